"""Read the weights and the metadata of one checkpoint, safely and lazily.

A checkpoint is one of:

* a ``torch.save`` file (.pt, .pth, .bin, .ckpt, .pth.tar), loaded with ``weights_only=True`` and mmap, so
  tensors stay on disk until they are used and no pickled code ever runs;
* a ``.safetensors`` file, mapped by :class:`ckpt_ema.safetensors_io.SafetensorsFile`;
* a Hugging Face ``checkpoint-N/`` folder, whose weights are ``model.safetensors``, ``pytorch_model.bin`` or a
  sharded set named by its ``*.index.json``.

Inside a ``torch.save`` file the weights are either a plain state dict or sit in one of the usual containers
(:data:`CONTAINER_KEYS`); ``key`` picks one explicitly. DDP's ``module.`` and torch.compile's ``_orig_mod.``
prefixes are stripped so that the output loads into the plain model.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.safetensors_io import SafetensorsFile

# Where trainers put the model's weights, tried in this order. timm's ``state_dict_ema`` is deliberately absent:
# averaging an EMA again is rarely what a user means, so it is read only when ``--key state_dict_ema`` asks.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")

# Top-level metadata keys that hold the training step, in order of preference.
STEP_KEYS = ("global_step", "step", "num_updates", "iteration")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")  # a sharded set, named by its index

# Weight files inside a Hugging Face checkpoint folder, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# Harmless non-tensor types that real trainers store next to the weights. Each is data, not code: building one
# runs no user code. timm's CheckpointSaver stores an argparse.Namespace; Lightning stores AttributeDict and paths.
# Lightning's AttributeDict (a dict subclass with no state beyond its items) loads as a plain dict: torch's
# weights-only unpickler only fills dict, OrderedDict and Counter, so a dict subclass stand-in could never load.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
]


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and dtypes (a metric saved as ``np.float64``), under both of numpy's module names."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    scalar = core.multiarray.scalar
    found: list[Any] = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    found += [type(np.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return found


def is_torch_file(path: Path) -> bool:
    return path.name.endswith(TORCH_SUFFIXES)


def is_weight_file(path: Path) -> bool:
    return is_torch_file(path) or path.name.endswith((SAFETENSORS_SUFFIX,) + INDEX_SUFFIXES)


@dataclass
class Checkpoint:
    """The weights of one checkpoint, as a lazily read mapping of name to tensor, plus its metadata.

    Every tensor is a view of the mapped file (``torch.load(mmap=True)`` or :class:`SafetensorsFile`): its bytes
    are read from the page cache when used, and never all at once. ``metadata`` holds the plain values saved
    beside the weights (step, epoch, arch, ...).
    """

    path: Path
    names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    mapped: bool = True  # every tensor a view of a mapped file (False: an old-style .pt, loaded into memory)
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

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)


# ---------------------------------------------------------------------------------------------------- torch.save


def torch_load_safely(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (never a fallback to full unpickling), mmap'd when possible.

    Raises CkptEmaError with one line saying why a file cannot be read: not a checkpoint, truncated, or a pickled
    object that is not on the short list of harmless types (:data:`SAFE_GLOBALS`).
    """
    _check_torch_file_magic(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS + _numpy_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            raise CkptEmaError(_explain_unpickling_error(str(exc)), path) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, KeyError,
                IndexError, TypeError) as exc:  # a corrupt pickle breaks the unpickler in any of these ways
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CkptEmaError(f"not a readable PyTorch checkpoint (truncated or corrupt?): {first_line}", path) from None


