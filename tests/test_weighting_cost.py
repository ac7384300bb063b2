"""The interval math at bounded cost: F, A, B of an interval equal timm's recurrence run step by step (to 1e-12
relative), whatever the schedule, and a gap of 10^12 steps (or Unix timestamps as steps) costs no more memory than
a gap of ten."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from ckpt_ema import weighting
from ckpt_ema.weighting import DecaySchedule, ema_weighting, interval_coefficients
from helpers import interval_reference, timm_ema


def relative_error(want: tuple[float, ...], got: tuple[float, ...]) -> float:
    """Largest relative difference; values below 1e-280 (underflowed products) compare absolutely."""
    return max(abs(w - g) / abs(w) if abs(w) > 1e-280 else abs(g) for w, g in zip(want, got))


def test_interval_coefficients_equal_the_per_step_recurrence() -> None:
    """300 random schedules (decay, min_decay, update_after_step, warmup's gamma and power, bias correction) and
    intervals, against timm's get_decay run one step at a time."""
    rng = random.Random(0)
    worst = 0.0
    for _ in range(300):
        schedule = dict(decay=rng.choice([0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0]),
                        min_decay=rng.choice([0.0, 0.0, 0.3, 0.95]), update_after_step=rng.choice([0, 0, 3, 50]),
                        warmup=rng.random() < 0.6, warmup_gamma=rng.choice([1.0, 3.0, 0.5]),
                        warmup_power=rng.choice([2 / 3, 3 / 4, 1.0]))
        a = rng.choice([0, 1, 2, 10, 100, 1000])
        b = a + rng.choice([1, 2, 3, 17, 200, 1500])
        bias = rng.random() < 0.3
        want = interval_reference(timm_ema(**schedule), a, b, bias)
        got = interval_coefficients(DecaySchedule(**schedule), a, b, "linear", bias)
        worst = max(worst, relative_error(want, got))
        assert relative_error(want, got) < 1e-12, (schedule, a, b, bias, want, got)
    assert worst > 0  # the comparison compared something


def warmup_brute_force(first: int, count: int, gamma: float, power: float) -> tuple[float, float, float]:
    """(F, A, B) of warmup steps t = first..first+count-1 (unclamped), per step in float64 with numpy."""
    t = np.arange(first, first + count, dtype=np.float64)
    d = 1 - (1 + t / gamma) ** -power
    after = np.append(np.cumprod(d[::-1])[::-1][1:], 1.0)
    share = (1 - d) * after
    lam = np.arange(1, count + 1) / count
    return float(np.prod(d)), float((share * (1 - lam)).sum()), float((share * lam).sum())


@pytest.mark.parametrize("first,count", [(0, 70_000), (3, 200_000), (1_000, 1_000_000), (5_000, 300_000)])
def test_long_warmup_chunks_equal_the_per_step_sum(first: int, count: int) -> None:
    """Beyond EXACT_WARMUP_STEPS the warmup is summed in extrapolated chunks: still the per-step sum to 1e-11."""
    schedule = DecaySchedule(decay=1.0, warmup=True)
    run = weighting._warmup_run(schedule, first, count)
    got = (run.survive, run.to_first / run.count, run.to_last / run.count)
    assert relative_error(warmup_brute_force(first, count, 1.0, 2 / 3), got) < 1e-11


def test_chunks_are_used_beyond_the_exact_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same long warmup with the exact path forced on, and with it forced off (chunks from the first step),
    agree: the chunked path is what the previous test measured, not the exact one."""
    schedule = DecaySchedule(decay=1.0, warmup=True)
    exact = weighting._warmup_run(schedule, 20_000, 50_000)
    monkeypatch.setattr(weighting, "EXACT_WARMUP_STEPS", 0)
    chunked = weighting._warmup_run(schedule, 20_000, 50_000)
    assert chunked != exact  # a different computation ...
    assert relative_error((exact.survive, exact.to_first, exact.to_last),
                          (chunked.survive, chunked.to_first, chunked.to_last)) < 1e-11  # ... of the same numbers


def test_a_gap_of_10_to_the_12_steps_is_closed_form() -> None:
    """Without warmup: F = d^n (0 here), A = sum_j (1-d) d^j j / n = d / ((1-d) n), B = 1 - A, exactly."""
    n = 10**12
    survive, older, newer = interval_coefficients(DecaySchedule(decay=0.999), n, 2 * n, "linear")
    assert survive == 0.0
    assert older == pytest.approx(0.999 / (0.001 * n), rel=1e-12)
    assert newer == pytest.approx(1 - 0.999 / (0.001 * n), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [False, True])
def test_huge_gaps_cost_no_memory_per_step(warmup: bool) -> None:
    """Peak memory for a gap of 10^12 steps (warmup never reaching decay 1.0: the longest warmup there is) stays
    small: one float per training step would be 8 TB."""
    schedule = DecaySchedule(decay=1.0 if warmup else 0.999, warmup=warmup)
    tracemalloc.start()
    try:
        weights = ema_weighting([0, 10**12, 2 * 10**12], schedule).weights
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)


def test_unix_timestamps_as_steps() -> None:
    """Steps that are Unix timestamps (an hour apart): without warmup the weights depend on the gaps only, so they
    equal those of the same gaps starting at step 100."""
    gaps = [0, 3600, 7300, 10_800, 14_400, 25_000]
    start = 1_700_000_000
    schedule = DecaySchedule(decay=0.9999)
    stamped = ema_weighting([start + g for g in gaps], schedule).weights
    small = ema_weighting([100 + g for g in gaps], schedule).weights
    assert stamped == pytest.approx(small, rel=1e-12)


def test_the_unresolved_share_at_bounded_cost_equals_the_step_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """U's part before the decay settles is walked step by step (few steps per interval) or computed interval by
    interval (monotone pieces, halving only where the mean is crossed): both agree on random schedules."""
    rng = random.Random(1)
    cases = []
    for _ in range(40):
        schedule = DecaySchedule(decay=rng.choice([0.9, 0.99, 0.999, 0.9999, 1.0]), min_decay=rng.choice([0.0, 0.3]),
                                 update_after_step=rng.choice([0, 5]), warmup=rng.random() < 0.8,
                                 warmup_power=rng.choice([2 / 3, 1.0, 1.5]))
        cases.append((sorted(rng.sample(range(1, 30_000), rng.choice([2, 5, 20]))), schedule, rng.random() < 0.3))
    monkeypatch.setattr(weighting, "_WALK_PER_INTERVAL", 10**9)
    walked = [weighting.ema_unresolved(steps, schedule, bias) for steps, schedule, bias in cases]
    monkeypatch.setattr(weighting, "_WALK_STEPS", 0)
    bounded = [weighting.ema_unresolved(steps, schedule, bias) for steps, schedule, bias in cases]
    assert bounded == pytest.approx(walked, abs=1e-12)
    assert max(walked) > 0.1  # the comparison compared something
