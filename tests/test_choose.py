"""Choosing the average for any model (issue 15): the power-function EMA, the unresolved share, and ``sweep
--eval-cmd``.

* ``--sigma-rel``: gamma is EDM2's (numpy's roots of their cubic); the weights equal EDM2's per-step recurrence
  beta(t) = (1 - 1/t)^(gamma+1) run over the weights guessed between checkpoints (a plain float64 loop over every
  step), for sparse and irregular checkpoints, a first checkpoint after step 1, step 0, and runs long enough for the
  closed form's Euler-Maclaurin part; per-step checkpoints of a real training run give the recurrence itself.
* The unresolved share equals a plain loop over the per-step profile, for timm's EMA (warmup, update_after_step,
  bias correction) and the power EMA; it is 0 for per-step checkpoints and uniform means; --dry-run, the summary
  and the metadata show it, and a warning line comes when it is poor.
* ``sweep --eval-cmd``: every candidate and the final model (its weights written as .safetensors) are scored by a
  real command; the table, the choice and best.safetensors agree with an independent rescoring; the final model
  can win (nothing copied, exit 0); a failing command stops with one line.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.cli import main
from ckpt_ema.weighting import (SIGMA_REL_MAX, DecaySchedule, ema_unresolved, ema_unresolved_continued, gamma_of,
                                power_continuation, power_weighting, sigma_rel_of)
from helpers import (edm2_gamma, max_abs_diff, per_step_profile, power_reference, power_weights,
                     train_and_checkpoint, unresolved_reference, write_run)


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


# ------------------------------------------------------------------------------------------- the power EMA

SIGMAS = [0.01, 0.05, 0.1, 0.2, SIGMA_REL_MAX]


@pytest.mark.parametrize("sigma_rel", [1e-4, *SIGMAS])
def test_gamma_is_edm2s_largest_root(sigma_rel: float) -> None:
    gamma = gamma_of(sigma_rel)
    assert gamma == pytest.approx(edm2_gamma(sigma_rel), rel=1e-12, abs=1e-12)
    assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-14)


@pytest.mark.parametrize("sigma_rel", [0, -0.1, 0.29, math.nan])
def test_a_sigma_rel_without_a_power_profile_is_refused(sigma_rel: float) -> None:
    with pytest.raises(ckpt_ema.errors.OptionError, match="sigma_rel must be in"):
        gamma_of(sigma_rel)


STEP_LISTS = [
    [1, 2, 3, 4, 5],  # every step: the recurrence itself
    [0, 1, 2, 3, 4],  # with the initial weights
    [0, 10, 20, 30, 100],
    [7, 9, 50, 51, 200],  # the first checkpoint stands for steps 1..7
    [25],
    [0, 4095, 4096, 4300, 9000],  # across the switch to Euler-Maclaurin (step 4096)
    [3000, 9001],
]


@pytest.mark.parametrize("interpolate", ["linear", "step"])
@pytest.mark.parametrize("steps", STEP_LISTS, ids=lambda s: f"{len(s)}ckpts-to-{s[-1]}")
def test_power_weights_equal_edm2s_recurrence_over_every_step(steps: list[int], interpolate: str) -> None:
    for sigma_rel in SIGMAS if steps[-1] <= 1000 else [0.01, 0.2]:  # the reference walks every step
        got = power_weighting(steps, sigma_rel, interpolate).weights
        want = power_weights(steps, sigma_rel, interpolate)
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-12, (sigma_rel, got, want)
        assert sum(got) == pytest.approx(1.0, abs=1e-12)


def test_power_weights_of_random_irregular_checkpoints() -> None:
    rng = random.Random(15)
    for _ in range(12):
        steps = sorted(rng.sample(range(0, 600), rng.randint(1, 9)))
        sigma_rel = rng.choice(SIGMAS)
        interpolate = rng.choice(["linear", "step"])
        got = power_weighting(steps, sigma_rel, interpolate).weights
        want = power_weights(steps, sigma_rel, interpolate)
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-12, (steps, sigma_rel, interpolate)


def test_a_billion_steps_are_computed_in_closed_form() -> None:
    """The closed form does not walk the steps. The power profile is scale-free: under ``step`` checkpoints every
    1e7 steps weigh exactly what checkpoints every 1e4 steps do, P(b) - P(a); under ``linear`` up to the
    discreteness of steps, which shrinks as 1 / spacing."""
    def weights(spacing: int, interpolate: str) -> tuple[float, ...]:
        return power_weighting([i * spacing for i in range(101)], 0.05, interpolate).weights

    billion = weights(10**7, "linear")
    assert sum(billion) == pytest.approx(1.0, abs=1e-12)
    gaps = [max(abs(a - b) for a, b in zip(billion, weights(10**k, "linear"))) for k in (4, 5)]
    assert gaps[0] < 1e-5 and 8 < gaps[0] / gaps[1] < 12, gaps
    assert weights(10**7, "step") == pytest.approx(weights(10**4, "step"), abs=1e-14)
    late = power_weighting([0, 10**9 - 3, 10**9], 0.05).weights  # a short interval at the end of a long run
    # each of the 3 steps weighs about (gamma+1)/T, and linear gives the newest 1/3 + 2/3 + 3/3 of them
    assert late[2] == pytest.approx(2 * (gamma_of(0.05) + 1) / 10**9, rel=1e-6)


@pytest.mark.parametrize("interpolate", ["linear", "step"])
def test_power_average_of_real_checkpoints_equals_the_recurrence(tmp_path: Path, interpolate: str) -> None:
    """A real training run saved every step (and at step 0): --sigma-rel is EDM2's recurrence run online; every
    third checkpoint: the recurrence over the guessed weights."""
    train_and_checkpoint(tmp_path / "run", {"decay": 0.9}, save_initial=True, steps=24)
    saved = {s: torch.load(tmp_path / "run" / f"step_{s}.pt")["state_dict"] for s in range(25)}
    for kept in (list(range(25)), list(range(0, 25, 3))):
        files = [tmp_path / "run" / f"step_{s}.pt" for s in kept]
        result = ckpt_ema.average(files, sigma_rel=0.1, interpolate=interpolate, accum_dtype="float64")
        want = power_reference({s: saved[s] for s in kept}, 0.1, interpolate)
        for name, tensor in want.items():
            assert max_abs_diff(result.state_dict[name], tensor) <= 1e-6, (kept, name)
        assert result.plan.weighting.weights == pytest.approx(power_weights(kept, 0.1, interpolate), abs=1e-12)


# ------------------------------------------------------------------------------------------- the unresolved share

SCHEDULES = [
    (DecaySchedule(0.99), False),
    (DecaySchedule(0.9), True),
    (DecaySchedule(0.0), False),
    (DecaySchedule(0.99, update_after_step=30), True),
    (DecaySchedule(0.99, update_after_step=30), False),
    (DecaySchedule(0.995, warmup=True), False),
    (DecaySchedule(0.9, warmup=True, min_decay=0.5), True),
    (DecaySchedule(0.99, warmup=True, update_after_step=20), False),
]
SPARSE = [[0, 10, 20, 30, 400], [7, 100, 200, 201, 800], [0, 500], [40], list(range(1, 60)), [3, 64, 130, 777]]


@pytest.mark.parametrize("schedule,bias_correction", SCHEDULES, ids=str)
def test_ema_unresolved_share_equals_a_loop_over_every_step(schedule: DecaySchedule, bias_correction: bool) -> None:
    for steps in SPARSE:
        decays = [schedule.decay_at(s, bias_correction) for s in range(1, steps[-1] + 1)]
        want = unresolved_reference(per_step_profile(decays), steps)
        got = ckpt_ema.weighting.ema_weighting(steps, schedule, bias_correction).unresolved
        assert got == pytest.approx(want, abs=1e-12), steps
        assert ema_unresolved(steps, schedule, bias_correction) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("schedule,bias_correction", SCHEDULES, ids=str)
def test_ema_unresolved_share_continues_over_appended_checkpoints(schedule: DecaySchedule,
                                                                  bias_correction: bool) -> None:
    """An append computes U from the earlier U and the new checkpoints alone: equal to U of the whole run."""
    for steps in [s for s in SPARSE if len(s) > 1] + [[5, 90_000, 90_001, 2_000_000]]:
        for cut in range(1, len(steps)):
            before = ema_unresolved(steps[:cut], schedule, bias_correction)
            got = ema_unresolved_continued(before, steps[cut - 1], steps[cut:], schedule, bias_correction)
            assert got == pytest.approx(ema_unresolved(steps, schedule, bias_correction), rel=1e-9, abs=1e-13), \
                (steps, cut)


@pytest.mark.parametrize("sigma_rel", SIGMAS)
@pytest.mark.parametrize("interpolate", ["linear", "step"])
def test_power_ema_continues_over_appended_checkpoints(sigma_rel: float, interpolate: str) -> None:
    """An append weighs the earlier mean by ``prior`` and the new checkpoints as the whole run does: the final
    weights and U equal the whole run's, wherever the run is cut (an append's cost is the new intervals')."""
    for steps in [s for s in SPARSE if len(s) > 1] + [[0, 4095, 4096, 4300, 9000], [5, 90_000, 90_001, 10**9]]:
        for cut in range(1, len(steps)):
            before = power_weighting(steps[:cut], sigma_rel, interpolate)
            w = power_continuation(steps[cut:], sigma_rel, interpolate, steps[cut - 1], before.unresolved)
            weights = [x * w.prior for x in before.weights]
            weights[-1] += w.weights[0]
            weights += w.weights[1:]
            whole = power_weighting(steps, sigma_rel, interpolate)
            assert weights == pytest.approx(whole.weights, rel=1e-9, abs=1e-13), (steps, cut)
            assert w.unresolved == pytest.approx(whole.unresolved, rel=1e-9, abs=1e-13), (steps, cut)