def _check_torch_file_magic(path: Path) -> None:
    """Refuse, before torch.load, a file that is neither a zip archive (torch.save since PyTorch 1.6) nor a pickle
    of protocol 2 to 5 (the legacy format): random bytes or text would otherwise reach the unpickler."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CkptEmaError(f"cannot read the file: {exc.strerror or exc}", path) from None
    if not head:
        raise CkptEmaError("not a PyTorch checkpoint: the file is empty", path)
    if not (head.startswith(b"PK") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))):
        raise CkptEmaError("not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle", path)


def _explain_unpickling_error(message: str) -> str:
    if "Unsupported operand" in message:  # not a pickle opcode at all: the data is corrupt, not malicious
        return "not a readable PyTorch checkpoint (truncated or corrupt?): invalid pickle data"
    # "Unsupported global: GLOBAL x.y", or "unsupported GLOBAL x.y whose module x is blocked" (os, subprocess, ...)
    unsupported = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", message)
    if unsupported:
        return (
            f"refusing to load: the checkpoint pickles {unsupported.group(1)}, which could run code when loaded. "
            "ckpt-ema loads only tensors and a short list of harmless types; save the model's state_dict() instead"
        )
    if "weights only" in message.lower() or "weights_only" in message:
        # torch puts the reason after "WeightsUnpickler error:", on the same line or (newer versions) a later one
        after = message.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in message else ""
        lines = [ln.strip() for ln in after.splitlines() if ln.strip()]
        detail = lines[0] if lines else "unsupported content"
        return f"refusing to load: {detail} (only tensors and plain Python data are loaded)"
    first = message.strip().splitlines()[0] if message.strip() else "unpickling failed"
    return f"not a PyTorch checkpoint: {first}"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _has_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj: Any, path: Path, key: str | None = None) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """Locate the weights inside a loaded checkpoint object; returns them and the container key used.

    ``key`` may be a dotted path (``"model.ema"``). Without it: the object itself when it maps names to tensors,
    else the first of :data:`CONTAINER_KEYS` that holds tensors.
    """
    if key is not None:
        node = obj
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                have = ", ".join(sorted(str(k) for k in obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise CkptEmaError(f"no key {key!r} in the checkpoint (it has: {have})", path)
            node = node[part]
        if not _has_tensors(node):
            raise CkptEmaError(f"key {key!r} holds no tensors", path)
        return node, key
    if not isinstance(obj, Mapping):
        raise CkptEmaError(f"not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors", path)
    if _is_state_dict(obj):
        return obj, None
    for candidate in CONTAINER_KEYS:
        if _has_tensors(obj.get(candidate)):
            return obj[candidate], candidate
    if _has_tensors(obj):
        return obj, None
    keys = ", ".join(sorted(str(k) for k in obj)[:12])
    raise CkptEmaError(f"no weights found: none of {', '.join(CONTAINER_KEYS)} holds tensors (keys: {keys}); pick one with --key", path)


def plain_metadata(obj: Any) -> dict[str, Any]:
    """Top-level values that are plain data (numbers, strings, small dicts of them), e.g. step, epoch, arch."""
    if not isinstance(obj, Mapping):
        return {}
    meta: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, argparse.Namespace):
            v = vars(v)
        if isinstance(v, bool | int | float | str):
            meta[str(k)] = v
        elif isinstance(v, Mapping) and v and all(isinstance(x, bool | int | float | str | None) for x in v.values()):
            meta[str(k)] = {str(a): b for a, b in v.items()}
    return meta


# ---------------------------------------------------------------------------------------------------- names


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


# ---------------------------------------------------------------------------------------------------- opening


def weight_files_of(path: Path) -> list[Path]:
    """The weight files that make up the checkpoint at ``path`` (a file, or a Hugging Face checkpoint folder)."""
    if path.name.endswith(INDEX_SUFFIXES):
        return _shards_of(path)
    if not path.is_dir():
        return [path]
    for index_name in HF_INDEX_FILES:
        if (path / index_name).is_file():
            return _shards_of(path / index_name)
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise CkptEmaError(f"no weights in this folder (looked for {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})", path)


def _shards_of(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / f for f in dict.fromkeys(weight_map.values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CkptEmaError(f"unreadable shard index: {exc}", index) from None


def _read_weight_file(file: Path, key: str | None) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """One weight file's tensors by stored name (tensors, or the safetensors handle that maps them), its plain
    metadata, and whether its tensors are views of the mapped file (False: an old-style .pt, loaded whole)."""
    if not file.is_file():
        raise CkptEmaError("shard listed in the index is missing", file)
    if file.name.endswith(SAFETENSORS_SUFFIX):
        handle = SafetensorsFile(file)
        return dict.fromkeys(handle.entries, handle), {k: _parse_json_value(v) for k, v in handle.metadata.items()}, True
    obj = torch_load_safely(file)
    state, _ = find_state_dict(obj, file, key)
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    return tensors, plain_metadata(obj), zipfile.is_zipfile(file)  # zip files are what torch_load_safely mmaps


def open_checkpoint(path: Path, key: str | None = None, files: list[Path] | None = None) -> Checkpoint:
    """Open the checkpoint at ``path`` (made of ``files``, default: :func:`weight_files_of`) for reading: names,
    metadata, lazily readable tensors."""
    stored: dict[str, tuple[Path, Any]] = {}  # stored name -> (file, tensor or safetensors handle)
    metadata: dict[str, Any] = {}
    mapped = True
    for file in weight_files_of(path) if files is None else files:
        tensors, meta, file_mapped = _read_weight_file(file, key)
        stored.update({name: (file, value) for name, value in tensors.items()})
        metadata.update(meta)
        mapped = mapped and file_mapped
    if not stored:
        raise CkptEmaError("no tensors in this checkpoint", path)
    plain = strip_wrapper_prefixes(list(stored))
    ckpt = Checkpoint(path=path, names=[], metadata=_with_trainer_state(path, metadata), mapped=mapped)
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


def probe(path: Path, key: str | None = None) -> tuple[dict[str, Any], Checkpoint | None]:
    """The plain metadata of a checkpoint, without reading tensor data; and, for a checkpoint of one weight file
    (a file, or a Hugging Face folder) whose tensors are views of the mapped file, the opened checkpoint itself,
    for the engine to reuse (a .pt file's pickle is then parsed once per run, not once to find its step and again
    to read it). A sharded checkpoint is probed through its first file only and not kept open (the engine may not
    need it); neither is an old-style (non-zip) .pt file, which is loaded into memory rather than mapped."""
    files = weight_files_of(path)
    if len(files) == 1:
        ckpt = open_checkpoint(path, key, files)
        return ckpt.metadata, (ckpt if ckpt.mapped else None)
    _, meta, _ = _read_weight_file(files[0], key)  # the metadata of a sharded set is the same in every shard
    return _with_trainer_state(path, meta), None


def _parse_json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _with_trainer_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus the global step of a Hugging Face checkpoint folder's trainer_state.json, if it has one."""
    state_file = path / "trainer_state.json"
    if not path.is_dir() or not state_file.is_file():
        return meta
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise CkptEmaError(f"unreadable trainer state: {exc}", state_file) from None
    if isinstance(state.get("global_step"), int):
        meta["global_step"] = state["global_step"]
    return meta


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
