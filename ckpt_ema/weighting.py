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

**Effective window.** The smallest number of newest checkpoints that carry 99% of the weight: when it is 1 or 2,
the checkpoints are too sparse for the decay, and the "average" is mostly the last checkpoint.

**The power-function EMA** of EDM2 (Karras et al., "Analyzing and improving the training dynamics of diffusion
models", CVPR 2024; NVlabs/edm2 ``training/phema.py``) averages with the per-step recurrence::

    v_t = beta(t) * v_{t-1} + (1 - beta(t)) * theta_t,      beta(t) = (1 - 1/t) ** (gamma + 1),   t = 1, 2, ...

(``beta(1) = 0``: it starts from a copy), with gamma set by the profile's relative width sigma_rel, the largest root
of ``sigma_rel^2 = (gamma+1) / ((gamma+2)^2 (gamma+3))`` (:func:`gamma_of`; gamma >= 0 needs sigma_rel <= 1/sqrt(12),
where gamma = 0 is the uniform mean of every step). Unrolled to step T, step s gets exactly
``e_s = P(s) - P(s-1)`` with ``P(x) = (x/T)^(gamma+1)``: the continuous profile ``(gamma+1) x^gamma / T^(gamma+1)``
integrated over the step, not sampled at it. From checkpoints at a_0 < ... < a_n = T, with the same guesses
between them as the EMA: the first checkpoint stands for steps 1..a_0 (weight P(a_0)); ``step`` gives each later
interval's weight ``P(b) - P(a)`` to its newer end; ``linear`` gives its newer end
``B = sum_{s=a+1..b} e_s (s-a)/(b-a) = P(b)/(b-a) * sum_{j=a..b-1} (1 - (j/b)^(gamma+1))`` (summation by parts) and
its older end the rest. That last sum is computed term by term below step ``max(4096, 64 (gamma+1))`` and by
Euler-Maclaurin above it (exact to rounding there), so the cost is bounded whatever the steps: at most a few
thousand terms plus a few operations per interval. With a checkpoint every step it is the recurrence itself.

**What the checkpoints can represent.** An EMA or a power EMA asks for a per-step profile: the weight e_s that
step s = 1..T would get from the recurrence run online (timm's from its copy at step 1). Checkpoints at
a_0 < ... < a_n cut the steps into intervals (0, a_0], (a_0, a_1], ... Both guesses give every interval exactly the
profile's weight on it (``A + B``, the first checkpoint taking all of (0, a_0]); how that weight is spread over
the steps inside an interval is what the checkpoints cannot tell. The *unresolved share* is the total-variation
distance between the profile and the same profile made flat within each interval::

    U = 1/2 sum_s |e_s - m(s)|,        m(s) = the mean of e over the interval that holds s

the share of the weight that would have to move for the profile to be flat between checkpoints. U = 0 with a
checkpoint every step, and for a uniform mean of checkpoints (it asks for nothing between them). For an EMA over
evenly spaced checkpoints whose 99% window spans 20 / 10 / 5 / 3 / 2 / 1 intervals, U is 3 / 6 / 11 / 19 / 27 /
46%. Above :data:`UNRESOLVED_WARNING`, with the 99% window within the newest :data:`WARNING_WINDOW` checkpoints,
the average is mostly the newest checkpoint or two, whatever was asked (:meth:`Weighting.too_sparse`). (A large U with a wide
window comes from a profile whose weight sits at the start: timm's copy at step 1 with a decay too long for the
run. That is not a matter of spacing, and linear interpolation places it well, next to the first checkpoint.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt_ema.errors import OptionError

if TYPE_CHECKING:
    import torch

# The effective window is the smallest number of newest checkpoints that carry this share of the weight.
EFFECTIVE_WEIGHT = 0.99
INTERPOLATIONS = ("linear", "step")
DEFAULT_DECAY = 0.999
# The checkpoints are too far apart for an average (a warning says so) when its unresolved share is above this and
# its effective window at most WARNING_WINDOW checkpoints: the window spans one or two checkpoint intervals.
UNRESOLVED_WARNING = 0.2
WARNING_WINDOW = 3


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
    unresolved: float = 0.0  # of the per-step profile asked for, the share the checkpoints cannot place (docstring)

    @property
    def lerps(self) -> tuple[float, ...]:
        """t_i = w_i / sum_{j<=i} w_j; 0 where a checkpoint adds nothing (it need not be read)."""
        out, total = [], 0.0
        for w in self.weights:
            total += w
            out.append(w / total if w > 0 else 0.0)
        return tuple(out)

    def too_sparse(self) -> bool:
        """The checkpoints are too far apart for this average: see the module docstring."""
        return self.unresolved > UNRESOLVED_WARNING and self.effective_window() <= WARNING_WINDOW

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


def ema_weighting(steps: list[int], schedule: DecaySchedule, bias_correction: bool = False,
                  interpolate: str = "linear") -> Weighting:
    """Weights of the EMA over checkpoints at ``steps`` (increasing), the weights between saves interpolated."""
    if interpolate not in INTERPOLATIONS:
        raise OptionError("interpolate", f"must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    # Interval i ends at checkpoint i; the first (bias correction only) runs from step 0, held at theta_0.
    coefficients = [interval_coefficients(schedule, 0, steps[0], "step", bias_correction)]
    coefficients += [interval_coefficients(schedule, a, b, interpolate, bias_correction)
                     for a, b in zip(steps, steps[1:])]
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
        # Only with bias correction and no update at all (every step before update_after_step).
        return Weighting(tuple(steps), tuple(0.0 for _ in steps))
    unresolved = ema_unresolved(steps, schedule, bias_correction, [c[0] for c in coefficients])
    return Weighting(tuple(steps), tuple(w / total for w in raw), unresolved)


def uniform_weighting(steps: list[int], last: int) -> Weighting:
    """The plain mean of the newest ``last`` checkpoints (LAWA, SWA, fairseq's average_checkpoints)."""
    if last < 1:
        raise OptionError("last", f"must be at least 1, got {last}")
    if last > len(steps):
        raise OptionError("last", f"{last} asks for more checkpoints than the {len(steps)} there are")
    return Weighting(tuple(steps), tuple(0.0 if i < len(steps) - last else 1.0 / last for i in range(len(steps))))


# ----------------------------------------------------------------------------------------------------------------
# The power-function EMA (EDM2) and the unresolved share: see the module docstring.

SIGMA_REL_MAX = 12 ** -0.5  # gamma = 0: the uniform mean of every step; a larger sigma_rel has no gamma >= 0
# Below this step (or 64 (gamma+1), if larger) sums over steps are taken term by term; above it, Euler-Maclaurin's
# remainder, below (gamma+1)^6 / (2 pi j)^6 of the sum, is under rounding.
DIRECT_STEPS = 4096
_BERNOULLI = (1 / 6, -1 / 30, 1 / 42)  # B_2, B_4, B_6
_CHUNK = 1 << 20  # steps per vectorised block where a sum is taken step by step


def sigma_rel_of(gamma: float) -> float:
    """EDM2's relative standard deviation of the power profile with exponent gamma (their ``exp_to_std``)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma >= 0 with ``sigma_rel_of(gamma) == sigma_rel``: EDM2's largest root of the cubic
    ``g^3 + 7 g^2 + (16 - s^-2) g + 12 - s^-2``. sigma_rel_of falls from 1/sqrt(12) at 0 towards 0, so the root
    is bracketed and bisected to the last bit."""
    if not (isinstance(sigma_rel, int | float) and math.isfinite(sigma_rel) and 0 < sigma_rel <= SIGMA_REL_MAX):
        raise OptionError("sigma_rel", f"must be in (0, {SIGMA_REL_MAX:.4f}], 1/sqrt(12) being the uniform mean of "
                                       f"every step; got {sigma_rel}")
    lo, hi = 0.0, 1.0
    while sigma_rel_of(hi) > sigma_rel:
        lo, hi = hi, 2 * hi
    while (mid := 0.5 * (lo + hi)) not in (lo, hi):
        lo, hi = (mid, hi) if sigma_rel_of(mid) > sigma_rel else (lo, mid)
    return lo if sigma_rel_of(lo) - sigma_rel < sigma_rel - sigma_rel_of(hi) else hi


def _one_minus_pow(ratio: torch.Tensor, power: float) -> torch.Tensor:
    """1 - ratio^power for ratio >= 0, without cancellation when ratio is close to 1."""
    import torch

    return -torch.expm1(power * torch.log(ratio))


def _power_sum(c: torch.Tensor, b: torch.Tensor, g: float) -> torch.Tensor:
    """sum_{j=c}^{b-1} (1 - (j/b)^g) by Euler-Maclaurin, for c >= max(DIRECT_STEPS, 64 g).

    Every term is a ``1 - u^p`` with u = c/b, by expm1, and the integral, b (eps - (1 - (1-eps)^(g+1)) / (g+1))
    with eps = 1 - c/b, by its series sum_{k>=2} (-1)^k C(g+1, k) eps^k / (g+1) when (g+1) eps <= 1: a short interval
    late in a long run keeps its digits.
    """
    import torch

    h = g + 1
    eps = (b - c) / b
    integral = b * eps - b * _one_minus_pow(c / b, h) / h
    short = h * eps <= 1  # the series converges at least as fast as 1/k! there
    term = (h - 1) * eps[short] ** 2 / 2
    series = term.clone()
    for k in range(2, 200):
        term = term * (-(h - k) * eps[short] / (k + 1))
        series = series + term
        if bool((term.abs() <= 1e-18 * series.abs()).all()):
            break
    integral[short] = b[short] * series
    total = integral + _one_minus_pow(c / b, g) / 2  # (f(c) - f(b)) / 2, f(b) = 0
    for k, bernoulli in enumerate(_BERNOULLI, start=1):
        m = 2 * k - 1  # f^(m)(b) - f^(m)(c) = -g (g-1) ... (g-m+1) / b^m * (1 - (c/b)^(g-m))
        falling = math.prod(g - r for r in range(m))
        total = total - bernoulli / math.factorial(2 * k) * falling / b**m * _one_minus_pow(c / b, g - m)
    return total


def power_intervals(steps: list[int], gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For the intervals (0, a_0], (a_0, a_1], ... of checkpoint steps: the power profile's weight on each, and the
    part of it that ``linear`` gives the checkpoint at its end (``B`` of the module docstring)."""
    import torch

    g = gamma + 1
    final = float(steps[-1])
    b = torch.tensor(steps, dtype=torch.float64)
    a = torch.cat([torch.zeros(1, dtype=torch.float64), b[:-1]])
    length = b - a
    at_end = torch.exp(g * torch.log(b / final))  # P(b)
    mass = torch.where(length > 0, at_end * _one_minus_pow(a / b, g), torch.zeros_like(b))
    split = min(steps[-1], max(DIRECT_STEPS, math.ceil(64 * g)))  # term by term below, Euler-Maclaurin above
    sums = torch.zeros_like(b)
    for first in range(0, split, _CHUNK):
        j = torch.arange(first, min(first + _CHUNK, split), dtype=torch.float64)
        i = torch.searchsorted(b, j, right=True)  # the interval with a <= j < b
        inside = i < len(steps)
        j, i = j[inside], i[inside]
        sums.index_add_(0, i, _one_minus_pow(j / b[i], g))
    start = a.clamp(min=split)
    late = b > start
    if bool(late.any()):
        sums[late] += _power_sum(start[late], b[late], g)
    newer = torch.where(length > 0, at_end * sums / length.clamp(min=1), torch.zeros_like(b))
    return mass, torch.minimum(newer, mass)


def power_weighting(steps: list[int], sigma_rel: float, interpolate: str = "linear") -> Weighting:
    """Weights of the power-function EMA with ``sigma_rel`` at the newest of ``steps`` (increasing)."""
    if interpolate not in INTERPOLATIONS:
        raise OptionError("interpolate", f"must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    gamma = gamma_of(sigma_rel)
    if steps[-1] == 0:  # a single checkpoint, at step 0: nothing trained, nothing to average
        return Weighting(tuple(steps), (1.0,))
    mass, newer = power_intervals(steps, gamma)
    if interpolate == "step":
        newer = mass.clone()
    newer[0] = mass[0]  # steps 1..a_0 are held at the first checkpoint
    weights = newer.clone()
    weights[:-1] += (mass - newer)[1:]  # the older end of interval i is checkpoint i-1
    weights = weights / weights.sum()
    return Weighting(tuple(steps), tuple(weights.tolist()), _power_unresolved(steps, gamma, mass))


def _power_unresolved(steps: list[int], gamma: float, mass: torch.Tensor) -> float:
    """U of the power profile. P is convex, so e_s rises within every interval: see :func:`_rising_excess`."""
    import torch

    g = gamma + 1
    final = float(steps[-1])
    b = torch.tensor(steps, dtype=torch.float64)
    a = torch.cat([torch.zeros(1, dtype=torch.float64), b[:-1]])

    def step_weight(s: torch.Tensor) -> torch.Tensor:  # e_s = P(s) (1 - (1 - 1/s)^g)
        s = s.clamp(min=1)
        return torch.exp(g * torch.log(s / final)) * -torch.expm1(g * torch.log1p(-1 / s))

    def weight_from(k: torch.Tensor) -> torch.Tensor:  # sum_{s=k..b} e_s = P(b) - P(k-1)
        return torch.exp(g * torch.log(b / final)) * _one_minus_pow((k - 1) / b, g)

    return _rising_excess(a, b, mass, step_weight, weight_from)


def _rising_excess(a: torch.Tensor, b: torch.Tensor, mass: torch.Tensor, step_weight: Any, weight_from: Any) -> float:
    """sum over intervals (a, b] of sum_s max(e_s - mean, 0), for a profile that rises within every interval.

    That is the interval's share of U (what lies above the mean equals what lies below it). The first step above
    the mean is found by bisection, every interval at once; ``step_weight(s)`` gives e at one step per interval,
    ``weight_from(k)`` the sum of e over k..b.
    """
    import torch

    length = b - a
    mean = mass / length.clamp(min=1)
    lo, hi = a.clone(), b.clone()  # the first step above the mean is in (lo, hi]
    while bool((open_ := hi - lo > 1).any()):
        mid = torch.floor((lo + hi) / 2)
        above = step_weight(mid) > mean
        hi = torch.where(open_ & above, mid, hi)
        lo = torch.where(open_ & ~above, mid, lo)
    excess = weight_from(hi) - (b - hi + 1) * mean
    rises = (length > 1) & (step_weight(hi) > mean)
    return float(torch.where(rises, excess, torch.zeros_like(excess)).clamp(min=0).sum())


def constant_from(schedule: DecaySchedule, bias_corrected: bool = False) -> float:
    """The first step from which d(s) no longer changes (math.inf if it changes forever: warmup towards 1)."""
    first = schedule.update_after_step + (1 if bias_corrected else 2)
    if not schedule.warmup:
        return first
    limit = schedule.decay_at(1 << 62, bias_corrected)  # the warmup rises to decay (or stays at min_decay)
    lo, hi = first - 1, first
    while schedule.decay_at(hi, bias_corrected) < limit:
        if hi > 1 << 60:
            return math.inf
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if schedule.decay_at(mid, bias_corrected) >= limit else (mid, hi)
    return hi


def ema_unresolved(steps: list[int], schedule: DecaySchedule, bias_correction: bool = False,
                   survive: list[float] | None = None) -> float:
    """U of the EMA's per-step profile e_s = (1 - d(s)) prod_{r>s} d(r) (divided by its sum under bias correction).

    Where the decay is constant over an interval, e_s rises geometrically in it and its share of U is closed form
    (:func:`_rising_excess`); the intervals before that (warmup, the copy at step k+1) are summed step by step, in
    chunks from the newest back: the cost is the steps until the decay settles, at most the run's. ``survive``:
    F of each interval (0, a_0], (a_0, a_1], ..., when the caller has them.
    """
    import torch

    starts = [0, *steps[:-1]]
    if survive is None:
        survive = [schedule.product(a, b, bias_correction) for a, b in zip(starts, steps)]
    tails, tail = [], 1.0
    for f in reversed(survive):
        tails.append(tail)
        tail *= f
    tails.reverse()  # prod_{j>i} F_j
    mass = [(1 - f) * t for f, t in zip(survive, tails)]
    total = sum(mass)
    if total <= 0:
        return 0.0
    a = torch.tensor(starts, dtype=torch.float64)
    b = torch.tensor(steps, dtype=torch.float64)
    m = torch.tensor(mass, dtype=torch.float64) / total
    after = torch.tensor(tails, dtype=torch.float64) / total  # the weight that survives past each interval's end
    settled = a + 1 >= constant_from(schedule, bias_correction)
    excess = 0.0
    if bool(settled.any()):
        d = schedule.decay_at(int(a[settled][0]) + 1, bias_correction)
        sa, sb, sm, st = a[settled], b[settled], m[settled], after[settled]
        if d >= 1:
            pass  # nothing decays: no weight in these intervals
        elif d > 0:
            log_d = math.log(d)
            excess += _rising_excess(sa, sb, sm, lambda s: st * (1 - d) * torch.exp((sb - s) * log_d),
                                     lambda k: st * -torch.expm1((sb - k + 1) * log_d))
        else:  # d = 0: all of an interval's weight on its last step
            excess += float((st * (1 - 1 / (sb - sa))).sum())
    if not bool(settled.all()):
        last = int((~settled).nonzero().max())
        mean = m[: last + 1] / (b[: last + 1] - a[: last + 1])
        log_after = math.log(tails[last]) if tails[last] > 0 else -math.inf  # sum of log d beyond the block
        hi = steps[last]
        while hi >= 1:
            lo = max(1, hi - _CHUNK + 1)
            d = schedule.decays(lo, hi, bias_correction)
            logs = torch.log(d)
            suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # sum_{r=s..hi} log d(r)
            later = torch.cat([suffix[1:], torch.zeros(1, dtype=torch.float64)]) + log_after
            e = (1 - d) * torch.exp(later) / total
            i = torch.searchsorted(b, torch.arange(lo, hi + 1, dtype=torch.float64))
            excess += float((e - mean[i]).clamp(min=0).sum())
            log_after += float(suffix[0])
            hi = lo - 1
    return excess
