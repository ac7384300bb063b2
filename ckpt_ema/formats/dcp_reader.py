"""The reader of PyTorch Distributed Checkpoint (DCP) folders: ``.metadata`` plus ``__R_S.distcp`` files, read in one
process. (Which folders are DCP checkpoints, and the layouts trainers put them in: :mod:`ckpt_ema.formats.dcp`.)

``torch.distributed.checkpoint.save`` writes, per rank, one ``.distcp`` file of items: each stored piece of a
tensor (a DTensor's local shard, or a whole tensor) is ``torch.save``'d into it at a byte range, and non-tensor
values are stored as pickled bytes. The ``.metadata`` file (a pickle of DCP's own :class:`Metadata` dataclasses)
lists every tensor's global shape, dtype and chunks (offsets and sizes in the global tensor), and each item's
file and byte range (``storage_data``). This reader uses exactly that metadata, with no process group and no
training code, in any world size the run was saved with:

* the metadata is unpickled with an unpickler that builds only DCP's metadata classes, ``torch.Size``, dtypes and
  paths (:class:`_MetadataUnpickler`): DCP's own ``FileSystemReader.read_metadata`` uses ``pickle.load``, which
  would run any code the file asks for;
* every item's byte range is checked against its file's size, optimizer items included (a truncated or missing
  ``.distcp`` is refused even when only optimizer bytes are gone, in a line saying which file and how), and against
  the others' (no two items share a byte); a chunk set that does not tile its tensor exactly once is refused;
* before a tensor is first read, each of its items' ``torch.save`` header is read (``torch.load(map_location=
  "meta")``, weights-only, no data read) to find where its data lies; its shape and dtype must match the metadata
  and its strides stay inside its data;
* the tensor data is then read through a private memory map of the ``.distcp`` file: :meth:`DcpCheckpoint.piece`
  assembles a flat element range of a tensor from the parts of the chunks that hold it, a view of the map where
  one chunk holds the range contiguously. Nothing is read whole: memory stays within the engine's chunk, however
  large the tensor or its chunks.

Only the model is read: the entry ``key`` names, else the first of the usual containers
(:data:`ckpt_ema.formats.torch_save.CONTAINER_KEYS`) that holds tensors, else the top-level tensors (torchtitan
saves the model's tensors at the top level beside ``optimizer``, ``lr_scheduler``, ``dataloader``,
``train_state``). The output names are the model's own, without the container's key. The step comes from the
checkpoint's own entries (``train_state.step``, a top-level ``step``).

Importing this module imports ``torch.distributed.checkpoint`` (for its metadata classes), which takes longer than
the rest of the readers together: :mod:`ckpt_ema.formats.dcp` imports it when a DCP checkpoint is first opened.
"""

from __future__ import annotations

import dataclasses

import io
import math
import os
import pathlib
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.utils import _create_file_view

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import STEP_KEYS, PartedCheckpoint
from ckpt_ema.formats.torch_save import CONTAINER_KEYS

# A step saved as a pickled value is read only if its item is this small.
MAX_STEP_ITEM_BYTES = 1 << 16
# Chunk layouts are checked on the grid their cut points span; a layout needing more cells than this is refused.
MAX_GRID_CELLS = 1 << 22

# What the metadata pickle may build: DCP's metadata dataclasses and what they hold. Nothing here runs code when
# built: dataclass records, an enum, torch.Size, paths, and torch's layout lookup by name.
_METADATA_CLASSES = (
    dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.ChunkStorageMetadata,
    dcp_metadata.BytesStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING, dcp_filesystem._StorageInfo,
    dcp_filesystem._StoragePrefix, torch.Size, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
    pathlib.PureWindowsPath,
)
# Megatron-core's torch_dist writer also pickles every rank's save plan into the metadata (``all_local_plans``, which
# it reads back to reuse a plan): DCP's own planner records, dataclasses of the classes above and an enum.
_MEGATRON_PLAN_CLASSES = (
    dcp_planner.SavePlan, dcp_planner.WriteItem, dcp_planner.WriteItemType, dcp_planner.TensorWriteData,
)
_METADATA_GLOBALS: dict[tuple[str, str], Any] = {(c.__module__, c.__qualname__): c
                                                 for c in (*_METADATA_CLASSES, *_MEGATRON_PLAN_CLASSES)}
