"""The averaging engine: fold every checkpoint into running weighted means, one chunk of the model at a time.

For checkpoint i in training order and each candidate average c (one for ``average``, several for a sweep)::

    acc_c <- lerp(acc_c, theta_i, t_ci)        (torch._foreach_lerp_; the first weighted checkpoint is copied)

with the lerp weights t of :attr:`ckpt_ema.weighting.Weighting.lerps`. The loop runs chunk-major: the model's tensors
are cut into chunks of ``chunk_elems`` elements (big tensors split, small ones grouped), and for each chunk every
checkpoint's matching slice is folded in before the next chunk starts. So

* memory is bounded by the chunk, not the model: the accumulator of one chunk per candidate, whatever the model
  size or the number of checkpoints (checkpoints are mmap'd views, nothing is loaded whole);
* the accumulator chunk stays in the CPU cache while all checkpoints pass through it, so memory traffic is one
  read per checkpoint byte (like ``cat``) instead of a read-modify-write of a model-sized accumulator each time;
* finished chunks go straight to the output writer, in the order of the output file.

Non-float tensors (BatchNorm's ``num_batches_tracked``) are copied from the newest checkpoint.

**Continuing an earlier fold** (appending new checkpoints to an average, :mod:`ckpt_ema.follow`): a candidate may
start from an initial running mean instead of from nothing. Its accumulator chunk is first copied from that mean
(a file the earlier fold wrote in the accumulator's dtype), and its lerp weights, computed with the earlier mean's
share as ``prior`` (:func:`ckpt_ema.weighting.ema_continuation`), carry on from there: the same lerps as if the
earlier checkpoints had been folded in this run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from ckpt_ema.engine.layout import FlatViews, Layout, Piece, chunk_pieces
from ckpt_ema.formats.base import Checkpoint
from ckpt_ema.formats.registry import open_checkpoint
from ckpt_ema.errors import CkptEmaError, OptionError

# Elements per chunk: 1M float32 = 4 MB, small enough to stay in cache, large enough that Python overhead is nil.
DEFAULT_CHUNK_ELEMS = 1 << 20
# The smallest chunk worth folding: below it, Python overhead per chunk dominates.
MIN_CHUNK_ELEMS = 1024


class Sink(Protocol):
    """Where finished pieces go, in layout order (an output file, or tensors in memory)."""

    def write(self, name: str, piece: torch.Tensor) -> None: ...


def open_run(checkpoints: Sequence[Path | Checkpoint], needed: Sequence[int], key: str | None,
             strip_prefix: str | None = None) -> tuple[dict[int, FlatViews], Layout]:
    """Open the checkpoints at the ``needed`` indices (those not already open), ``strip_prefix`` cut from their
    tensor names, and check that they hold the same tensors (headers only)."""
    opened: dict[int, FlatViews] = {}
    layout: Layout | None = None
    for i in needed:
        given = checkpoints[i]
        ckpt = given if isinstance(given, Checkpoint) else open_checkpoint(given, key)
        if strip_prefix:
            ckpt = ckpt.without_prefix(strip_prefix)
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
    strip_prefix: str | None = None,
    device: str = "cpu",
    accum_dtype: torch.dtype = torch.float32,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    on_bytes: Callable[[int], None] | None = None,
    on_layout: Callable[[Layout, int], None] | None = None,
    select: Callable[[Layout], Collection[str]] | None = None,
    initial: Sequence[Checkpoint | None] | None = None,
    newest_to: Sink | None = None,
) -> Layout:
    """Fold ``checkpoints`` (paths, or checkpoints already open) into one running mean per candidate and stream
    the results to ``sinks``.

    ``lerps[c][i]`` is candidate c's lerp weight for checkpoint i (0: not used; the first nonzero one is 1).
    Checkpoints no candidate uses are not read, except the newest, whose non-float tensors are copied.
    ``on_layout(layout, n_used)`` is called once the tensors are known, before any is written (to open output
    files, size progress bars); ``on_bytes(n)`` as checkpoint bytes are folded in.
    ``select(layout)``, if given, names the only tensors to fold and write (this rank's share under torchrun);
    the checks that checkpoints hold the same tensors still cover all of them, so every rank fails alike.
    ``initial[c]``, if given, is the running mean candidate c continues (see the module docstring): a checkpoint
    with the same tensors, its float ones in ``accum_dtype``. ``newest_to``, if given, receives the newest
    checkpoint's tensors as read (the copy a later append needs), chunk by chunk like the candidates' sinks.
    """
    if len(lerps) != len(sinks):
        raise ValueError("one sink per candidate")
    initial = list(initial) if initial is not None else [None] * len(lerps)
    used = [i for i in range(len(checkpoints)) if any(c[i] > 0 for c in lerps)]
    if not used and not any(initial):
        raise CkptEmaError("no checkpoint carries any weight")
    opened, layout = open_run(checkpoints, checkpoints_read(lerps), key, strip_prefix)
    starts = [None if init is None else _initial_views(init, layout, accum_dtype) for init in initial]
    names = None if select is None else select(layout)
    if on_layout is not None:
        on_layout(layout, len(used))
    dev = torch.device(device)
    stage = _stager(dev)
    buffers = [torch.empty(chunk_elems, dtype=accum_dtype, device=dev) for _ in lerps]
    newest = opened[len(checkpoints) - 1]
    for chunk in selected_chunks(layout, chunk_elems, names):
        floats = [p for p in chunk if layout.is_float(p.name)]
        offsets = _offsets(floats)
        accs = [[buf[a:b] for a, b in offsets] for buf in buffers]
        for acc, start in zip(accs, starts):
            if start is not None:
                torch._foreach_copy_(acc, stage([start.piece(p) for p in floats], accum_dtype))
        newest_floats = None
        for i, raw, sources in _staged_sources(floats, opened, used, stage, accum_dtype, on_bytes):
            _fold_one(accs, sources, [cand[i] for cand in lerps])
            if i == len(checkpoints) - 1:
                newest_floats = raw
        used_elems = offsets[-1][1] if offsets else 0
        for c, buf in enumerate(buffers):
            _check_finite(buf[:used_elems], floats, opened, used, lerps[c], starts[c])
            folded = iter(accs[c])
            for p in chunk:
                sinks[c].write(p.name, next(folded) if layout.is_float(p.name) else newest.piece(p))
        if newest_to is not None:
            read = dict(zip((p.name for p in floats), newest_floats or []))  # its float pieces, as read above
            for p in chunk:
                newest_to.write(p.name, read[p.name] if p.name in read else newest.piece(p))
    return layout


def chunk_elems_for(budget: int, candidates: int, itemsize: int) -> int:
    """Elements per chunk such that everything a chunk costs fits ``budget`` bytes.

    Per candidate: its accumulator chunk and the finished chunk in the output's dtype on its way to the file; plus
    two temporaries for dtype conversion of the checkpoint being read; all at ``itemsize``, the widest dtype
    involved. Raises OptionError (max_memory) below :data:`MIN_CHUNK_ELEMS`.
    """
    per_element = (candidates * 2 + 2) * itemsize
    elems = min(DEFAULT_CHUNK_ELEMS, budget // per_element)
    if elems < MIN_CHUNK_ELEMS:
        raise OptionError("max_memory", f"of {budget} bytes is too small for {candidates} accumulator(s): at least "
                                        f"{MIN_CHUNK_ELEMS * per_element} bytes are needed")
    return elems


def _staged_sources(floats: list[Piece], opened: dict[int, FlatViews], used: list[int],
                    stage: Callable[[list[torch.Tensor], torch.dtype], list[torch.Tensor]], dtype: torch.dtype,
                    on_bytes: Callable[[int], None] | None
                    ) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
    """For each used checkpoint i in order: (i, its pieces of the chunk as read, the same on the accumulators'
    device and in their dtype)."""
    for i in used:
        sources = [opened[i].piece(p) for p in floats]
        if on_bytes is not None:
            on_bytes(sum(s.numel() * s.element_size() for s in sources))
        yield i, sources, stage(sources, dtype)


def _fold_one(accs: list[list[torch.Tensor]], sources: list[torch.Tensor], weights: list[float]) -> None:
    """Fold one checkpoint's pieces into every candidate that weighs it: a copy for the candidate's first
    checkpoint (its lerp weight is 1), else one lerp, all candidates in as few kernel launches as torch allows."""
    lerp_accs: list[torch.Tensor] = []
    lerp_srcs: list[torch.Tensor] = []
    lerp_weights: list[float] = []
    for acc, t in zip(accs, weights):
        if t <= 0:
            continue
        if t >= 1:
            torch._foreach_copy_(acc, sources)
        else:
            lerp_accs += acc
            lerp_srcs += sources
            lerp_weights += [t] * len(sources)
    _lerp(lerp_accs, lerp_srcs, lerp_weights)


def _check_finite(acc: torch.Tensor, floats: list[Piece], opened: dict[int, FlatViews], used: list[int],
                  lerps: Sequence[float], start: FlatViews | None = None) -> None:
    """Raise, naming the checkpoint and tensor, if a finished chunk holds NaN or Inf.

    A sum is NaN or Inf when any element is (or, rarely, when finite values overflow it: then look closer). One
    reduction over a chunk still in cache, no temporary mask.
    """
    if not bool(torch.isfinite(acc.sum())) and not bool(torch.isfinite(acc).all()):
        _raise_non_finite(floats, ([start] if start is not None else []) + [opened[i] for i in used if lerps[i] > 0])


def _initial_views(init: Checkpoint, layout: Layout, accum_dtype: torch.dtype) -> FlatViews:
    """An initial running mean, checked to hold the layout's tensors with its float ones in the accumulator's dtype
    (a mean of another precision or model is refused, never converted)."""
    this = Layout.of(init)
    layout.check_same(this)
    wrong = [n for n, d in this.dtypes.items() if d.is_floating_point and d != accum_dtype]
    if wrong:
        raise CkptEmaError(f"tensor {wrong[0]!r} is {this.dtypes[wrong[0]]}, not the accumulator's {accum_dtype}",
                           init.path)
    return FlatViews(init)


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
    from ckpt_ema.engine.cuda_staging import PinnedStager

    return PinnedStager(dev)


def _raise_non_finite(floats: list[Piece], weighed: list[FlatViews]) -> None:
    """Name the checkpoint (or initial mean) and tensor that brought NaN or Inf into the average."""
    for views in weighed:
        for p in floats:
            piece = views.piece(p)
            if not bool(torch.isfinite(piece).all()):
                kind = "NaN" if bool(torch.isnan(piece).any()) else "Inf"
                raise CkptEmaError(f"tensor {p.name!r} contains {kind}", views.ckpt.path)
    name = floats[0].name if floats else "?"
    raise CkptEmaError(f"the average overflowed to Inf near tensor {name!r} (try --accum-dtype float64)")