@pytest.mark.parametrize("sigma_rel", SIGMAS)
def test_power_unresolved_share_equals_a_loop_over_every_step(sigma_rel: float) -> None:
    gamma = edm2_gamma(sigma_rel)
    for steps in [*SPARSE, [0, 4095, 4096, 4300, 9000]]:
        betas = [(1 - 1 / t) ** (gamma + 1) for t in range(1, steps[-1] + 1)]
        want = unresolved_reference(per_step_profile(betas), steps)
        assert power_weighting(steps, sigma_rel).unresolved == pytest.approx(want, abs=1e-12), steps


def test_unresolved_is_nothing_for_per_step_checkpoints_and_grows_with_the_spacing() -> None:
    schedule = DecaySchedule(0.5 ** (1 / 254))  # the seed's half-life at its last step
    shares = [ema_unresolved(list(range(0, 7041, every)), schedule) for every in (1, 10, 100, 700)]
    assert shares[0] == pytest.approx(0.0, abs=1e-12)
    assert shares == sorted(shares)
    # a geometric profile against its mean within an interval: c/8 for small c = spacing * ln 2 / half-life
    assert shares[1] == pytest.approx(10 * math.log(2) / 254 / 8, rel=0.02)
    assert power_weighting(list(range(1, 500)), 0.05).unresolved == pytest.approx(0.0, abs=1e-12)
    assert ckpt_ema.weighting.uniform_weighting([10, 20, 30], 2).unresolved == 0.0


