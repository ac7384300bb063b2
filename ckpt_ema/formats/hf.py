"""Hugging Face layouts: ``checkpoint-N/`` folders and sharded sets named by their ``*.index.json``.

A Trainer's ``checkpoint-N/`` folder holds its weights as ``model.safetensors``, ``pytorch_model.bin`` or a sharded
set with its index json, and its global step in ``trainer_state.json``. A PEFT fine-tune's folder holds only the
adapter's weights, ``adapter_model.safetensors`` (or ``adapter_model.bin``), beside its ``adapter_config.json``.

A sharded set is read through its index's ``weight_map`` (tensor name -> shard file) and only through it
(:func:`read_index`): each tensor comes from the shard the map names, a shard holding a tensor the map puts
elsewhere (a tensor in two shards) is refused, and shard names are plain file names beside the index: no
``../``, no absolute path, no folder, at most 255 bytes of valid UTF-8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats import strict_json
from ckpt_ema.formats.torch_save import TORCH_SUFFIXES

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")  # a sharded set, named by its index
# Weight files inside a Hugging Face checkpoint folder, in order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES

# The largest index or trainer state read (a weight map of a million tensors is ~100 MB).
MAX_JSON_BYTES = 256 << 20
# The longest file name most filesystems allow, in bytes.
MAX_NAME_BYTES = 255


def index_of(path: Path) -> Path | None:
    """The index json of the sharded set at ``path`` (the index itself, or a Hugging Face folder holding one)."""
    if path.name.endswith(INDEX_SUFFIXES):
        return path
    if path.is_dir():
        for index_name in HF_INDEX_FILES:
            if (path / index_name).is_file():
                return path / index_name
    return None


def is_hf_checkpoint_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_WEIGHT_FILES + HF_INDEX_FILES)


def weight_files_of(path: Path) -> list[Path]:
    """The weight files that make up the checkpoint at ``path`` (a file, a sharded set, or a Hugging Face folder)."""
    index = index_of(path)
    if index is not None:
        return list(dict.fromkeys(read_index(index).values()))
    if not path.is_dir():
        return [path]
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise CkptEmaError(f"no weights in this folder (looked for {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})", path)


def read_index(index: Path) -> dict[str, Path]:
    """The index's ``weight_map``: tensor name -> the shard file beside the index that holds it, after checking
    that the index is strict JSON with a non-empty map of valid UTF-8 names to plain shard file names."""
    parsed = _read_json(index, "shard index")
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict):
        raise CkptEmaError("bad shard index: no weight_map object", index)
    if not weight_map:
        raise CkptEmaError("bad shard index: its weight_map is empty", index)
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        _check_utf8(name, "a tensor name", index)
        if not isinstance(shard, str):
            raise CkptEmaError(f"bad shard index: tensor {name!r} maps to {shard!r}, not a file name", index)
        if shard not in shards:
            shards[shard] = index.parent / _checked_shard_name(shard, index)
    return {name: shards[shard] for name, shard in weight_map.items()}


def _checked_shard_name(shard: str, index: Path) -> str:
    """``shard`` if it is a plain file name of a weight file (the only kind Hugging Face writes)."""
    _check_utf8(shard, "a shard name", index)
    if len(shard.encode("utf-8")) > MAX_NAME_BYTES:
        raise CkptEmaError(f"bad shard index: a shard name of {len(shard.encode('utf-8'))} bytes (at most "
                           f"{MAX_NAME_BYTES})", index)
    if "/" in shard or "\\" in shard or "\0" in shard or shard in (".", ".."):
        raise CkptEmaError(f"bad shard index: shard {shard!r} is not a file name beside the index (shards must "
                           "not be in other folders)", index)
    if not shard.endswith(SHARD_SUFFIXES):
        raise CkptEmaError(f"bad shard index: shard {shard!r} is not a weight file ({', '.join(SHARD_SUFFIXES)})",
                           index)
    return shard


def with_trainer_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus the global step of a Hugging Face checkpoint folder's trainer_state.json, if it has one."""
    state_file = path / "trainer_state.json"
    if not path.is_dir() or not state_file.is_file():
        return meta
    state = _read_json(state_file, "trainer state", floats=True)
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, int) and not isinstance(step, bool):
        meta["global_step"] = step
    return meta


def _read_json(path: Path, what: str, floats: bool = False) -> Any:
    """The JSON in ``path``, parsed strictly (:mod:`ckpt_ema.formats.strict_json`); one line if it cannot be."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CkptEmaError(f"unreadable {what}: {exc.strerror or exc}", path) from None
    if len(data) > MAX_JSON_BYTES:
        raise CkptEmaError(f"unreadable {what}: larger than {MAX_JSON_BYTES} bytes", path)
    try:
        return strict_json.parse(data, floats=floats)
    except strict_json.JsonRefused as exc:
        raise CkptEmaError(f"unreadable {what}: {exc}", path) from None


def _check_utf8(text: str, what: str, index: Path) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CkptEmaError(f"bad shard index: {what} is not valid UTF-8: {text!r}", index) from None
