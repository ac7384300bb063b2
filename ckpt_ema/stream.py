"""The averaging engine: fold every checkpoint into running weighted means, one chunk of the model at a time.

For checkpoint i in training order and each candidate average c (one for ``average``, several for a sweep)::

    acc_c <- lerp(acc_c, theta_i, t_ci)        (torch._foreach_lerp_; the first weighted checkpoint is copied)

with the lerp weights t of :attr:`ckpt_ema.plan.Weighting.lerps`. The loop runs chunk-major: the model's tensors
are cut into chunks of ``chunk_elems`` elements (big tensors split, small ones grouped), and for each chunk every
checkpoint's matching slice is folded in before the next chunk starts. So

* memory is bounded by the chunk, not the model: the accumulator of one chunk per candidate, whatever the model
  size or the number of checkpoints (checkpoints are mmap'd views, nothing is loaded whole);
* the accumulator chunk stays in the CPU cache while all checkpoints pass through it, so memory traffic is one
  read per checkpoint byte (like ``cat``) instead of a read-modify-write of a model-sized accumulator each time;
* finished chunks go straight to the output writer, in the order of the output file.

Non-float tensors (BatchNorm's ``num_batches_tracked``) are copied from the newest checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ckpt_ema.checkpoint import Checkpoint, open_checkpoint
from ckpt_ema.errors import CkptEmaError

# Elements per chunk: 1M float32 = 4 MB, small enough to stay in cache, large enough that Python overhead is nil.
DEFAULT_CHUNK_ELEMS = 1 << 20
# How many differences to list when two checkpoints do not hold the same tensors.
SHOWN_DIFFERENCES = 5


class Sink(Protocol):
    """Where finished pieces go, in layout order (an output file, or tensors in memory)."""

    def write(self, name: str, piece: torch.Tensor) -> None: ...


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
    """Flat pieces of one checkpoint's tensors: views of the mapped file, or, for a tensor stored non-contiguous
    (a transposed weight, channels_last convolutions), a copy of just the piece asked for, never of the whole
    tensor (one whole copy per open checkpoint would make memory grow with the number of checkpoints)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._cached: tuple[str, torch.Tensor] | None = None

    def piece(self, p: Piece) -> torch.Tensor:
        if self._cached is None or self._cached[0] != p.name:
            self._cached = (p.name, self.ckpt.tensor(p.name))
        return flat_slice(self._cached[1], p.start, p.stop)


