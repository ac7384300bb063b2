"""The per-step decay d(s) of timm's ModelEmaV3, and its product over a run of steps.

timm updates its EMA once per optimizer step ``s`` (1, 2, 3, ...)::

    v_s = d(s) * v_{s-1} + (1 - d(s)) * theta_s          # torch._foreach_lerp_(v, theta, 1 - d(s))

with ``d(s) = ModelEmaV3.get_decay(s)``: with k = update_after_step and t = s - k - 1,

    d(s) = 0                                              if t <= 0   (the EMA copies the model)
    d(s) = clamp(1 - (1 + t / gamma) ** -power, min_decay, decay)   with warmup
    d(s) = decay                                          without warmup

Warmup makes early steps count less because the average then has little history; the alternative is the bias
correction of Adam (``v_t / (1 - prod d)``), for which the first step uses the decay too (:meth:`bias_corrected`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ckpt_ema.errors import CkptEmaError


@dataclass(frozen=True)
class DecaySchedule:
    """The arguments of timm's ``ModelEmaV3`` that define d(s); defaults are timm's, except decay."""

    decay: float = 0.999
    min_decay: float = 0.0
    update_after_step: int = 0
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    # Bias correction (Adam's): the step timm copies the model at (t == 0) decays like any other step instead.
    first_step_decays: bool = False

    def __post_init__(self) -> None:
        for name in ("decay", "min_decay"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0 and math.isfinite(value)):
                raise CkptEmaError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.update_after_step < 0:
            raise CkptEmaError(f"--update-after-step must be >= 0, got {self.update_after_step}")
        if not self.warmup_gamma > 0:
            raise CkptEmaError(f"--warmup-gamma must be > 0, got {self.warmup_gamma}")
        if not self.warmup_power > 0:
            raise CkptEmaError(f"--warmup-power must be > 0, got {self.warmup_power}")

    @classmethod
    def from_half_life(cls, half_life_steps: float, **kwargs: object) -> DecaySchedule:
        """The schedule whose decay halves a weight every ``half_life_steps`` steps: decay = 0.5 ** (1 / h)."""
        if not half_life_steps > 0:
            raise CkptEmaError(f"--half-life must be > 0 steps, got {half_life_steps}")
        return cls(decay=0.5 ** (1.0 / half_life_steps), **kwargs)  # type: ignore[arg-type]

    def bias_corrected(self) -> DecaySchedule:
        return replace(self, first_step_decays=True)

    def decay_at(self, step: int) -> float:
        """d(step), exactly as ``ModelEmaV3(...).get_decay(step)`` computes it (same float operations)."""
        if self.first_step_decays and step <= self.update_after_step:
            return 1.0  # before averaging starts: no update at all, the accumulator stays at zero
        t = max(0, step - self.update_after_step - 1)
        if t <= 0 and not self.first_step_decays:
            return 0.0
        if self.warmup:
            decay = 1 - (1 + t / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def decays(self, first: int, last: int) -> torch.Tensor:
        """d(s) for s = first..last (inclusive) as a float64 tensor, vectorised for long intervals."""
        steps = torch.arange(first, last + 1, dtype=torch.float64)
        if steps.numel() == 0:
            return steps
        t = (steps - self.update_after_step - 1).clamp(min=0)
        if self.warmup:
            d = 1 - (1 + t / self.warmup_gamma) ** -self.warmup_power
            d = d.clamp(max=self.decay).clamp(min=self.min_decay)
        else:
            d = torch.full_like(steps, self.decay)
        if self.first_step_decays:
            d = torch.where(steps <= self.update_after_step, torch.ones_like(d), d)
        else:
            d = torch.where(t <= 0, torch.zeros_like(d), d)
        return d

    def product(self, after: int, upto: int) -> float:
        """prod_{s = after+1 .. upto} d(s): how much of the average before step ``after`` survives to ``upto``."""
        if upto <= after:
            return 1.0
        first_decaying_step = self.update_after_step + (1 if self.first_step_decays else 2)
        if not self.warmup and after + 1 >= first_decaying_step:
            return self.decay ** (upto - after)  # the common case, in closed form
        return float(torch.prod(self.decays(after + 1, upto)))
