"""Run a fold job: one read of the checkpoints into the outputs of one or more averages (a sweep's candidates).

A :class:`Job` is everything :func:`ckpt_ema.engine.fold.fold` needs, per candidate (its lerp weights, the running
mean it continues, where its finished pieces go and which files to open for them), plus the copy of the newest
checkpoint that a later append needs. :func:`run_job` opens the files once the checkpoints' tensors are known, in
each file's dtype, and folds in as few passes over the checkpoints as the memory budget allows, with one progress
bar. In one process by default; with a :class:`~ckpt_ema.engine.distributed.World` of several processes each folds
its share of the tensors (:func:`ckpt_ema.engine.distributed.partition`) into its own shards of every output.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ckpt_ema.engine import distributed
from ckpt_ema.engine.distributed import World
from ckpt_ema.engine.fold import Sink, chunk_elems_for, fold
from ckpt_ema.engine.layout import Layout
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.formats.base import Checkpoint
from ckpt_ema.options import AverageOptions
from ckpt_ema.output.sinks import SafetensorsOutput

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class File(Protocol):
    """A sink that is opened once the tensors are known (an output file, a state file, tensors in memory)."""

    def open(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> None: ...

    def write(self, name: str, piece: torch.Tensor) -> None: ...


# What a file's float tensors are: "output" (the input's dtype, or --out-dtype), "accum" (the accumulator's: a
# running mean kept to go on from), "input" (as read: the newest checkpoint's copy).
KINDS = ("output", "accum", "input")


@dataclass
class Job:
    """One fold: the checkpoints read, in order; per candidate its lerp weights, the running mean it continues
    (None: from nothing), where its pieces go and the files to open for it, each with its kind (:data:`KINDS`)."""

    checkpoints: list[Path | Checkpoint]
    lerps: list[list[float]] = field(default_factory=list)
    initial: list[Checkpoint | None] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    files: list[list[tuple[File, str]]] = field(default_factory=list)
    newest_copy: File | None = None  # receives the newest checkpoint's tensors as read (kind "input")
    recorded_dtypes: dict[str, str] | None = None  # the tensors' dtypes as a state recorded them (must match)
    recorded_in: Path | None = None  # that state's folder

    def add(self, lerps: list[float], initial: Checkpoint | None, sink: Sink, files: list[tuple[File, str]]) -> None:
        self.lerps.append(lerps)
        self.initial.append(initial)
        self.sinks.append(sink)
        self.files.append(files)


class Tee:
    """A candidate's finished pieces, to several sinks (its output and its state's running mean)."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def write(self, name: str, piece: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.write(name, piece)


def check_device(device: str) -> torch.device:
    """The torch device ``device`` names, if this machine has it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError("device", f"{device!r} is not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("device", f"{device}: MPS is not available on this machine")
    return dev


def chunk_elems(options: AverageOptions, candidates: int) -> int:
    """Elements per chunk for ``candidates`` accumulators within the options' memory budget."""
    itemsize = max(DTYPES[options.accum_dtype].itemsize,
                   DTYPES[options.out_dtype].itemsize if options.out_dtype else 0, 4)
    return chunk_elems_for(options.memory_budget(), candidates, itemsize)


def candidates_per_pass(options: AverageOptions, wanted: int) -> int:
    """How many candidates' accumulator chunks fit the memory budget together (at least one, or an error)."""
    for count in range(wanted, 0, -1):
        try:
            chunk_elems(options, candidates=count)
            return count
        except OptionError:
            if count == 1:
                raise
    raise AssertionError("unreachable")


