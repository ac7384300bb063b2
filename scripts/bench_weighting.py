"""What the weights of an average cost to compute, from steps alone (medians of interleaved repeats, one thread).

    .venv/bin/python scripts/bench_weighting.py [--repeats 5]

* power_weighting (the power EMA) over 1,000 checkpoints spread over 1e6 and over 1e9 steps: the ratio shows that
  the closed form does not walk the steps;
* the unresolved share's part of ema_weighting (timm's EMA): the same weighting timed with and without it;
* ema_weighting for two checkpoints a gap apart (10^4 .. 10^12 steps), without and with timm's warmup at decay 1.0
  (the longest warmup: it never reaches the decay), against the per-step sum it replaced (one float64 per training
  step, numpy), in the same invocation, where that fits in memory; the ratio is per step / closed form.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ckpt_ema.weighting import DecaySchedule, ema_unresolved, ema_weighting, interval_coefficients, power_weighting


def timed(work) -> float:  # noqa: ANN001 - any callable
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    runs = {span: [i * (span // 1000) for i in range(1001)] for span in (10**6, 10**9)}
    times: dict[int, list[float]] = {span: [] for span in runs}
    for _ in range(args.repeats):
        for span, steps in runs.items():
            times[span].append(timed(lambda steps=steps: power_weighting(steps, 0.05)))
    short, long = (statistics.median(times[span]) for span in runs)
    print(f"power_weighting, 1,000 checkpoints: over 1e6 steps {1e3 * short:.1f} ms, over 1e9 steps "
          f"{1e3 * long:.1f} ms: {long / short:.2f}x")

    cases = [("705 checkpoints every 10 steps, warmup 0.9998", list(range(0, 7041, 10)),
              DecaySchedule(0.9998, warmup=True)),
             ("10,001 checkpoints every 100 steps, decay 0.9999", list(range(0, 10**6 + 1, 100)),
              DecaySchedule(0.9999)),
             ("1,001 checkpoints every 1,000 steps, warmup 0.9999", list(range(0, 10**6 + 1, 1000)),
              DecaySchedule(0.9999, warmup=True))]
    for label, steps, schedule in cases:
        survive = [interval_coefficients(schedule, a, b, "step")[0] for a, b in zip([0, *steps[:-1]], steps)]
        whole, share = [], []
        for _ in range(max(1, args.repeats // 2)):
            whole.append(timed(lambda: ema_weighting(steps, schedule)))
            share.append(timed(lambda: ema_unresolved(steps, schedule, False, survive)))
        w, u = statistics.median(whole), statistics.median(share)
        print(f"ema_weighting, {label}: {1e3 * w:.1f} ms, of which the unresolved share {1e3 * u:.1f} ms "
              f"({100 * u / w:.0f}%)")


    gaps(args.repeats)


GAPS = (10**4, 10**6, 10**7, 10**8, 10**12)
PER_STEP_LIMIT = 10**7  # the per-step sum's floats: 80 MB at this gap


def per_step(gap: int, schedule: DecaySchedule) -> None:
    """The per-step linear rule over one interval (0, gap]: what every gap cost before."""
    d = schedule.decays(1, gap).numpy()
    after = np.append(np.cumprod(d[::-1])[::-1][1:], 1.0)
    share = (1 - d) * after
    lam = np.arange(1, gap + 1) / gap
    float((share * (1 - lam)).sum()), float((share * lam).sum())


def gaps(repeats: int) -> None:
    print(f"{'gap':>8}  {'warmup':>6}  {'closed form (s)':>15}  {'per step (s)':>12}  {'ratio':>8}")
    for warmup in (False, True):
        schedule = DecaySchedule(decay=1.0 if warmup else 0.999, warmup=warmup)
        for gap in GAPS:
            ours = statistics.median(timed(lambda: ema_weighting([0, gap], schedule)) for _ in range(repeats))
            base = (statistics.median(timed(lambda: per_step(gap, schedule)) for _ in range(repeats))
                    if gap <= PER_STEP_LIMIT else None)
            shown = "-" if base is None else f"{base:.4f}"
            ratio = "-" if base is None else f"{base / ours:.1f}x"
            print(f"{gap:>8.0e}  {str(warmup):>6}  {ours:>15.4f}  {shown:>12}  {ratio:>8}")


if __name__ == "__main__":
    main()
