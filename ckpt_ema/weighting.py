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

**Cost.** F, A and B of an interval take a few operations whatever its length (:meth:`DecaySchedule.run`): a
step of 10^12, or Unix timestamps used as steps, costs what a step of 10 costs. Where d(s) is constant it is a
closed form; timm's warmup, whose d(s) changes at every step, is summed step by step over up to 2^16 steps and in
extrapolated chunks beyond (:func:`_warmup_run`, to ~1e-12 relative).

**Effective window.** The smallest number of newest checkpoints that carry 99% of the weight: when it is 1 or 2,
the checkpoints are too sparse for the decay, and the "average" is mostly the last checkpoint.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

    def warmup_raw(self, t: float) -> float:
        """timm's warmup formula before clamping, with its float operations: 1 - (1 + t/gamma)^-power."""
        return 1 - (1 + t / self.warmup_gamma) ** -self.warmup_power

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
    """``count`` steps at one decay, in O(log count) float operations: :func:`_constant_runs` for one run, in
    plain floats (numpy's per-call cost would dominate a single run)."""
    if count <= 0:
        return StepRun()
    log_d = math.log(decay) if decay > 0 else -math.inf
    gained = -math.expm1(log_d)
    out: tuple = (0, 1.0, 0.0, 0.0, 0.0)
    level: tuple = (1, decay, gained, 0.0, gained)
    while True:
        if count & 1:
            out = _then(out, level)
        count >>= 1
        if not count:
            return StepRun(*out)
        doubled = _then(level, level)
        level = (doubled[0], math.exp(doubled[0] * log_d), -math.expm1(doubled[0] * log_d), doubled[3], doubled[4])


def _constant_runs(log_d: Any, count: Any) -> tuple:
    """Runs of ``count[i]`` steps at decay ``exp(log_d[i])`` (numpy arrays), by doubling: a run of 2^k steps is two
    of 2^(k-1), and the runs asked for are unions of those. The survive and gained of each 2^k level come straight
    from exp and expm1 (squaring d^(2^(k-1)) would lose a bit per level); the moments from the doubling."""
    import numpy as np

    zero = np.zeros(count.shape)
    out = (zero, zero + 1.0, zero, zero, zero)
    gained = -np.expm1(log_d)
    level = (zero + 1.0, np.exp(log_d), gained, zero, gained)
    size, remaining = 1, count.copy()
    while remaining.any():
        take = (remaining & 1).astype(bool)
        out = tuple(np.where(take, new, old) for new, old in zip(_then(out, level), out))
        remaining >>= 1
        doubled = _then(level, level)
        size *= 2
        level = (doubled[0], np.exp(size * log_d), -np.expm1(size * log_d), doubled[3], doubled[4])
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
    t = starts[single]
    for run, values in zip(runs, _single_steps(1 - (1 + t / gamma) ** -power)):
        run[single] = values
    chunk_starts, chunk_lengths = starts[~single], lengths[~single]
    coarse, fine = (_midpoint_runs(chunk_starts, chunk_lengths, parts, gamma, power) for parts in (4, 8))
    m = chunk_lengths / 8.0
    weight = (m * m - 1) / (3 * m * m)
    runs[0][~single] = chunk_lengths
    for run, c, f in zip(runs[1:], coarse[1:], fine[1:]):
        run[~single] = f + (f - c) * weight
    return _fold_runs(tuple(runs))


def _midpoint_runs(starts: Any, lengths: Any, parts: int, gamma: float, power: float) -> tuple:
    """Each chunk as ``parts`` equal runs, each at the decay of its middle step (log d from 1 - d directly, not
    rounded through d), composed: arrays over the chunks."""
    import numpy as np

    size = lengths // parts
    out = None
    for i in range(parts):
        middle = starts + i * size + (size - 1) / 2
        run = _constant_runs(np.log1p(-((1 + middle / gamma) ** -power)), size)
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


def interval_coefficients(schedule: DecaySchedule, a: int, b: int, interpolate: str,
                          bias_corrected: bool = False) -> tuple[float, float, float]:
    """(F, A, B) of ``v_b = F * v_a + A * theta_a + B * theta_b`` for the steps s = a+1..b between two checkpoints
    (see the module docstring), at a cost independent of b - a (:meth:`DecaySchedule.run`)."""
    run = schedule.run(a, b, bias_corrected)
    if interpolate == "step" or run.count == 0:
        return run.survive, 0.0, run.gained
    return run.survive, run.to_first / run.count, run.to_last / run.count


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
    return Weighting(tuple(steps), tuple(w / total for w in raw))


def uniform_weighting(steps: list[int], last: int) -> Weighting:
    """The plain mean of the newest ``last`` checkpoints (LAWA, SWA, fairseq's average_checkpoints)."""
    if last < 1:
        raise OptionError("last", f"must be at least 1, got {last}")
    if last > len(steps):
        raise OptionError("last", f"{last} asks for more checkpoints than the {len(steps)} there are")
    return Weighting(tuple(steps), tuple(0.0 if i < len(steps) - last else 1.0 / last for i in range(len(steps))))
