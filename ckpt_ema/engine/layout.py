"""What every checkpoint of a run must share, and how it is cut for the fold.

:class:`Layout` holds the names (in output order), shapes and dtypes of the tensors; :func:`chunk_pieces` cuts them
into chunks of at most ``chunk_elems`` elements (big tensors split, small ones grouped); :class:`FlatViews` hands out
one checkpoint's flat piece of a tensor, a view of the mapped file wherever the tensor is stored contiguously.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import Checkpoint

# How many differences to list when two checkpoints do not hold the same tensors.
SHOWN_DIFFERENCES = 5


@dataclass
class Layout:
    """Names (in output order), shapes and dtypes of the tensors every checkpoint of the run must share."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    source: Path

    @classmethod
    def of(cls, ckpt: Checkpoint) -> Layout:
        found = ckpt.shapes()
        return cls({n: s for n, (s, _) in found.items()}, {n: d for n, (_, d) in found.items()}, ckpt.path)

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shapes[name]:
            n *= d
        return n

    def is_float(self, name: str) -> bool:
        return self.dtypes[name].is_floating_point

    def float_nbytes(self, names: Collection[str] | None = None) -> int:
        """Bytes of float tensors (of ``names``, default all) in one checkpoint: what each used checkpoint
        contributes to the fold."""
        return sum(self.numel(n) * d.itemsize for n, d in self.dtypes.items()
                   if d.is_floating_point and (names is None or n in names))

    def output_dtypes(self, out_dtype: torch.dtype | None) -> dict[str, torch.dtype]:
        """Each tensor's dtype in the output: its own, or ``out_dtype`` for every float tensor."""
        return {n: out_dtype if out_dtype is not None and d.is_floating_point else d for n, d in self.dtypes.items()}

    def check_same(self, other: Layout) -> None:
        """Raise a one-line error listing the first differences between two checkpoints' tensors."""
        problems = [f"{n} is missing" for n in self.shapes if n not in other.shapes]
        problems += [f"{n} is extra" for n in other.shapes if n not in self.shapes]
        problems += [
            f"{n} has shape {list(other.shapes[n])}, not {list(s)}"
            for n, s in self.shapes.items()
            if n in other.shapes and other.shapes[n] != s
        ]
        problems += [
            f"{n} is {other.dtypes[n]}, not a float as in {self.source.name}"
            for n, d in self.dtypes.items()
            if n in other.dtypes and d.is_floating_point != other.dtypes[n].is_floating_point
        ]
        if problems:
            more = f" (and {len(problems) - SHOWN_DIFFERENCES} more)" if len(problems) > SHOWN_DIFFERENCES else ""
            raise CkptEmaError(
                f"tensors differ from {self.source}: {'; '.join(problems[:SHOWN_DIFFERENCES])}{more}", other.source
            )


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of one tensor, flattened."""

    name: str
    start: int
    stop: int


def chunk_pieces(layout: Layout, chunk_elems: int) -> list[list[Piece]]:
    """Cut the layout's tensors, in order, into chunks of at most ``chunk_elems`` elements."""
    chunks: list[list[Piece]] = [[]]
    room = chunk_elems
    for name in layout.shapes:
        start, numel = 0, layout.numel(name)
        if numel == 0:
            chunks[-1].append(Piece(name, 0, 0))
            continue
        while start < numel:
            if room == 0:
                chunks.append([])
                room = chunk_elems
            stop = min(numel, start + room)
            chunks[-1].append(Piece(name, start, stop))
            room -= stop - start
            start = stop
    return [c for c in chunks if c]


class FlatViews:
    """Flat pieces of one checkpoint's tensors, as its format hands them out (:meth:`Checkpoint.piece`): views of
    the mapped file where a tensor is stored contiguously, else a copy of just the piece asked for, never of the
    whole tensor (one whole copy per open checkpoint would make memory grow with the number of checkpoints)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def piece(self, p: Piece) -> torch.Tensor:
        return self.ckpt.piece(p.name, p.start, p.stop)
