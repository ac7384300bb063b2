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
continuation of nothing, and an append gives the full rerun's weights. The power EMA goes on the same way
(:func:`power_continuation`): its weight on an interval is P(b) - P(a) against the newest step, whatever comes
after, so m_n weighs P(s_n) and no total need be kept. The uniform mean of the newest K has no such state: it
needs the K newest checkpoints themselves.

**Cost.** F, A and B of an interval take a few operations whatever its length (:meth:`DecaySchedule.run`): a
step of 10^12, or Unix timestamps used as steps, costs what a step of 10 costs. Where d(s) is constant it is a
closed form; timm's warmup, whose d(s) changes at every step, is summed step by step over up to 2^16 steps and in
extrapolated chunks beyond (:func:`_warmup_run`, to ~1e-12 relative).

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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
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
            return max(min(self.warmup_raw(t), self.decay), self.min_decay)
        return self.decay

    def decays(self, first: int, last: int, bias_corrected: bool = False) -> torch.Tensor:
        """d(s) for s = first..last (inclusive) as a float64 tensor, vectorised for long intervals."""
        import torch

        steps = torch.arange(first, last + 1, dtype=torch.float64)
        if steps.numel() == 0:
            return steps
        t = (steps - self.update_after_step - 1).clamp(min=0)
        if self.warmup:
            d = self.warmup_raw(t).clamp(max=self.decay).clamp(min=self.min_decay)
        else:
            d = torch.full_like(steps, self.decay)
        if bias_corrected:
            return torch.where(steps <= self.update_after_step, torch.ones_like(d), d)
        return torch.where(t <= 0, torch.zeros_like(d), d)

    def product(self, after: int, upto: int, bias_corrected: bool = False) -> float:
        """prod_{s = after+1 .. upto} d(s): how much of the average at step ``after`` survives to ``upto``."""
        return self.run(after, upto, bias_corrected).survive

    def run(self, after: int, upto: int, bias_corrected: bool = False) -> StepRun:
        """What the steps s = after+1..upto do to the average (:class:`StepRun`), at a cost that does not grow
        with their number: the stretches where d(s) is constant (before update_after_step, clamped at min_decay
        or at decay, or no warmup) in closed form, the warmup between them by :func:`_warmup_run`."""
        out = StepRun()
        s = after + 1
        if s > upto:
            return out
        k = self.update_after_step
        lead_end = min(upto, k if bias_corrected else k + 1)  # d = 1 (nothing to decay yet) or 0 (timm's copy)
        if s <= lead_end:
            out = out.then(constant_run(1.0 if bias_corrected else 0.0, lead_end - s + 1))
            s = lead_end + 1
        if s > upto:
            return out
        if not self.warmup:
            return out.then(constant_run(self.decay, upto - s + 1))
        first, last = s - k - 1, upto - k - 1  # the warmup's t of these steps (t >= 0)
        if self.min_decay >= self.decay:
            return out.then(constant_run(self.min_decay, last - first + 1))
        varying, capped = self._warmup_bounds
        varying = last + 1 if varying is None else varying
        capped = last + 1 if capped is None else capped
        if first < varying:
            out = out.then(constant_run(self.min_decay, min(last, varying - 1) - first + 1))
        lo, hi = max(first, varying), min(last, capped - 1)
        if lo <= hi:
            out = out.then(_warmup_run(self, lo, hi - lo + 1))
        if max(first, capped) <= last:
            out = out.then(constant_run(self.decay, last - max(first, capped) + 1))
        return out

    @functools.cached_property
    def _warmup_bounds(self) -> tuple[int | None, int | None]:
        """The first warmup t with d(t) > min_decay, and the first with d(t) = decay (None: not before 2^62)."""
        return self._first_t(lambda raw: raw > self.min_decay), self._first_t(lambda raw: raw >= self.decay)

    def warmup_gap(self, t: Any) -> Any:
        """1 - d(t) of timm's warmup before clamping, (1 + t/gamma)^-power: for a float, or element-wise for a
        numpy array or torch tensor of t. The one place the warmup formula is written."""
        return (1 + t / self.warmup_gamma) ** -self.warmup_power

    def warmup_raw(self, t: Any) -> Any:
        """timm's warmup decay before clamping, with its float operations: 1 - (1 + t/gamma)^-power."""
        return 1 - self.warmup_gap(t)

    def _first_t(self, holds: Callable[[float], bool]) -> int | None:
        """The first t >= 0 at which ``holds(warmup_raw(t))`` (a condition that, once true, stays true: the
        warmup increases), by bisection; None if not before 2^62."""
        low, high = -1, 1 << 62
        if not holds(self.warmup_raw(high)):
            return None
        while high - low > 1:
            mid = (low + high) // 2
            if holds(self.warmup_raw(mid)):
                high = mid
            else:
                low = mid
        return high


