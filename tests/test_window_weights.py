"""Merge weights shaped like a learning-rate decay over a window (WSM), against a brute-force reference: a run's
per-step updates decayed by the schedule, step by step, in plain Python floats."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import RUNS
from helpers import assert_refused, run_cli, write_run
from safetensors.torch import load_file

import ckpt_ema
import ckpt_ema.api
from ckpt_ema.errors import OptionError
from ckpt_ema.follow.state import StateFolder, state_folder_of
from ckpt_ema.follow.watch import Watcher
from ckpt_ema.pipeline import Target
from ckpt_ema.window_weights import token_window, window_weighting

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


def coefficients(steps: list[int], shape: str, window: int) -> list[float]:
    """The brute-force merge weights: the mean decay factor over each interval, step by step; for ``uniform`` the
    plain mean of the checkpoints inside the window."""
    end = steps[-1]
    if shape == "uniform":
        inside = [s >= end - window for s in steps]
        return [x / sum(inside) for x in inside]
    first = max(i for i, s in enumerate(steps) if s <= end - window) if steps[0] <= end - window else 0
    w = [sum(lr_factor(shape, s, end, window) for s in range(a + 1, b + 1)) / (b - a)
         for a, b in zip(steps[first:], steps[first + 1:])]
    return [0.0] * first + [1 - w[0], *[x - y for x, y in zip(w, [*w[1:], 0.0])]]


def merged(states: list[dict[str, torch.Tensor]], coef: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(c * st[k].double() for c, st in zip(coef, states)) for k in states[0] if states[0][k].is_floating_point()}


def reference_merge(run: Path, steps: list[int], shape: str, window: int) -> dict[str, torch.Tensor]:
    """The float64 merge of the saved tensors with the brute-force weights (torch.load reads them)."""
    return merged([torch.load(run / f"ckpt_{s}.pt", weights_only=True) for s in steps], coefficients(steps, shape, window))


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
def test_the_dry_run_shows_the_weights_and_the_cli_refuses_what_does_not_fit(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0, 10, 20, 30])

    def cli(*args: object):  # noqa: ANN202 - a click Result
        return run_cli("average", tmp_path / "run", *args)

    dry = cli("--weights", "1-sqrt", "--window-steps", "20", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    weights = window_weighting([0, 10, 20, 30], "1-sqrt", 20).weights
    assert [float(line.split()[2]) for line in dry.stdout.splitlines()[1:5]] == pytest.approx(weights, rel=1e-3)
    tokens = cli("--weights", "cosine", "--window-tokens", "2e3", "--tokens-per-step", "1e2", "--dry-run")
    assert tokens.exit_code == 0 and "over the newest 2000 tokens" in tokens.stdout, tokens.output  # 8e9 as typed
    for args, said in [(["--weights", "cosine"], "--weights cosine merges a window: give --window-steps"),
                       (["--window-tokens", "100"], "records no count of the tokens trained on"),
                       (["--window-tokens", "2.5", "--tokens-per-step", "1"], "'2.5' is not a whole number"),
                       (["--weights", "cosine", "--window-steps", "5", "--warmup"], "cannot go with it"),
                       (["--window-steps", "0"], "--window-steps must be a whole number >= 1")]:
        done = cli(*args, "-o", tmp_path / "x.safetensors")
        assert done.exit_code == 2 and said in done.stderr and "Traceback" not in done.output, (args, done.stderr)
    with pytest.raises(OptionError):
        ckpt_ema.AverageOptions.build(weights="cosine", window_steps=10, last=3)


# ------------------------------------------------------------------------------------------------ windows in tokens

OLMO_STEPS = [0, 2, 4]  # 32 tokens per step: OLMo-core records global_train_tokens_seen = 32 * step


def brute_force_token_window(checkpoints: list[int], batches: list[int], first_tokens: int, window_tokens: int) -> int:
    """The steps that trained the newest ``window_tokens`` tokens, counted step by step: step s trains batches[j]
    tokens when s lies in the j-th interval between checkpoints (before the first: the first interval's batch);
    the window begins at the newest step at which at most tokens[-1] - window_tokens had been seen."""
    def batch(s: int) -> int:
        return next((b for c, b in zip(checkpoints[1:], batches) if s <= c), batches[-1])

    seen = {checkpoints[0]: first_tokens}
    for s in range(checkpoints[0] + 1, checkpoints[-1] + 1):
        seen[s] = seen[s - 1] + batch(s)
    start, s = seen[checkpoints[-1]] - window_tokens, checkpoints[-1]
    while seen.get(s, -1) > start:
        if s - 1 not in seen:
            seen[s - 1] = seen[s] - batch(s)
        s -= 1
    return checkpoints[-1] - s


def test_a_window_in_tokens_is_the_steps_that_trained_them() -> None:
    """Batch sizes that change at checkpoints (a ramp), windows inside the run and reaching before it."""
    rng = random.Random(3)
    for _ in range(200):
        checkpoints = sorted(rng.sample(range(1, 300), rng.randint(1, 8)))
        batches = sorted(rng.randint(1, 64) for _ in checkpoints[1:]) or [rng.randint(1, 64)]
        first = rng.randint(0, 5000)
        tokens = [first]
        for a, b, batch in zip(checkpoints, checkpoints[1:], batches):
            tokens.append(tokens[-1] + (b - a) * batch)
        for t in [1, rng.randint(1, tokens[-1] - first + 1), rng.randint(1, 3 * (tokens[-1] - first + 64))]:
            want = brute_force_token_window(checkpoints, batches, first, t) if len(checkpoints) > 1 else 1
            assert token_window(checkpoints, tokens, t) == want, (checkpoints, tokens, t)


def test_at_a_constant_rate_the_records_give_what_tokens_per_step_gives() -> None:
    steps = [0, 10, 25, 40]
    for t in [1, 99, 100, 101, 1234, 4000, 9999]:
        assert token_window(steps, [100 * s + 7 for s in steps], t) == -(-t // 100)


@pytest.fixture(scope="module")
def olmo_unpacked() -> Path:
    """The OLMo-core run of the fixture table (``run/``, written by ai2-olmo-core 3.0.0 itself) with
    ``reference/stepN.safetensors``, what OLMo-core's own loader loads."""
    return RUNS["olmo_core"].folder.parent


@pytest.fixture
def olmo_run(olmo_unpacked: Path, tmp_path: Path) -> Path:
    """A copy of the run, for a test to change."""
    return Path(shutil.copytree(olmo_unpacked / "run", tmp_path / "run"))


def olmo_reference(unpacked: Path, steps: list[int], coef: list[float]) -> dict[str, torch.Tensor]:
    return merged([load_file(unpacked / "reference" / f"step{s}.safetensors") for s in steps], coef)


def record_tokens(run: Path, step: int, tokens: int) -> None:
    """Make the trainer state of ``stepN`` record ``tokens`` (what OLMo-core saves after a larger batch)."""
    state_file = run / f"step{step}" / "train" / "rank0.pt"
    state = torch.load(state_file, weights_only=False)
    state["global_train_tokens_seen"] = tokens
    torch.save(state, state_file)


@pytest.mark.parametrize("shape", ["cosine", "1-sqrt", "uniform"])
@pytest.mark.parametrize("window_tokens", [64, 70, 500])
def test_a_window_in_tokens_reads_the_counts_olmo_core_records(olmo_unpacked: Path, tmp_path: Path, shape: str,
                                                               window_tokens: int) -> None:
    out = tmp_path / "merge.safetensors"
    done = ckpt_ema.average(olmo_unpacked / "run", out, weights=shape, window_tokens=window_tokens)
    assert done is not None
    window = brute_force_token_window(OLMO_STEPS, [32, 32], 0, window_tokens)
    assert window == -(-window_tokens // 32)
    assert_close(load_file(out), olmo_reference(olmo_unpacked, OLMO_STEPS, coefficients(OLMO_STEPS, shape, window)))
    given = ckpt_ema.plan(olmo_unpacked / "run", weights=shape, window_tokens=window_tokens, tokens_per_step=32)
    assert given.weighting.weights == done.plan.weighting.weights and not given.tokens_per_step_warnings()


def test_a_batch_size_ramp_is_followed_and_the_dry_run_says_how_the_window_was_placed(olmo_unpacked: Path,
                                                                                     olmo_run: Path) -> None:
    record_tokens(olmo_run, 4, 64 + 2 * 48)  # 48 tokens per step after step 2
    window = brute_force_token_window(OLMO_STEPS, [32, 48], 0, 100)
    assert window == 3
    plan = ckpt_ema.plan(olmo_run, weights="cosine", window_tokens=100)
    assert plan.weighting.weights == pytest.approx(coefficients(OLMO_STEPS, "cosine", window), abs=1e-12)
    dry = run_cli("average", olmo_run, "--weights", "cosine", "--window-tokens", "100", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert ("a cosine merge over the newest 100 tokens: 3 steps by the token counts the checkpoints record (steps "
            "1..4)") in dry.stdout


def test_appends_and_the_watcher_keep_each_checkpoints_count(olmo_unpacked: Path, olmo_run: Path,
                                                             tmp_path: Path) -> None:
    """The state records each checkpoint's tokens: an append, and a watcher naming only the new checkpoint (the
    ones before read again from their paths, their counts from the state), place the window as a full run does."""
    record_tokens(olmo_run, 4, 64 + 2 * 48)
    shutil.move(olmo_run / "step4", tmp_path / "step4")
    out = tmp_path / "merge.safetensors"
    assert ckpt_ema.average(olmo_run, out, weights="1-sqrt", window_tokens=100) is not None
    shutil.move(tmp_path / "step4", olmo_run / "step4")
    done = ckpt_ema.average(olmo_run, out, weights="1-sqrt", window_tokens=100)
    assert done is not None and done.note is not None and done.note.startswith("appended 1 new checkpoint"), done.note
    want = olmo_reference(olmo_unpacked, OLMO_STEPS, coefficients(OLMO_STEPS, "1-sqrt", 3))
    assert_close(load_file(out), want)
    manifest = json.loads((state_folder_of(out) / "manifest.json").read_text())
    assert [r["tokens"] for r in manifest["inputs"]] == [0, 64, 160]

    watched = tmp_path / "watched.safetensors"
    shutil.move(olmo_run / "step4", tmp_path / "step4")
    target = [Target("average", ckpt_ema.api.resolve_options(None, dict(weights="1-sqrt", window_tokens=100)),
                     watched)]
    w = Watcher([olmo_run], target, StateFolder(state_folder_of(watched)), on_note=lambda _: None)
    w.step()
    shutil.move(tmp_path / "step4", olmo_run / "step4")
    w.step()
    assert w.last is not None and w.last.action == "appended" and [s.path.name for s in w.last.new] == ["step4"]
    assert_close(load_file(watched), want)


def test_a_manifest_without_token_counts_still_reads(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0, 10, 20])
    out = tmp_path / "ema.safetensors"
    assert ckpt_ema.average(tmp_path / "run", out, decay=0.9) is not None
    manifest_file = state_folder_of(out) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert [r["tokens"] for r in manifest["inputs"]] == [None, None, None]
    for r in manifest["inputs"]:
        del r["tokens"]  # as written before the field was added
    manifest_file.write_text(json.dumps(manifest))
    write_run(tmp_path / "run", [30])
    done = ckpt_ema.average(tmp_path / "run", out, decay=0.9)
    assert done is not None and done.note is not None and done.note.startswith("appended 1 new checkpoint"), done.note


def test_a_sweep_compares_windows_in_tokens_read_from_the_checkpoints(olmo_unpacked: Path, tmp_path: Path) -> None:
    result = ckpt_ema.sweep(olmo_unpacked / "run", tmp_path / "sweep", shapes=["cosine", "linear"],
                            token_windows=[40, 100], plot=False)
    assert result is not None
    assert [c.name for c in result.candidates] == ["cosine-40tokens", "cosine-100tokens", "linear-40tokens",
                                                   "linear-100tokens"]
    for c in result.candidates:
        shape, tokens = c.name.split("-")
        window = brute_force_token_window(OLMO_STEPS, [32, 32], 0, int(tokens.removesuffix("tokens")))
        assert c.output is not None
        assert_close(load_file(c.output), olmo_reference(olmo_unpacked, OLMO_STEPS,
                                                         coefficients(OLMO_STEPS, shape, window)))
    assert "the newest 100 tokens: 4 steps by the token counts the checkpoints record" in result.table()


def test_a_checkpoint_without_a_count_is_named_with_the_cure(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0, 10, 20])
    assert_refused([tmp_path / "run", "--window-tokens", "100"], str(tmp_path / "run" / "ckpt_0.pt"),
                   "records no count of the tokens trained on", "give --tokens-per-step", out=tmp_path / "m.safetensors")


def test_counts_that_go_backwards_are_refused(olmo_run: Path, tmp_path: Path) -> None:
    record_tokens(olmo_run, 4, 50)
    assert_refused([olmo_run, "--weights", "cosine", "--window-tokens", "64"], str(olmo_run / "step4"),
                   "records 50 tokens trained on at step 4, not more than the 64 of", str(olmo_run / "step2"),
                   out=tmp_path / "m.safetensors")


def test_tokens_per_step_that_the_records_contradict_is_used_and_said(olmo_run: Path, tmp_path: Path) -> None:
    done = run_cli("average", olmo_run, "--weights", "cosine", "--window-tokens", "64", "--tokens-per-step", "16",
                   "-o", tmp_path / "m.safetensors")
    assert done.exit_code == 0, done.output
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: --tokens-per-step")]
    assert warned == [f"warning: --tokens-per-step 16 is not what the checkpoints record: 64 tokens over the 2 steps "
                      f"from {olmo_run / 'step0'} to {olmo_run / 'step2'} (32 per step); the window is taken at 16 "
                      "per step as asked (leave --tokens-per-step out to use the records)"]
    plan = ckpt_ema.plan(olmo_run, weights="cosine", window_tokens=64, tokens_per_step=16)
    assert plan.window == 4


def train_with_hugging_face(folder: Path, count_tokens: bool) -> Path:
    """A tiny Llama trained 6 steps by transformers' own Trainer (2 sequences of 8 tokens a step), saved every 2,
    counting its input tokens or not (then trainer_state.json says 0)."""
    from checkpoints import tiny_llama_config
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(2, 64, (64, 8))]
    args = TrainingArguments(str(folder), max_steps=6, save_steps=2, per_device_train_batch_size=2, use_cpu=True,
                             include_num_input_tokens_seen=count_tokens, report_to=[], disable_tqdm=True)
    Trainer(LlamaForCausalLM(tiny_llama_config()), args=args, train_dataset=data).train()
    return folder


@pytest.mark.slow
def test_a_hugging_face_trainer_run_gives_its_counted_tokens(tmp_path: Path) -> None:
    run = train_with_hugging_face(tmp_path / "counted", count_tokens=True)
    plan = ckpt_ema.plan(run, weights="cosine", window_tokens=40)
    assert [(s.step, s.tokens) for s in plan.sources] == [(2, 32), (4, 64), (6, 96)]
    window = brute_force_token_window([2, 4, 6], [16, 16], 32, 40)
    assert plan.window == window == 3
    assert plan.weighting.weights == pytest.approx(coefficients([2, 4, 6], "cosine", window), abs=1e-12)
    run = train_with_hugging_face(tmp_path / "uncounted", count_tokens=False)
    assert_refused([run, "--window-tokens", "40"], f"{run / 'checkpoint-2'}: records no count of the tokens",
                   out=tmp_path / "m.safetensors")
