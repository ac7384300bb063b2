"""A sharded set named by its index json (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``).

Hugging Face's ``save_pretrained`` splits large weights into shards (``model-00001-of-00003.safetensors``) and
writes, after them, an index whose ``weight_map`` names the shard of every tensor. A sharded set is read through
that map and only through it (:func:`read_index`): each tensor comes from the shard the map names, a shard holding
a tensor the map puts elsewhere (a tensor in two shards) or does not list is refused, and shard names are plain file
names beside the index: no ``../``, no absolute path, no folder, at most 255 bytes of valid UTF-8. Each shard is
read by its own format (:data:`SHARD_FORMATS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats import safetensors, strict_json, torch_save
from ckpt_ema.formats.base import Checkpoint, Format, StoredTensors, weights_checkpoint

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
# The formats a shard may have.
SHARD_FORMATS = (safetensors.FORMAT, torch_save.FORMAT)
SHARD_SUFFIXES = tuple(suffix for fmt in SHARD_FORMATS for suffix in fmt.suffixes)
# The longest file name most filesystems allow, in bytes.
MAX_NAME_BYTES = 255


def is_index(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIXES)


def read_index(index: Path) -> dict[str, Path]:
    """The index's ``weight_map``: tensor name -> the shard file beside the index that holds it, after checking
    that the index is strict JSON with a non-empty map of valid UTF-8 names to plain shard file names."""
    parsed = strict_json.read_json(index, "shard index")
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


def shards_of(index: Path) -> list[Path]:
    """The shard files the index names, each once, in the order the map first names them."""
    return list(dict.fromkeys(read_index(index).values()))


def read_sharded(path: Path, index: Path, key: str | None, metadata: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint at ``path`` whose weights are the sharded set ``index`` names: every tensor from the shard
    the map names, each exactly once (:func:`_check_against_map`); its metadata the shards' own, then ``metadata``."""
    weight_map = read_index(index)
    files: list[tuple[Path, StoredTensors]] = []
    meta: dict[str, Any] = {}
    for shard in dict.fromkeys(weight_map.values()):
        tensors, shard_meta = read_shard(shard, key)
        files.append((shard, tensors))
        meta.update(shard_meta)
    ckpt = weights_checkpoint(path, files, {**meta, **(metadata or {})})
    _check_against_map(index, weight_map, files)
    return ckpt


def read_shard(shard: Path, key: str | None) -> tuple[StoredTensors, dict[str, Any]]:
    """One shard's tensors by stored name and its plain metadata, read by the format its name says."""
    if not shard.is_file():
        raise CkptEmaError("shard listed in the index is missing", shard)
    if shard.name.endswith(safetensors.FORMAT.suffixes):
        return safetensors.read_safetensors_weights(shard, key)
    return torch_save.read_torch_weights(shard, key)


def shards_are_complete(index: Path) -> bool:
    """Whether the writer is done with a sharded set: the index is there and readable (Hugging Face writes it after
    the shards) and every shard it names is complete by its own format."""
    try:
        shards = shards_of(index)
    except CkptEmaError:
        return not _is_partial(index)  # a bad index that is all there: opening it says what is wrong
    return all(shard.is_file() and _shard_format(shard).is_complete(shard) for shard in shards)


def probe_sharded(path: Path, index: Path, key: str | None) -> dict[str, Any]:
    """The metadata of a sharded set, from its first shard alone (the shards of one save carry the same)."""
    return read_shard(shards_of(index)[0], key)[1]


def _shard_format(shard: Path) -> Format:
    return next(fmt for fmt in SHARD_FORMATS if shard.name.endswith(fmt.suffixes))


def _is_partial(index: Path) -> bool:
    """An index still being written: empty, or not yet ending with the closing brace of its JSON object."""
    try:
        with open(index, "rb") as f:
            f.seek(max(f.seek(0, 2) - 64, 0))
            tail = f.read().rstrip()
    except OSError:
        return True
    return not tail.endswith(b"}")


def _check_against_map(index: Path, weight_map: dict[str, Path], files: list[tuple[Path, StoredTensors]]) -> None:
    """Every tensor the index lists was read from the shard it names, and no shard holds a tensor the index puts
    elsewhere or does not list."""
    held = {name: file for file, tensors in files for name in tensors}
    for name, shard in weight_map.items():
        if name not in held:
            raise CkptEmaError(f"the index puts tensor {name!r} in {shard.name}, which does not hold it", index)
    for file, tensors in files:
        for name in tensors:
            if name not in weight_map:
                raise CkptEmaError(f"shard {file.name} holds tensor {name!r}, which the index does not list", index)
            if file != weight_map[name]:
                raise CkptEmaError(f"tensor {name!r} is in shard {file.name}, but the index puts it in "
                                   f"{weight_map[name].name}", index)


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


def _check_utf8(text: str, what: str, index: Path) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CkptEmaError(f"bad shard index: {what} is not valid UTF-8: {text!r}", index) from None


def _files(index: Path) -> list[Path]:
    """The index and its shards."""
    return [index, *shards_of(index)]


def _open(index: Path, key: str | None) -> Checkpoint:
    return read_sharded(index, index, key)


def _probe(index: Path, key: str | None) -> tuple[dict[str, Any], Checkpoint | None]:
    return probe_sharded(index, index, key), None  # not kept open: the engine may not need it


FORMAT = Format(
    name="a sharded set named by its index json",
    suffixes=INDEX_SUFFIXES,
    recognises=is_index,
    files=_files,
    open=_open,
    is_complete=shards_are_complete,
    probe=_probe,
)
