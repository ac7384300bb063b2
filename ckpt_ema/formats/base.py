"""What every checkpoint format provides: a :class:`Checkpoint` to read, and a :class:`Format` that says how the
format is recognised, which files a checkpoint of it consists of, how it opens, when it is whole on disk and
where its training step is recorded.

Each format is one module of this folder that declares one ``FORMAT``; :mod:`ckpt_ema.formats.registry` lists
them, and discovery, the watcher, the output-is-an-input check and the engine all go through that list
(docs/adding-a-format.md walks through adding one). This module imports no format: formats import it.

Whatever the format, the engine reads a :class:`Checkpoint`: names, shapes and dtypes from headers, and flat pieces
of tensors (:meth:`Checkpoint.piece`) as views of the mapped files, read from the page cache when used and never
all at once. DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes are stripped
(:func:`strip_wrapper_prefixes`) so that the output loads into the plain model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ckpt_ema.errors import CkptEmaError

# Top-level metadata keys that hold the training step, in order of preference.
STEP_KEYS = ("global_step", "step", "num_updates", "iteration")
# What ckpt-ema writes into a checkpoint folder it made (``--like-input``): what was averaged. Its presence tells
# the folder from a training checkpoint (its metadata then carries OWN_OUTPUT_KEY, as a safetensors output's does).
OWN_RECORD = "ckpt-ema.json"
OWN_OUTPUT_KEY = "ckpt_ema_version"
# Top-level metadata keys that hold the number of tokens trained on up to the checkpoint: OLMo-core's trainer state
# (train/rank0.pt), a Hugging Face Trainer's trainer_state.json (with include_num_input_tokens_seen).
TOKEN_KEYS = ("global_train_tokens_seen", "num_input_tokens_seen")


class MappedTensors(Protocol):
    """A mapped file that makes its tensors on request (a safetensors file): shapes from its header, tensors as
    views of the map."""

    def tensor(self, name: str) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...


@dataclass
class Checkpoint:
    """The weights of one checkpoint, as a lazily read mapping of name to tensor, plus its metadata.

    Every tensor is a view of a mapped file at a checked offset: held in ``_tensors`` (a torch.save file's
    tensors, made when it was unpickled) or made on request by a :class:`MappedTensors` in ``_mapped`` (under its
    stored name); its bytes are read from the page cache when used, and never all at once. ``metadata`` holds the
    plain values saved beside the weights (step, epoch, arch, ...).
    """

    path: Path
    names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    # Where the weights were taken from, when the format leaves a choice (a DCP entry, DeepSpeed's fp32 masters):
    # said to the user once per run.
    weights_from: str | None = None
    # Bytes of the files the weights are read from, when not the whole files (DCP and DeepSpeed: the model only).
    nbytes: int | None = None
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _mapped: dict[str, tuple[MappedTensors, str]] = field(default_factory=dict, repr=False)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor called ``name`` (prefixes already stripped), as a view of the mapped file."""
        if name in self._tensors:
            return self._tensors[name]
        handle, stored_name = self._mapped[name]
        return handle.tensor(stored_name)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor, from headers only."""
        out = {}
        for name in self.names:
            if name in self._tensors:
                t = self._tensors[name]
                out[name] = (tuple(t.shape), t.dtype)
            else:
                handle, stored = self._mapped[name]
                out[name] = handle.shape(stored)
        return out

    def piece(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of tensor ``name`` in row-major order: a view of the mapped file when the tensor
        is stored contiguously, else a copy of just those elements. Formats that store a tensor in parts (DCP,
        DeepSpeed) override this to read only the parts that hold them, never the whole tensor."""
        return flat_slice(self.tensor(name), start, stop)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)

    def without_prefix(self, prefix: str) -> Checkpoint:
        """The same checkpoint with ``prefix`` cut from every tensor name (``--strip-prefix``: a wrapper's
        ``model.``); a tensor without it, or named just the prefix, is an error naming it."""
        bad = [n for n in self.names if not n.startswith(prefix) or n == prefix]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise CkptEmaError(f"tensor {bad[0]!r}{more} does not start with the prefix {prefix!r} to strip", self.path)
        cut = len(prefix)
        return replace(self, names=[n[cut:] for n in self.names],
                       _tensors={n[cut:]: t for n, t in self._tensors.items()},
                       _mapped={n[cut:]: h for n, h in self._mapped.items()})

    def with_prefix(self, prefix: str) -> Checkpoint:
        """The same checkpoint with ``prefix`` put before every tensor name: the inverse of :meth:`without_prefix`
        (a state file holds the names as averaged; the fold strips the prefix from every checkpoint it reads)."""
        return replace(self, names=[prefix + n for n in self.names],
                       _tensors={prefix + n: t for n, t in self._tensors.items()},
                       _mapped={prefix + n: h for n, h in self._mapped.items()})