_METADATA_GLOBALS[("torch.serialization", "_get_layout")] = torch.serialization._get_layout

# Trainers whose DCP writer pickles its own copy of one of DCP's metadata records: their name -> torch's record with
# the same fields, built in its place (nothing of the trainer's is imported or run).
# OLMo-core (ai2-olmo-core): its RemoteFileSystemWriter stores each item's file and byte range in its own
# _StorageInfo, a dataclass of torch's fields (relative_path, offset, length) without transform_descriptors.
_METADATA_GLOBALS[("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: any other global in the pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load: the metadata pickles {module}.{name}, which is not part "
                                     "of DCP's metadata and could run code when loaded")


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """The metadata file ``path`` (a DCP folder's ``.metadata``), unpickled with :class:`_MetadataUnpickler`;
    one-line errors."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as exc:
        raise CkptEmaError(f"cannot read the DCP metadata: {exc.strerror or exc}", path) from None
    except pickle.UnpicklingError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "invalid pickle data"
        if not message.startswith("refusing to load"):
            message = f"not a readable DCP metadata file (corrupt pickle: {message})"
        raise CkptEmaError(message, path) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle breaks the unpickler in many ways; all mean the same
        raise CkptEmaError(f"not a readable DCP metadata file (truncated or corrupt?): {type(exc).__name__}",
                           path) from None
    if (not isinstance(metadata, dcp_metadata.Metadata)
            or not isinstance(getattr(metadata, "state_dict_metadata", None), dict)  # a field a flipped byte dropped
            or not isinstance(metadata.storage_data, dict)):
        raise CkptEmaError("not a DCP metadata file written by the file system writer (no storage records)", path)
    missing = _missing_field(metadata)
    if missing is not None:
        raise CkptEmaError(f"not a readable DCP metadata file (a {missing} without all its fields: corrupt?)", path)
    return metadata


def _missing_field(root: object) -> str | None:
    """The name of the first DCP record (a dataclass, as the unpickler built it) in ``root``'s graph that lacks one
    of its fields (a flipped byte in the pickle can drop one): every later check may then read every field."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            todo += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple):
            todo += list(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                if not hasattr(obj, f.name):
                    return type(obj).__name__
                todo.append(getattr(obj, f.name))
    return None


@dataclass
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor, and where its data lies in its file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    item_offset: int  # the byte range of its torch.save'd item in the file
    item_length: int
    data_offset: int = 0  # found from the item's header: the absolute byte offset of its storage in the file
    stride: tuple[int, ...] = ()
    storage_offset: int = 0  # in elements


# Which entries are the model (metadata, each flat key's path, --key, the folder): where the weights come from (said
# to the user), and flat key -> output name. :func:`choose_model` by default; a layout with its own naming passes
# its own.
ModelChoice = Callable[[dcp_metadata.Metadata, dict[str, tuple[str, ...]], str | None, Path], tuple[str, dict[str, str]]]


class DcpCheckpoint(PartedCheckpoint):
    """The model's tensors of one DCP checkpoint (``path``, whose metadata file is ``metadata_file``: its folder
    holds the ``.distcp`` files), read piece by piece through private maps of its ``.distcp`` files; the model's
    entries are those ``choose`` picks (:func:`choose_model` by default)."""

    def __init__(self, path: Path, metadata_file: Path, key: str | None = None,
                 choose: ModelChoice | None = None) -> None:
        folder = metadata_file.parent
        metadata = read_metadata(metadata_file)
        sizes = check_storage(metadata_file, metadata)
        paths = entry_paths(metadata, metadata_file)
        taken, model = (choose or choose_model)(metadata, paths, key, folder)
        meta: dict[str, Any] = {}
        step = read_step(folder, metadata, paths, set(model))
        if step is not None:
            meta[step[0].rsplit(".", 1)[-1]] = step[1]  # under its own name (train_state.step -> step)
        super().__init__(path=path, names=[], metadata=meta)
        self.folder = folder
        self.file_sizes = sizes
        self.dcp_metadata = metadata
        self.metadata_file = metadata_file
        self._shape: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._chunks: dict[str, list[Chunk]] = {}
        # Each output tensor's flat keys: every entry holding a copy of it, the one read first (a writer of the run's
        # own format, ckpt_ema.output.like_input, writes the merge into each). One per tensor here; a layout with
        # copies (Megatron's fp32 masters) fills in more.
        self.entries: dict[str, list[str]] = {}
        # Entries holding copies of the model that no name maps to (Megatron's fp32 masters in flat buckets): a
        # resume would load them over the merge, so a writer of the run's own format refuses such a checkpoint.
        self.unwritable_copies: list[str] = []
        left_out = []
        for fqn, name in model.items():
            entry = metadata.state_dict_metadata[fqn]
            if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
                left_out.append(name)  # a pickled value (a module's extra state): not a tensor to average
                continue
            shape, dtype, chunks = _tensor_chunks(fqn, entry, metadata.storage_data, metadata_file)
            self.names.append(name)
            self._shape[name] = (shape, dtype)
            self._chunks[name] = chunks
            self.entries[name] = [fqn]
        if not self.names:
            raise CkptEmaError(f"{taken} holds no tensors", folder)
        self.nbytes = sum(c.item_length for chunks in self._chunks.values() for c in chunks)
        self.largest_piece = max(math.prod(c.sizes) * self._shape[n][1].itemsize
                                 for n, chunks in self._chunks.items() for c in chunks)
        skipped = f"; left out, not tensors: {', '.join(left_out[:5])}" if left_out else ""
        self.weights_from = f"{taken}{skipped}" if choose else f"the DCP entry {taken}{skipped}"
        self._maps: dict[str, torch.UntypedStorage] = {}
        self._located: set[str] = set()

    def piece(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the tensor in row-major order: a view of the mapped file when one chunk holds
        them contiguously, else a new tensor filled from the parts of the chunks that hold them. A view may start at
        any byte (DCP packs items without padding, so most are not aligned to their dtype): torch's CPU kernels load
        unaligned data, and the tests compare such views with PyTorch's own consolidation.

        A tensor's items are located (their headers read and checked) when it is first read: a run's checkpoints
        that no average uses cost only their metadata."""
        shape, dtype = self._shape[name]
        chunks = self._chunks[name]
        if name not in self._located:
            for chunk in chunks:
                _locate_data(self.folder / chunk.file, chunk, dtype)
            self._located.add(name)
        boxes = list(flat_boxes(shape, start, stop))
        if len(boxes) == 1:
            _, lo, hi = boxes[0]
            for chunk in chunks:
                if holds(chunk, lo, hi):
                    view = self._chunk_tensor(chunk, dtype)[window(lo, hi, chunk.offsets)]
                    if view.is_contiguous():
                        return view.reshape(-1)
        out = torch.empty(max(stop - start, 0), dtype=dtype)
        for chunk, at, box, in_box, in_chunk in chunk_parts(shape, chunks, start, stop):
            out[at : at + math.prod(box)].view(box)[in_box].copy_(self._chunk_tensor(chunk, dtype)[in_chunk])
        return out

    def _chunk_tensor(self, chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
        """The chunk as a tensor over the private map of its file (checked by :func:`_locate_data`)."""
        if chunk.file not in self._maps:
            self._maps[chunk.file] = map_file(self.folder / chunk.file, self.file_sizes[chunk.file], shared=False)
        return chunk_tensor(self._maps[chunk.file], chunk, dtype)

    def stored_chunks(self, fqn: str) -> tuple[tuple[int, ...], torch.dtype, list[Chunk]]:
        """The global shape, dtype and chunks of the tensor stored under the flat key ``fqn``, each chunk located
        in its file (its item's header read and checked): where a writer puts that tensor's elements."""
        entry = self.dcp_metadata.state_dict_metadata.get(fqn)
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CkptEmaError(f"the DCP metadata holds no tensor {fqn!r}", self.metadata_file)
        shape, dtype, chunks = _tensor_chunks(fqn, entry, self.dcp_metadata.storage_data, self.metadata_file)
        for chunk in chunks:
            _locate_data(self.folder / chunk.file, chunk, dtype)
        return shape, dtype, chunks


def map_file(path: Path, nbytes: int, *, shared: bool) -> torch.UntypedStorage:
    """The first ``nbytes`` of the file ``path`` as a storage over its memory map: private (copy on write, for
    reading) or ``shared`` (writes go to the file)."""
    try:
        # (torch annotates from_file on the storage base class, as returning any storage)
        return torch.UntypedStorage.from_file(str(path), shared=shared, nbytes=nbytes)  # type: ignore[return-value]
    except RuntimeError as exc:
        raise CkptEmaError(f"cannot map the file: {str(exc).splitlines()[0]}", path) from None


def chunk_tensor(storage: torch.UntypedStorage, chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
    """A located chunk (:func:`_locate_data`) as a tensor over ``storage``, the map of its file."""
    nbytes = extent(chunk.sizes, chunk.stride, chunk.storage_offset) * dtype.itemsize
    data = storage[chunk.data_offset : chunk.data_offset + nbytes]
    return torch.empty(0, dtype=dtype).set_(data, chunk.storage_offset, chunk.sizes, chunk.stride)


# ---------------------------------------------------------------------------------------------------- metadata


def check_storage(metadata_file: Path, metadata: dcp_metadata.Metadata) -> dict[str, int]:
    """Check every item's storage record (model or not): a plain file of the metadata's folder that exists and is
    long enough for its byte range, with no stream transform; and that each file ends where its last item does.
    Returns each file's size."""
    folder = metadata_file.parent
    sizes: dict[str, int] = {}
    ends: dict[str, tuple[int, str]] = {}  # where each file's last item ends, and that item
    for index, info in metadata.storage_data.items():
        if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, dcp_filesystem._StorageInfo):
            raise CkptEmaError("a storage record that is not DCP's file-system record", metadata_file)
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
            raise CkptEmaError(f"the storage record of {index.fqn!r} names {name!r}, not a file of this folder",
                               metadata_file)
        transforms = getattr(info, "transform_descriptors", None)  # (absent from torch versions without transforms)
        if transforms:
            raise CkptEmaError(f"{name} was written through stream transforms ({', '.join(map(str, transforms))}), "
                               "which ckpt-ema does not read", metadata_file)
        if not (_is_count(info.offset) and _is_count(info.length)):
            raise CkptEmaError(f"the storage record of {index.fqn!r} has no valid byte range", metadata_file)
        if name not in sizes:
            try:
                sizes[name] = (folder / name).stat().st_size
            except OSError:
                raise CkptEmaError(f"{name} is missing (the DCP metadata stores {index.fqn!r} in it)", folder) from None
        end = info.offset + info.length
        if end > ends.get(name, (0, ""))[0]:
            ends[name] = (end, index.fqn)
    spans = sorted((info.relative_path, info.offset, info.offset + info.length, index.fqn)
                   for index, info in metadata.storage_data.items())
    for (name, _, end, fqn), (other, start, _, other_fqn) in zip(spans, spans[1:]):
        if name == other and start < end:  # DCP writes each item at a range of its own
            raise CkptEmaError(f"the DCP metadata stores {fqn!r} and {other_fqn!r} at overlapping bytes of {name}",
                               metadata_file)
    for name, (end, fqn) in ends.items():
        if sizes[name] < end:
            raise CkptEmaError(f"holds {sizes[name]} bytes, the DCP metadata needs {end} (it stores {fqn!r} up to "
                               "there): truncated", folder / name)
        if sizes[name] > end:  # DCP writes a file's items back to back: nothing follows the last
            raise CkptEmaError(f"holds {sizes[name]} bytes, the DCP metadata accounts for {end}: "
                               f"{sizes[name] - end} bytes after its last item", folder / name)
    return sizes


def entry_paths(metadata: dcp_metadata.Metadata, metadata_file: Path) -> dict[str, tuple[str, ...]]:
    """Each flat key's path in the nested state dict that was saved (``"model.l1.weight"`` -> ``("model",
    "l1.weight")``), from the planner's flattening map; a key without one is a top-level entry. DCP builds each
    flat key by joining its path with dots: a map that says otherwise is refused."""
    mapping = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths: dict[str, tuple[str, ...]] = {}
    for fqn in metadata.state_dict_metadata:
        path = mapping.get(fqn)
        if path is None:
            paths[fqn] = (str(fqn),)
            continue
        if not (isinstance(path, tuple | list) and path and all(isinstance(p, str | int) for p in path)
                and ".".join(map(str, path)) == fqn):
            raise CkptEmaError(f"the DCP metadata maps {fqn!r} to {path!r}, not the path its name joins",
                               metadata_file)
        paths[fqn] = tuple(str(p) for p in path)
    return paths


def choose_model(metadata: dcp_metadata.Metadata, paths: dict[str, tuple[str, ...]], key: str | None,
                 folder: Path) -> tuple[str, dict[str, str]]:
    """Which entries are the model: a description of the choice, and flat key -> output name."""
    tensors = {f for f, e in metadata.state_dict_metadata.items() if isinstance(e, dcp_metadata.TensorStorageMetadata)}

    def under(prefix: str) -> dict[str, str]:
        """The entries inside the one ``prefix`` names (a dotted path: its parts may hold dots themselves, as a
        module's parameter names do), by their names within it."""
        found = {}
        for f, p in paths.items():
            cut = next((i for i in range(1, len(p)) if ".".join(p[:i]) == prefix), None)
            if cut is not None:
                found[f] = ".".join(p[cut:])
        return found

    tops = ", ".join(sorted({p[0] for p in paths.values()})[:12])
    if key is not None:
        found = under(key)
        if not tensors & set(found):
            raise CkptEmaError(f"no tensors under the key {key!r} (entries: {tops})", folder)
        return f"{key!r}", found
    for candidate in CONTAINER_KEYS:
        found = under(candidate)
        if tensors & set(found):
            return f"{candidate!r}", found
    top = {f: p[0] for f, p in paths.items() if len(p) == 1 and f in tensors}
    if top:
        return "of top-level tensors", top
    raise CkptEmaError(f"no model found: none of {', '.join(CONTAINER_KEYS)} holds tensors, nor the top level "
                       f"(entries: {tops}); pick one with --key", folder)


def _tensor_chunks(fqn: str, entry: dcp_metadata.TensorStorageMetadata, storage: dict, where: Path
                   ) -> tuple[tuple[int, ...], torch.dtype, list[Chunk]]:
    """A tensor's global shape, dtype and chunks, checked: each chunk inside the shape with a storage record,
    all of them together covering every element exactly once (``where``: the metadata file, for messages)."""
    shape = _counts(entry.size)
    dtype = getattr(entry.properties, "dtype", None)
    if shape is None or not isinstance(dtype, torch.dtype) or not isinstance(entry.chunks, list) or not entry.chunks:
        raise CkptEmaError(f"the DCP metadata of {fqn!r} has no valid shape, dtype or chunks", where)
    chunks = []
    for record in entry.chunks:
        offsets, sizes = _counts(record.offsets, len(shape)), _counts(record.sizes, len(shape))
        if offsets is None or sizes is None or any(o + n > d for o, n, d in zip(offsets, sizes, shape)):
            raise CkptEmaError(f"a chunk of {fqn!r} lies outside its shape {list(shape)}", where)
        info = storage.get(dcp_metadata.MetadataIndex(fqn, offsets))
        if info is None:
            raise CkptEmaError(f"no storage record for the chunk of {fqn!r} at {list(offsets)}", where)
        chunks.append(Chunk(offsets, sizes, info.relative_path, info.offset, info.length))
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape) or not _tiles(shape, chunks):
        raise CkptEmaError(f"the chunks of {fqn!r} do not cover its shape {list(shape)} exactly once", where)
    return shape, dtype, chunks


def _tiles(shape: tuple[int, ...], chunks: list[Chunk]) -> bool:
    """Whether the chunks cover every element of ``shape`` exactly once: counted on the grid of their cut points."""
    if math.prod(shape) == 0:  # nothing to read (sizes summed to 0 already)
        return True
    if not shape:
        return len(chunks) == 1
    cuts = [sorted({0, size} | {c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
            for d, size in enumerate(shape)]
    if math.prod(len(c) - 1 for c in cuts) > MAX_GRID_CELLS:
        return False
    where = [{x: i for i, x in enumerate(c)} for c in cuts]
    grid = torch.zeros([len(c) - 1 for c in cuts], dtype=torch.int32)
    for c in chunks:
        grid[tuple(slice(w[o], w[o + n]) for w, o, n in zip(where, c.offsets, c.sizes))] += 1
    return bool((grid == 1).all())


def _locate_data(path: Path, chunk: Chunk, dtype: torch.dtype) -> None:
    """Read the ``torch.save`` header of a chunk's item (weights-only, no tensor data) and record where its data
    lies in the file; refuse an item that is not one tensor of the metadata's shape and dtype, or whose strides
    reach outside its data."""
    where = f"the item of a chunk at byte {chunk.item_offset}"
    try:
        with open(path, "rb") as f:
            # a byte reader over the item's range (torch's own DCP reader casts it so too)
            view = cast(IO[bytes], _create_file_view(f, chunk.item_offset, chunk.item_length))
            reader = torch._C.PyTorchFileReader(view)
            records = [r for r in reader.get_all_records() if r.startswith("data/")]
            # (torch's stub of the reader lacks has_record and get_record_offset, which torch.serialization calls)
            little = (not reader.has_record("byteorder")  # type: ignore[attr-defined]
                      or reader.get_record("byteorder") == b"little")
            view.seek(0)
            header = torch.load(view, map_location="meta", weights_only=True)
            offset = reader.get_record_offset(records[0]) if records else 0  # type: ignore[attr-defined]
            size = reader.get_record_size(records[0]) if records else 0
    except Exception as exc:  # noqa: BLE001 - torch's zip reader and the unpickler fail in many ways on bad bytes
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CkptEmaError(f"{where} is not a readable tensor (truncated or corrupt?): {first}", path) from None
    if not isinstance(header, torch.Tensor) or len(records) != 1 or not little:
        raise CkptEmaError(f"{where} is not one little-endian tensor", path)
    if tuple(header.shape) != chunk.sizes or header.dtype != dtype:
        raise CkptEmaError(f"{where} holds {header.dtype} {list(header.shape)}, the metadata says {dtype} "
                           f"{list(chunk.sizes)}", path)
    stride, storage_offset = tuple(header.stride()), int(header.storage_offset())  # (no SymInt: a loaded tensor)
    needed = extent(chunk.sizes, stride, storage_offset) * dtype.itemsize
    nbytes = header.untyped_storage().nbytes()
    if min(stride, default=0) < 0 or needed > nbytes or nbytes > size or offset + size > chunk.item_length:
        raise CkptEmaError(f"{where} points outside its data", path)
    chunk.data_offset = chunk.item_offset + offset
    chunk.stride, chunk.storage_offset = stride, storage_offset


# ---------------------------------------------------------------------------------------------------- steps


def read_step(folder: Path, metadata: dcp_metadata.Metadata, paths: dict[str, tuple[str, ...]],
              model: set[str]) -> tuple[str, int] | None:
    """The training step the checkpoint records, and the entry it came from: a top-level entry named like a step
    (:data:`STEP_KEYS`) or one inside a top-level entry (torchtitan's ``train_state.step``), saved as a plain
    integer or a one-element integer tensor."""
    for key in STEP_KEYS:
        for fqn, path in paths.items():
            if fqn in model or path[-1] != key or len(path) > 2:
                continue
            value = _small_value(folder, metadata, fqn)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = int(value.item())
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return ".".join(path), value
    return None


def _small_value(folder: Path, metadata: dcp_metadata.Metadata, fqn: str) -> Any:
    """A small stored item, loaded weights-only; None when it is large, sharded or not plain data."""
    entry = metadata.state_dict_metadata.get(fqn)
    if isinstance(entry, dcp_metadata.TensorStorageMetadata):
        if len(entry.chunks) != 1:
            return None
        index = dcp_metadata.MetadataIndex(fqn, entry.chunks[0].offsets)
    else:
        index = dcp_metadata.MetadataIndex(fqn)
    info = metadata.storage_data.get(index)
    if info is None or info.length > MAX_STEP_ITEM_BYTES:
        return None
    with open(folder / info.relative_path, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a value that is not plain data is simply not a step
        return None


# ---------------------------------------------------------------------------------------------------- geometry


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Split elements [start, stop) of a row-major tensor of ``shape`` into boxes (index ranges ``lo <= i < hi``
    per dimension) that are each contiguous in flat order; yields ``(flat index of the box's first element, lo,
    hi)`` in order. At most two boxes per dimension: a partial row at each end, whole rows between."""

    def split(shape: tuple[int, ...], start: int, stop: int, base: int) -> Iterator[tuple[int, tuple, tuple]]:
        if start >= stop:
            return
        if len(shape) <= 1:
            yield base + start, ((start,) if shape else ()), ((stop,) if shape else ())
            return
        row = math.prod(shape[1:])
        first, begin = divmod(start, row)
        last, end = divmod(stop, row)
        if first == last:
            for at, lo, hi in split(shape[1:], begin, end, base + first * row):
                yield at, (first, *lo), (first + 1, *hi)
            return
        if begin:
            for at, lo, hi in split(shape[1:], begin, row, base + first * row):
                yield at, (first, *lo), (first + 1, *hi)
            first += 1
        if last > first:
            yield base + first * row, (first,) + (0,) * (len(shape) - 1), (last, *shape[1:])
        if end:
            for at, lo, hi in split(shape[1:], 0, end, base + last * row):
                yield at, (last, *lo), (last + 1, *hi)

    yield from split(tuple(shape), start, stop, 0)


def chunk_parts(shape: tuple[int, ...], chunks: list[Chunk], start: int, stop: int
                ) -> Iterator[tuple[Chunk, int, tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """Where elements [start, stop) of a row-major tensor of ``shape`` lie in its ``chunks``: for each box of them
    that is contiguous in flat order (:func:`flat_boxes`: its first element's index counted from ``start``, and its
    shape), each chunk that holds part of the box, with that part's window in the box and in the chunk. What a
    reader gathers and a writer scatters."""
    for at, lo, hi in flat_boxes(shape, start, stop):
        box = tuple(b - a for a, b in zip(lo, hi))
        for chunk in chunks:
            low = tuple(max(a, o) for a, o in zip(lo, chunk.offsets))
            high = tuple(min(b, o + n) for b, o, n in zip(hi, chunk.offsets, chunk.sizes))
            if all(a < b for a, b in zip(low, high)):
                yield chunk, at - start, box, window(low, high, lo), window(low, high, chunk.offsets)


def holds(chunk: Chunk, lo: tuple[int, ...], hi: tuple[int, ...]) -> bool:
    return all(o <= a and b <= o + n for a, b, o, n in zip(lo, hi, chunk.offsets, chunk.sizes))


def window(lo: tuple[int, ...], hi: tuple[int, ...], origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))


def extent(sizes: tuple[int, ...], stride: tuple[int, ...], storage_offset: int) -> int:
    """How many elements of its storage a tensor of this geometry reaches (0 for an empty tensor)."""
    if math.prod(sizes) == 0:
        return 0
    return storage_offset + sum((n - 1) * s for n, s in zip(sizes, stride)) + 1


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _counts(seq: Any, n: int | None = None) -> tuple[int, ...] | None:
    if not isinstance(seq, tuple | list) or not all(_is_count(x) for x in seq) or (n is not None and len(seq) != n):
        return None
    return tuple(seq)
