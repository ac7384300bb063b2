"""``-o DIR --like-input``: the average written as a checkpoint of the run's own format, which the trainer's own
loader reads, to resume training from the merge (annealing it, or pretraining on), or to evaluate it with the
run's own harness.

DIR becomes a copy of the newest checkpoint, every file of its folder in its layout, in which the model's tensors
hold the average; everything else stays the newest checkpoint's: the optimizer state, the learning-rate scheduler,
the data loader's position, the RNG states, the step and tokens seen. Formats built on PyTorch Distributed
Checkpoint are written this way (torch DCP folders as torchtitan saves them, Lightning's and accelerate's FSDP
checkpoints, OLMo-core's ``stepN/``, Megatron-LM's ``iter_N/``, NeMo 2's checkpoints):

* a DCP checkpoint stores each piece of a tensor as a ``torch.save`` archive at a byte range of a ``.distcp``
  file, which the ``.metadata`` file records. The average has the model's shapes and dtypes, so each of its items
  keeps its length and only its tensor data changes: the ``.metadata`` and every other byte are the newest
  checkpoint's, and the loader reshards the model as it would the newest checkpoint;
* the pieces of the average are scattered into the chunks that hold them (any chunking: tensor-parallel rows,
  FSDP shards, Megatron's stacked layers), through a shared map of the copied files: memory stays within the
  engine's chunk, however large the model;
* where a tensor is kept twice (fp32 master copies in the optimizer state beside the bf16 model entries, which a
  resume loads over the model: :attr:`~ckpt_ema.formats.dcp_reader.DcpCheckpoint.entries`), every copy gets the
  average, each in its own dtype;
* each changed archive's CRC-32 is recomputed (torch does not check it; ``zipfile`` and other tools do);
* ``ckpt-ema.json`` in DIR records what was averaged (the safetensors outputs' metadata): it tells the folder from
  a training checkpoint, and allows a later run to replace it; any other existing folder is refused.

The copy is written as ``.DIR.<pid>@<host>.<random>.tmp/`` beside DIR, flushed to disk, then renamed to DIR. An
earlier output at DIR is exchanged with the new one in one step (Linux's ``renameat2(RENAME_EXCHANGE)``) and then
removed; where the exchange is not available it is moved aside first (for a moment DIR is absent, never a mix of
the two). A failure or a signal removes the copy; a ``kill -9`` leaves it, and the next write of DIR removes it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import shutil
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
import torch

from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.formats.base import OWN_RECORD, Checkpoint
from ckpt_ema.formats.dcp_reader import Chunk, DcpCheckpoint, chunk_parts, chunk_tensor, map_file
from ckpt_ema.formats.registry import format_of, open_checkpoint
from ckpt_ema.formats.zip_records import ZipError, crc_fields, read_directory
from ckpt_ema.output.atomic import create_temporary_folder, remove_stale_temporaries, umask

# Read this many bytes at a time to compute a CRC-32.
BLOCK_BYTES = 16 << 20
# What the output's metadata file is called (DCP's), to find it without opening the folder.
DCP_METADATA = ".metadata"


def check_like_input_output(folder: Path) -> Path:
    """Fail before any work is done when DIR cannot become a checkpoint: it exists and is a file, or a folder that
    is neither empty nor an earlier output of ``--like-input`` (replacing it would delete what it holds)."""
    folder = folder.expanduser()
    if folder.exists() and not folder.is_dir():
        raise CkptEmaError("the output is a file; --like-input writes a checkpoint folder", folder)
    if folder.suffix in (".safetensors", ".pt", ".pth", ".bin") and not folder.exists():
        raise CkptEmaError(f"--like-input writes a checkpoint folder, and {folder.name} names a file: give a folder "
                           "(or leave --like-input out for a .safetensors file)", folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / OWN_RECORD).is_file():
        raise CkptEmaError(f"the output folder exists and is not an earlier output of --like-input (it has no "
                           f"{OWN_RECORD}): writing it would replace what it holds; choose a new folder", folder)
    if not folder.parent.is_dir():
        raise CkptEmaError("the output folder's parent does not exist", folder)
    if not os.access(folder.parent, os.W_OK):
        raise CkptEmaError("the output folder's parent is not writable", folder)
    return folder


def check_like_input_options(out_dtype: str | None, distributed: bool) -> None:
    """The options a checkpoint of the run's own format cannot honour."""
    if out_dtype is not None:
        raise OptionError("like_input", "keeps the run's own dtypes: --out-dtype does not go with it")
    if distributed:
        raise OptionError("like_input", "is written by one process: run it without torchrun")