# The warmup's d(t) varies at every step: a stretch of up to this many steps is summed step by step (exact), in
# plain floats up to FEW_STEPS (numpy's per-call cost would dominate) ...
FEW_STEPS = 256
EXACT_WARMUP_STEPS = 1 << 16
# ... a longer one in chunks over which 1 - d(t) changes by about this fraction (see _warmup_run).
WARMUP_CHUNK_VARIATION = 1e-3


@dataclass(frozen=True)
class StepRun:
    """What ``count`` consecutive steps u+1..u+m of the recurrence do to the average, whatever the weights were at
    each step: ``v_{u+m} = survive * v_u + sum_s e_s theta_s`` with ``e_s = (1 - d(s)) prod_{r>s} d(r)`` and

    * ``gained = sum_s e_s`` (= 1 - survive, summed without the cancellation of 1 - survive near 1),
    * ``to_first = sum_s e_s (u + m - s)`` and ``to_last = sum_s e_s (s - u)``: the first moments that split the
      gained weight between the two checkpoints at u and u+m under linear interpolation (A and B, times m).

    Runs compose with :meth:`then` (associatively), so a long interval is built from a few pieces; every
    operation adds or multiplies non-negative numbers, so the result keeps the relative precision of its parts.
    """

    count: int = 0
    survive: float = 1.0
    gained: float = 0.0
    to_first: float = 0.0
    to_last: float = 0.0

    def then(self, newer: StepRun) -> StepRun:
        """This run followed by ``newer``."""
        return StepRun(*_then((self.count, self.survive, self.gained, self.to_first, self.to_last),
                              (newer.count, newer.survive, newer.gained, newer.to_first, newer.to_last)))


def _then(older: tuple, newer: tuple) -> tuple:
    """:meth:`StepRun.then` on tuples of floats or of numpy arrays (many runs at once)."""
    count_o, survive_o, gained_o, first_o, last_o = older
    count_n, survive_n, gained_n, first_n, last_n = newer
    return (count_o + count_n, survive_o * survive_n, survive_n * gained_o + gained_n,
            survive_n * (first_o + count_n * gained_o) + first_n, survive_n * last_o + last_n + count_o * gained_n)


def constant_run(decay: float, count: int) -> StepRun:
    """``count`` steps at one decay, in O(log count) float operations (:func:`_constant_runs` in plain floats:
    numpy's per-call cost would dominate a single run)."""
    if count <= 0:
        return StepRun()
    log_d = math.log(decay) if decay > 0 else -math.inf
    return StepRun(*_constant_runs(log_d, count, _FLOATS))


class _Floats:
    """The operations :func:`_constant_runs` needs, on plain floats."""

    exp = staticmethod(math.exp)
    expm1 = staticmethod(math.expm1)

    @staticmethod
    def where(take: Any, new: Any, old: Any) -> Any:
        return new if take else old

    @staticmethod
    def zeros(count: Any) -> Any:
        return 0.0

    @staticmethod
    def any(count: Any) -> bool:
        return bool(count)


