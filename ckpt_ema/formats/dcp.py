"""PyTorch Distributed Checkpoint (DCP) folders, and the layouts trainers put them in.

A DCP checkpoint is a folder holding ``.metadata`` and the ``__R_S.distcp`` files it indexes
(:mod:`ckpt_ema.formats.dcp_reader` reads them). Trainers wrap it:

* accelerate's FSDP saves the model as the DCP folder ``pytorch_model_fsdp_0/`` inside its checkpoint folder, its
  weights under the entry ``model`` (the default ``--key`` there);
* Lightning's FSDP strategy saves a DCP folder named like its checkpoint files (``epoch=0-step=100.ckpt/``) and,
  after it, its own plain entries (``global_step``, ``epoch``, ...) in ``meta.pt`` beside the ``.distcp`` files.

``torch.distributed.checkpoint.save`` writes the ``.metadata`` file last, under a temporary name renamed once
whole, after every rank has written its ``.distcp`` files: a folder with its ``.metadata`` is complete (and one whose
metadata names a file that is missing or short is refused when opened, in a line saying which). A Lightning
folder is complete once its ``meta.pt`` is there too.

The reader imports ``torch.distributed.checkpoint``, slow to import: it is imported when a DCP checkpoint is first
opened, so that runs of other formats never pay for it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import Checkpoint, Format
from ckpt_ema.formats.torch_save import plain_metadata, torch_file_is_complete, torch_load_safely

METADATA_FILE = ".metadata"  # what makes a folder a DCP checkpoint
# accelerate's FSDP saves the model as a DCP folder of this name inside its checkpoint folder (weights under "model").
ACCELERATE_MODEL_FOLDER = "pytorch_model_fsdp_0"
ACCELERATE_MODEL_KEY = "model"
# Lightning's FSDP strategy saves its non-tensor checkpoint entries (global_step, epoch, ...) here, beside the DCP,
# in a folder named like its checkpoint files.
LIGHTNING_META_FILE = "meta.pt"
LIGHTNING_SUFFIX = ".ckpt"


def dcp_folder_of(path: Path) -> Path | None:
    """The DCP folder that holds the model of the checkpoint at ``path``: itself, or accelerate's
    ``pytorch_model_fsdp_0/`` inside it; None when it is no DCP checkpoint."""
    if (path / METADATA_FILE).is_file():
        return path
    if (path / ACCELERATE_MODEL_FOLDER / METADATA_FILE).is_file():
        return path / ACCELERATE_MODEL_FOLDER
    return None


def is_dcp_checkpoint(path: Path) -> bool:
    return dcp_folder_of(path) is not None


def dcp_files(path: Path) -> list[Path]:
    """Every file of the checkpoint's folder (the ``.distcp`` files, ``.metadata``, a trainer's files beside)."""
    return sorted(p for p in path.rglob("*") if p.is_file())


def dcp_is_complete(path: Path) -> bool:
    """Whether the writer is done with the DCP checkpoint at ``path`` (see the module docstring): its ``.metadata``
    is there and ends where a pickle ends, and a Lightning folder's ``meta.pt`` is there and whole."""
    folder = dcp_folder_of(path)
    if folder is None:
        return False
    try:
        with open(folder / METADATA_FILE, "rb") as f:
            f.seek(max(f.seek(0, 2) - 1, 0))
            if f.read(1) != pickle.STOP:
                return False
    except OSError:
        return False
    meta = folder / LIGHTNING_META_FILE
    return not folder.name.endswith(LIGHTNING_SUFFIX) or (meta.is_file() and torch_file_is_complete(meta))


def open_dcp(path: Path, key: str | None) -> Checkpoint:
    """The model of the DCP checkpoint at ``path``, with Lightning's plain entries as metadata (its own step first)."""
    from ckpt_ema.formats.dcp_reader import DcpCheckpoint  # torch.distributed.checkpoint: only for DCP runs

    folder = dcp_folder_of(path)
    if folder is None:
        raise CkptEmaError(f"no DCP metadata ({METADATA_FILE}) in this folder", path)
    if key is None and folder.name == ACCELERATE_MODEL_FOLDER:
        key = ACCELERATE_MODEL_KEY
    ckpt = DcpCheckpoint(path, folder / METADATA_FILE, key)
    ckpt.metadata = {**_lightning_metadata(folder), **ckpt.metadata}
    return ckpt


def _lightning_metadata(folder: Path) -> dict[str, Any]:
    """The plain values of Lightning's ``meta.pt`` (global_step, epoch, ...) beside the DCP files, if any."""
    meta = folder / LIGHTNING_META_FILE
    return plain_metadata(torch_load_safely(meta)) if meta.is_file() else {}


FORMAT = Format(
    name=f"a PyTorch Distributed Checkpoint folder ({METADATA_FILE})",
    suffixes=(),
    recognises=is_dcp_checkpoint,
    files=dcp_files,
    open=open_dcp,
    is_complete=dcp_is_complete,
)