def dtype_for(kind: str, dtype: torch.dtype, accum: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """A tensor's dtype in a file of ``kind`` (:data:`KINDS`); non-float tensors keep their own."""
    if not dtype.is_floating_point or kind == "input":
        return dtype
    return (out_dtype or dtype) if kind == "output" else accum


def run_job(job: Job, options: AverageOptions, *, progress: bool = False, desc: str = "averaging",
            world: World | None = None, device: str | None = None) -> tuple[dict[str, str], int]:
    """Fold ``job`` (in as few passes as the memory budget allows; the newest checkpoint copied in the first) and
    return the run's tensor dtypes (by name, as torch names them without ``torch.``) and the number of passes.
    With a ``world`` of several processes, this rank folds and writes only its share (the caller runs this
    inside :func:`ckpt_ema.engine.distributed.process_group` and commits as the ranks agree)."""
    accum = DTYPES[options.accum_dtype]
    out_dtype = DTYPES[options.out_dtype] if options.out_dtype else None
    per_pass = candidates_per_pass(options, len(job.lerps))
    shared = world is not None and world.is_distributed
    seen: dict[str, str] = {}
    shares: list[list[str]] = []
    bar = tqdm(unit="B", unit_scale=True, desc=desc, disable=not progress)

    def select(layout: Layout) -> Collection[str]:
        assert world is not None
        shares[:] = distributed.partition(layout, world.size)
        return set(shares[world.rank])

    def opener(group: range, copy: bool) -> Callable[[Layout, int], None]:
        def on_layout(layout: Layout, n_used: int) -> None:
            if job.recorded_dtypes is not None and list(job.recorded_dtypes) != list(layout.shapes):
                raise CkptEmaError("the state's manifest does not list the tensors its files hold; remove the "
                                   "folder to start over", job.recorded_in)
            dtypes = ({k: getattr(torch, v) for k, v in job.recorded_dtypes.items()}
                      if job.recorded_dtypes is not None else dict(layout.dtypes))
            seen.update({k: str(v).removeprefix("torch.") for k, v in dtypes.items()})
            files = [f for c in group for f in job.files[c]]
            if copy and job.newest_copy is not None:
                files.append((job.newest_copy, "input"))
            for file, kind in files:
                wanted = {name: dtype_for(kind, d, accum, out_dtype) for name, d in dtypes.items()}
                if shared:  # each rank writes its own shards of every file
                    assert world is not None and isinstance(file, SafetensorsOutput)
                    file.open(layout.shapes, wanted, partition=shares, rank=world.rank)
                else:
                    file.open(layout.shapes, wanted)
            mine = set(shares[world.rank]) if shared and world is not None else None
            bar.total = (bar.total or 0) + n_used * layout.float_nbytes(mine)
        return on_layout

    with bar:
        for start in range(0, len(job.lerps), per_pass):
            group = range(start, min(start + per_pass, len(job.lerps)))
            first = start == 0
            fold(job.checkpoints, [job.lerps[c] for c in group], [job.sinks[c] for c in group],
                 key=options.key, strip_prefix=options.strip_prefix,
                 device=options.device if device is None else device, accum_dtype=accum,
                 chunk_elems=chunk_elems(options, len(group)), on_bytes=bar.update,
                 on_layout=opener(group, first), select=select if shared else None,
                 initial=[job.initial[c] for c in group], newest_to=job.newest_copy if first else None)
    return seen, -(-len(job.lerps) // per_pass)


class Publishable(Protocol):
    """The commit steps of an output file (:class:`ckpt_ema.output.sinks.SafetensorsOutput`)."""

    def prepare(self) -> None: ...

    def retire_previous(self) -> None: ...

    def publish_shards(self) -> None: ...

    def publish_index(self) -> None: ...

    def remove_stale(self) -> None: ...


def commit_on_ranks(outputs: Sequence[Publishable], world: World) -> None:
    """The commit all ranks agree to, once each has folded its share: every rank prepares its shards (complete on
    disk under temporary names); rank 0 retires an earlier output's index; every rank renames its shards; rank 0
    renames the index into place, the commit point, so no index ever presents partial output. A failure on any
    rank is raised on every rank (:func:`ckpt_ema.engine.distributed.on_every_rank`)."""
    def on_rank_zero(action: Callable[[Publishable], object]) -> None:
        if world.rank == 0:
            for out in outputs:
                action(out)

    def on_every(action: Callable[[Publishable], object]) -> None:
        for out in outputs:
            action(out)

    distributed.on_every_rank(lambda: on_every(lambda out: out.prepare()))
    distributed.on_every_rank(lambda: on_rank_zero(lambda out: out.retire_previous()))  # before any rename
    distributed.on_every_rank(lambda: on_every(lambda out: out.publish_shards()))  # then all are in place
    distributed.on_every_rank(lambda: on_rank_zero(lambda out: out.publish_index()))  # the commit point
    on_rank_zero(lambda out: out.remove_stale())