class _Arrays:
    """The operations :func:`_constant_runs` needs, element-wise on numpy arrays (many runs at once)."""

    @staticmethod
    def exp(x: Any) -> Any:
        import numpy as np

        return np.exp(x)

    @staticmethod
    def expm1(x: Any) -> Any:
        import numpy as np

        return np.expm1(x)

    @staticmethod
    def where(take: Any, new: Any, old: Any) -> Any:
        import numpy as np

        return np.where(take.astype(bool), new, old)

    @staticmethod
    def zeros(count: Any) -> Any:
        import numpy as np

        return np.zeros(count.shape)

    @staticmethod
    def any(count: Any) -> bool:
        return bool(count.any())


_FLOATS, _ARRAYS = _Floats(), _Arrays()


def _constant_runs(log_d: Any, count: Any, ops: Any = _ARRAYS) -> tuple:
    """Runs of ``count`` steps at decay ``exp(log_d)`` (numpy arrays of many runs with :data:`_ARRAYS`, or one run
    in plain floats with :data:`_FLOATS`), by doubling: a run of 2^k steps is two of 2^(k-1), and the runs asked
    for are unions of those. The survive and gained of each 2^k level come straight from exp and expm1 (squaring
    d^(2^(k-1)) would lose a bit per level); the moments from the doubling."""
    zero = ops.zeros(count)
    out = (zero, zero + 1.0, zero, zero, zero)
    gained = -ops.expm1(log_d)
    level = (zero + 1.0, ops.exp(log_d), gained, zero, gained)
    size, remaining = 1, count
    while ops.any(remaining):
        take = remaining & 1
        out = tuple(ops.where(take, new, old) for new, old in zip(_then(out, level), out))
        remaining = remaining >> 1
        doubled = _then(level, level)
        size *= 2
        level = (doubled[0], ops.exp(size * log_d), -ops.expm1(size * log_d), doubled[3], doubled[4])
    return out


def _fold_runs(runs: tuple) -> StepRun:
    """The runs (numpy arrays, oldest first) one after another, in vectorised form: each run's gained weight
    decays by the survival of every later run, and its moments shift by the steps before/after it."""
    import numpy as np

    count, survive, gained, to_first, to_last = runs
    after = np.append(np.cumprod(survive[::-1])[::-1][1:], 1.0)
    steps_after = np.append(np.cumsum(count[::-1])[::-1][1:], 0.0)
    steps_before = np.concatenate([[0.0], np.cumsum(count)[:-1]])
    return StepRun(int(round(float(count.sum()))), float(np.prod(survive)), float((gained * after).sum()),
                   float(((to_first + steps_after * gained) * after).sum()),
                   float(((to_last + steps_before * gained) * after).sum()))


def _single_steps(d: Any) -> tuple:
    import numpy as np

    return np.ones_like(d), d, 1.0 - d, np.zeros_like(d), 1.0 - d


def _warmup_run(schedule: DecaySchedule, first: int, count: int) -> StepRun:
    """The steps at warmup t = first..first+count-1, all strictly between the clamps (d(t) = warmup_raw(t)).

    Up to EXACT_WARMUP_STEPS steps, step by step. Beyond, in chunks of 2^j steps, j growing with t so that
    1 - d(t) ~ (t/gamma)^-power changes by at most ~WARMUP_CHUNK_VARIATION across a chunk (~700 chunks per
    doubling of t, so the cost grows with log t only). Each chunk is summed twice, as 4 and as 8 runs of
    constant decay (the decay of each run's middle step), and the two are extrapolated to runs of one step
    (Richardson): a run of m steps at its middle decay errs by a term in m^2 - 1, so with the fine runs m steps
    long the limit is ``fine + (fine - coarse) (m^2 - 1) / (3 m^2)``. Measured against a long-double per-step
    sum over 10^6 and 10^7 steps (gamma 1, power 2/3, t from 0 to 10^5): at most 3.4e-12 relative, at the
    level of the per-step sum's own rounding.
    """
    import numpy as np

    gamma, power = schedule.warmup_gamma, schedule.warmup_power
    if count <= FEW_STEPS:  # in plain floats, timm's own operations
        out = StepRun()
        for t in range(first, first + count):
            d = schedule.warmup_raw(t)
            out = out.then(StepRun(1, d, 1.0 - d, 0.0, 1.0 - d))
        return out
    if count <= EXACT_WARMUP_STEPS:
        k = schedule.update_after_step
        d = schedule.decays(first + k + 1, first + count + k, bias_corrected=True).numpy()
        return _fold_runs(_single_steps(d))
    starts, lengths = _warmup_chunks(first, count, gamma, power)
    single = lengths == 1
    runs = [np.empty(len(lengths)) for _ in range(5)]
    for run, values in zip(runs, _single_steps(schedule.warmup_raw(starts[single]))):
        run[single] = values
    chunk_starts, chunk_lengths = starts[~single], lengths[~single]
    coarse, fine = (_midpoint_runs(schedule, chunk_starts, chunk_lengths, parts) for parts in (4, 8))
    m = chunk_lengths / 8.0
    weight = (m * m - 1) / (3 * m * m)
    runs[0][~single] = chunk_lengths
    for run, c, f in zip(runs[1:], coarse[1:], fine[1:]):
        run[~single] = f + (f - c) * weight
    return _fold_runs(tuple(runs))


