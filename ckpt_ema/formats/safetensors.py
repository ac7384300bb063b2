"""The safetensors format, read through a memory map and written as a stream.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape and
``data_offsets`` relative to the end of the header, plus an optional ``__metadata__`` of strings), then the raw
tensor bytes. :class:`SafetensorsFile` maps a file and hands out zero-copy views of its tensors, so averaging
reads each byte once, straight from the page cache, without a copy into a buffer first. (Writing is
:mod:`ckpt_ema.output.writer`.)

The ``safetensors`` package stays the reference: the tests read every file written here with it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

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


def safetensors_is_complete(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and the furthest tensor ends exactly at the end of the
    file (a file still being written, or cut short, fails; so does one with bytes beyond its tensors)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                return False
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                return False
            header = json.loads(f.read(header_len))
        ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    return 8 + header_len + max(ends, default=0) == size


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
