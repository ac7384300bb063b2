"""Read the weights and the metadata of one checkpoint, safely and lazily.

A checkpoint is one of:

* a ``torch.save`` file (.pt, .pth, .bin, .ckpt, .pth.tar): :mod:`ckpt_ema.formats.torch_save`;
* a ``.safetensors`` file: :mod:`ckpt_ema.formats.safetensors`;
* a Hugging Face ``checkpoint-N/`` folder or a sharded set named by its index json: :mod:`ckpt_ema.formats.hf`;
* a PyTorch Distributed Checkpoint folder (``.metadata`` and ``.distcp`` files): :mod:`ckpt_ema.formats.dcp`;
* a DeepSpeed ZeRO checkpoint folder: :mod:`ckpt_ema.formats.deepspeed`.

Whatever the format, the engine reads a :class:`Checkpoint`: names, shapes and dtypes from headers, and flat pieces
of tensors (:meth:`Checkpoint.piece`) as views of the mapped files, read from the page cache when used and never
all at once. A new format is a module in
this folder whose reader returns a Checkpoint, and a branch in :func:`open_checkpoint`.

DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes are stripped so that the output loads into the plain
model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.hf import INDEX_SUFFIXES, index_of, read_index, weight_files_of, with_trainer_state
from ckpt_ema.formats.safetensors import SafetensorsFile
from ckpt_ema.formats.torch_save import (find_state_dict, is_torch_file, plain_metadata, state_dict_tensors,
                                         torch_load_safely)

# Top-level metadata keys that hold the training step, in order of preference.
STEP_KEYS = ("global_step", "step", "num_updates", "iteration")
SAFETENSORS_SUFFIX = ".safetensors"
DCP_METADATA_FILE = ".metadata"  # what makes a folder a PyTorch Distributed Checkpoint


def is_weight_file(path: Path) -> bool:
    return is_torch_file(path) or path.name.endswith((SAFETENSORS_SUFFIX,) + INDEX_SUFFIXES)


@dataclass
class Checkpoint:
    """The weights of one checkpoint, as a lazily read mapping of name to tensor, plus its metadata.

    Every tensor is a view of a mapped file at a checked offset (:func:`torch_load_safely` or
    :class:`SafetensorsFile`): its bytes are read from the page cache when used, and never all at once.
    ``metadata`` holds the plain values saved beside the weights (step, epoch, arch, ...).
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
    _safetensors: dict[str, tuple[SafetensorsFile, str]] = field(default_factory=dict, repr=False)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor called ``name`` (prefixes already stripped), as a view of the mapped file."""
        if name in self._tensors:
            return self._tensors[name]
        handle, stored_name = self._safetensors[name]
        return handle.tensor(stored_name)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor, from headers only."""
        out = {}
        for name in self.names:
            if name in self._tensors:
                t = self._tensors[name]
                out[name] = (tuple(t.shape), t.dtype)
            else:
                handle, stored = self._safetensors[name]
                dtype, shape, _, _ = handle.entries[stored]
                out[name] = (shape, dtype)
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
                       _safetensors={n[cut:]: h for n, h in self._safetensors.items()})

    def with_prefix(self, prefix: str) -> Checkpoint:
        """The same checkpoint with ``prefix`` put before every tensor name: the inverse of :meth:`without_prefix`
        (a state file holds the names as averaged; the fold strips the prefix from every checkpoint it reads)."""
        return replace(self, names=[prefix + n for n in self.names],
                       _tensors={prefix + n: t for n, t in self._tensors.items()},
                       _safetensors={prefix + n: h for n, h in self._safetensors.items()})


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



