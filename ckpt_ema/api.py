"""The Python API: plan an average, run it, write it. The CLI is a thin layer over these two functions.

    import ckpt_ema
    result = ckpt_ema.average(["runs/cifar"], decay=0.999, output="ema.safetensors")
    model.load_state_dict(result.state_dict)
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ckpt_ema import __version__, distributed
from ckpt_ema.checkpoint import load_state_dict
from ckpt_ema.discover import Discovery, discover
from ckpt_ema.distributed import World
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.output import MemoryOutput, SafetensorsOutput, check_output_path
from ckpt_ema.plan import INTERPOLATIONS, Weighting, ema_weighting, uniform_weighting
from ckpt_ema.schedule import DecaySchedule
from ckpt_ema.stream import DEFAULT_CHUNK_ELEMS, Layout, checkpoints_read, fold

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACCUM_DTYPES = ("float32", "float64")

# Training metadata carried from the newest checkpoint into the output (``eval`` needs the architecture).
CARRIED_METADATA = ("arch", "epoch", "step", "global_step", "hparams", "hyper_parameters", "args", "version")


DEFAULT_DECAY = 0.999
# The smallest chunk worth folding: below it, Python overhead per chunk dominates.
MIN_CHUNK_ELEMS = 1024
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, option: str) -> int:
    """Bytes from ``1234``, ``"500MB"``, ``"1.5GiB"``; a one-line error naming ``option`` otherwise."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).upper() not in SIZE_UNITS:
            raise CkptEmaError(f"{option} must be a size like 500MB or 2GiB, got {value!r}")
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise CkptEmaError(f"{option} must be positive, got {value!r}")
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


