"""The safetensors format, read through a memory map and written as a stream.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape and
``data_offsets`` relative to the end of the header, plus an optional ``__metadata__`` of strings), then the raw
tensor bytes. Both directions here work tensor piece by tensor piece:

* :class:`SafetensorsFile` maps a file and hands out zero-copy views of its tensors, so averaging reads each byte
  once, straight from the page cache, without a copy into a buffer first;
* :class:`StreamingWriter` writes the header first (every shape is known before any tensor is computed), then
  the tensors' bytes in order as they are produced, so the output never has to be in memory at once. Files are
  written under temporary names and renamed only when all of them are complete (see :mod:`ckpt_ema.output`).

The ``safetensors`` package stays the reference: the tests read every file written here with it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ckpt_ema.errors import CkptEmaError

DTYPE_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPE_CODES[_code] = getattr(torch, _name)
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Refuse absurd headers before allocating them (the safetensors package uses the same limit).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """A safetensors file, mapped into memory: names, shapes, dtypes, metadata, and zero-copy tensor views."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise CkptEmaError("not a safetensors file (shorter than its 8-byte header length)", path)
                (header_len,) = struct.unpack("<Q", head)
                if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                    raise CkptEmaError("not a safetensors file, or truncated: the header is longer than the file", path)
                header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CkptEmaError("not a safetensors file: its header is not JSON", path) from None
        except OSError as exc:
            raise CkptEmaError(f"cannot read: {exc.strerror or exc}", path) from None
        if not isinstance(header, dict):
            raise CkptEmaError("not a safetensors file: its header is not a JSON object", path)
        self._bytes = _map_privately(path, size)
        metadata = header.pop("__metadata__", None) or {}
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise CkptEmaError("not a safetensors file: its __metadata__ does not map strings to strings", path)
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._parse_entry(name, info, size)
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.entries.items() if end > begin)
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise CkptEmaError(f"bad header: tensors {name!r} and {other!r} overlap", path)

    def _parse_entry(self, name: str, info: Any, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = DTYPE_CODES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CkptEmaError(f"bad header entry for tensor {name!r}", self.path) from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CkptEmaError(f"bad header entry for tensor {name!r}: its byte range does not fit its shape", self.path)
        if self._data_start + end > size:
            raise CkptEmaError(f"truncated: tensor {name!r} ends past the end of the file", self.path)
        return dtype, shape, begin, end

    def tensor(self, name: str) -> torch.Tensor:
        """A view of tensor ``name`` on the mapped file (a copy only when its bytes are not aligned for its dtype)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        offset = self._data_start + begin
        itemsize = dtype.itemsize
        if offset % itemsize:
            return self._bytes[offset : offset + end - begin].clone().view(dtype).reshape(shape)
        return self._bytes[offset : offset + end - begin].view(dtype).reshape(shape)


def _map_privately(path: Path, size: int) -> torch.Tensor | None:
    """The file's ``size`` bytes as a uint8 tensor over a private (copy-on-write) map: tensors view it as writable
    memory, and the file is never modified. torch's map closes the file once mapped, where Python's mmap would hold
    a descriptor for as long as the map lives: a run of a thousand checkpoints (or shards) would hit `ulimit -n`."""
    if not size:
        return None
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as exc:  # the file vanished or shrank since its header was read
        raise CkptEmaError(f"cannot map: {str(exc).strip().splitlines()[0]}", path) from None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def header_bytes(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8-byte length and JSON header for tensors stored in the given order; and each tensor's byte range."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, shape in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtypes[name].itemsize
        if dtypes[name] not in CODE_OF_DTYPE:
            raise CkptEmaError(f"tensor {name!r} has dtype {dtypes[name]}, which safetensors cannot store")
        entries[name] = {"dtype": CODE_OF_DTYPE[dtypes[name]], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        ranges[name] = (offset, offset + nbytes)
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors package writes it
    return struct.pack("<Q", len(text)) + text, ranges


class StreamingWriter:
    """Write one safetensors file whose tensors arrive in header order, piece by piece."""

    def __init__(self, file: BinaryIO, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                 metadata: Mapping[str, str]) -> None:
        self.file = file
        head, self._ranges = header_bytes(shapes, dtypes, metadata)
        self._dtypes = dict(dtypes)
        file.write(head)
        self._written = 0
        self.total = sum(end - begin for begin, end in self._ranges.values())

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next piece (a contiguous run of elements, in order) of tensor ``name``."""
        begin, end = self._ranges[name]
        if not begin <= self._written < end and begin != end:
            raise AssertionError(f"tensor {name!r} written out of order")
        data = piece.detach().to(device="cpu", dtype=self._dtypes[name]).contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self._written += data.numel()

    def close(self) -> None:
        if self._written != self.total:
            raise AssertionError(f"wrote {self._written} of {self.total} tensor bytes")
