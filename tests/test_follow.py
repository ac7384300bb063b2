"""Appending to an average and following a run: the continuation's math, the engine's initial state, the state
kept beside the output and its commit protocol, and watching a trainer that writes in another process.

Every appended result is checked against a full rerun over the same checkpoints and against the independent
float64 references of tests/helpers.py (timm's recurrence run at every step).
"""

from __future__ import annotations

import random

import pytest
import torch

from ckpt_ema.engine.fold import fold
from ckpt_ema.engine.layout import Layout
from ckpt_ema.output.sinks import MemoryOutput
from ckpt_ema.weighting import DecaySchedule, EmaState, ema_continuation, ema_weighting
from helpers import TOLERANCE, linear_reference, make_state, max_abs_diff, reference_ema, write_run

SCHEDULES = [
    dict(decay=0.9),
    dict(decay=0.97, warmup=True),
    dict(decay=0.95, update_after_step=7),
    dict(decay=0.97, warmup=True, update_after_step=5, min_decay=0.3),
]
STEP_SETS = [[0, 10, 20, 30, 40, 50], [1, 2, 3, 9, 10, 25, 26, 60], [2, 8, 12, 13, 14, 50, 51, 90]]


def _chain(steps: list[int], schedule: DecaySchedule, bias_correction: bool, interpolate: str, cuts: list[int]):
    """The continuation over ``steps`` cut at ``cuts``: per piece (weighting, state)."""
    pieces, state = [], None
    for lo, hi in zip([0, *cuts], [*cuts, len(steps)]):
        w, state = ema_continuation(steps[lo:hi], schedule, bias_correction, interpolate, state)
        pieces.append(w)
    return pieces, state


@pytest.mark.parametrize("interpolate", ["linear", "step"])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_continuation_gives_the_full_weights(schedule, bias_correction, interpolate):
    """Chaining continuations and unrolling them gives ema_weighting's weights; the state's total is 1 without
    bias correction and 1 - prod d(s) with it."""
    rng = random.Random(0)
    sched = DecaySchedule(**schedule)
    for steps in STEP_SETS:
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, len(steps)), rng.randint(1, 3)))
            pieces, state = _chain(steps, sched, bias_correction, interpolate, cuts)
            weights = list(pieces[0].weights)
            for w in pieces[1:]:
                weights = [x * w.prior for x in weights]
                weights[-1] += w.weights[0]
                weights += w.weights[1:]
            full = ema_weighting(steps, sched, bias_correction, interpolate).weights
            assert max(abs(a - b) for a, b in zip(weights, full)) < 1e-13
            want = 1 - sched.product(0, steps[-1], True) if bias_correction else 1.0
            assert state.total == pytest.approx(want, abs=1e-13)
            assert state.step == steps[-1]


@pytest.mark.parametrize("interpolate", ["linear", "step"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_fold_from_an_initial_mean_continues_exactly(tmp_path, bias_correction, interpolate):
    """The engine started from the mean of a first fold (and, for linear, the newest checkpoint again) gives the
    full fold's result: bit for bit with ``step`` (the same lerps), to float32 rounding with ``linear``; both
    within float32 rounding of timm's recurrence run at every step in float64."""
    # (reference_ema, the held-weights reference, knows bias correction without warmup only)
    schedule = dict(decay=0.95, warmup=not (bias_correction and interpolate == "step"), update_after_step=3)
    steps = [0, 4, 9, 10, 17, 30, 31, 45]
    saved = write_run(tmp_path, steps)
    paths = [tmp_path / f"ckpt_{s}.pt" for s in steps]
    sched = DecaySchedule(**schedule)

    def run(checkpoints, lerps, initial=None):
        sink = MemoryOutput()
        fold(checkpoints, [lerps], [sink], initial=None if initial is None else [initial],
             on_layout=lambda layout, n: sink.open(layout.shapes, layout.dtypes))
        return sink.tensors

    full = run(paths, ema_weighting(steps, sched, bias_correction, interpolate).lerps)
    first, state = ema_continuation(steps[:4], sched, bias_correction, interpolate)
    mean = run(paths[:4], first.lerps)
    torch.save(mean, tmp_path / "mean.pt")
    from ckpt_ema.formats.checkpoint import open_checkpoint

    rest, _ = ema_continuation(steps[4:], sched, bias_correction, interpolate, state)
    appended = run(paths[3:], rest.lerps, open_checkpoint(tmp_path / "mean.pt"))
    reference = (linear_reference if interpolate == "linear" else reference_ema)(
        saved, bias_correction=bias_correction, **schedule)
    for name, want in reference.items():
        if interpolate == "step":
            assert torch.equal(appended[name], full[name]), name
        assert max_abs_diff(appended[name], full[name]) < TOLERANCE
        assert max_abs_diff(appended[name], want) < TOLERANCE
    assert torch.equal(appended["bn.num_batches_tracked"], saved[45]["bn.num_batches_tracked"])


def test_an_initial_mean_of_another_precision_or_model_is_refused(tmp_path):
    from ckpt_ema.errors import CkptEmaError
    from ckpt_ema.formats.checkpoint import open_checkpoint

    write_run(tmp_path, [1, 2])
    paths = [tmp_path / "ckpt_1.pt", tmp_path / "ckpt_2.pt"]
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in make_state(5).items()}, tmp_path / "m64.pt")
    other = make_state(5)
    other["extra"] = torch.zeros(2)
    torch.save(other, tmp_path / "other.pt")
    for bad, words in (("m64.pt", "not the accumulator's torch.float32"), ("other.pt", "extra is extra")):
        sink = MemoryOutput()
        with pytest.raises(CkptEmaError, match=words):
            fold(paths, [[0.0, 0.5]], [sink], initial=[open_checkpoint(tmp_path / bad)],
                 on_layout=lambda layout, n: sink.open(layout.shapes, layout.dtypes))
    assert Layout  # the layout check is the engine's own (engine.layout)
