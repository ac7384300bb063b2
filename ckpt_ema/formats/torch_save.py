"""``torch.save`` files (.pt, .pth, .bin, .ckpt, .pth.tar): loaded weights-only, mapped, never running pickled code.

``torch.load(weights_only=True)`` rebuilds only tensors and plain Python data; the short list of harmless types
that real trainers pickle beside the weights (:data:`SAFE_GLOBALS`) is allowed explicitly, and anything else is
refused with a line naming the type. Inside the loaded object the weights are a plain state dict or sit in one
of the usual containers (:data:`CONTAINER_KEYS`); ``key`` picks one explicitly.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckpt_ema.errors import CkptEmaError

# Where trainers put the model's weights, tried in this order. timm's ``state_dict_ema`` is deliberately absent:
# averaging an EMA again is rarely what a user means, so it is read only when ``--key state_dict_ema`` asks.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")

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



def torch_load_safely(path: Path, extra_safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (never a fallback to full unpickling), mmap'd when possible.

    Raises CkptEmaError with one line saying why a file cannot be read: not a checkpoint, truncated, or a pickled
    object that is not on the short list of harmless types (:data:`SAFE_GLOBALS`, plus ``extra_safe_globals``: a
    format's own stand-ins, such as DeepSpeed's in :mod:`ckpt_ema.formats.deepspeed`).
    """
    _check_torch_file_magic(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS + _numpy_safe_globals() + list(extra_safe_globals)):
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

