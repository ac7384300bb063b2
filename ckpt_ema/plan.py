"""The weight each checkpoint gets in the average, computed from steps alone (no tensor is read).

Post hoc, the weights between two checkpoints at steps a < b are unknown. Assuming they sat at the newer
checkpoint theta_b for the whole interval, the EMA recurrence of :mod:`ckpt_ema.schedule` over s = a+1..b
collapses to one lerp::

    v_b = F * v_a + (1 - F) * theta_b,       F = prod_{s=a+1..b} d(s)

With a checkpoint every step this *is* timm's online update. Unrolled, the output is a weighted sum
``sum_i w_i * theta_i`` with ``w_i = (1 - F_i) * prod_{j>i} F_j``. Without bias correction the first checkpoint is
copied (``w_0 = prod_{j>0} F_j``, as timm starts from a copy of the model); with it the accumulator starts at zero,
the first checkpoint stands for steps 1..a_0, and the weights are divided by their sum ``1 - prod_j F_j``.

The engine does not use w_i directly: it keeps a running weighted mean, ``v <- lerp(v, theta_i, w_i / W_i)`` with
``W_i = sum_{j<=i} w_j``, which for the EMA gives back exactly timm's lerp weights ``1 - F_i`` and serves any other
set of weights (uniform averages, other interpolations) through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.schedule import DecaySchedule

# The effective window is the smallest number of newest checkpoints that carry this share of the weight.
EFFECTIVE_WEIGHT = 0.99


@dataclass(frozen=True)
class Weighting:
    """Final weights (summing to 1) of checkpoints at ``steps``, and the lerp weights that reproduce them."""

    steps: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def lerps(self) -> tuple[float, ...]:
        """t_i = w_i / sum_{j<=i} w_j; 0 where a checkpoint adds nothing (it need not be read)."""
        out, total = [], 0.0
        for w in self.weights:
            total += w
            out.append(w / total if w > 0 else 0.0)
        return tuple(out)

    def effective_window(self, share: float = EFFECTIVE_WEIGHT) -> int:
        """How many of the newest checkpoints carry ``share`` of the weight."""
        carried = 0.0
        for count, w in enumerate(reversed(self.weights), start=1):
            carried += w
            if carried >= share * (1 - 1e-12):
                return count
        return len(self.weights)


INTERPOLATIONS = ("step", "linear")


def interval_coefficients(schedule: DecaySchedule, a: int, b: int, interpolate: str) -> tuple[float, float, float]:
    """(F, A, B) of ``v_b = F * v_a + A * theta_a + B * theta_b`` for the steps s = a+1..b between two checkpoints.

    ``step``: the weights sat at theta_b for the whole interval, so A = 0 and B = 1 - F.
    ``linear``: they moved in a straight line, theta(s) = (1 - l_s) theta_a + l_s theta_b with l_s = (s - a)/(b - a);
    each step's EMA weight ``(1 - d(s)) * prod_{r>s} d(r)`` is split between the two ends in proportion to l_s.
    """
    if interpolate == "step" or b - a <= 1:
        survive = schedule.product(a, b)
        return survive, 0.0, 1.0 - survive
    d = schedule.decays(a + 1, b)
    suffix = torch.flip(torch.cumprod(torch.flip(d, [0]), 0), [0])  # prod_{r >= s} d(r)
    after = torch.cat([suffix[1:], torch.ones(1, dtype=d.dtype)])  # prod_{r > s} d(r)
    share = (1 - d) * after
    lam = torch.arange(1, b - a + 1, dtype=torch.float64) / (b - a)
    return float(suffix[0]), float((share * (1 - lam)).sum()), float((share * lam).sum())


def ema_weighting(
    steps: list[int], schedule: DecaySchedule, bias_correction: bool = False, interpolate: str = "step"
) -> Weighting:
    """Weights of the EMA over checkpoints at ``steps`` (increasing), the weights between saves interpolated."""
    if interpolate not in INTERPOLATIONS:
        raise CkptEmaError(f"--interpolate must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    if bias_correction:
        schedule = schedule.bias_corrected()
    # Interval i ends at checkpoint i; the first (bias correction only) runs from step 0, held at theta_0.
    coefficients = [interval_coefficients(schedule, 0, steps[0], "step")]
    coefficients += [interval_coefficients(schedule, a, b, interpolate) for a, b in zip(steps, steps[1:])]
    raw = [0.0] * len(steps)
    tail = 1.0  # prod_{j>i} F_j: how much of what interval i left survives to the end
    for i in range(len(steps) - 1, -1, -1):
        survive, older, newer = coefficients[i]
        if i == 0 and not bias_correction:
            raw[0] += tail  # timm starts from a copy of the model
        else:
            raw[i] += newer * tail
            if i > 0:
                raw[i - 1] += older * tail
        tail *= survive
    total = sum(raw)
    if total <= 0.0:
        # Only with bias correction and no update at all (every step before --update-after-step).
        return Weighting(tuple(steps), tuple(0.0 for _ in steps))
    return Weighting(tuple(steps), tuple(w / total for w in raw))


def uniform_weighting(steps: list[int], last: int) -> Weighting:
    """The plain mean of the newest ``last`` checkpoints (LAWA, SWA, fairseq's average_checkpoints)."""
    if last < 1:
        raise CkptEmaError(f"--last must be at least 1, got {last}")
    if last > len(steps):
        raise CkptEmaError(f"--last {last} asks for more checkpoints than the {len(steps)} there are")
    return Weighting(tuple(steps), tuple(0.0 if i < len(steps) - last else 1.0 / last for i in range(len(steps))))