def flat_slice(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of ``t`` in row-major order: a view when ``t`` is contiguous, else a new tensor of
    stop - start elements copied straight from the strided storage (no copy of the whole tensor, no temporaries)."""
    if t.is_contiguous():
        return t.reshape(-1)[start:stop]
    out = torch.empty(max(stop - start, 0), dtype=t.dtype, device=t.device)
    _copy_flat(t, start, stop, out)
    return out


def _copy_flat(t: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> None:
    """Copy elements [start, stop) of ``t`` (row-major) into the flat tensor ``out``: whole rows at once, partial
    rows at either end recursively."""
    if start >= stop:
        return
    if t.dim() <= 1:
        out.copy_(t.reshape(-1)[start:stop])  # a 1-d tensor: a strided view, no copy of its own
        return
    row = t[0].numel()
    first, begin = divmod(start, row)
    last, end = divmod(stop, row)
    if first == last:
        _copy_flat(t[first], begin, end, out)
        return
    at = 0
    if begin:
        _copy_flat(t[first], begin, row, out[: row - begin])
        at, first = row - begin, first + 1
    if last > first:
        block = t[first:last]
        out[at : at + block.numel()].view(block.shape).copy_(block)
        at += block.numel()
    if end:
        _copy_flat(t[last], 0, end, out[at:])


def open_run(checkpoints: Sequence[Path | Checkpoint], needed: Sequence[int], key: str | None
             ) -> tuple[dict[int, FlatViews], Layout]:
    """Open the checkpoints at the ``needed`` indices (those not already open) and check that they hold the same
    tensors (headers only)."""
    opened: dict[int, FlatViews] = {}
    layout: Layout | None = None
    for i in needed:
        given = checkpoints[i]
        ckpt = given if isinstance(given, Checkpoint) else open_checkpoint(given, key)
        this = Layout.of(ckpt)
        if layout is None:
            layout = this
        else:
            layout.check_same(this)
        opened[i] = FlatViews(ckpt)
    assert layout is not None
    return opened, layout


def fold(
    checkpoints: Sequence[Path | Checkpoint],
    lerps: Sequence[Sequence[float]],
    sinks: Sequence[Sink],
    *,
    key: str | None = None,
    device: str = "cpu",
    accum_dtype: torch.dtype = torch.float32,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    on_bytes: Callable[[int], None] | None = None,
    on_layout: Callable[[Layout, int], None] | None = None,
    select: Callable[[Layout], Collection[str]] | None = None,
) -> Layout:
    """Fold ``checkpoints`` (paths, or checkpoints already open) into one running mean per candidate and stream
    the results to ``sinks``.

    ``lerps[c][i]`` is candidate c's lerp weight for checkpoint i (0: not used; the first nonzero one is 1).
    Checkpoints no candidate uses are not read, except the newest, whose non-float tensors are copied.
    ``on_layout(layout, n_used)`` is called once the tensors are known, before any is written (to open output
    files, size progress bars); ``on_bytes(n)`` as checkpoint bytes are folded in.
    ``select(layout)``, if given, names the only tensors to fold and write (this rank's share under torchrun);
    the checks that checkpoints hold the same tensors still cover all of them, so every rank fails alike.
    """
    if len(lerps) != len(sinks):
        raise ValueError("one sink per candidate")
    last = len(checkpoints) - 1
    used = [i for i in range(len(checkpoints)) if any(c[i] > 0 for c in lerps)]
    if not used:
        raise CkptEmaError("no checkpoint carries any weight")
    opened, layout = open_run(checkpoints, checkpoints_read(lerps), key)
    names = None if select is None else select(layout)
    if on_layout is not None:
        on_layout(layout, len(used))
    dev = torch.device(device)
    stage = _stager(dev)
    buffers = [torch.empty(chunk_elems, dtype=accum_dtype, device=dev) for _ in lerps]
    for chunk in selected_chunks(layout, chunk_elems, names):
        floats = [p for p in chunk if layout.is_float(p.name)]
        offsets = _offsets(floats)
        accs = [[buf[a:b] for a, b in offsets] for buf in buffers]
        started = [False] * len(lerps)
        for i in used:
            sources = [opened[i].piece(p) for p in floats]
            if on_bytes is not None:
                on_bytes(sum(s.numel() * s.element_size() for s in sources))
            sources = stage(sources, accum_dtype)
            lerp_accs, lerp_srcs, lerp_weights = [], [], []
            for c, cand in enumerate(lerps):
                t = cand[i]
                if t <= 0:
                    continue
                if not started[c]:
                    torch._foreach_copy_(accs[c], sources)
                    started[c] = True
                else:
                    lerp_accs += accs[c]
                    lerp_srcs += sources
                    lerp_weights += [t] * len(sources)
            _lerp(lerp_accs, lerp_srcs, lerp_weights)
        used_elems = offsets[-1][1] if offsets else 0
        for c, buf in enumerate(buffers):
            # A sum is NaN or Inf when any element is (or, rarely, when finite values overflow it: then look
            # closer). One reduction over a chunk still in cache, no temporary mask.
            total = buf[:used_elems].sum()
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(buf[:used_elems]).all()):
                _raise_non_finite(floats, opened, used, lerps[c])
            folded = iter(accs[c])
            for p in chunk:
                sinks[c].write(p.name, next(folded) if layout.is_float(p.name) else opened[last].piece(p))
    return layout


def checkpoints_read(lerps: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the checkpoints a fold with these lerp weights reads: those some candidate weighs, and the newest
    (whose non-float tensors are copied)."""
    n = len(lerps[0])
    return sorted({i for c in lerps for i in range(n) if c[i] > 0} | {n - 1})


def selected_chunks(layout: Layout, chunk_elems: int, names: Collection[str] | None) -> list[list[Piece]]:
    """The chunks of the whole layout, keeping only the pieces of ``names`` (all when None).

    Cut first, filter after: each piece is then the same slice whichever tensors a process folds, so every element
    goes through the same kernel path (vectorised body or scalar tail) and the result is bitwise the same as one
    process's, whatever the kernel's floating-point contraction.
    """
    chunks = chunk_pieces(layout, chunk_elems)
    if names is None:
        return chunks
    wanted = set(names)
    kept = ([p for p in chunk if p.name in wanted] for chunk in chunks)
    return [chunk for chunk in kept if chunk]


def _offsets(pieces: list[Piece]) -> list[tuple[int, int]]:
    out, at = [], 0
    for p in pieces:
        out.append((at, at + p.stop - p.start))
        at += p.stop - p.start
    return out


def _lerp(accs: list[torch.Tensor], sources: list[torch.Tensor], weights: list[float]) -> None:
    """``acc <- acc + w * (src - acc)`` for every triple, in as few kernel launches as torch allows."""
    if not accs:
        return
    if len(set(weights)) == 1:
        torch._foreach_lerp_(accs, sources, weights[0])
    elif _FOREACH_LERP_TAKES_A_LIST:
        torch._foreach_lerp_(accs, sources, weights)
    else:
        for a, s, w in zip(accs, sources, weights):
            a.lerp_(s, w)


def _foreach_lerp_takes_a_list() -> bool:
    """Whether this torch's _foreach_lerp_ takes one weight per tensor (torch >= 2.6): asked once, not per chunk."""
    try:
        torch._foreach_lerp_([torch.zeros(1)], [torch.ones(1)], [0.5])
        return True
    except TypeError:
        return False


_FOREACH_LERP_TAKES_A_LIST = _foreach_lerp_takes_a_list()


def _stager(dev: torch.device) -> Callable[[list[torch.Tensor], torch.dtype], list[torch.Tensor]]:
    """How source pieces reach the accumulator's device and dtype."""
    if dev.type != "cuda":
        return lambda sources, dtype: [s.to(device=dev, dtype=dtype) for s in sources]
    from ckpt_ema.cuda_staging import PinnedStager

    return PinnedStager(dev)


def _raise_non_finite(floats: list[Piece], opened: dict[int, FlatViews], used: list[int], lerps: Sequence[float]) -> None:
    """Name the checkpoint and tensor that brought NaN or Inf into the average."""
    for i in used:
        if lerps[i] <= 0:
            continue
        for p in floats:
            piece = opened[i].piece(p)
            if not bool(torch.isfinite(piece).all()):
                kind = "NaN" if bool(torch.isnan(piece).any()) else "Inf"
                raise CkptEmaError(f"tensor {p.name!r} contains {kind}", opened[i].ckpt.path)
    name = floats[0].name if floats else "?"
    raise CkptEmaError(f"the average overflowed to Inf near tensor {name!r} (try --accum-dtype float64)")
