"""Execute plans: one read of the checkpoints into the outputs of one or more averages (a sweep's candidates).

In one process by default; with a :class:`~ckpt_ema.engine.distributed.World` of several processes (the CLI under
torchrun, or a caller's own script that asks for it), this process folds only its share of the tensors and the
ranks agree on the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ckpt_ema.engine import distributed
from ckpt_ema.engine.distributed import World
from ckpt_ema.engine.fold import checkpoints_read, chunk_elems_for, fold
from ckpt_ema.engine.layout import Layout
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.output.sinks import MemoryOutput, SafetensorsOutput

if TYPE_CHECKING:
    from ckpt_ema.options import AverageOptions
    from ckpt_ema.planning import Plan

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bytes_read_by(plans: list[Plan]) -> int:
    """File bytes of the checkpoints one fold of ``plans`` reads: those some plan weighs, and the newest."""
    return sum(plans[0].sources[i].nbytes for i in checkpoints_read([p.weighting.lerps for p in plans]))


def chunk_elems(options: AverageOptions, candidates: int) -> int:
    """Elements per chunk for ``candidates`` accumulators within the options' memory budget."""
    itemsize = max(DTYPES[options.accum_dtype].itemsize, DTYPES[options.out_dtype].itemsize if options.out_dtype else 0, 4)
    return chunk_elems_for(options.memory_budget(), candidates, itemsize)


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


def run_plans(plans: list[Plan], sinks: list[SafetensorsOutput | MemoryOutput], *, progress: bool, desc: str,
               world: World | None = None) -> list[list[Path]]:
    """Fold the checkpoints of ``plans`` (same checkpoints, different weights) into ``sinks`` in one read.

    Output files become visible only when every candidate is complete; returns the files each sink wrote. With a
    ``world`` of several processes (and output files), this process folds its share: :func:`run_plans_on_ranks`.
    """
    check_device(plans[0].options.device)
    if world is not None and world.is_distributed:
        if not all(isinstance(s, SafetensorsOutput) for s in sinks):
            raise CkptEmaError("several processes write their shares to files: give an output file")
        return run_plans_on_ranks(plans, sinks, world, progress=progress, desc=desc)  # type: ignore[arg-type]
    files = [s for s in sinks if isinstance(s, SafetensorsOutput)]
    try:
        _read_once_into(plans, sinks, progress=progress, desc=desc)
        return [s.commit() if isinstance(s, SafetensorsOutput) else [] for s in sinks]
    finally:
        for f in files:
            f.abort()  # removes whatever temporary files a failure left; nothing once committed


def run_plans_on_ranks(plans: list[Plan], sinks: list[SafetensorsOutput], world: World, *, progress: bool,
                        desc: str) -> list[list[Path]]:
    """This rank's share of the fold under torchrun, and a commit all ranks agree to.

    Each rank folds the tensors :func:`ckpt_ema.engine.distributed.partition` gives it and writes them as its own
    shards under temporary names. Only once every rank has its shards complete on disk do the ranks rename them,
    and only once all are renamed does rank 0 rename the index into place: the commit point, so no index ever
    presents partial output. A failure on any rank is raised on every rank, naming the rank(s) and the cause;
    the temporary files are removed and an existing output is left as it was. Returns every file of each output.
    """
    device = world.device(plans[0].options.device)

    def fold_and_prepare() -> None:
        _read_once_into(plans, sinks, progress=progress and world.rank == 0, desc=desc, world=world, device=device)
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


def _read_once_into(plans: list[Plan], sinks: list[SafetensorsOutput | MemoryOutput], *, progress: bool, desc: str,
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
            strip_prefix=opts.strip_prefix,
            device=opts.device if device is None else device,
            accum_dtype=DTYPES[opts.accum_dtype],
            chunk_elems=chunk_elems(opts, candidates=len(plans)),
            on_bytes=bar.update,
            on_layout=open_outputs,
            select=None if world is None else select,
        )
