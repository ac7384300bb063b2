"""Every checkpoint format ckpt-ema reads, in one list, and the questions the rest of the tool asks of it.

Each format is declared once, by its module's ``FORMAT`` (a :class:`~ckpt_ema.formats.base.Format`): how it is
recognised, which files a checkpoint of it consists of, how it opens, when it is whole on disk, where its step is
recorded. Discovery (:mod:`ckpt_ema.discover`), the watcher (:mod:`ckpt_ema.follow.watch`), the state's listings
and the output-is-an-input check (:func:`checkpoint_files`) and the engine (:func:`open_checkpoint`) all ask here,
so adding a format is one module and one line in :data:`FORMATS` (docs/adding-a-format.md).

A path is read as the first format in :data:`FORMATS` that recognises it: folder formats for folders, file formats
(by their names' endings) for anything else. Folder formats come first in the order their recognition must be
tried: a Hugging Face ``checkpoint-N/`` under DeepSpeed holds both a ``latest`` and maybe model weights, and is
read as DeepSpeed's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats import dcp, deepspeed, megatron, model_folder, olmo_core, safetensors, sharded, torch_save
from ckpt_ema.formats.base import OWN_OUTPUT_KEY, OWN_RECORD, Checkpoint, Format

FORMATS: tuple[Format, ...] = (
    megatron.FORMAT,  # before DCP: a megatron-core torch_dist folder is a DCP folder with its own naming
    dcp.FORMAT,
    olmo_core.FORMAT,
    deepspeed.FORMAT,
    model_folder.FORMAT,
    sharded.FORMAT,
    safetensors.FORMAT,
    torch_save.FORMAT,
)


def weight_suffixes() -> tuple[str, ...]:
    """Every ending of a weight file's name that some format reads, in the order of :data:`FORMATS`."""
    return tuple(dict.fromkeys(s for fmt in FORMATS for s in fmt.suffixes))


def format_of(path: Path) -> Format | None:
    """The format of the checkpoint at ``path`` (None: it is none, e.g. a run's folder)."""
    folder = path.is_dir()
    return next((fmt for fmt in FORMATS if fmt.is_file_format() != folder and fmt.recognises(path)), None)


def format_for(path: Path) -> Format:
    """The format of the checkpoint at ``path``; an error naming what it could have been when it is none."""
    fmt = format_of(path)
    if fmt is not None:
        return fmt
    if path.is_dir():
        kinds = [f.name for f in FORMATS if not f.is_file_format()]
        raise CkptEmaError(f"no checkpoint in this folder: it is not {', '.join(kinds[:-1])} or {kinds[-1]}", path)
    raise CkptEmaError(f"not a checkpoint file (expected {', '.join(weight_suffixes())} or a folder)", path)


def is_weight_file(path: Path) -> bool:
    """Whether the name of ``path`` is that of a checkpoint file some format reads."""
    return path.name.endswith(weight_suffixes())


def strip_weight_suffix(name: str) -> str:
    """``name`` without the weight-file ending it has, if any (``epoch=3-step=400.ckpt`` -> ``epoch=3-step=400``)."""
    suffix = max((s for s in weight_suffixes() if name.endswith(s)), key=len, default="")
    return name[: len(name) - len(suffix)]


def check_run_folder(folder: Path) -> None:
    """Refuse, in one line, a run's folder in which a format's record of the newest checkpoint is broken
    (:attr:`Format.check_run`)."""
    for fmt in FORMATS:
        fmt.check_run(folder)


def checkpoint_files(path: Path) -> list[Path]:
    """Every file the checkpoint at ``path`` consists of (:attr:`Format.files`); a checkpoint no longer there (an
    input a state recorded, since deleted) is just its path."""
    if not path.exists():
        return [path]
    return format_for(path).files(path)


def open_checkpoint(path: Path, key: str | None = None) -> Checkpoint:
    """Open the checkpoint at ``path`` for reading: names, metadata, lazily readable tensors."""
    return format_for(path).open(path, key)


def probe(path: Path, key: str | None = None) -> tuple[dict[str, Any], Checkpoint | None]:
    """The plain metadata of a checkpoint, without reading tensor data; and the checkpoint itself when probing
    opened it, for the engine to reuse (a .pt file's pickle is then parsed once per run, not once to find its step
    and again to read it). A sharded set is probed through its first shard only and not kept open."""
    fmt = format_for(path)
    if fmt.probe is not None:
        metadata, ckpt = fmt.probe(path, key)
    else:
        ckpt = fmt.open(path, key)
        metadata = ckpt.metadata
    if path.is_dir() and (path / OWN_RECORD).is_file():  # a checkpoint folder ckpt-ema wrote (--like-input)
        metadata = {**metadata, OWN_OUTPUT_KEY: _own_version(path / OWN_RECORD)}
    return metadata, ckpt


def _own_version(record: Path) -> str:
    """The ckpt-ema version that wrote a checkpoint folder, from its record ("unknown" when unreadable)."""
    try:
        with open(record, "rb") as f:
            value = json.loads(f.read(1 << 20)).get(OWN_OUTPUT_KEY)
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return value if isinstance(value, str) else "unknown"


def step_of(path: Path, metadata: Mapping[str, Any]) -> tuple[int, str] | None:
    """The step the checkpoint at ``path`` records, given the metadata its probe found, and where it came from."""
    return format_for(path).step(path, metadata)


def is_complete(path: Path) -> bool:
    """Whether the writer is done with the checkpoint at ``path`` (:attr:`Format.is_complete`): False while it
    is no checkpoint yet (a folder still without its weights) or cannot be looked at."""
    try:
        fmt = format_of(path)
        return fmt is not None and fmt.is_complete(path)
    except (OSError, CkptEmaError):
        return False


def load_state_dict(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of a checkpoint, in memory, with its metadata: the one reader ``eval`` and tests use."""
    path = Path(path)
    if not path.exists():
        raise CkptEmaError("no such file or folder", path)
    ckpt = open_checkpoint(path, key)
    meta = dict(ckpt.metadata)
    # Clone: a view of a mapped file would keep it open, and an eval may modify weights (BatchNorm recalibration).
    return {name: t.clone() for name, t in ckpt.items()}, meta