def metadata_file_of(folder: Path) -> Path | None:
    """The DCP metadata file of a ``--like-input`` output: its record of what it holds (its size, modification
    time and inode tell whether the output is still the one written)."""
    found = sorted(folder.rglob(DCP_METADATA)) if folder.is_dir() else []
    return min(found, key=lambda p: len(p.parts)) if found else None


class LikeInputOutput:
    """A sink that writes the average into a copy of the newest checkpoint ``newest`` at ``path`` (see the module
    docstring); ``key`` and ``strip_prefix`` as the average read the checkpoints, ``metadata`` recorded in
    ``ckpt-ema.json``; ``opened``: the newest checkpoint as discovery opened it, if it did. Committed like :class:`~ckpt_ema.output.sinks.SafetensorsOutput`: prepare, then the rename."""

    def __init__(self, path: Path, newest: Path, key: str | None, strip_prefix: str | None,
                 metadata: Mapping[str, str], opened: Checkpoint | None = None) -> None:
        self.path = path
        self.newest = newest
        self.metadata = dict(metadata)
        self.notes: list[str] = []
        self.prefix = strip_prefix or ""
        if not newest.exists():
            raise CkptEmaError("--like-input copies the newest checkpoint, which is gone", newest)
        ckpt = opened if isinstance(opened, DcpCheckpoint) else open_checkpoint(newest, key)  # (as discovery did)
        if not isinstance(ckpt, DcpCheckpoint):
            fmt = format_of(newest)
            raise CkptEmaError(f"--like-input writes checkpoints built on PyTorch Distributed Checkpoint (torchtitan, "
                               f"OLMo-core, Megatron, NeMo, FSDP); the newest checkpoint is "
                               f"{fmt.name if fmt else 'not one'}: write a .safetensors file or a model folder",
                               newest)
        if ckpt.unwritable_copies:
            raise CkptEmaError(f"the newest checkpoint keeps fp32 master copies of the model that ckpt-ema cannot map "
                               f"to its tensors ({ckpt.unwritable_copies[0]!r}"
                               f"{f' and {len(ckpt.unwritable_copies) - 1} more' if len(ckpt.unwritable_copies) > 1 else ''}"
                               "): a resume would load them over the merge; save the run with Megatron-LM's "
                               "--dist-ckpt-optim-fully-reshardable, or write a .safetensors file", newest)
        self.source = ckpt
        self._tmp: Path | None = None  # the copy being written, until it is renamed to path
        self._old: Path | None = None  # an earlier output, moved aside by the commit, to remove
        self._maps: dict[str, torch.UntypedStorage] = {}
        self._places: dict[str, list[tuple[tuple[int, ...], torch.dtype, list[Chunk]]]] = {}
        self._filled: dict[str, int] = {}
        self._numel: dict[str, int] = {}
        self._files: list[Path] = []  # every file of the copy, relative to it

    @property
    def _dcp(self) -> Path:
        """The DCP folder of the copy (the newest checkpoint's, relative to it, under the copy)."""
        assert self._tmp is not None
        return self._tmp / self.source.folder.relative_to(self.newest)

    def open(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> None:
        """Copy the newest checkpoint and locate every piece of the model's tensors in the copy."""
        stored = {self.prefix + n: s for n, s in shapes.items()}
        if sorted(stored) != sorted(self.source.names):
            extra = sorted(set(stored) - set(self.source.names)) or sorted(set(self.source.names) - set(stored))
            raise CkptEmaError(f"the average's tensors are not the newest checkpoint's model entries ({extra[0]!r}); "
                               "--like-input writes them back only into the same model", self.newest)
        for name, shape in shapes.items():
            places = [self.source.stored_chunks(fqn) for fqn in self.source.entries[self.prefix + name]]
            for where, (stored_shape, _, _) in zip(self.source.entries[self.prefix + name], places):
                if stored_shape != tuple(shape):
                    raise CkptEmaError(f"{where!r} holds a {list(stored_shape)} tensor, the average of {name!r} is "
                                       f"{list(shape)}", self.source.metadata_file)
            self._places[name] = places
            self._filled[name] = 0
            self._numel[name] = math.prod(shape)
        _check_writable([c for places in self._places.values() for _, _, chunks in places for c in chunks],
                        self.source.metadata_file)
        self.notes += remove_stale_temporaries(self.path)
        try:
            self._tmp = create_temporary_folder(self.path)
            os.chmod(self._tmp, 0o777 & ~umask())  # the mode a plain mkdir gives (not the temporary's 0700)
            for source in sorted(p for p in self.newest.rglob("*") if p.is_file()):
                relative = source.relative_to(self.newest)
                if relative.name == OWN_RECORD and len(relative.parts) == 1:
                    continue  # an earlier output's record: this one writes its own
                (self._tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                _copy(source, self._tmp / relative)
                self._files.append(relative)
        except OSError as exc:
            raise CkptEmaError(f"cannot copy the newest checkpoint: {exc.strerror or exc}", self.path) from None

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Scatter the next elements of tensor ``name`` (row-major) into every chunk that holds them, in every
        entry that keeps the tensor, each in its own dtype."""
        start = self._filled[name]
        stop = start + piece.numel()
        flat = piece.reshape(-1)
        for shape, dtype, chunks in self._places[name]:
            for chunk, at, box, in_box, in_chunk in chunk_parts(shape, chunks, start, stop):
                target = chunk_tensor(self._map(chunk.file), chunk, dtype)[in_chunk]
                target.copy_(flat[at : at + math.prod(box)].view(box)[in_box])
        self._filled[name] = stop

    def _map(self, file: str) -> torch.UntypedStorage:
        if file not in self._maps:
            self._maps[file] = map_file(self._dcp / file, self.source.file_sizes[file], shared=True)
        return self._maps[file]

    def single_file_of(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> None:
        """A running mean is never this output's file (see :class:`ckpt_ema.follow.state.MeanFile`)."""
        return None

    def prepare(self) -> None:
        """Complete the copy on disk under its temporary name: every tensor written whole, each changed archive's
        CRC-32 recomputed, the record written, every file and folder flushed."""
        short = [n for n, filled in self._filled.items() if filled != self._numel[n]]
        if short or self._tmp is None:
            raise CkptEmaError(f"the average of {short[0] if short else 'the model'!r} was not written whole; "
                               "nothing was written", self.path)
        self._maps.clear()  # unmapped: the data is in the files' pages
        try:
            changed = {(c.file, c.item_offset, c.item_length) for places in self._places.values()
                       for _, _, chunks in places for c in chunks}
            for file, offset, length in sorted(changed):
                _rewrite_crc(self._dcp / file, offset, length)
            record = self._tmp / OWN_RECORD
            record.write_text(json.dumps({"like_input": str(self.newest), **self.metadata}, indent=2) + "\n")
            self._files.append(Path(OWN_RECORD))
            for relative in self._files:
                _fsync(self._tmp / relative)
            for folder in sorted({(self._tmp / r).parent for r in self._files}, key=lambda p: -len(p.parts)):
                _fsync(folder, directory=True)
        except (OSError, ZipError) as exc:
            raise CkptEmaError(f"cannot write the output: {getattr(exc, 'strerror', None) or exc}", self.path) from None

    def prepared_listing(self) -> tuple[int, int, int]:
        """(bytes, modification time, inode) of the copy's DCP metadata file, which the rename keeps."""
        st = (self._dcp / DCP_METADATA).stat()
        return st.st_size, st.st_mtime_ns, st.st_ino

    def retire_previous(self) -> None:
        """Nothing: the earlier output is replaced as a whole by :meth:`publish_index`."""

    def publish_shards(self) -> None:
        """Nothing: the copy is published as a whole by :meth:`publish_index`."""

    def publish_index(self) -> None:
        """The commit point: the copy becomes DIR (exchanged with an earlier output, or renamed into place)."""
        assert self._tmp is not None
        try:
            if self.path.is_dir() and _exchange(self._tmp, self.path):
                self._old, self._tmp = self._tmp, None
                return
            if self.path.is_dir():  # no atomic exchange here: move the earlier output aside first
                aside = create_temporary_folder(self.path)
                os.replace(self.path, aside)
                self._old = aside
            try:
                os.replace(self._tmp, self.path)
            except OSError:
                if self._old is not None:  # put the earlier output back: nothing changed
                    os.replace(self._old, self.path)
                    self._old = None
                raise
            self._tmp = None
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None

    def remove_stale(self) -> None:
        """After the commit point: remove the earlier output."""
        if self._old is not None:
            shutil.rmtree(self._old, ignore_errors=True)
            self._old = None

    def commit(self) -> list[Path]:
        self.prepare()
        self.publish_index()
        self.remove_stale()
        return self.written

    @property
    def written(self) -> list[Path]:
        """Every file of the output."""
        return [self.path / r for r in self._files]

    def abort(self) -> None:
        """Remove the copy if it was not published (whether or not the run failed)."""
        self._maps.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _check_writable(chunks: list[Chunk], where: Path) -> None:
    """Refuse to write a chunk whose strides put two elements in one place. (Its bytes are its own: every written
    chunk lies inside its item, checked when it was located, and no two items share a byte, checked when the
    metadata was read.)"""
    for c in chunks:
        if not _one_to_one(c.sizes, c.stride):
            raise CkptEmaError(f"a chunk in {c.file} at byte {c.item_offset} has strides {list(c.stride)} that put "
                               "two elements in one place: the checkpoint cannot be written back", where)


def _one_to_one(sizes: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether every element of a tensor of this geometry has a place of its own in its storage: each dimension's
    stride (by increasing stride) steps past everything the smaller ones reach. (Sufficient, and what every dense or
    permuted tensor torch saves satisfies.)"""
    reach = 0
    for step, size in sorted((t, s) for s, t in zip(sizes, stride) if s > 1):
        if step <= reach:
            return False
        reach += (size - 1) * step
    return True


def _copy(source: Path, target: Path) -> None:
    """A copy of the file ``source`` at the new path ``target``, by the kernel (no buffer of ours)."""
    if target.exists():
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    shutil.copyfile(source, target)


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite_crc(path: Path, offset: int, length: int) -> None:
    """Recompute the CRC-32 of the tensor data of the ``torch.save`` archive at [offset, offset + length) of
    ``path`` and write it where the archive records the old one (a field that holds 0, as when torch was told to
    skip CRCs, stays 0)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
        item = memoryview(whole)[offset : offset + length]
        try:
            for record in read_directory(item).values():
                if "/data/" not in record.name:
                    continue
                crc = 0
                for at in range(record.offset, record.offset + record.stored_size, BLOCK_BYTES):
                    crc = zlib.crc32(item[at : min(at + BLOCK_BYTES, record.offset + record.stored_size)], crc)
                for field in crc_fields(item, record):
                    if record.crc and struct.unpack_from("<I", item, field)[0] == record.crc:
                        os.pwrite(f.fileno(), struct.pack("<I", crc), offset + field)
        finally:
            item.release()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
