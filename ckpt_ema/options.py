"""The options of an average, declared once: the Python API takes them, the CLI builds them, the output records them.

:class:`AverageOptions` is the one currency between the command line (:mod:`ckpt_ema.cli_options` declares a flag
per field), the API (:func:`ckpt_ema.average` and friends take it, or keyword arguments that build it) and the
output's metadata (every field, as JSON). Sizes are bytes, already parsed (:func:`parse_size` turns ``"500MB"``
into bytes); errors name the parameter (:class:`ckpt_ema.errors.OptionError`), and the CLI words them as flags.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, TypedDict

from ckpt_ema.errors import OptionError
from ckpt_ema.weighting import DEFAULT_DECAY, INTERPOLATIONS, DecaySchedule, gamma_of
from ckpt_ema.window_weights import WINDOW_SHAPES

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")
ACCUM_DTYPE_NAMES = ("float32", "float64")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# The memory budget when none is given: a quarter of the available memory, at most this much.
DEFAULT_MAX_MEMORY_CAP = 2 << 30
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, param: str = "size") -> int:
    """Bytes from ``1234``, ``"500MB"``, ``"1.5GiB"``; an :class:`OptionError` naming ``param`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).upper() not in SIZE_UNITS:
            raise OptionError(param, f"must be a size like 500MB or 2GiB, got {value!r}")
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise OptionError(param, f"must be positive, got {value!r}")
    return size


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, or physical memory where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class OptionFields(TypedDict, total=False):
    """The keyword arguments that build :class:`AverageOptions` (:meth:`AverageOptions.build`): the schedule's
    fields flat (``decay`` or ``half_life``, and the warmup's), then every other field."""

    decay: float | None
    half_life: float | None
    min_decay: float
    update_after_step: int
    warmup: bool
    warmup_gamma: float
    warmup_power: float
    bias_correction: bool
    interpolate: str
    last: int | None
    sigma_rel: float | None
    weights: str | None
    window_steps: int | None
    window_tokens: int | None
    tokens_per_step: int | None
    from_step: int | None
    to_step: int | None
    per_checkpoint: bool
    key: str | None
    strip_prefix: str | None
    device: str
    accum_dtype: str
    out_dtype: str | None
    max_memory: int | str | None
    max_shard_size: int | str | None


@dataclass(frozen=True)
class AverageOptions:
    """Everything that decides an average: which weights (timm's EMA, EDM2's power EMA of width ``sigma_rel``, a
    uniform mean of the newest ``last``, or a merge shaped like a learning-rate decay over a window), over which
    checkpoints, computed and written how. Validated when built;
    recorded in the output's metadata."""

    schedule: DecaySchedule = field(default_factory=DecaySchedule)  # the EMA's per-step decay d(s)
    bias_correction: bool = False  # start from zero and divide by 1 - prod d(s), instead of copying the first
    interpolate: str = "linear"  # the weights between two checkpoints: "linear" or "step" (see ckpt_ema.weighting)
    last: int | None = None  # instead of an EMA: the plain mean of the newest ``last`` checkpoints
    sigma_rel: float | None = None  # instead of timm's EMA: EDM2's power-function EMA of this relative width
    # instead of an EMA: merge weights shaped like a learning-rate decay over a window (ckpt_ema.window_weights),
    # the window in steps, or in tokens: at tokens_per_step, or (None) by the token counts the checkpoints record
    weights: str | None = None
    window_steps: int | None = None
    window_tokens: int | None = None
    tokens_per_step: int | None = None
    from_step: int | None = None  # only checkpoints with from_step <= step <= to_step
    to_step: int | None = None
    per_checkpoint: bool = False  # ignore steps: every checkpoint counts as one update
    key: str | None = None  # where the weights are in each checkpoint (dotted path); None: found automatically
    strip_prefix: str | None = None  # cut from every tensor name (a wrapper's "model."); a name without it is an error
    device: str = "cpu"  # where to accumulate
    accum_dtype: str = "float32"  # precision of the running average
    out_dtype: str | None = None  # dtype of every float output tensor; None: each tensor's input dtype
    max_memory: int | None = None  # bytes for the accumulators; None: a quarter of the available memory, <= 2 GiB
    max_shard_size: int | None = DEFAULT_MAX_SHARD_SIZE  # a bigger output is sharded; None: never

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, DecaySchedule):
            raise OptionError("schedule", f"must be a DecaySchedule, got {type(self.schedule).__name__}")
        if self.interpolate not in INTERPOLATIONS:
            raise OptionError("interpolate", f"must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolate!r}")
        if self.last is not None and not (isinstance(self.last, int) and self.last >= 1):
            raise OptionError("last", f"must be at least 1, got {self.last}")
        if self.last is not None and (self.schedule != DecaySchedule() or self.bias_correction):
            raise OptionError("last", f"{self.last} is a uniform mean: the EMA's decay schedule and bias correction "
                                      "do not apply to it")
        if self.sigma_rel is not None:
            gamma_of(self.sigma_rel)  # in (0, 1/sqrt(12)]
            if self.last is not None:
                raise OptionError("sigma_rel", f"{self.sigma_rel} asks for a power EMA, last {self.last} for a uniform "
                                               "mean: give one of them")
            if self.schedule != DecaySchedule() or self.bias_correction:
                raise OptionError("sigma_rel", f"{self.sigma_rel} is a power-function EMA: timm's decay schedule and "
                                               "bias correction do not apply to it")
        self._check_window()
        if self.accum_dtype not in ACCUM_DTYPE_NAMES:
            raise OptionError("accum_dtype", f"must be one of {', '.join(ACCUM_DTYPE_NAMES)}, got {self.accum_dtype!r}")
        if self.out_dtype is not None and self.out_dtype not in DTYPE_NAMES:
            raise OptionError("out_dtype", f"must be one of {', '.join(DTYPE_NAMES)}, got {self.out_dtype!r}")
        for name in ("max_memory", "max_shard_size"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise OptionError(name, f"must be a positive number of bytes (see parse_size), got {value!r}")
        if self.from_step is not None and self.to_step is not None and self.from_step > self.to_step:
            raise OptionError("from_step", f"{self.from_step} is after to_step {self.to_step}")
        if self.strip_prefix is not None and not (isinstance(self.strip_prefix, str) and self.strip_prefix):
            raise OptionError("strip_prefix", f"must be a non-empty string, got {self.strip_prefix!r}")

    def _check_window(self) -> None:
        """A window merge: a shape, and a window in steps or in tokens (at tokens_per_step, or by the checkpoints'
        own token counts); no other weights. A window alone is the uniform mean of the window."""
        for name in ("window_steps", "window_tokens", "tokens_per_step"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise OptionError(name, f"must be a whole number >= 1, got {value!r}")
        if self.weights is not None and self.weights not in WINDOW_SHAPES:
            raise OptionError("weights", f"must be one of {', '.join(WINDOW_SHAPES)}, got {self.weights!r}")
        if self.window_steps is not None and self.window_tokens is not None:
            raise OptionError("window_tokens", "replaces --window-steps: give one of them, not both")
        windowed = self.window_steps is not None or self.window_tokens is not None
        if self.weights is not None and not windowed:
            raise OptionError("weights", f"{self.weights} merges a window: give --window-steps or --window-tokens")
        if not windowed:
            return
        if self.weights is None:
            object.__setattr__(self, "weights", "uniform")
        others = {"--last": self.last is not None, "--sigma-rel": self.sigma_rel is not None,
                  "--decay and its schedule": self.schedule != DecaySchedule(),
                  "--bias-correction": self.bias_correction}
        given = [flag for flag, on in others.items() if on]
        if given:
            raise OptionError("weights", f"{self.weights} over a window is its own average: {', '.join(given)} "
                                         "cannot go with it")

    @property
    def window(self) -> int | None:
        """The window of a window merge in steps, where the options alone give it: the window in steps, or in
        tokens at tokens_per_step rounded up to whole steps. None for a window in tokens read from the checkpoints'
        records (:func:`ckpt_ema.planning.window_of` places it on the run)."""
        if self.window_tokens is not None and self.tokens_per_step is not None:
            return -(-self.window_tokens // self.tokens_per_step)
        return self.window_steps

    @classmethod
    def build(cls, *, decay: float | None = None, half_life: float | None = None, min_decay: float = 0.0,
              update_after_step: int = 0, warmup: bool = False, warmup_gamma: float = 1.0,
              warmup_power: float = 2 / 3, **rest: Any) -> AverageOptions:
        """Options from flat keyword arguments, as the CLI's flags and ``average(..., decay=0.99)`` give them:
        the schedule's fields (``decay`` or ``half_life``, and the warmup's) and any other field of this class."""
        if decay is not None and half_life is not None:
            raise OptionError("half_life", "replaces --decay: give one of them, not both")
        if half_life is not None:
            decay = DecaySchedule.from_half_life(half_life).decay
        schedule = DecaySchedule(decay=DEFAULT_DECAY if decay is None else decay, min_decay=min_decay,
                                 update_after_step=update_after_step, warmup=warmup, warmup_gamma=warmup_gamma,
                                 warmup_power=warmup_power)
        unknown = sorted(set(rest) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        for name in ("max_memory", "max_shard_size"):  # "500MB" is welcome here; the options object holds bytes
            if isinstance(rest.get(name), str):
                rest[name] = parse_size(rest[name], name)
        return cls(schedule=schedule, **rest)

    def replaced(self, **changes: Any) -> AverageOptions:
        """A copy with some fields changed, given flat as to :meth:`build` (``decay=0.99``, ``warmup=True``,
        ``max_memory=...``). ``half_life`` replaces the decay; ``last=K`` (a uniform mean) and ``sigma_rel=S`` (a
        power EMA) take no schedule: the schedule and bias correction are then reset rather than refused."""
        unset = {"last": None, "sigma_rel": None, "weights": None, "window_steps": None, "window_tokens": None}
        for weights in ("last", "sigma_rel", "weights", "window_steps", "window_tokens"):
            if changes.get(weights) is not None:  # a uniform mean, a power EMA, a window: no schedule, no others
                window: dict[str, Any] = {k: changes[k] for k in ("weights", "window_steps", "window_tokens")
                                          if k in changes}
                chosen = {**unset, weights: changes[weights], **window}
                rest = {k: v for k, v in changes.items() if k not in chosen}
                return replace(self, schedule=DecaySchedule(), bias_correction=False, **chosen).replaced(**rest)
        flat = self.flat()
        if changes.get("half_life") is not None:
            flat.pop("decay")
        if changes.get("decay") is not None or changes.get("half_life") is not None:
            flat.update(unset)
        flat.update(changes)
        return AverageOptions.build(**flat)

    def memory_budget(self) -> int:
        return self.max_memory if self.max_memory is not None else min(DEFAULT_MAX_MEMORY_CAP, available_memory() // 4)

    def flat(self) -> dict[str, Any]:
        """Every option as the flat keywords of :meth:`build` (the schedule's fields first): plain JSON values,
        what the output's metadata records, and ``AverageOptions.build(**options.flat()) == options``."""
        return {**asdict(self.schedule), **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "schedule"}}
