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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from ckpt_ema.output import disk
from ckpt_ema.output.atomic import (close_on_disk, create_temporary, index_path_of,
                                   output_files, remove_stale_temporaries)
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.output.writer import StreamingWriter


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


# Ask the kernel to start writing the output to disk every this many bytes (see _start_writeback).
WRITEBACK_EVERY_BYTES = 8 << 20



class SafetensorsOutput:
    """A sink that streams tensors into ``path`` (or shards beside it) and makes them visible only on commit().

    Pieces are written as they come, in the caller's thread, so that writing never competes with the fold for the
    cores; the file's blocks are reserved when it is opened and its writeback is started as it grows, so that the
    disk works while the next chunks are folded (:mod:`ckpt_ema.output.disk`).
    abort() (called whether or not the run failed) removes every temporary file left uncommitted.
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
        self._finals: list[Path] = []  # every file of the output but the index, in order
        self._writes_index = True
        self._index_tmp: Path | None = None
        self._writeback_from: dict[BinaryIO, int] = {}  # per file: where the bytes not yet sent to disk begin
        self.notes: list[str] = []  # stale temporary files of killed runs, removed or left alone
        self._layout: tuple[dict, dict] | None = None  # (shapes, dtypes) once opened

    def open(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], *,
             partition: Sequence[Sequence[str]] | None = None, rank: int = 0) -> None:
        """Create the temporary files and write their headers; tensors must then arrive in ``shapes`` order.

        With ``partition`` (tensor names per rank, under torchrun) the output is always sharded and this process
        writes only the shards of ``partition[rank]``. Every rank derives the same global shard names and index
        from the same partition, so no names need to be exchanged; rank 0 writes the index.
        """
        self._layout = ({n: tuple(shape) for n, shape in shapes.items()}, dict(dtypes))
        shards, mine = self._shards(shapes, dtypes, partition, rank)
        if len(shards) == 1 and partition is None:
            self._finals = [self.path]
        else:
            stem = self.path.name[: -len(".safetensors")]
            self._finals = [self.path.with_name(f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors")
                            for k in range(1, len(shards) + 1)]
            self.index_path = index_path_of(self.path)
            self._writes_index = partition is None or rank == 0
            shard_of = {n: final.name for names, final in zip(shards, self._finals) for n in names}
            self._index = {"metadata": dict(self.metadata), "weight_map": {n: shard_of[n] for n in shapes}}
            # Tensor bytes of the whole output, whoever writes them (what the writers' totals add up to).
            self._index["metadata"]["total_size"] = sum(
                torch.Size(shape).numel() * dtypes[n].itemsize for n, shape in shapes.items())
        for k in mine:
            names, final = shards[k], self._finals[k]
            try:  # a full disk or a folder gone read-only shows here first: one line, like a failed write
                f, tmp = self._temporary(final)
                self._files.append((tmp, final, f))  # before the header is written, so that abort() closes it
                writer = StreamingWriter(f, {n: shapes[n] for n in names}, {n: dtypes[n] for n in names}, self.metadata)
                disk.preallocate(f.fileno(), f.tell() + writer.total)
            except OSError as exc:
                raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None
            self._writers.append(writer)
            for n in names:
                self._writer_of[n] = writer

    def _shards(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                partition: Sequence[Sequence[str]] | None, rank: int) -> tuple[list[list[str]], range]:
        """All shards of the output (names of their tensors) and the indices of those this process writes: with a
        partition, each rank's tensors are sharded on their own and the ranks' shards follow in rank order."""
        if partition is None:
            shards = shard_plan(shapes, dtypes, self.max_shard_bytes)
            return shards, range(len(shards))
        per_rank = [shard_plan({n: shapes[n] for n in names}, dtypes, self.max_shard_bytes) if names else []
                    for names in partition]
        first = sum(len(p) for p in per_rank[:rank])
        return [s for p in per_rank for s in p], range(first, first + len(per_rank[rank]))

    def _temporary(self, final: Path) -> tuple[BinaryIO, Path]:
        self.notes += remove_stale_temporaries(final)
        fd, tmp = create_temporary(final)
        self._temporaries.append(tmp)
        return os.fdopen(fd, "wb"), tmp

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next piece of tensor ``name`` to its file."""
        writer = self._writer_of[name]
        try:
            writer.write(name, piece)
            self._start_writeback(writer.file)
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None

    def _start_writeback(self, f: BinaryIO) -> None:
        """Start writing ``f``'s newest bytes to disk once there are WRITEBACK_EVERY_BYTES of them, so that they
        go to disk while the next chunks are folded and the fsync before the rename has little left to wait for."""
        start, end = self._writeback_from.get(f, 0), f.tell()
        if end - start >= WRITEBACK_EVERY_BYTES:
            f.flush()
            disk.start_writeback(f.fileno(), start, end - start)
            self._writeback_from[f] = end

    def single_file_of(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype]) -> Path | None:
        """This output's temporary file, when the output (opened) is that one file holding exactly these tensors in
        these dtypes, in this order; else None."""
        if (self._layout is None or self.index_path is not None or len(self._files) != 1
                or list(self._layout[0].items()) != [(n, tuple(s)) for n, s in shapes.items()]
                or self._layout[1] != dict(dtypes)):
            return None
        return self._files[0][0]

    def commit(self) -> list[Path]:
        """Flush everything to disk, then rename: shards first, the index (the commit point) last."""
        self.prepare()
        self.retire_previous()
        self.publish_shards()
        self.publish_index()
        self.remove_stale()
        return self.written

    @property
    def written(self) -> list[Path]:
        """Every file of the output, the index last: the files of all ranks under torchrun."""
        return list(self._finals) + ([self.index_path] if self.index_path else [])

    def prepare(self) -> None:
        """Complete this process's files and flush them to disk, the index too under its temporary name: all
        that can fail is done before anything is renamed (under torchrun, before the ranks agree to commit)."""
        try:
            for writer in self._writers:
                writer.close()
            for tmp, _, f in self._files:
                close_on_disk(f, tmp)
            if self._index is not None and self._writes_index:
                assert self.index_path is not None
                f, self._index_tmp = self._temporary(self.index_path)
                f.write(json.dumps(self._index, indent=2).encode())
                close_on_disk(f, self._index_tmp)
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None

    def prepared_listing(self) -> tuple[int, int, int]:
        """(bytes, modification time, inode) of the prepared file that will hold the output once renamed: the
        index of its shards, or its one file. A rename keeps all three."""
        held = self._index_tmp if self._index_tmp is not None else self._files[0][0]
        st = held.stat()
        return st.st_size, st.st_mtime_ns, st.st_ino

    def retire_previous(self) -> None:
        """Remove an earlier output's index before any file is renamed over its shards.

        Renaming shards one by one over an earlier sharded output would, if it stopped halfway, leave the old index
        presenting a mix of old and new shards as one model. Without an index the old shards present nothing.
        A single-file output removes an earlier index too: loaders prefer the index to the single file.
        """
        try:
            index_path_of(self.path).unlink(missing_ok=True)
        except OSError as exc:
            raise CkptEmaError(f"cannot replace the earlier output: {exc.strerror or exc}", self.path) from None

    def remove_stale(self) -> None:
        """After the commit point: remove what is left of an earlier output in the other layout (or shard count)."""
        ours = set(self.written)
        for path in output_files(self.path):  # an earlier single file beside a new index, shards of another count
            if path not in ours:
                path.unlink(missing_ok=True)

    def publish_shards(self) -> None:
        """Rename this process's prepared files to their final names (no index points at them yet)."""
        try:
            for tmp, final, _ in self._files:
                os.replace(tmp, final)
                self._temporaries.remove(tmp)
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None

    def publish_index(self) -> None:
        """Rename the prepared index into place: the commit point of a sharded output."""
        if self._index_tmp is None:
            return
        try:
            os.replace(self._index_tmp, self.index_path)  # type: ignore[arg-type]
        except OSError as exc:
            raise CkptEmaError(f"cannot write the output: {exc.strerror or exc}", self.path) from None
        self._temporaries.remove(self._index_tmp)
        self._index_tmp = None

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