def _read_weight_file(file: Path, key: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One weight file's tensors by stored name (checked tensors, or the safetensors handle that maps them) and
    its plain metadata."""
    if not file.is_file():
        raise CkptEmaError("shard listed in the index is missing", file)
    if file.name.endswith(SAFETENSORS_SUFFIX):
        handle = SafetensorsFile(file)
        return dict.fromkeys(handle.entries, handle), {k: _parse_json_value(v) for k, v in handle.metadata.items()}
    obj = torch_load_safely(file)
    state, _ = find_state_dict(obj, file, key)
    return state_dict_tensors(state, file), plain_metadata(obj)


def folder_format(folder: Path) -> str | None:
    """What kind of checkpoint the folder ``folder`` is: ``"dcp"`` (a DCP folder, or accelerate's FSDP checkpoint
    holding one), ``"deepspeed"`` (a DeepSpeed tag folder, or a Hugging Face ``checkpoint-N/`` whose ``latest``
    names one), ``"hf"`` (weight files of a Hugging Face folder), or None (not one checkpoint: maybe a run)."""
    from ckpt_ema.formats import deepspeed
    from ckpt_ema.formats.hf import is_hf_checkpoint_folder

    if (folder / DCP_METADATA_FILE).is_file() or (folder / "pytorch_model_fsdp_0" / DCP_METADATA_FILE).is_file():
        return "dcp"
    if deepspeed.is_tag_folder(folder) or ((folder / deepspeed.LATEST_FILE).is_file() and is_trainer_folder(folder)):
        return "deepspeed"
    if is_hf_checkpoint_folder(folder):
        return "hf"
    return None


def checkpoint_files(path: Path) -> list[Path]:
    """Every file the checkpoint at ``path`` consists of: each file of a DCP or DeepSpeed folder, else its weight
    files (:func:`ckpt_ema.formats.hf.weight_files_of`)."""
    if path.is_dir() and folder_format(path) in ("dcp", "deepspeed"):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return weight_files_of(path)


def is_trainer_folder(folder: Path) -> bool:
    """A Hugging Face Trainer's checkpoint folder (``checkpoint-N/``, or one with its ``trainer_state.json``)."""
    return folder.name.startswith("checkpoint-") or (folder / "trainer_state.json").is_file()


def open_checkpoint(path: Path, key: str | None = None, files: list[Path] | None = None) -> Checkpoint:
    """Open the checkpoint at ``path`` (made of ``files``, default: :func:`weight_files_of`) for reading: names,
    metadata, lazily readable tensors. A sharded set is read through its index's weight map: every tensor from
    the shard the map names, each exactly once (:func:`_check_against_index`)."""
    kind = folder_format(path) if files is None and path.is_dir() else None
    if kind == "dcp":
        from ckpt_ema.formats.dcp import DcpCheckpoint

        return DcpCheckpoint(path, key)
    if kind == "deepspeed":
        from ckpt_ema.formats.deepspeed import DeepSpeedCheckpoint

        if key is not None:
            raise CkptEmaError(f"--key {key} does not apply to a DeepSpeed checkpoint: its weights are the model's "
                               "parameters and buffers, taken from the partitions", path)
        ckpt: Checkpoint = DeepSpeedCheckpoint(path)
        ckpt.metadata = with_trainer_state(path, ckpt.metadata)
        return ckpt
    stored: dict[str, tuple[Path, Any]] = {}  # stored name -> (file, tensor or safetensors handle)
    metadata: dict[str, Any] = {}
    index = index_of(path) if files is None else None
    for file in weight_files_of(path) if files is None else files:
        tensors, meta = _read_weight_file(file, key)
        for name, value in tensors.items():
            if name in stored:
                raise CkptEmaError(f"tensor {name!r} is in two shards, {stored[name][0].name} and {file.name}", path)
            stored[name] = (file, value)
        metadata.update(meta)
    if index is not None:
        _check_against_index(index, read_index(index), stored)
    if not stored:
        raise CkptEmaError("no tensors in this checkpoint", path)
    plain = strip_wrapper_prefixes(list(stored))
    ckpt = Checkpoint(path=path, names=[], metadata=with_trainer_state(path, metadata))
    for name, (file, value) in stored.items():
        new = plain[name]
        if new in ckpt._tensors or new in ckpt._safetensors:
            raise CkptEmaError(f"two tensors are both called {new!r} once wrapper prefixes are removed", file)
        ckpt.names.append(new)
        if isinstance(value, torch.Tensor):
            ckpt._tensors[new] = value
        else:
            ckpt._safetensors[new] = (value, name)
    return ckpt


def _check_against_index(index: Path, weight_map: dict[str, Path], stored: dict[str, tuple[Path, Any]]) -> None:
    """Every tensor the index lists was read from the shard it names, and no shard holds a tensor the index puts
    elsewhere or does not list."""
    for name, shard in weight_map.items():
        if name not in stored:
            raise CkptEmaError(f"the index puts tensor {name!r} in {shard.name}, which does not hold it", index)
    for name, (file, _) in stored.items():
        if name not in weight_map:
            raise CkptEmaError(f"shard {file.name} holds tensor {name!r}, which the index does not list", index)
        if file != weight_map[name]:
            raise CkptEmaError(f"tensor {name!r} is in shard {file.name}, but the index puts it in "
                               f"{weight_map[name].name}", index)


def probe(path: Path, key: str | None = None) -> tuple[dict[str, Any], Checkpoint | None]:
    """The plain metadata of a checkpoint, without reading tensor data; and, for a checkpoint of one weight file
    (a file, or a Hugging Face folder) whose tensors are views of the mapped file, the opened checkpoint itself,
    for the engine to reuse (a .pt file's pickle is then parsed once per run, not once to find its step and again
    to read it). A checkpoint of several shards is probed through its first file only and not kept open (the
    engine may not need it). DCP and DeepSpeed checkpoints are opened whole (metadata only until a tensor is read)."""
    if path.is_dir() and folder_format(path) in ("dcp", "deepspeed"):
        ckpt = open_checkpoint(path, key)  # its metadata is read with the checkpoint; it stays open for the engine
        return ckpt.metadata, ckpt
    files = weight_files_of(path)
    if len(files) == 1:
        ckpt = open_checkpoint(path, key)
        return ckpt.metadata, ckpt
    _, meta = _read_weight_file(files[0], key)  # the metadata of a sharded set is the same in every shard
    return with_trainer_state(path, meta), None


def _parse_json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def step_from_metadata(meta: Mapping[str, Any]) -> tuple[int, str] | None:
    """The training step a checkpoint records, and the key it came from."""
    for key in STEP_KEYS:
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, key
    return None


def load_state_dict(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of a checkpoint, in memory, with its metadata: the one reader ``eval`` and tests use."""
    path = Path(path)
    if not path.exists():
        raise CkptEmaError("no such file or folder", path)
    ckpt = open_checkpoint(path, key)
    meta = dict(ckpt.metadata)
    # Clone: a view of a mapped file would keep it open, and an eval may modify weights (BatchNorm recalibration).
    return {name: t.clone() for name, t in ckpt.items()}, meta