@dataclass(frozen=True)
class AverageOptions:
    """Every option of ``average``; recorded in the output's metadata so that a result can be reproduced."""

    decay: float | None = None  # default 0.999, or from half_life
    half_life: float | None = None  # steps; decay = 0.5 ** (1 / half_life)
    min_decay: float = 0.0
    update_after_step: int = 0
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    bias_correction: bool = False
    interpolate: str = "linear"  # measured on the seed recipe: see README
    last: int | None = None  # uniform mean of the newest ``last`` checkpoints instead of an EMA
    from_step: int | None = None
    to_step: int | None = None
    per_checkpoint: bool = False
    key: str | None = None
    device: str = "cpu"
    accum_dtype: str = "float32"
    out_dtype: str | None = None
    max_memory: str | int | None = None  # e.g. "2GB"; default: a quarter of the available memory, at most 2 GB
    max_shard_size: str | int | None = "5GB"  # a bigger output is sharded (Hugging Face layout); None: never

    def max_shard_bytes(self) -> int | None:
        return None if self.max_shard_size is None else parse_size(self.max_shard_size, "--max-shard-size")

    def memory_budget(self) -> int:
        if self.max_memory is not None:
            return parse_size(self.max_memory, "--max-memory")
        return min(2 << 30, available_memory() // 4)

    def chunk_elems(self, candidates: int) -> int:
        """Elements per chunk such that everything a chunk costs fits the memory budget.

        Per candidate: its accumulator chunk and the finished chunk in the output's dtype on its way to the file;
        plus two temporaries for dtype conversion of the checkpoint being read. All in the widest dtype involved.
        """
        itemsize = max(DTYPES[self.accum_dtype].itemsize, DTYPES[self.out_dtype].itemsize if self.out_dtype else 0, 4)
        per_element = (candidates * 2 + 2) * itemsize
        elems = min(DEFAULT_CHUNK_ELEMS, self.memory_budget() // per_element)
        if elems < MIN_CHUNK_ELEMS:
            raise CkptEmaError(
                f"--max-memory {self.max_memory} is too small for {candidates} accumulator(s): "
                f"at least {_human_bytes(MIN_CHUNK_ELEMS * per_element)} is needed"
            )
        return elems

    def schedule(self) -> DecaySchedule:
        if self.half_life is not None and self.decay is not None:
            raise CkptEmaError("give --decay or --half-life, not both")
        kwargs = dict(
            min_decay=self.min_decay,
            update_after_step=self.update_after_step,
            warmup=self.warmup,
            warmup_gamma=self.warmup_gamma,
            warmup_power=self.warmup_power,
        )
        if self.half_life is not None:
            return DecaySchedule.from_half_life(self.half_life, **kwargs)
        return DecaySchedule(decay=DEFAULT_DECAY if self.decay is None else self.decay, **kwargs)  # type: ignore[arg-type]

    def validate(self) -> None:
        self.schedule()  # raises on a decay outside [0, 1] and friends
        self.max_shard_bytes()
        self.chunk_elems(candidates=1)
        if self.interpolate not in INTERPOLATIONS:
            raise CkptEmaError(f"--interpolate must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolate!r}")
        if self.last is not None and self.last < 1:
            raise CkptEmaError(f"--last must be at least 1, got {self.last}")
        ema_only = {"--decay": self.decay is not None, "--half-life": self.half_life is not None,
                    "--warmup": self.warmup, "--bias-correction": self.bias_correction}
        if self.last is not None and any(ema_only.values()):
            given = ", ".join(name for name, on in ema_only.items() if on)
            raise CkptEmaError(f"--last {self.last} is a uniform mean: {given} apply only to an EMA")
        if self.accum_dtype not in ACCUM_DTYPES:
            raise CkptEmaError(f"--accum-dtype must be one of {', '.join(ACCUM_DTYPES)}, got {self.accum_dtype!r}")
        if self.out_dtype is not None and self.out_dtype not in DTYPES:
            raise CkptEmaError(f"--out-dtype must be one of {', '.join(DTYPES)}, got {self.out_dtype!r}")
        check_device(self.device)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CkptEmaError(f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CkptEmaError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CkptEmaError(f"--device {device}: MPS is not available on this machine")
    return dev


@dataclass
class Plan:
    """The checkpoints in training order and the final weight of each: everything but the tensors."""

    discovery: Discovery
    weighting: Weighting
    options: AverageOptions

    @property
    def sources(self):  # noqa: ANN201 - list[Source]
        return self.discovery.sources

    @property
    def bytes_to_read(self) -> int:
        return bytes_read_by([self])

    def table(self) -> str:
        """One line per checkpoint (step, weight, path) and the effective window: what ``--dry-run`` prints."""
        lines = [f"{'#':>4}  {'step':>10}  {'weight':>10}  checkpoint"]
        for i, (source, w) in enumerate(zip(self.sources, self.weighting.weights)):
            lines.append(f"{i:>4}  {source.step:>10}  {w:>10.3e}  {source.path}")
        lines.append(self.window_line())
        return "\n".join(lines)

    def window_line(self) -> str:
        n = len(self.sources)
        k = self.weighting.effective_window()
        first, last = self.sources[0].step, self.sources[-1].step
        steps_in_window = last - self.sources[n - k].step
        return (
            f"{n} checkpoints, steps {first}..{last}; the newest {k} carry 99% of the weight "
            f"(steps {self.sources[n - k].step}..{last}, a window of {steps_in_window} steps)"
        )


@dataclass
class AverageResult:
    """What ``average`` did: the plan, the output files written, the time taken; the weights on request."""

    _state_dict: dict[str, torch.Tensor] | None
    plan: Plan
    metadata: dict[str, str]
    output: Path | None
    seconds: float
    bytes_read: int = 0
    files: list[Path] = field(default_factory=list)

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights: kept in memory without an output file, else read back from it."""
        if self._state_dict is None:
            assert self.output is not None
            written = self.files[-1] if self.files and self.files[-1].name.endswith(".index.json") else self.output
            self._state_dict, _ = load_state_dict(written)
        return self._state_dict

    def summary(self) -> str:
        size = sum(f.stat().st_size for f in self.files)
        where = ""
        if self.files:
            shown = self.files[-1] if len(self.files) > 1 else self.output
            where = f" -> {shown}" + (f" + {len(self.files) - 1} shards" if len(self.files) > 1 else "") + f" ({_human_bytes(size)})"
        return (
            f"averaged {len(self.plan.sources)} checkpoints (steps {self.plan.sources[0].step}.."
            f"{self.plan.sources[-1].step}, effective window {self.plan.weighting.effective_window()} checkpoints)"
            f"{where} in {self.seconds:.1f} s ({_human_bytes(self.bytes_read / max(self.seconds, 1e-9))}/s)"
        )


def bytes_read_by(plans: list[Plan]) -> int:
    """File bytes of the checkpoints one fold of ``plans`` reads: those some plan weighs, and the newest."""
    return sum(plans[0].sources[i].nbytes for i in checkpoints_read([p.weighting.lerps for p in plans]))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def plan(inputs: list[str | Path] | str | Path, **options: Any) -> Plan:
    """Resolve the checkpoints and their weights without reading any tensor (what ``--dry-run`` shows)."""
    opts = AverageOptions(**options)
    opts.validate()
    found = discover_window(inputs, opts)
    return Plan(found, weighting_for(opts, [s.step for s in found.sources]), opts)  # type: ignore[misc]


def discover_window(inputs: list[str | Path] | str | Path, opts: AverageOptions) -> Discovery:
    """The checkpoints ``inputs`` name, in training order, within the options' --from-step/--to-step window."""
    found = discover([inputs] if isinstance(inputs, str | Path) else list(inputs), opts.key, opts.per_checkpoint)
    return within_window(found, opts.from_step, opts.to_step)


def within_window(found: Discovery, from_step: int | None, to_step: int | None) -> Discovery:
    """Keep the checkpoints with from_step <= step <= to_step; an empty window is an error."""
    if from_step is None and to_step is None:
        return found
    low = -1 if from_step is None else from_step
    high = float("inf") if to_step is None else to_step
    kept = [s for s in found.sources if low <= s.step <= high]  # type: ignore[operator]
    if not kept:
        steps = f"{found.sources[0].step}..{found.sources[-1].step}"
        window = f"{'…' if from_step is None else from_step}..{'…' if to_step is None else to_step}"
        raise CkptEmaError(f"no checkpoint has a step in {window} (the run has steps {steps})")
    return replace(found, sources=kept)


def weighting_for(opts: AverageOptions, steps: list[int]) -> Weighting:
    """The weights ``opts`` ask for: a uniform mean of the newest ``last``, or the EMA."""
    if opts.last is not None:
        return uniform_weighting(steps, opts.last)
    weighting = ema_weighting(steps, opts.schedule(), opts.bias_correction, opts.interpolate)
    if not any(weighting.weights):
        raise CkptEmaError(
            f"every checkpoint is at or before --update-after-step {opts.update_after_step}: nothing to average"
        )
    return weighting


def average(
    inputs: list[str | Path] | str | Path,
    output: str | Path | None = None,
    *,
    progress: bool = False,
    **options: Any,
) -> AverageResult:
    """Average checkpoints with timm's EMA recurrence; write the result to ``output`` (.safetensors) if given.

    ``options`` are the fields of :class:`AverageOptions` (decay or half_life, the warmup options,
    bias_correction, interpolate, last, from_step/to_step, per_checkpoint, key, device, dtypes, memory, shards).
    Raises :class:`CkptEmaError` on bad input, before anything is written.
    """
    if output is not None:
        check_output_path(output)  # before reading anything: a typo in -o should not cost a whole run
    return run(plan(inputs, **options), output, progress=progress)


def run(the_plan: Plan, output: str | Path | None = None, *, progress: bool = False) -> AverageResult:
    """Read the planned checkpoints once and write their average to ``output`` (or keep it in memory)."""
    out_path = check_output_path(output) if output is not None else None
    started = time.perf_counter()
    metadata = output_metadata(the_plan)
    sink = SafetensorsOutput(out_path, metadata, the_plan.options.max_shard_bytes()) if out_path else MemoryOutput()
    written = fold_plans([the_plan], [sink], progress=progress, desc="averaging")
    state = sink.tensors if isinstance(sink, MemoryOutput) else None
    return AverageResult(state, the_plan, metadata, out_path, time.perf_counter() - started, the_plan.bytes_to_read,
                         written[0])


def fold_plans(plans: list[Plan], sinks: list[SafetensorsOutput | MemoryOutput], *, progress: bool,
               desc: str) -> list[list[Path]]:
    """Fold the checkpoints of ``plans`` (same checkpoints, different weights) into ``sinks`` in one read.

    Output files become visible only when every candidate is complete; returns the files each sink wrote.
    Under torchrun (WORLD_SIZE > 1) with output files, the work is split by tensor: :func:`fold_plans_on_ranks`.
    """
    world = World.from_env()
    if world.is_distributed and all(isinstance(s, SafetensorsOutput) for s in sinks):
        return fold_plans_on_ranks(plans, sinks, world, progress=progress, desc=desc)  # type: ignore[arg-type]
    files = [s for s in sinks if isinstance(s, SafetensorsOutput)]
    try:
        _fold_into(plans, sinks, progress=progress, desc=desc)
        return [s.commit() if isinstance(s, SafetensorsOutput) else [] for s in sinks]
    finally:
        for f in files:
            f.abort()  # removes whatever temporary files a failure left; nothing once committed


def fold_plans_on_ranks(plans: list[Plan], sinks: list[SafetensorsOutput], world: World, *, progress: bool,
                        desc: str) -> list[list[Path]]:
    """This rank's share of the fold under torchrun, and a commit all ranks agree to.

    Each rank folds the tensors :func:`ckpt_ema.distributed.partition` gives it and writes them as its own
    shards under temporary names. Only once every rank has its shards complete on disk do the ranks rename them,
    and only once all are renamed does rank 0 rename the index into place: the commit point, so no index ever
    presents partial output. A failure on any rank is raised on every rank, naming the rank(s) and the cause;
    the temporary files are removed and an existing output is left as it was. Returns every file of each output.
    """
    device = world.device(plans[0].options.device)

    def fold_and_prepare() -> None:
        _fold_into(plans, sinks, progress=progress and world.rank == 0, desc=desc, world=world, device=device)
        for sink in sinks:
            sink.prepare()

    def on_rank_zero(action: Callable[[SafetensorsOutput], object]) -> None:
        if world.rank == 0:
            for sink in sinks:
                action(sink)

    with distributed.process_group(world, device):
        try:
            distributed.on_every_rank(fold_and_prepare)
            distributed.on_every_rank(lambda: on_rank_zero(lambda sink: sink.retire_previous()))  # before renames
            distributed.on_every_rank(lambda: [sink.publish_shards() for sink in sinks])  # then all are in place
            # and no rank reports success before the index is in place
            distributed.on_every_rank(lambda: on_rank_zero(lambda sink: sink.publish_index()))
            on_rank_zero(lambda sink: sink.remove_stale())
            return [sink.written for sink in sinks]
        except CkptEmaError:  # raised on every rank alike by on_every_rank
            for sink in sinks:
                sink.abort()
            # The first rank to exit makes torchrun stop the others: let every rank remove its temporary files first.
            distributed.barrier()
            raise
        finally:
            for sink in sinks:
                sink.abort()


def _fold_into(plans: list[Plan], sinks: list[SafetensorsOutput | MemoryOutput], *, progress: bool, desc: str,
               world: World | None = None, device: str | None = None) -> None:
    """One read of the checkpoints into the (opened, uncommitted) sinks; with a ``world``, only this rank's share."""
    opts = plans[0].options
    bar = tqdm(unit="B", unit_scale=True, desc=desc, disable=not progress)
    shares: list[list[str]] | None = None  # tensor names per rank, once the layout is known
    mine: set[str] | None = None

    def select(layout: Layout) -> set[str]:
        nonlocal shares, mine
        assert world is not None
        shares = distributed.partition(layout, world.size)
        mine = set(shares[world.rank])
        return mine

    def open_outputs(layout: Layout, n_used: int) -> None:
        out_dtype = DTYPES[opts.out_dtype] if opts.out_dtype else None
        for sink in sinks:
            if shares is None:
                sink.open(layout.shapes, layout.output_dtypes(out_dtype))
            else:
                assert isinstance(sink, SafetensorsOutput) and world is not None
                sink.open(layout.shapes, layout.output_dtypes(out_dtype), partition=shares, rank=world.rank)
        bar.total = n_used * layout.float_nbytes(mine)

    with bar:
        fold(
            [s.opened or s.path for s in plans[0].sources],
            [p.weighting.lerps for p in plans],
            sinks,
            key=opts.key,
            device=opts.device if device is None else device,
            accum_dtype=DTYPES[opts.accum_dtype],
            chunk_elems=opts.chunk_elems(candidates=len(plans)),
            on_bytes=bar.update,
            on_layout=open_outputs,
            select=None if world is None else select,
        )


def output_metadata(the_plan: Plan) -> dict[str, str]:
    """The safetensors header: tool version, every option, each input with step and weight, training metadata."""
    newest = the_plan.sources[-1].metadata
    meta: dict[str, str] = {"format": "pt"}
    for key in CARRIED_METADATA:
        if key in newest:
            value = newest[key]
            meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    meta["ckpt_ema_version"] = __version__
    meta["ckpt_ema_options"] = json.dumps(asdict(the_plan.options))
    meta["ckpt_ema_inputs"] = json.dumps(
        [
            {"path": str(s.path), "step": s.step, "step_from": s.step_from, "weight": w}
            for s, w in zip(the_plan.sources, the_plan.weighting.weights)
        ]
    )
    meta["ckpt_ema_effective_window"] = str(the_plan.weighting.effective_window())
    return meta
