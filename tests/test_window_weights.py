"""Merge weights shaped like a learning-rate decay over a window (WSM), against a brute-force reference: a run's
per-step updates decayed by the schedule, step by step, in plain Python floats."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_run
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.errors import OptionError
from ckpt_ema.window_weights import window_weighting

DECAYS = {"linear": lambda x: 1 - x, "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
          "1-sqrt": lambda x: 1 - math.sqrt(x)}


def lr_factor(shape: str, s: int, end: int, window: int) -> float:
    """phi(s): the decayed run's learning-rate factor at step s, 1 before the window."""
    return DECAYS[shape](min(max((s - (end - window)) / window, 0.0), 1.0))


def decayed_run(updates: list[float], steps: list[int], shape: str, window: int) -> float:
    """The model a decayed run ends at, as a merge can stand for it: from the checkpoint the window begins at,
    each update weighed by the mean of phi over the steps between the two checkpoints around it."""
    end = steps[-1]
    first = max(i for i, s in enumerate(steps) if s <= end - window) if steps[0] <= end - window else 0
    theta = sum(updates[: steps[first] + 1])
    for a, b in zip(steps[first:], steps[first + 1:]):
        mean = sum(lr_factor(shape, s, end, window) for s in range(a + 1, b + 1)) / (b - a)
        theta += mean * sum(updates[a + 1: b + 1])
    return theta


@pytest.mark.parametrize("shape", sorted(DECAYS))
@pytest.mark.parametrize("window", [7, 40, 95, 500])
def test_the_merge_is_the_decayed_run(shape: str, window: int) -> None:
    rng = random.Random(window)
    updates = [rng.gauss(0, 1) for _ in range(201)]  # theta_s = sum of updates up to s
    steps = sorted(rng.sample(range(1, 200), 23)) + [200]
    weights = window_weighting(steps, shape, window).weights
    merged = sum(w * sum(updates[: s + 1]) for w, s in zip(weights, steps))
    assert merged == pytest.approx(decayed_run(updates, steps, shape, window), abs=1e-9)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12) and min(weights) >= -1e-15


@pytest.mark.parametrize("shape", sorted(DECAYS))
def test_with_a_checkpoint_every_step_the_merge_applies_the_decay_to_every_update(shape: str) -> None:
    rng = random.Random(1)
    updates = [rng.gauss(0, 1) for _ in range(101)]
    steps, window = list(range(101)), 60
    weights = window_weighting(steps, shape, window).weights
    merged = sum(w * sum(updates[: s + 1]) for w, s in zip(weights, steps))
    want = sum(updates[:41]) + sum(lr_factor(shape, s, 100, window) * updates[s] for s in range(41, 101))
    assert merged == pytest.approx(want, abs=1e-9)


def test_uniform_is_the_mean_of_the_checkpoints_inside_the_window() -> None:
    weights = window_weighting([10, 20, 30, 40, 50], "uniform", 20).weights
    assert weights == pytest.approx([0, 0, 1 / 3, 1 / 3, 1 / 3])


def reference_merge(run: Path, steps: list[int], shape: str, window: int) -> dict[str, torch.Tensor]:
    """The float64 merge of the saved tensors with the brute-force weights (torch.load reads them)."""
    end = steps[-1]
    first = max(i for i, s in enumerate(steps) if s <= end - window) if steps[0] <= end - window else 0
    w = [sum(lr_factor(shape, s, end, window) for s in range(a + 1, b + 1)) / (b - a)
         for a, b in zip(steps[first:], steps[first + 1:])]
    coef = [0.0] * first + [1 - w[0], *[x - y for x, y in zip(w, [*w[1:], 0.0])]]
    states = [torch.load(run / f"ckpt_{s}.pt", weights_only=True) for s in steps]
    return {k: sum(c * st[k].double() for c, st in zip(coef, states)) for k in states[0] if states[0][k].is_floating_point()}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for k, v in want.items():
        assert (got[k].double() - v).abs().max().item() < 1e-6, k


@pytest.mark.parametrize("shape", sorted(DECAYS))
def test_average_writes_the_merge_and_appends_to_it(tmp_path: Path, shape: str) -> None:
    run, out = tmp_path / "run", tmp_path / "merge.safetensors"
    steps = [0, 7, 19, 30, 44, 52, 61, 79, 90, 100]
    write_run(run, steps[:6])
    done = ckpt_ema.average(run, out, weights=shape, window_steps=35)
    assert done is not None
    assert_close(load_file(out), reference_merge(run, steps[:6], shape, 35))
    write_run(run, steps[6:])
    done = ckpt_ema.average(run, out, weights=shape, window_steps=35)
    assert done is not None and done.note is not None and done.note.startswith("appended 4 new checkpoints"), done.note
    assert_close(load_file(out), reference_merge(run, steps, shape, 35))
    (run / "ckpt_19.pt").unlink()  # outside the window now: not needed again
    write_run(run, [110])
    assert ckpt_ema.average(run, out, weights=shape, window_steps=35) is not None
    steps = [s for s in steps if s != 19] + [110]
    assert_close(load_file(out), reference_merge(run, steps, shape, 35))


def test_a_window_in_tokens_is_a_window_in_whole_steps(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0, 10, 20, 30, 40])
    by_tokens = ckpt_ema.average(tmp_path / "run", weights="cosine", window_tokens=2_500, tokens_per_step=100)
    by_steps = ckpt_ema.average(tmp_path / "run", weights="cosine", window_steps=25)
    assert by_tokens is not None and by_steps is not None
    assert by_tokens.plan.weighting.weights == by_steps.plan.weighting.weights


def test_a_sweep_compares_the_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    steps = [0, 5, 10, 20, 30, 40, 50, 60]
    write_run(run, steps)
    result = ckpt_ema.sweep(run, tmp_path / "sweep", shapes=["cosine", "1-sqrt"], windows=[20, 45], lasts=[3],
                            plot=False)
    assert result is not None
    names = [c.name for c in result.candidates]
    assert names == ["last-3", "cosine-20steps", "cosine-45steps", "1-sqrt-20steps", "1-sqrt-45steps"]
    for c in result.candidates[1:]:
        shape, window = c.name.rsplit("-", 1)
        assert_close(load_file(c.output), reference_merge(run, steps, shape, int(window.removesuffix("steps"))))


@pytest.mark.slow
@pytest.mark.slow
def test_the_dry_run_shows_the_weights_and_the_cli_refuses_what_does_not_fit(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0, 10, 20, 30])

    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckpt_ema", "average", tmp_path / "run", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    dry = cli("--weights", "1-sqrt", "--window-steps", "20", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    weights = window_weighting([0, 10, 20, 30], "1-sqrt", 20).weights
    assert [float(line.split()[2]) for line in dry.stdout.splitlines()[1:5]] == pytest.approx(weights, rel=1e-3)
    for args, said in [(["--weights", "cosine"], "--weights cosine merges a window: give --window-steps"),
                       (["--window-tokens", "100"], "--window-tokens needs --tokens-per-step"),
                       (["--weights", "cosine", "--window-steps", "5", "--warmup"], "cannot go with it"),
                       (["--window-steps", "0"], "--window-steps must be a whole number >= 1")]:
        done = cli(*args, "-o", tmp_path / "x.safetensors")
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    with pytest.raises(OptionError):
        ckpt_ema.AverageOptions.build(weights="cosine", window_steps=10, last=3)
