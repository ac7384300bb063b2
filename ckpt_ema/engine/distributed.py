"""Scale out under torchrun: which process folds which tensors, and how the processes agree on the outcome.

Averaging is elementwise, so the work splits by tensor: every rank reads only its tensors from every checkpoint
(from storage all ranks see) and writes them as its own shards. Nothing but a few small control messages goes
between processes: every rank computes the same partition and shard names from the same checkpoint headers.

A single process never imports ``torch.distributed``: :class:`World` reads the environment torchrun sets.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from ckpt_ema.errors import CkptEmaError

if TYPE_CHECKING:
    from ckpt_ema.engine.layout import Layout


# How long a rank that has finished its share waits for the others at the commit. Not torch's 30 minutes: at
# LLM scale a share takes hours and ranks on slower storage finish long after the rest. A rank that dies is
# noticed by torchrun, which stops the others; this only bounds a rank that hangs.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in the environment; one process of one without it."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise CkptEmaError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def device(self, device: str) -> str:
        """Where this rank computes: a bare ``cuda`` becomes ``cuda:LOCAL_RANK``, one GPU per process."""
        return f"cuda:{self.local_rank}" if device == "cuda" else device


def backend_for(device: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.startswith("cuda") else "gloo"


@contextmanager
def process_group(world: World, device: str) -> Iterator[None]:
    """Join the default process group for the duration of the block; one already joined (by the caller's own
    script) is used as it is and left alone."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))  # NCCL's collectives run on the current device
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def partition(layout: Layout, size: int) -> list[list[str]]:
    """Tensor names per rank, balanced by bytes: largest first onto the least-loaded rank (ties: the lower rank;
    equal sizes: by name), each rank's names in layout order. Deterministic: every rank computes the same."""
    nbytes = {name: layout.numel(name) * layout.dtypes[name].itemsize for name in layout.shapes}
    loads = [(0, rank) for rank in range(size)]  # a heap of (bytes, rank)
    owner: dict[str, int] = {}
    for name in sorted(nbytes, key=lambda n: (-nbytes[n], n)):
        load, rank = heapq.heappop(loads)
        owner[name] = rank
        heapq.heappush(loads, (load + nbytes[name], rank))
    return [[name for name in layout.shapes if owner[name] == rank] for rank in range(size)]


def gather_errors(error: str | None) -> list[str | None]:
    """Every rank's error message (None: it succeeded), in rank order; a collective, so also a barrier."""
    import torch.distributed as dist

    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def barrier() -> None:
    """Wait until every rank gets here."""
    import torch.distributed as dist

    dist.barrier()


def describe(exc: BaseException) -> str:
    """One line for an exception: our messages as they are, anything else with its type."""
    return str(exc) if isinstance(exc, CkptEmaError) else f"{type(exc).__name__}: {exc}"


def failure_message(errors: list[str | None]) -> str | None:
    """``rank 1: <cause>`` for each failing rank (ranks failing alike share one line); None when none failed."""
    by_message: dict[str, list[int]] = {}
    for rank, message in enumerate(errors):
        if message is not None:
            by_message.setdefault(message, []).append(rank)
    if not by_message:
        return None
    return "; ".join(
        f"rank {ranks[0]}: {message}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}: {message}"
        for message, ranks in by_message.items()
    )


def on_every_rank(step: Callable[[], None]) -> None:
    """Run ``step`` here, then learn how it went on every rank: raise one error naming every failing rank and its
    cause, on every rank, if any failed. Returns on every rank together (the gather is a barrier)."""
    try:
        step()
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised as one line
        error = describe(exc)
    message = failure_message(gather_errors(error))
    if message is not None:
        raise CkptEmaError(message)