def test_dry_run_summary_and_metadata_show_the_unresolved_share_and_warn(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0, 100, 200, 300, 400])
    fine = ok(cli("average", tmp_path / "run", "--half-life", "100", "--dry-run"))
    poor = ok(cli("average", tmp_path / "run", "--decay", "0.97", "--dry-run"))
    start = ok(cli("average", tmp_path / "run", "--decay", "0.999", "--dry-run"))  # mostly timm's copy at step 1
    shares = [ema_unresolved([0, 100, 200, 300, 400], schedule)
              for schedule in (DecaySchedule.from_half_life(100), DecaySchedule(0.97), DecaySchedule(0.999))]
    for res, share in zip((fine, poor, start), shares):
        assert f"unresolved {100 * share:.2g}%" in res.stdout, res.stdout
    assert shares[0] < 0.2 < shares[1] and shares[2] > 0.2
    assert "warning:" not in fine.stderr and "too far apart" not in start.stderr
    assert "warning: the first checkpoint" in start.stderr  # step 0 keeps most of the weight (test_traps)
    warnings = [line for line in poor.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "too far apart" in warnings[0], poor.stderr

    # One checkpoint: no average at all, said as that, not as checkpoints too far apart.
    for command in (["average"], ["sweep", "--decay", "0.97", "0.9", "--no-plot", "-o", tmp_path / "one-sweep"]):
        one = ok(cli(*command, tmp_path / "run" / "ckpt_400.pt", *([] if command[0] == "sweep" else ["--dry-run"])))
        warnings = [line for line in one.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and warnings[0].startswith("warning: only one checkpoint"), one.stderr

    out = tmp_path / "power.safetensors"
    res = ok(cli("average", tmp_path / "run", "--sigma-rel", "0.2", "-o", out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    want = power_weighting([0, 100, 200, 300, 400], 0.2)
    assert float(meta["ckpt_ema_unresolved"]) == pytest.approx(want.unresolved, rel=1e-5)
    assert json.loads(meta["ckpt_ema_options"])["sigma_rel"] == 0.2
    assert [i["weight"] for i in json.loads(meta["ckpt_ema_inputs"])] == pytest.approx(want.weights, abs=1e-12)
    assert f"unresolved {100 * want.unresolved:.2g}%" in res.stderr, res.stderr


@pytest.mark.parametrize("extra", [["--decay", "0.9"], ["--last", "2"], ["--warmup"], ["--bias-correction"]])
def test_sigma_rel_with_timms_options_is_one_line_error(tmp_path: Path, extra: list[str]) -> None:
    write_run(tmp_path / "run", [1, 2, 3])
    res = cli("average", tmp_path / "run", "--sigma-rel", "0.1", *extra, "--dry-run")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "ckpt-ema: error:" in res.output, res.output
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- sweep --eval-cmd

# The user's evaluation, as a user would write it: load the weights file, score it on held-out data, print one
# line. numpy only, so that each run starts in a fraction of a second.
EVAL_SCRIPT = '''
import json, sys
import numpy as np
from safetensors.numpy import load_file
w = load_file(sys.argv[1])
target = np.load(sys.argv[2])
distance = float(np.abs(w["layer.weight"].astype(np.float64) - target).sum())
print("a line of progress")
print(json.dumps({"distance": distance, "bias_sum": float(w["layer.bias"].astype(np.float64).sum())}))
'''


def evaluation(tmp_path: Path, target: torch.Tensor) -> str:
    script = tmp_path / "my_eval.py"
    script.write_text(EVAL_SCRIPT)
    import numpy as np

    np.save(tmp_path / "target.npy", target.double().numpy())
    return f"{sys.executable} {script} {{weights}} {tmp_path / 'target.npy'}"


@pytest.fixture()
def run_folder(tmp_path: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    return tmp_path / "run", write_run(tmp_path / "run", [10, 20, 30, 40, 50, 60])


def distance(path: Path, target: torch.Tensor) -> float:
    return (load_file(str(path))["layer.weight"].double() - target.double()).abs().sum().item()


@pytest.mark.slow
def test_eval_cmd_scores_every_candidate_and_the_final_model_and_copies_the_best(run_folder, tmp_path: Path) -> None:
    folder, saved = run_folder
    # the target is the mean of the three newest checkpoints: last-3 is the answer; the final model is not
    target = sum(saved[s]["layer.weight"].double() for s in (40, 50, 60)) / 3
    out = tmp_path / "sweep"
    res = ok(cli("sweep", folder, "--decay", "0.5", "0.9", "--sigma-rel", "0.1", "--last", "1", "3",
                 "--eval-cmd", evaluation(tmp_path, target), "--minimize", "-o", out))
    names = ["ema-0.5", "ema-0.9", "power-0.1", "last-1", "last-3"]
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert list(rows) == [*names, "final"], res.stdout
    header = res.stdout.splitlines()[0].split()
    assert header[4:6] == ["distance", "bias_sum"], header  # the ranking score first, then in the scorer's order
    for name in names:  # each printed score is the distance of that candidate's file, rescored here
        assert float(rows[name].split()[4]) == pytest.approx(distance(out / f"{name}.safetensors", target), rel=1e-5)
    assert "<- best on distance" in rows["last-3"]
    assert (out / "best.safetensors").read_bytes() == (out / "last-3.safetensors").read_bytes()
    # the final model is scored as a .safetensors of the newest checkpoint's weights
    final = load_file(str(out / "final-model.safetensors"))
    for name, tensor in saved[60].items():
        assert torch.equal(final[name], tensor), name
    assert float(rows["final"].split()[2]) == pytest.approx(distance(out / "final-model.safetensors", target), rel=1e-5)
    assert "best on distance: last-3" in res.stderr
    assert (out / "scores.png").exists() and (out / "weights.png").exists()


def test_the_final_model_can_be_the_answer(run_folder, tmp_path: Path) -> None:
    folder, saved = run_folder
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "best.safetensors").write_bytes(b"an earlier sweep's choice")
    command = evaluation(tmp_path, saved[60]["layer.weight"])  # nothing is closer to the final weights than they
    res = ok(cli("sweep", folder, "--decay", "0.9", "--last", "2", "--eval-cmd", command, "--minimize",
                 "-o", out, "--no-plot"))
    assert "the final model is best on distance" in res.stderr and "no average is copied" in res.stderr
    assert not (out / "best.safetensors").exists()
    assert "<- best" not in res.stdout
    # --maximize (the default) with the same command picks the farthest average instead
    res = ok(cli("sweep", folder, "--decay", "0.9", "--last", "2", "--eval-cmd", command, "-o", out, "--no-plot"))
    assert (out / "best.safetensors").exists() and "best on distance:" in res.stderr


def test_a_bare_number_is_the_score(run_folder, tmp_path: Path) -> None:
    folder, _ = run_folder
    script = tmp_path / "size.py"
    script.write_text("import os, sys\nprint('loading')\nprint(os.path.getsize(sys.argv[1]) % 7 + 0.5)\n")
    res = ok(cli("sweep", folder, "--decay", "0.9", "--last", "2", "--eval-cmd", f"{sys.executable} {script} {{weights}}",
                 "-o", tmp_path / "sweep", "--no-plot"))
    assert res.stdout.splitlines()[0].split()[4] == "score"


@pytest.mark.parametrize("body,problem", [
    ("import sys\nprint('half way', file=sys.stderr)\nraise SystemExit('out of memory on the eval set')\n",
     "exited with 1 on this file: half way | out of memory on the eval set"),
    ("print('accuracy: high')\n", "last line is neither a number nor a JSON object"),
    ("pass\n", "printed nothing on stdout"),
    ("print('nan')\n", "not a finite number"),
])
def test_a_failing_command_stops_with_one_line_naming_the_candidate(run_folder, tmp_path: Path, body: str,
                                                                    problem: str) -> None:
    folder, _ = run_folder
    script = tmp_path / "bad_eval.py"
    script.write_text(body)
    res = cli("sweep", folder, "--decay", "0.9", "--eval-cmd", f"{sys.executable} {script} {{weights}}",
              "-o", tmp_path / "sweep", "--no-plot")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt-ema: error: "), res.output
    assert "ema-0.9.safetensors" in lines[0] and problem in lines[0], lines[0]


def test_an_eval_cmd_without_the_placeholder_is_refused_before_reading(run_folder, tmp_path: Path) -> None:
    folder, _ = run_folder
    res = cli("sweep", folder, "--decay", "0.9", "--eval-cmd", "python my_eval.py", "-o", tmp_path / "sweep")
    assert res.exit_code == 2 and "--eval-cmd must contain {weights}" in res.output
    assert not (tmp_path / "sweep").exists()


def test_the_api_takes_any_function_from_a_path_to_scores(run_folder, tmp_path: Path) -> None:
    folder, saved = run_folder
    target = saved[50]["layer.weight"]
    seen: list[str] = []

    def closeness(path: Path) -> dict[str, float]:
        seen.append(path.name)
        return {"closeness": -distance(path, target), "size": float(path.stat().st_size)}

    import ckpt_ema.sweeping  # noqa: F401 - the module is sweeping, so ckpt_ema.sweep stays the function

    result = ckpt_ema.sweep(folder, tmp_path / "sweep", decays=[0.5, 0.9], lasts=[1, 2], sigma_rels=[0.05], score=closeness,
                   plot=False)
    assert seen == ["ema-0.5.safetensors", "ema-0.9.safetensors", "power-0.05.safetensors", "last-1.safetensors",
                    "last-2.safetensors", "final-model.safetensors"]
    assert result.ranked_by == "closeness"
    best = max(result.scores, key=lambda name: result.scores[name]["closeness"])
    assert result.best == best and result.scores[best]["closeness"] > result.final_scores["closeness"]
    assert result.final_scores["closeness"] == pytest.approx(-distance(result.final_output, target))
    assert (tmp_path / "sweep" / "best.safetensors").read_bytes() == (tmp_path / "sweep" / f"{best}.safetensors").read_bytes()


def test_a_sharded_output_is_scored_through_its_index(tmp_path: Path) -> None:
    """A model over --max-shard-size (and any output under torchrun) is written as shards: the command is given
    the index json, and a sharded best is named, not copied."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20, 30):
        torch.save({"a": torch.randn(100, 100), "b": torch.randn(100, 100), "step": step}, run / f"ckpt_{step}.pt")
    script = tmp_path / "name_length.py"
    script.write_text("import sys\nassert sys.argv[1].endswith('.safetensors.index.json'), sys.argv[1]\n"
                      "print(len(sys.argv[1].rsplit('/', 1)[-1]))\n")
    out = tmp_path / "sweep"
    res = ok(cli("sweep", run, "--decay", "0.5", "--last", "2", "--max-shard-size", "50KB", "--minimize",
                 "--eval-cmd", f"{sys.executable} {script} {{weights}}", "-o", out, "--no-plot"))
    assert "<- best on score" in [line for line in res.stdout.splitlines() if line.startswith("last-2")][0]
    assert f"last-2 is sharded: it stays {out / 'last-2.safetensors.index.json'}" in res.stderr, res.stderr
    assert not (out / "best.safetensors").exists()
