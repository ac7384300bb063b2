"""``torch.save`` files (.pt, .pth, .bin, .ckpt, .pth.tar): unpickled weights-only, tensors mapped at checked offsets.

Two layouts exist. Since PyTorch 1.6 ``torch.save`` writes a zip archive: ``<prefix>/data.pkl`` pickles the saved
object, naming each storage by a key, a dtype and an element count, and the storage's bytes are the stored record
``<prefix>/data/<key>``. Older files (``_use_new_zipfile_serialization=False``) are a sequence of pickles followed
by the storages, each after its element count. ``torch.load`` trusts the sizes and offsets either layout gives;
here nothing is used before it is checked:

* the zip directory (:mod:`ckpt_ema.formats.zip_records`): every record inside the file, none overlapping another;
* every storage the pickle names: a stored record (or a stretch of a legacy file) of exactly ``numel * itemsize``
  bytes, described the same way wherever it is named;
* the pickle: the standard library's unpickler behind :mod:`ckpt_ema.formats.unpickle` (its opcodes checked
  first, an allow-list of stand-ins, any protocol, bounded memory, only dense tensors), so no pickled code runs;
  the harmless types real trainers store beside the weights (:data:`SAFE_GLOBALS`) are allowed explicitly;
* every tensor of the state dict (:func:`state_dict_tensors`): a string name, valid UTF-8, and elements that all lie
  inside its storage.

The tensors are views of one private (copy-on-write) map of the file (:mod:`ckpt_ema.formats.mapping`) at the
checked offsets, built once the pickle has run; the checks read the same map. Nothing here reads tensor data: the
cost is O(pickle + directory), and the engine reads each byte once, from the page cache.

Inside the loaded object the weights are a plain state dict or sit in one of the usual containers
(:data:`CONTAINER_KEYS`); ``key`` picks one explicitly.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import Checkpoint, Format, StoredTensors, weights_checkpoint
from ckpt_ema.formats.mapping import map_privately
from ckpt_ema.formats.unpickle import (PickleCorrupt, PickleRefused, StorageRecord, storage_dtype, unpickle,
                                       with_tensors)
from ckpt_ema.formats.zip_records import STORED, Record, ZipError, read_directory, read_small_record

# Where trainers put the model's weights, tried in this order. timm's ``state_dict_ema`` is deliberately absent:
# averaging an EMA again is rarely what a user means, so it is read only when ``--key state_dict_ema`` asks.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")

# Harmless non-tensor types that real trainers store next to the weights. Each is data, not code: building one
# runs no user code. timm's CheckpointSaver stores an argparse.Namespace; Lightning stores AttributeDict and paths.
# Lightning's AttributeDict (a dict subclass with no state beyond its items) loads as a plain dict: torch's
# weights-only unpickler only fills dict, OrderedDict and Counter, so a dict subclass stand-in could never load.
SAFE_GLOBALS: list[Any] = [
    bytes,  # protocol 2 pickles b"" as bytes() (other bytes through _codecs.encode, which torch allows)
    frozenset,  # as protocol 4's FROZENSET opcode builds it
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


# The most memory unpickling one file may take, as :mod:`ckpt_ema.formats.unpickle` charges it (a state dict of
# 10,000 tensors is charged about 110 MB, and takes about 35 MB).
MAX_PICKLE_BYTES = 1 << 30

# What a legacy (non-zip) file starts with: the magic number and format version torch's _legacy_save pickles first.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def is_torch_file(path: Path) -> bool:
    return path.name.endswith(TORCH_SUFFIXES)


# The records that end a zip archive (torch.save writes the zip64 ones too): see zip_is_complete.
ZIP_END = b"PK\x05\x06"
ZIP64_END_LOCATOR = b"PK\x06\x07"
ZIP64_END = b"PK\x06\x06"


def zip_is_complete(path: Path) -> bool:
    """Whether a zip archive (a torch.save file) is whole, from its last bytes: it must end with the
    end-of-central-directory record (22 bytes and its comment), and the central directory it points at must end
    exactly where that record (or torch's zip64 record before it) begins. The archive writer puts these last, so
    a file still being written, or cut short, fails (a watcher must not read it yet)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            tail_len = min(size, 22 + 0xFFFF)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
            at = tail.rfind(ZIP_END)
            while at >= 0 and not (at + 22 <= len(tail)
                                   and at + 22 + struct.unpack_from("<H", tail, at + 20)[0] == len(tail)):
                at = tail.rfind(ZIP_END, 0, at)
            if at < 0:
                return False
            end_at = size - tail_len + at
            cd_size, cd_offset = struct.unpack_from("<II", tail, at + 12)
            locator = at - 20
            if locator >= 0 and tail[locator:locator + 4] == ZIP64_END_LOCATOR:
                (record_at,) = struct.unpack_from("<Q", tail, locator + 8)
                if record_at >= end_at:
                    return False
                f.seek(record_at)
                record = f.read(56)
                if len(record) < 56 or record[:4] != ZIP64_END:
                    return False
                cd_size, cd_offset = struct.unpack_from("<QQ", record, 40)
                return cd_offset + cd_size == record_at
            return cd_offset != 0xFFFFFFFF and cd_offset + cd_size == end_at
    except OSError:
        return False


def torch_load_safely(path: Path, extra_safe_globals: Sequence[Any] = (), max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """The object ``torch.save`` wrote to ``path``: loaded weights-only, its tensors views of a private map of the
    file at checked offsets (zip archives and legacy files alike), in at most ``max_bytes`` of unpickling memory.

    Raises CkptEmaError with one line saying why a file cannot be read: not a checkpoint, truncated or corrupt
    (a record, a storage or a tensor that does not fit), or a pickled object that is not on the short list of
    harmless types (:data:`SAFE_GLOBALS`, plus ``extra_safe_globals``: a format's own stand-ins, such as
    DeepSpeed's in :mod:`ckpt_ema.formats.deepspeed`).
    """
    safe_globals = SAFE_GLOBALS + _numpy_safe_globals() + list(extra_safe_globals)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head.startswith(b"PK"):
                return _load_zip(path, f, safe_globals, max_bytes)
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                return _load_legacy(path, f, safe_globals, max_bytes)
    except ZipError as exc:
        raise CkptEmaError(f"not a readable PyTorch checkpoint: {exc}", path) from None
    except PickleCorrupt as exc:
        raise CkptEmaError(f"not a readable PyTorch checkpoint (corrupt pickle: {exc})", path) from None
    except PickleRefused as exc:
        raise CkptEmaError(str(exc), path) from None
    except OSError as exc:
        raise CkptEmaError(f"cannot read the file: {exc.strerror or exc}", path) from None
    if not head:
        raise CkptEmaError("not a PyTorch checkpoint: the file is empty", path)
    raise CkptEmaError("not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle", path)


def _load_zip(path: Path, f: BinaryIO, safe_globals: list[Any], max_bytes: int) -> Any:
    """A zip archive: the directory checked (:mod:`zip_records`), then the pickle, each storage a stored record of
    exactly the size the pickle gives it."""
    file_map, data = _mapped(f, path)
    records = read_directory(data)
    prefix = _archive_prefix(records)
    order = records.get(f"{prefix}/byteorder")
    if order is not None and read_small_record(data, order, 16) != b"little":
        raise CkptEmaError("saved on a big-endian machine; ckpt-ema reads little-endian checkpoints", path)
    pickled = read_small_record(data, records[f"{prefix}/data.pkl"], max_bytes)

    storage_folder = f"{prefix}/data/"

    def record_of(key: str, dtype: torch.dtype, numel: int) -> int:
        record = records.get(storage_folder + key)
        if record is None:
            raise PickleCorrupt(f"the pickle names storage {key!r}, which the archive does not hold")
        if record.method != STORED:
            raise PickleCorrupt(f"storage record {record.name!r} is compressed; tensor data must be stored (as "
                                "torch.save writes it) to be mapped")
        if record.size != numel * dtype.itemsize:
            raise PickleCorrupt(f"storage record {record.name!r} holds {record.size} bytes, but the pickle gives "
                                f"it {numel} x {dtype} ({numel * dtype.itemsize} bytes)")
        return record.offset

    storages = _Storages(record_of)
    obj, end = unpickle(pickled, storages, safe_globals=safe_globals, max_bytes=max_bytes)
    if end != len(pickled):
        raise CkptEmaError(f"not a readable PyTorch checkpoint (corrupt pickle: {len(pickled) - end} bytes after its "
                           "end)", path)
    return with_tensors(obj, storages.views(file_map))


def _mapped(f: BinaryIO, path: Path) -> tuple[torch.UntypedStorage, memoryview]:
    """The open file's private map (:func:`map_privately`), and the same bytes as a buffer for the checks: what is
    checked is what the tensors view, and each page is mapped once."""
    file_map = map_privately(f, path, os.fstat(f.fileno()).st_size)
    return file_map, torch.empty(0, dtype=torch.uint8).set_(file_map).numpy().data


def _archive_prefix(records: dict[str, Record]) -> str:
    """The folder all records of a torch.save archive sit in (torch names it after the file)."""
    prefixes = {name.split("/", 1)[0] for name in records}
    if len(prefixes) != 1 or any("/" not in name for name in records):
        raise ZipError("a zip archive, but not one torch.save wrote (its records are not in one folder)")
    prefix = prefixes.pop()
    if f"{prefix}/constants.pkl" in records:
        raise ZipError("a TorchScript archive (torch.jit.save), not saved weights: save the state_dict() instead")
    if f"{prefix}/data.pkl" not in records:
        raise ZipError("a zip archive, but not one torch.save wrote (no data.pkl)")
    return prefix


def _load_legacy(path: Path, f: BinaryIO, safe_globals: list[Any], max_bytes: int) -> Any:
    """A file in torch's legacy format (``_use_new_zipfile_serialization=False``): pickles of the magic number,
    the format version, the system's byte order and the object, then the list of storage keys, then each storage
    in that order as an int64 element count and its bytes, up to the end of the file.

    A storage's offset depends on the sizes of those before it, which only the object's pickle gives: the pickles
    are unpickled first (tensors as records), the offsets checked against the counts in the file, and the tensors
    then built over the map.
    """
    file_map, data = _mapped(f, path)
    size = len(data)
    header, position = [], 0
    for _ in range(3):
        value, position = unpickle(data, _no_storage, safe_globals=[], max_bytes=max_bytes, start=position)
        header.append(value)
    if header[:2] != [LEGACY_MAGIC, LEGACY_PROTOCOL] or not isinstance(header[2], dict):
        raise CkptEmaError("not a PyTorch checkpoint: a pickle, but not one torch.save wrote", path)
    if header[2].get("little_endian") is not True:
        raise CkptEmaError("saved on a big-endian machine; ckpt-ema reads little-endian checkpoints", path)
    storages = _Storages(None, legacy=True)
    obj, position = unpickle(data, storages, safe_globals=safe_globals, max_bytes=max_bytes, start=position)
    keys, position = unpickle(data, _no_storage, safe_globals=[], max_bytes=max_bytes, start=position)
    if not (isinstance(keys, list) and all(type(key) is str for key in keys) and len(set(keys)) == len(keys)
            and set(keys) == set(storages.named)):
        raise CkptEmaError("not a readable PyTorch checkpoint: its list of storages is not the storages its pickle "
                           "names", path)
    for key in keys:
        record = storages.named[key]
        numel = record.nbytes // record.dtype.itemsize
        if position + 8 > size or int.from_bytes(data[position : position + 8], "little") != numel:
            raise CkptEmaError(f"not a readable PyTorch checkpoint (truncated?): storage {key!r} does not start with "
                               f"the count of {numel} elements its pickle gives", path)
        storages.offsets[key] = position + 8
        position += 8 + record.nbytes
        if position > size:
            raise CkptEmaError(f"not a readable PyTorch checkpoint (truncated?): storage {key!r} ends past the end "
                               "of the file", path)
    if position != size:
        raise CkptEmaError(f"not a readable PyTorch checkpoint: {size - position} bytes after its last storage", path)
    return with_tensors(obj, storages.views(file_map))


class _Storages:
    """The unpickler's ``persistent_load``: storage id -> a :class:`StorageRecord`, after checking the id and, with
    ``locate``, the storage's place in the file (``locate(key, dtype, numel)`` returns its offset after checking
    it). The same key always names the same storage, of one dtype and size. Legacy files' offsets are found after
    the unpickling, from the storages it names (:attr:`named`), and set in :attr:`offsets`.

    A storage id is ``('storage', storage type, key, location, numel)``; legacy files add a view (always None
    since PyTorch 0.4). The location is ignored: every storage is read to the CPU.
    """

    def __init__(self, locate: Callable[[str, torch.dtype, int], int] | None, legacy: bool = False) -> None:
        self._locate = locate
        self._fields = 6 if legacy else 5
        self.named: dict[str, StorageRecord] = {}
        self.offsets: dict[str, int] = {}

    def __call__(self, pid: Any) -> StorageRecord:
        if not (type(pid) is tuple and len(pid) == self._fields and pid[0] in ("storage", b"storage")):
            raise PickleCorrupt("a persistent id that is not a storage")
        if self._fields == 6 and pid[5] is not None:
            raise PickleRefused("a storage view (written by PyTorch before 0.4): load and re-save it with torch.save")
        dtype, key, numel = storage_dtype(pid[1]), pid[2], pid[4]
        if dtype is None:
            raise PickleCorrupt("a storage without a dtype")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise PickleCorrupt("a storage without a key and a size")
        record = self.named.get(key)
        if record is not None:
            if record.dtype != dtype or record.nbytes != numel * dtype.itemsize:
                raise PickleCorrupt(f"storage {key!r} is described twice, differently")
            return record
        if self._locate is not None:
            self.offsets[key] = self._locate(key, dtype, numel)
        record = self.named[key] = StorageRecord(key, dtype, numel * dtype.itemsize)
        return record

    def views(self, file_map: torch.UntypedStorage) -> Callable[[StorageRecord], torch.UntypedStorage]:
        """Each storage as a view of the file's map at its offset, one per key (a copy where its offset is not
        aligned for its dtype, as in legacy files)."""
        built: dict[str, torch.UntypedStorage] = {}

        def view(record: StorageRecord) -> torch.UntypedStorage:
            untyped = built.get(record.key)
            if untyped is None:
                offset = self.offsets[record.key]
                # UntypedStorage's own __getitem__ only adds a check for meta storages: a third of the cost
                untyped = torch._C.StorageBase.__getitem__(  # type: ignore[misc]
                    file_map, slice(offset, offset + record.nbytes))
                if offset % record.dtype.itemsize and record.nbytes:
                    untyped = torch.frombuffer(bytearray(record.nbytes), dtype=torch.uint8).untyped_storage().copy_(
                        untyped)
                built[record.key] = untyped
            return untyped

        return view


def _no_storage(pid: Any) -> Any:
    raise PickleCorrupt("a storage where torch.save writes none")


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
    """Top-level values that are plain data (numbers, strings, small dicts of them), e.g. step, epoch, arch.
    Strings that are not valid UTF-8 (a pickle can hold lone surrogates) are left out: the output's header could
    not hold them."""
    if not isinstance(obj, Mapping):
        return {}
    meta: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, argparse.Namespace):
            v = vars(v)
        if isinstance(v, bool | int | float | str) and _is_utf8(k, v):
            meta[str(k)] = v
        elif (isinstance(v, Mapping) and v and all(isinstance(x, bool | int | float | str | None) for x in v.values())
              and _is_utf8(k, *v.keys(), *v.values())):
            meta[str(k)] = {str(a): b for a, b in v.items()}
    return meta


def _is_utf8(*values: Any) -> bool:
    try:
        for value in values:
            str(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def state_dict_tensors(state: Mapping[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, by name, after checking each: a name that is a string of valid UTF-8 (it is
    written into the output's header), and a dense tensor whose elements all lie inside its storage, each element
    stored once (no broadcast view that would make a small record stand for a huge tensor). Other values (a
    module's ``_extra_state``, ``_metadata``) are left out."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not isinstance(name, str):
            raise CkptEmaError(f"a tensor is named {name!r}, a {type(name).__name__}: state dict names are strings", path)
        if not (name.isascii() or _is_utf8(name)):
            raise CkptEmaError(f"the tensor name {name!r} is not valid UTF-8", path)
        _check_tensor(name, value, path)
        tensors[name] = value
    return tensors


def _check_tensor(name: str, t: torch.Tensor, path: Path) -> None:
    if t.layout != torch.strided or t.is_quantized or not t.is_cpu:
        raise CkptEmaError(f"tensor {name!r} is not a dense CPU tensor ({t.layout}, {t.device})", path)
    numel = t.numel()
    if numel == 0:
        return
    storage = t.untyped_storage()
    if storage.resizable():  # every storage read here is fixed-size: a map, or a copy of a record
        raise CkptEmaError(f"tensor {name!r} is not a view of the data stored for it", path)
    offset, stride = t.storage_offset(), t.stride()
    if offset < 0 or min(stride, default=0) < 0:
        raise CkptEmaError(f"tensor {name!r} has a negative stride or offset", path)
    last = offset + (numel - 1 if t.is_contiguous() else sum((n - 1) * s for n, s in zip(t.shape, stride, strict=True)))
    stored = storage.nbytes()
    if (last + 1) * t.element_size() > stored:
        raise CkptEmaError(f"tensor {name!r} extends past the data stored for it", path)
    if numel * t.element_size() > stored:
        raise CkptEmaError(f"tensor {name!r} has more elements than its stored data (a broadcast view?); "
                           "save it with .contiguous()", path)


# ---------------------------------------------------------------------------------------------------- the format


def torch_file_is_complete(path: Path) -> bool:
    """Whether the writer is done with a torch.save file: a zip archive must end with its closing records
    (:func:`zip_is_complete`); a legacy pickle has no end mark and counts as whole once it holds anything (the
    weights-only reader refuses one cut short)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return zip_is_complete(path) if head == b"PK" else bool(head)


def read_torch_weights(file: Path, key: str | None) -> tuple[StoredTensors, dict[str, Any]]:
    """The tensors of one torch.save file's state dict (``key`` picks its container), by stored name, and the plain
    metadata saved beside them."""
    obj = torch_load_safely(file)
    state, _ = find_state_dict(obj, file, key)
    return dict(state_dict_tensors(state, file)), plain_metadata(obj)


def open_torch_file(path: Path, key: str | None) -> Checkpoint:
    tensors, metadata = read_torch_weights(path, key)
    return weights_checkpoint(path, [(path, tensors)], metadata)


FORMAT = Format(
    name="a torch.save file",
    suffixes=TORCH_SUFFIXES,
    recognises=is_torch_file,
    files=lambda path: [path],
    open=open_torch_file,
    is_complete=torch_file_is_complete,
)
