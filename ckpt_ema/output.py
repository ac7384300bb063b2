"""Where averaged tensors go: a .safetensors file (or a sharded set), written atomically, or memory.

Files are written under temporary names in the destination folder, flushed to disk, and renamed only once every
one of them is complete: readers see the old output or the whole new one, never a partial one, and a failure or
Ctrl-C leaves an existing output untouched. A sharded output (Hugging Face layout: ``NAME-00001-of-00003
.safetensors`` and ``NAME.safetensors.index.json``) renames its index last, so no index ever points at missing
or partial shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.safetensors_io import StreamingWriter


def check_output_path(path: str | Path) -> Path:
    """Fail before any work is done when the output cannot be written where the user asked."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise CkptEmaError("the output must be a .safetensors file", path)
    if not path.parent.is_dir():
        raise CkptEmaError("the output's folder does not exist", path)
    if path.is_dir():
        raise CkptEmaError("the output is a folder", path)
    if not os.access(path.parent, os.W_OK):
        raise CkptEmaError("the output's folder is not writable", path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shard_plan(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], max_shard_bytes: int | None
) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtypes[name].itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class SafetensorsOutput:
    """A sink that streams tensors into ``path`` (or shards beside it) and makes them visible only on commit().

    Use as a context manager: leaving the block without commit() (an error, Ctrl-C) removes every temporary file.
    """

    def __init__(self, path: Path, metadata: Mapping[str, str], max_shard_bytes: int | None = None) -> None:
        self.path = path
        self.metadata = dict(metadata)
        self.max_shard_bytes = max_shard_bytes
        self._files: list[tuple[Path, Path, BinaryIO]] = []  # (temporary, final, open file)
        self._temporaries: list[Path] = []  # every temporary file created and not yet renamed
        self._writer_of: dict[str, StreamingWriter] = {}
        self._writers: list[StreamingWriter] = []
        self.index_path: Path | None = None
        self._index: dict | None = None
        self.total_bytes = 0

    def __enter__(self) -> SafetensorsOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def open(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> None:
        """Create the temporary files and write their headers; tensors must then arrive in ``shapes`` order."""
        shards = shard_plan(shapes, dtypes, self.max_shard_bytes)
        if len(shards) == 1:
            finals = [self.path]
        else:
            stem = self.path.name[: -len(".safetensors")]
            finals = [self.path.with_name(f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors") for k in range(1, len(shards) + 1)]
            self.index_path = self.path.with_name(self.path.name + ".index.json")
            self._index = {"metadata": dict(self.metadata), "weight_map": {}}
        for names, final in zip(shards, finals):
            try:  # a full disk or a folder gone read-only shows here first: one line, like a failed write
                f, tmp = self._temporary(final)
                self._files.append((tmp, final, f))  # before the header is written, so that abort() closes it
                writer = StreamingWriter(f, {n: shapes[n] for n in names}, {n: dtypes[n] for n in names}, self.metadata)
            except OSError as exc:
                raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None
            self._writers.append(writer)
            self.total_bytes += writer.total
            for n in names:
                self._writer_of[n] = writer
                if self._index is not None:
                    self._index["weight_map"][n] = final.name
        if self._index is not None:
            self._index["metadata"]["total_size"] = self.total_bytes

    def _temporary(self, final: Path) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        self._temporaries.append(Path(name))
        return os.fdopen(fd, "wb"), Path(name)

    def write(self, name: str, piece: torch.Tensor) -> None:
        try:
            self._writer_of[name].write(name, piece)
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None

    def commit(self) -> list[Path]:
        """Flush everything to disk, then rename: shards first, the index (the commit point) last."""
        try:
            for writer in self._writers:
                writer.close()
            for tmp, _, f in self._files:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
            index_tmp = None
            if self._index is not None:
                assert self.index_path is not None
                f, index_tmp = self._temporary(self.index_path)
                with f:
                    f.write(json.dumps(self._index, indent=2).encode())
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(index_tmp, 0o666 & ~_umask())
            for tmp, final, _ in self._files:
                os.replace(tmp, final)
            if index_tmp is not None:
                os.replace(index_tmp, self.index_path)  # type: ignore[arg-type]
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None
        written = [final for _, final, _ in self._files] + ([self.index_path] if self.index_path else [])
        self._temporaries = []
        return written  # type: ignore[return-value]

    def abort(self) -> None:
        for _, _, f in self._files:
            f.close()
        for tmp in self._temporaries:
            tmp.unlink(missing_ok=True)
        self._temporaries = []


class MemoryOutput:
    """A sink that assembles the averaged tensors in memory (the Python API without an output file)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._flat: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}

    def open(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> None:
        for name, shape in shapes.items():
            self.tensors[name] = torch.empty(shape, dtype=dtypes[name])
            self._flat[name] = self.tensors[name].view(-1)
            self._filled[name] = 0

    def write(self, name: str, piece: torch.Tensor) -> None:
        at = self._filled[name]
        self._flat[name][at : at + piece.numel()].copy_(piece.reshape(-1))
        self._filled[name] = at + piece.numel()


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, flush it, then rename it to ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomically(source: Path, path: Path) -> None:
    """A complete copy of ``source`` at ``path``, or nothing."""
    write_atomically(path, lambda tmp: shutil.copyfile(source, tmp))


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write whole in-memory ``tensors`` to ``path`` atomically (``train`` and ``eval`` helpers use this)."""
    with SafetensorsOutput(path, metadata) as out:
        out.open({n: tuple(t.shape) for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()})
        for name, t in tensors.items():
            out.write(name, t)
        out.commit()

