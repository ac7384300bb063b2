"""The math of ckpt-ema, in one place: the weight each checkpoint gets, computed from training steps alone.

**timm's recurrence.** timm's ``ModelEmaV3`` updates its average once per optimizer step s = 1, 2, ...::

    v_s = d(s) * v_{s-1} + (1 - d(s)) * theta_s            # torch._foreach_lerp_(v, theta, 1 - d(s))

with the per-step decay ``d(s) = ModelEmaV3.get_decay(s)``; with k = update_after_step and t = s - k - 1::

    d(s) = 0                                                 if t <= 0  (the EMA copies the model)
    d(s) = clamp(1 - (1 + t / gamma) ** -power, min_decay, decay)     with warmup
    d(s) = decay                                             otherwise

Warmup makes early steps count less because the average then has little history. The alternative cure is the
bias correction of Adam (the seed's ``v_t / (1 - beta^t)``): the accumulator starts at zero, every step after k
uses the decay (the step timm copies at included), and the result is divided by ``1 - prod d(s)``.

**Between checkpoints.** Post hoc, the weights between two saved checkpoints at steps a < b are unknown, so every
step s = a+1..b needs a guess theta(s). Either guess collapses the b - a updates into one::

    v_b = F * v_a + A * theta_a + B * theta_b,       F = prod_{s=a+1..b} d(s),   A + B = 1 - F

* ``linear`` (the default): the weights moved in a straight line, theta(s) = (1 - l_s) theta_a + l_s theta_b with
  l_s = (s - a) / (b - a). Step s gets the weight e_s = (1 - d(s)) prod_{r=s+1..b} d(r) within the interval, split
  between the two ends: A = sum_s e_s (1 - l_s), B = sum_s e_s l_s.
* ``step``: the weights sat at the newer checkpoint for the whole interval: A = 0, B = 1 - F.

With a checkpoint every step both are timm's update, step for step. Linear is the better guess when checkpoints
are sparse and within noise of ``step`` when they are dense (the seed experiment in the README).

**Unrolled**, the output is a weighted sum ``sum_i w_i * theta_i`` whose weights sum to 1 (for ``step``:
``w_i = (1 - F_i) prod_{j>i} F_j``). Without bias correction the first checkpoint is copied, as timm starts from
a copy of the model (``w_0 = prod_{j>0} F_j``); with it, the first checkpoint, at step a_0, stands for steps
1..a_0 and the weights are divided by their sum.

**How the engine uses them.** The fold does not use w_i directly: it keeps a running weighted mean,
``v <- lerp(v, theta_i, w_i / W_i)`` with ``W_i = sum_{j<=i} w_j`` (:attr:`Weighting.lerps`). For the EMA with
``step`` these are exactly timm's lerp weights ``1 - F_i``; the same code serves every other weighting (a uniform
mean of the newest K, other interpolations).

**Appending** (:func:`ema_continuation`). The EMA up to checkpoint n goes on exactly from what the fold leaves:
the running mean m_n (the engine's accumulator), its raw total weight R_n (1 without bias correction; 1 - prod d
with it, the divisor of the correction, so that the uncorrected accumulator is R_n m_n), the step s_n and, for
``linear``, theta_n itself (the next interval gives it the weight A). Appending checkpoints n+1..N, with
tail_j = prod_{k>j} F_k over their intervals::

    raw(m_n) = R_n * prod_{j>n} F_j,    raw(theta_n) = A_{n+1} tail_{n+1},    raw(theta_j) = B_j tail_j + A_{j+1} tail_{j+1}

and m_N is their weighted mean, R_N their sum. A fresh start is the same with R = 0 and a first interval that
copies (F = A = 0, B = 1) or, with bias correction, holds theta_0 from step 0: so :func:`ema_weighting` is the
continuation of nothing, and an append gives the full rerun's weights. The uniform mean of the newest K has no
such state: it needs the K newest checkpoints themselves.

**Effective window.** The smallest number of newest checkpoints that carry 99% of the weight: when it is 1 or 2,
the checkpoints are too sparse for the decay, and the "average" is mostly the last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_ema.errors import OptionError

if TYPE_CHECKING:
    import torch

# The effective window is the smallest number of newest checkpoints that carry this share of the weight.
EFFECTIVE_WEIGHT = 0.99
INTERPOLATIONS = ("linear", "step")
DEFAULT_DECAY = 0.999


@dataclass(frozen=True)
class DecaySchedule:
    """The arguments of timm's ``ModelEmaV3`` that define d(s); the defaults are timm's, except ``decay``."""

    decay: float = DEFAULT_DECAY
    min_decay: float = 0.0
    update_after_step: int = 0
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3

    def __post_init__(self) -> None:
        for name in ("decay", "min_decay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise OptionError(name, f"must be in [0, 1], got {value}")
        if not (isinstance(self.update_after_step, int) and self.update_after_step >= 0):
            raise OptionError("update_after_step", f"must be an integer >= 0, got {self.update_after_step}")
        for name in ("warmup_gamma", "warmup_power"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise OptionError(name, f"must be > 0, got {value}")

    @classmethod
    def from_half_life(cls, half_life: float, **fields: object) -> DecaySchedule:
        """The schedule whose decay halves a weight every ``half_life`` steps: decay = 0.5 ** (1 / half_life)."""
        if not (isinstance(half_life, int | float) and math.isfinite(half_life) and half_life > 0):
            raise OptionError("half_life", f"must be > 0 steps, got {half_life}")
        return cls(decay=0.5 ** (1.0 / half_life), **fields)  # type: ignore[arg-type]

    def half_life_at(self, step: int, bias_corrected: bool = False) -> float:
        """Steps over which a weight halves at the decay in force at ``step`` (under warmup, maybe below decay)."""
        d = self.decay_at(step, bias_corrected)
        return math.inf if d >= 1 else (0.0 if d <= 0 else math.log(0.5) / math.log(d))

    def decay_at(self, step: int, bias_corrected: bool = False) -> float:
        """d(step), exactly as ``ModelEmaV3(...).get_decay(step)`` computes it (same float operations).

        ``bias_corrected``: steps up to update_after_step leave the (zero) accumulator alone (d = 1), and the step
        timm copies the model at decays like any other.
        """
        if bias_corrected and step <= self.update_after_step:
            return 1.0
        t = max(0, step - self.update_after_step - 1)
        if t <= 0 and not bias_corrected:
            return 0.0
        if self.warmup:
            decay = 1 - (1 + t / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def decays(self, first: int, last: int, bias_corrected: bool = False) -> torch.Tensor:
        """d(s) for s = first..last (inclusive) as a float64 tensor, vectorised for long intervals."""
        import torch

        steps = torch.arange(first, last + 1, dtype=torch.float64)
        if steps.numel() == 0:
            return steps
        t = (steps - self.update_after_step - 1).clamp(min=0)
        if self.warmup:
            d = 1 - (1 + t / self.warmup_gamma) ** -self.warmup_power
            d = d.clamp(max=self.decay).clamp(min=self.min_decay)
        else:
            d = torch.full_like(steps, self.decay)
        if bias_corrected:
            return torch.where(steps <= self.update_after_step, torch.ones_like(d), d)
        return torch.where(t <= 0, torch.zeros_like(d), d)

    def product(self, after: int, upto: int, bias_corrected: bool = False) -> float:
        """prod_{s = after+1 .. upto} d(s): how much of the average at step ``after`` survives to ``upto``."""
        if upto <= after:
            return 1.0
        first_decaying_step = self.update_after_step + (1 if bias_corrected else 2)
        if not self.warmup and after + 1 >= first_decaying_step:
            return self.decay ** (upto - after)  # the common case, in closed form
        return float(self.decays(after + 1, upto, bias_corrected).prod())


@dataclass(frozen=True)
class Weighting:
    """Final weights (summing to 1) of checkpoints at ``steps``, and the lerp weights that reproduce them."""

    steps: tuple[int, ...]
    weights: tuple[float, ...]
    # The share of an earlier running mean that this one continues (appending, see ema_continuation): the weights
    # and the prior sum to 1.
    prior: float = 0.0

    @property
    def lerps(self) -> tuple[float, ...]:
        """t_i = w_i / (prior + sum_{j<=i} w_j); 0 where a checkpoint adds nothing (it need not be read)."""
        out, total = [], self.prior
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


def interval_coefficients(schedule: DecaySchedule, a: int, b: int, interpolate: str,
                          bias_corrected: bool = False) -> tuple[float, float, float]:
    """(F, A, B) of ``v_b = F * v_a + A * theta_a + B * theta_b`` for the steps s = a+1..b between two checkpoints
    (see the module docstring)."""
    import torch

    if interpolate == "step" or b - a <= 1:
        survive = schedule.product(a, b, bias_corrected)
        return survive, 0.0, 1.0 - survive
    d = schedule.decays(a + 1, b, bias_corrected)
    suffix = torch.flip(torch.cumprod(torch.flip(d, [0]), 0), [0])  # prod_{r >= s} d(r)
    after = torch.cat([suffix[1:], torch.ones(1, dtype=d.dtype)])  # prod_{r > s} d(r)
    share = (1 - d) * after
    lam = torch.arange(1, b - a + 1, dtype=torch.float64) / (b - a)
    return float(suffix[0]), float((share * (1 - lam)).sum()), float((share * lam).sum())


@dataclass(frozen=True)
class EmaState:
    """Where an EMA over checkpoints stands after its newest checkpoint, besides the tensors (the running mean, and
    that checkpoint's weights for ``linear``): enough to go on exactly (see "Appending" above)."""

    step: int  # the newest checkpoint's step
    total: float  # R: raw weight of the running mean; 1 without bias correction, 1 - prod d(s) with it, 0 before any


def ema_continuation(steps: list[int], schedule: DecaySchedule, bias_correction: bool = False,
                     interpolate: str = "linear", after: EmaState | None = None) -> tuple[Weighting, EmaState]:
    """Weights of the EMA over checkpoints at ``steps`` (increasing), continuing the one ``after`` describes (None:
    from the start); and the state after the newest. With ``after``, the weighting's first entry is the checkpoint
    at ``after.step`` (whose weights ``linear`` needs again) and ``prior`` is the share of the earlier mean."""
    if interpolate not in INTERPOLATIONS:
        raise OptionError("interpolate", f"must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    if after is None:
        # Interval i ends at checkpoint i; the first copies theta_0 (as timm starts from a copy of the model) or,
        # with bias correction, runs from step 0 held at theta_0.
        ends, prior_total = list(steps), 0.0
        first = interval_coefficients(schedule, 0, steps[0], "step", True) if bias_correction else (0.0, 0.0, 1.0)
        coefficients = [first]
    else:
        if steps and steps[0] <= after.step:
            raise ValueError(f"step {steps[0]} is not after the newest step already folded, {after.step}")
        ends, prior_total = [after.step, *steps], after.total
        coefficients = [None]  # nothing ends at the earlier newest checkpoint: it is in the running mean
    coefficients += [interval_coefficients(schedule, a, b, interpolate, bias_correction) for a, b in zip(ends, ends[1:])]
    raw = [0.0] * len(ends)
    tail = 1.0  # prod_{j>i} F_j: how much of what interval i left survives to the end
    for i in range(len(ends) - 1, 0 if after is not None else -1, -1):
        survive, older, newer = coefficients[i]  # type: ignore[misc]
        raw[i] += newer * tail
        if i > 0:
            raw[i - 1] += older * tail
        tail *= survive
    prior = prior_total * tail
    total = prior + sum(raw)
    state = EmaState(ends[-1], total)
    if total <= 0.0:
        # Only with bias correction and no update at all (every step before update_after_step).
        return Weighting(tuple(ends), tuple(0.0 for _ in ends)), state
    return Weighting(tuple(ends), tuple(w / total for w in raw), prior / total), state


def ema_weighting(steps: list[int], schedule: DecaySchedule, bias_correction: bool = False,
                  interpolate: str = "linear") -> Weighting:
    """Weights of the EMA over checkpoints at ``steps`` (increasing), the weights between saves interpolated."""
    return ema_continuation(steps, schedule, bias_correction, interpolate)[0]


def uniform_weighting(steps: list[int], last: int) -> Weighting:
    """The plain mean of the newest ``last`` checkpoints (LAWA, SWA, fairseq's average_checkpoints)."""
    if last < 1:
        raise OptionError("last", f"must be at least 1, got {last}")
    if last > len(steps):
        raise OptionError("last", f"{last} asks for more checkpoints than the {len(steps)} there are")
    return Weighting(tuple(steps), tuple(0.0 if i < len(steps) - last else 1.0 / last for i in range(len(steps))))
