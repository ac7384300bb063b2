"""A Hugging Face model folder: what ``save_pretrained`` writes, and a Trainer's ``checkpoint-N/`` folders.

The weights are one file, ``model.safetensors`` or ``pytorch_model.bin``, or a sharded set named by its index json
(:mod:`ckpt_ema.formats.sharded`). A PEFT fine-tune's folder holds only the adapter's weights,
``adapter_model.safetensors`` (or ``adapter_model.bin``), beside its ``adapter_config.json``: it reads the same way
(the output side, :mod:`ckpt_ema.output.folder`, writes it back as an adapter). A Trainer's checkpoint folder
records its global step in ``trainer_state.json`` (:mod:`ckpt_ema.formats.trainer_state`).

In a run's folder only ``checkpoint-N/`` folders are checkpoints of the run (a ``base/`` model beside them is not);
a Trainer's output folder holding its final model beside the ``checkpoint-N/`` folders is scanned as a run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats import safetensors, sharded, torch_save
from ckpt_ema.formats.base import Checkpoint, Format
from ckpt_ema.formats.trainer_state import trainer_step, with_trainer_state

# Weight files inside a model folder, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_FOLDER_PATTERN = re.compile(r"^checkpoint-\d+$")
# The format of each single weight file.
_FILE_FORMATS = {name: safetensors.FORMAT if name.endswith(".safetensors") else torch_save.FORMAT
                 for name in HF_WEIGHT_FILES}


def is_model_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_WEIGHT_FILES + HF_INDEX_FILES)


def index_of(folder: Path) -> Path | None:
    """The index json of the model folder's sharded set, if its weights are sharded."""
    return next((folder / name for name in HF_INDEX_FILES if (folder / name).is_file()), None)


def weight_file_of(folder: Path) -> Path:
    """The folder's one weight file (its weights are not sharded)."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CkptEmaError(f"no weights in this folder (looked for {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})", folder)


def model_folder_files(folder: Path) -> list[Path]:
    """The folder's weights: its index and shards, or its one weight file (the tokenizer, the config and the
    Trainer's own files are no part of the weights)."""
    index = index_of(folder)
    return sharded.FORMAT.files(index) if index is not None else [weight_file_of(folder)]


def open_model_folder(folder: Path, key: str | None) -> Checkpoint:
    index = index_of(folder)
    if index is not None:
        return sharded.read_sharded(folder, index, key, with_trainer_state(folder, {}))
    file = weight_file_of(folder)
    ckpt = _FILE_FORMATS[file.name].open(file, key)
    ckpt.path = folder
    ckpt.metadata = with_trainer_state(folder, ckpt.metadata)
    return ckpt


def model_folder_is_complete(folder: Path) -> bool:
    index = index_of(folder)
    if index is not None:
        return sharded.FORMAT.is_complete(index)
    try:
        file = weight_file_of(folder)
    except CkptEmaError:
        return False
    return _FILE_FORMATS[file.name].is_complete(file)


def probe_model_folder(folder: Path, key: str | None) -> tuple[dict[str, Any], Checkpoint | None]:
    """A sharded folder's metadata from its first shard (not kept open: the engine may not need it); a folder of one
    weight file opened (the engine reuses it)."""
    index = index_of(folder)
    if index is not None:
        return with_trainer_state(folder, sharded.probe_sharded(folder, index, key)), None
    ckpt = open_model_folder(folder, key)
    return ckpt.metadata, ckpt


def is_checkpoint_folder(folder: Path) -> bool:
    """A Trainer's ``checkpoint-N/`` folder: a run's checkpoint."""
    return bool(HF_FOLDER_PATTERN.match(folder.name))


def holds_checkpoint_folders(folder: Path) -> bool:
    """A Trainer's output folder: checkpoint-N/ folders inside, maybe the final model beside them."""
    return any(e.is_dir() and is_checkpoint_folder(e) and is_model_folder(e) for e in folder.iterdir())


FORMAT = Format(
    name=f"a Hugging Face model folder ({', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})",
    suffixes=(),
    recognises=is_model_folder,
    files=model_folder_files,
    open=open_model_folder,
    is_complete=model_folder_is_complete,
    step=trainer_step,
    probe=probe_model_folder,
    in_run=is_checkpoint_folder,
    holds_run=holds_checkpoint_folders,
)
