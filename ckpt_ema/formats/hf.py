"""Hugging Face layouts: ``checkpoint-N/`` folders and sharded sets named by their ``*.index.json``.

A Trainer's ``checkpoint-N/`` folder holds its weights as ``model.safetensors``, ``pytorch_model.bin`` or a sharded
set with its index json, and its global step in ``trainer_state.json``. A PEFT fine-tune's folder holds only the
adapter's weights, ``adapter_model.safetensors`` (or ``adapter_model.bin``), beside its ``adapter_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")  # a sharded set, named by its index
# Weight files inside a Hugging Face checkpoint folder, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf_checkpoint_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_WEIGHT_FILES + HF_INDEX_FILES)


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



def with_trainer_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
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