class PartedCheckpoint(Checkpoint):
    """A checkpoint whose tensors are stored in parts (DCP's chunks, DeepSpeed's partitions) and assembled on read:
    a subclass records each tensor's shape and dtype in ``_shape`` and implements :meth:`piece`."""

    _shape: dict[str, tuple[tuple[int, ...], torch.dtype]]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._shape)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor, assembled from its parts (a copy when they are several)."""
        shape, _ = self._shape[name]
        return self.piece(name, 0, math.prod(shape)).view(shape)


# What one weight file holds, by stored name: a tensor (a view of the mapped file), or the mapped file that makes it.
StoredTensors = dict[str, "torch.Tensor | MappedTensors"]


def weights_checkpoint(path: Path, files: Sequence[tuple[Path, Mapping[str, torch.Tensor | MappedTensors]]],
                       metadata: dict[str, Any]) -> Checkpoint:
    """The checkpoint at ``path`` whose weights are the tensors that ``files`` (each weight file and what it holds)
    store, under their plain names (:func:`strip_wrapper_prefixes`): each tensor exactly once, in no two files."""
    stored: dict[str, tuple[Path, torch.Tensor | MappedTensors]] = {}
    for file, tensors in files:
        for name, value in tensors.items():
            if name in stored:
                raise CkptEmaError(f"tensor {name!r} is in two shards, {stored[name][0].name} and {file.name}", path)
            stored[name] = (file, value)
    if not stored:
        raise CkptEmaError("no tensors in this checkpoint", path)
    plain = strip_wrapper_prefixes(list(stored))
    ckpt = Checkpoint(path=path, names=[], metadata=metadata)
    for name, (file, value) in stored.items():
        new = plain[name]
        if new in ckpt._tensors or new in ckpt._mapped:
            raise CkptEmaError(f"two tensors are both called {new!r} once wrapper prefixes are removed", file)
        ckpt.names.append(new)
        if isinstance(value, torch.Tensor):
            ckpt._tensors[new] = value
        else:
            ckpt._mapped[new] = (value, name)
    return ckpt


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


def strip_wrapper_prefixes(names: list[str]) -> dict[str, str]:
    """Map stored name -> plain name: drop torch.compile's ``_orig_mod.`` components and DDP's ``module.`` prefix.

    ``module.`` is dropped only when every name has it: a model may well have a submodule called ``module``, but
    DDP wraps the whole model.
    """
    plain = {n: n.replace("_orig_mod.", "") for n in names}
    while plain and all(p.startswith("module.") for p in plain.values()):
        plain = {n: p[len("module.") :] for n, p in plain.items()}
        plain = {n: p.replace("_orig_mod.", "") for n, p in plain.items()}
    return plain


def step_from_metadata(meta: Mapping[str, Any]) -> tuple[int, str] | None:
    """The training step a checkpoint's metadata records (:data:`STEP_KEYS`), and the key it came from."""
    for key in STEP_KEYS:
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, key
    return None


def tokens_from_metadata(meta: Mapping[str, Any]) -> int | None:
    """The number of tokens trained on that a checkpoint's metadata records (:data:`TOKEN_KEYS`); None: none."""
    for key in TOKEN_KEYS:
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def step_in_metadata(path: Path, meta: Mapping[str, Any]) -> tuple[int, str] | None:
    """A :attr:`Format.step` for formats that keep the step beside the weights: the step and ``"metadata:<key>"``."""
    found = step_from_metadata(meta)
    return None if found is None else (found[0], f"metadata:{found[1]}")


def _always(path: Path) -> bool:
    return True


def _never(path: Path) -> bool:
    return False


def _no_check(folder: Path) -> None:
    return None


def _not_left_out(path: Path) -> str | None:
    return None


@dataclass(frozen=True)
class Format:
    """One checkpoint format, declared once: :mod:`ckpt_ema.formats.registry` lists every ``FORMAT``.

    A *file format* names the endings of its files in ``suffixes``; a *folder format* leaves it empty and is
    recognised from what the folder holds. Every callable takes the checkpoint's path (the file, or the folder).
    """

    name: str  # what a checkpoint of this format is, in a few words ("a torch.save file")
    suffixes: tuple[str, ...]  # a file format's name endings; () for a folder format
    # Whether ``path`` is one checkpoint of this format: from names and the presence of small files only.
    recognises: Callable[[Path], bool]
    # Every file the checkpoint consists of: what a listing stats, what no output may replace.
    files: Callable[[Path], list[Path]]
    # The checkpoint opened for reading: names, metadata, lazily readable tensors (``--key`` as the second argument).
    open: Callable[[Path, str | None], Checkpoint]
    # Whether the writer is done with it, as far as the format can tell (a watcher reads it only then). A file that
    # is whole but corrupt counts as complete: opening it says what is wrong.
    is_complete: Callable[[Path], bool]
    # Where its step is recorded: (step, where from: "metadata:<key>", "trainer_state.json"), from the path and the
    # metadata the probe found; None: no step recorded (the name's last number is used).
    step: Callable[[Path, Mapping[str, Any]], tuple[int, str] | None] = step_in_metadata
    # Its metadata without reading tensor data, and the opened checkpoint if it was opened (the engine reuses it).
    # None: open it (a checkpoint whose opening reads little beyond its metadata).
    probe: Callable[[Path, str | None], tuple[dict[str, Any], Checkpoint | None]] | None = None
    # Whether a checkpoint of this format met while scanning a run's folder is one of the run's checkpoints (a model
    # folder there is one only when it is a Trainer's checkpoint-N).
    in_run: Callable[[Path], bool] = _always
    # Why a checkpoint of this format met while scanning a run's folder is left out although it is one of the run's
    # (NeMo 2's -last copy of the newest checkpoint), in a few words that discovery's skipped lines say; None: kept.
    left_out: Callable[[Path], str | None] = _not_left_out
    # Whether a checkpoint of this format given as an input is also a run's folder, to be scanned (a Trainer's
    # output folder: its final model beside checkpoint-N folders).
    holds_run: Callable[[Path], bool] = _never
    # Refuses, in one line, a run's folder in which this format's record of the newest checkpoint is broken
    # (DeepSpeed's ``latest`` naming a tag that is not there).
    check_run: Callable[[Path], None] = _no_check

    def is_file_format(self) -> bool:
        return bool(self.suffixes)
