"""What the weights of an EMA cost to compute, against the step gap between checkpoints.

    PYTHONPATH=. python scripts/bench_weighting.py [--repeats 5]

For two checkpoints a gap apart (and three for 10^12), the seconds :func:`ckpt_ema.weighting.ema_weighting` takes,
median of ``--repeats``, with the linear rule (the default), without and with timm's warmup at decay 1.0 (the
longest warmup: it never reaches the decay). The baseline, in the same invocation, is the per-step sum the
interval math replaced (one float64 per training step, vectorised with numpy), where it fits in memory; the
ratio is baseline / ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ckpt_ema.weighting import DecaySchedule, ema_weighting

GAPS = (10**4, 10**6, 10**7, 10**8, 10**12)
PER_STEP_LIMIT = 10**7  # the baseline's floats: 80 MB at this gap


def per_step(gap: int, schedule: DecaySchedule) -> None:
    """The per-step linear rule over one interval (0, gap]: what every gap cost before."""
    d = schedule.decays(1, gap).numpy()
    after = np.append(np.cumprod(d[::-1])[::-1][1:], 1.0)
    share = (1 - d) * after
    lam = np.arange(1, gap + 1) / gap
    float((share * (1 - lam)).sum()), float((share * lam).sum())


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'gap':>8}  {'warmup':>6}  {'ours (s)':>10}  {'per step (s)':>12}  {'ratio':>8}")
    for warmup in (False, True):
        schedule = DecaySchedule(decay=1.0 if warmup else 0.999, warmup=warmup)
        for gap in GAPS:
            ours = median_seconds(lambda: ema_weighting([0, gap], schedule), args.repeats)
            base = median_seconds(lambda: per_step(gap, schedule), args.repeats) if gap <= PER_STEP_LIMIT else None
            shown = "-" if base is None else f"{base:.4f}"
            ratio = "-" if base is None else f"{base / ours:.1f}x"
            print(f"{gap:>8.0e}  {str(warmup):>6}  {ours:>10.4f}  {shown:>12}  {ratio:>8}")


if __name__ == "__main__":
    main()