def _midpoint_runs(schedule: DecaySchedule, starts: Any, lengths: Any, parts: int) -> tuple:
    """Each chunk as ``parts`` equal runs, each at the decay of its middle step (log d from 1 - d directly, not
    rounded through d), composed: arrays over the chunks."""
    import numpy as np

    size = lengths // parts
    out = None
    for i in range(parts):
        middle = starts + i * size + (size - 1) / 2
        run = _constant_runs(np.log1p(-schedule.warmup_gap(middle)), size)
        out = run if out is None else _then(out, run)
    return out  # type: ignore[return-value]


def _warmup_chunks(first: int, count: int, gamma: float, power: float) -> tuple[Any, Any]:
    """Chunk starts (warmup t) and lengths covering first..first+count-1: 2^j steps long from the t where
    WARMUP_CHUNK_VARIATION (t + gamma) / power reaches 2^j, the end in smaller powers of two; chunks shorter
    than 8 steps become single steps."""
    import numpy as np

    starts, lengths = [], []
    t, end, j = first, first + count, 0
    while t < end:
        size = 1 << j
        band_end = math.ceil(2 * size * power / WARMUP_CHUNK_VARIATION - gamma)  # where 2^(j+1) becomes allowed
        if band_end <= t:
            j += 1
            continue
        n = min((min(band_end, end) - t + size - 1) // size, (end - t) // size)
        if n == 0:
            break
        starts.append(t + size * np.arange(n, dtype=np.float64))
        lengths.append(np.full(n, size, dtype=np.int64))
        t += n * size
        j += 1
    while t < end:
        size = 1 << int(math.log2(end - t))
        starts.append(np.array([float(t)]))
        lengths.append(np.array([size], dtype=np.int64))
        t += size
    start, length = np.concatenate(starts), np.concatenate(lengths)
    repeat = np.where(length < 8, length, 1)
    offsets = np.arange(repeat.sum()) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    return np.repeat(start, repeat) + offsets, np.where(np.repeat(length < 8, repeat), 1, np.repeat(length, repeat))


@dataclass(frozen=True)
class Weighting:
    """Final weights (summing to 1) of checkpoints at ``steps``, and the lerp weights that reproduce them."""

    steps: tuple[int, ...]
    weights: tuple[float, ...]
    unresolved: float = 0.0  # of the per-step profile asked for, the share the checkpoints cannot place (docstring)
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
    (see the module docstring), at a cost independent of b - a (:meth:`DecaySchedule.run`)."""
    run = schedule.run(a, b, bias_corrected)
    if interpolate == "step" or run.count == 0:
        return run.survive, 0.0, run.gained
    return run.survive, run.to_first / run.count, run.to_last / run.count


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
    weighting, state, _ = _ema_continuation(steps, schedule, bias_correction, interpolate, after)
    return weighting, state


def _ema_continuation(steps: list[int], schedule: DecaySchedule, bias_correction: bool, interpolate: str,
                      after: EmaState | None) -> tuple[Weighting, EmaState, list[float]]:
    """:func:`ema_continuation`, and F of each interval (the first, ending at the earlier newest: 1)."""
    if interpolate not in INTERPOLATIONS:
        raise OptionError("interpolate", f"must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    if after is None:
        # Interval i ends at checkpoint i; the first copies theta_0 (as timm starts from a copy of the model) or,
        # with bias correction, runs from step 0 held at theta_0.
        ends, prior_total = list(steps), 0.0
        first = interval_coefficients(schedule, 0, steps[0], "step", True) if bias_correction else (0.0, 0.0, 1.0)
        coefficients: list[tuple[float, float, float] | None] = [first]
    else:
        if steps and steps[0] <= after.step:
            raise ValueError(f"step {steps[0]} is not after the newest step already folded, {after.step}")
        ends, prior_total = [after.step, *steps], after.total
        coefficients = [None]  # nothing ends at the earlier newest checkpoint: it is in the running mean
    coefficients += [interval_coefficients(schedule, a, b, interpolate, bias_correction) for a, b in zip(ends, ends[1:])]
    raw = [0.0] * len(ends)
    tail = 1.0  # prod_{j>i} F_j: how much of what interval i left survives to the end
    for i in range(len(ends) - 1, 0 if after is not None else -1, -1):
        coefficient = coefficients[i]
        assert coefficient is not None, "only the interval ending at the earlier newest has none, and it is not walked"
        survives, older, newer = coefficient
        raw[i] += newer * tail
        if i > 0:
            raw[i - 1] += older * tail
        tail *= survives
    prior = prior_total * tail
    total = prior + sum(raw)
    state = EmaState(ends[-1], total)
    survive = [1.0 if c is None else c[0] for c in coefficients]
    if total <= 0.0:
        # Only with bias correction and no update at all (every step before update_after_step).
        return Weighting(tuple(ends), tuple(0.0 for _ in ends)), state, survive
    return Weighting(tuple(ends), tuple(w / total for w in raw), prior=prior / total), state, survive


def ema_total(last_step: int, schedule: DecaySchedule, bias_correction: bool = False) -> float:
    """R after the newest checkpoint, at ``last_step``, of an EMA from the start (see "Appending"): 1, or with bias
    correction 1 - prod d(s) over every step (the intervals' F telescope)."""
    return 1.0 - schedule.product(0, last_step, True) if bias_correction else 1.0


def ema_weighting(steps: list[int], schedule: DecaySchedule, bias_correction: bool = False,
                  interpolate: str = "linear") -> Weighting:
    """Weights of the EMA over checkpoints at ``steps`` (increasing), the weights between saves interpolated."""
    weighting, _, survive = _ema_continuation(steps, schedule, bias_correction, interpolate, None)
    if not any(weighting.weights):
        return weighting  # only with bias correction and no update at all (every step before update_after_step)
    survive[0] = schedule.product(0, steps[0], bias_correction)  # the first interval, (0, a_0]
    return replace(weighting, unresolved=ema_unresolved(steps, schedule, bias_correction, survive))


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


def power_continuation(steps: list[int], sigma_rel: float, interpolate: str, newest: int,
                       unresolved: float | None = None) -> Weighting:
    """Weights of the power EMA over checkpoints at ``steps`` (increasing, after ``newest``), continuing the mean of
    the checkpoints up to step ``newest``: the weighting's first entry is the checkpoint at ``newest`` (whose
    weights ``linear`` needs again for the next interval), ``prior`` the earlier mean's share. ``unresolved``, U
    of the earlier mean, gives U of the whole (else 0).

    The profile's weight on an interval, relative to the newest step, is P(b) - P(a) with P(x) = (x / newest)^(g):
    it does not depend on what comes after, only on the step it is measured against. The earlier mean holds the
    intervals up to ``newest``, whose total is P(newest) measured against the new newest step: that is its share,
    and the new intervals are split between their ends as from the start. The cost is that of the new intervals.
    """
    if interpolate not in INTERPOLATIONS:
        raise OptionError("interpolate", f"must be one of {', '.join(INTERPOLATIONS)}, got {interpolate!r}")
    if not steps or steps[0] <= newest:
        raise ValueError(f"the new steps must come after the newest step already folded, {newest}")
    gamma = gamma_of(sigma_rel)
    ends = [newest, *steps]
    mass, newer = power_intervals(ends, gamma)
    if interpolate == "step":
        newer = mass.clone()
    raw = newer.clone()
    raw[0] = 0.0  # the interval (0, newest] is in the earlier mean
    raw[:-1] += (mass - newer)[1:]  # the older end of interval i is checkpoint i-1
    prior = float(mass[0])
    total = prior + float(raw.sum())
    u = 0.0 if unresolved is None else unresolved * prior + _power_unresolved(steps, gamma, mass[1:], newest)
    return Weighting(tuple(ends), tuple((raw / total).tolist()), u / total, prior=prior / total)


def _power_unresolved(steps: list[int], gamma: float, mass: torch.Tensor, start: int = 0) -> float:
    """U of the power profile. P is convex, so e_s rises within every interval: see :func:`_rising_excess`.
    ``start``: the first interval begins after this step (the intervals after an earlier part of the run)."""
    import torch

    g = gamma + 1
    final = float(steps[-1])
    b = torch.tensor(steps, dtype=torch.float64)
    a = torch.cat([torch.full((1,), float(start), dtype=torch.float64), b[:-1]])

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


# Up to this many steps before the decay settles, and this many per interval there, U's part there is summed step
# by step (fastest for many short intervals); beyond, interval by interval (:func:`_unsettled_excess`, about as
# costly as walking 5,000 steps per interval), whose cost does not grow with the steps.
_WALK_STEPS = 1 << 22
_WALK_PER_INTERVAL = 5_000
# A stretch of steps this short is compared with its interval's mean step by step.
_EXCESS_STEPS = 4096


def _unsettled_excess(schedule: DecaySchedule, bias_corrected: bool, a: int, b: int, mean: float,
                      after: float) -> float:
    """sum over s = a+1..b of max(0, e_s - mean), e_s = after (1 - d(s)) prod_{s<r<=b} d(r): an interval's part of
    U where d(s) is not constant, at a cost that does not grow with b - a.

    The interval is cut where d(s) changes form (no update yet, timm's copy, the clamps of the warmup); within a
    piece e_s is monotone (a constant d makes it rise; the warmup's 1 - (1 + t/gamma)^-power makes it rise for
    power < 1, stay for 1 and fall above), so a stretch whose two ends lie on one side of the mean lies wholly on
    it: above, its excess is its sum (:meth:`DecaySchedule.run`) less its length times the mean. Only the stretch
    that crosses the mean is halved, down to _EXCESS_STEPS steps compared one by one."""
    import torch

    k = schedule.update_after_step
    cuts = {a, b, k, k + 1}
    if schedule.warmup:
        varying, capped = schedule._warmup_bounds
        cuts |= {k + 1 + t for t in (varying, capped) if t is not None}
    bounds = sorted(c for c in cuts if a <= c <= b)

    def stretch(lo: int, hi: int, tail: float) -> float:  # steps lo+1..hi; tail = prod_{hi<r<=b} d(r)
        if hi - lo <= _EXCESS_STEPS:
            d = schedule.decays(lo + 1, hi, bias_corrected)
            later_each = torch.cat([torch.flip(torch.cumprod(torch.flip(d[1:], [0]), 0), [0]), d.new_ones(1)])
            return float(((1 - d) * later_each * (after * tail) - mean).clamp(min=0).sum())
        whole = schedule.run(lo, hi, bias_corrected)
        d_first = schedule.decay_at(lo + 1, bias_corrected)
        later = whole.survive / d_first if d_first > 0 else schedule.run(lo + 1, hi, bias_corrected).survive
        first = after * (1 - d_first) * later * tail
        last = after * (1 - schedule.decay_at(hi, bias_corrected)) * tail
        if min(first, last) >= mean:
            return after * whole.gained * tail - (hi - lo) * mean
        if max(first, last) <= mean:
            return 0.0
        mid = (lo + hi) // 2
        return stretch(lo, mid, tail * schedule.run(mid, hi, bias_corrected).survive) + stretch(mid, hi, tail)

    return sum(stretch(lo, hi, schedule.run(hi, b, bias_corrected).survive) for lo, hi in zip(bounds, bounds[1:]))


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


def ema_unresolved_continued(unresolved: float, newest: int, new_steps: list[int], schedule: DecaySchedule,
                             bias_correction: bool = False) -> float:
    """U of a run appended to: ``unresolved`` was U of the checkpoints up to step ``newest``, and ``new_steps``
    come after it. At a cost independent of the checkpoints before.

    U is a sum over intervals of excesses proportional to the weight e_s, and sum_s e_s = 1 - F over the whole run
    (the sum telescopes; F the product of every d(s)). The steps after ``newest`` multiply every earlier e_s by
    their F_new, so the old intervals' excess becomes ``unresolved`` (1 - F_old) F_new, the new intervals add theirs,
    and the total becomes 1 - F_old F_new.
    """
    if not new_steps:
        return unresolved
    f_old = schedule.product(0, newest, bias_correction)
    f_new = schedule.product(newest, new_steps[-1], bias_correction)
    total = 1 - f_old * f_new
    if total <= 0:
        return 0.0
    added = ema_unresolved(new_steps, schedule, bias_correction, start=newest) * (1 - f_new)
    return (unresolved * (1 - f_old) * f_new + added) / total


def ema_unresolved(steps: list[int], schedule: DecaySchedule, bias_correction: bool = False,
                   survive: list[float] | None = None, start: int = 0) -> float:
    """U of the EMA's per-step profile e_s = (1 - d(s)) prod_{r>s} d(r) (divided by its sum under bias correction).

    Where the decay is constant over an interval, e_s rises geometrically in it and its share of U is closed form
    (:func:`_rising_excess`); the intervals before that (warmup, the copy at step k+1) are summed step by step, in
    chunks from the newest back: the cost is the steps until the decay settles, at most the run's. ``survive``:
    F of each interval (0, a_0], (a_0, a_1], ..., when the caller has them. ``start``: the first interval begins
    after this step instead (the checkpoints after an earlier part of the run: U of those intervals alone).
    """
    import torch

    starts = [start, *steps[:-1]]
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
    unsettled = (~settled).nonzero().flatten().tolist()
    walk = unsettled and steps[unsettled[-1]] - start <= min(_WALK_STEPS, _WALK_PER_INTERVAL * len(unsettled))
    if walk:  # step by step, in vectorised chunks from the newest back
        last = unsettled[-1]
        mean = m[: last + 1] / (b[: last + 1] - a[: last + 1])
        log_after = math.log(tails[last]) if tails[last] > 0 else -math.inf  # sum of log d beyond the block
        hi = steps[last]
        while hi > start:
            lo = max(start + 1, hi - _CHUNK + 1)
            decays = schedule.decays(lo, hi, bias_correction)
            logs = torch.log(decays)
            suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # sum_{r=s..hi} log d(r)
            later = torch.cat([suffix[1:], torch.zeros(1, dtype=torch.float64)]) + log_after
            e = (1 - decays) * torch.exp(later) / total
            i = torch.searchsorted(b, torch.arange(lo, hi + 1, dtype=torch.float64))
            excess += float((e - mean[i]).clamp(min=0).sum())
            log_after += float(suffix[0])
            hi = lo - 1
    else:  # too many steps to walk: each interval at a cost independent of its length
        for i in unsettled:
            if steps[i] > starts[i]:
                excess += _unsettled_excess(schedule, bias_correction, starts[i], steps[i],
                                            float(m[i]) / (steps[i] - starts[i]), tails[i] / total)
    return excess
