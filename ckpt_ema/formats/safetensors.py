"""Read a safetensors file: a header checked as strictly as the format's specification, then zero-copy views.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON (tensor name -> dtype,
shape and ``data_offsets`` relative to the end of the header, plus an optional ``__metadata__`` of strings), then
the tensors' bytes. :class:`SafetensorsFile` checks, before any tensor byte is used, everything that decides which
bytes a tensor is (the same rules as the ``safetensors`` package's ``Metadata::validate``, and a few more):

* the header: at most :data:`MAX_HEADER_BYTES`, inside the file, strict JSON (:mod:`strict_json`: no duplicate
  names, no NaN, infinities or huge numbers, bounded depth), an object whose entries have exactly the fields
  ``dtype``, ``shape`` and ``data_offsets`` and whose names are valid UTF-8;
* every tensor: a known dtype, a shape of non-negative integers, and a byte range exactly ``numel * itemsize`` long;
* all tensors together: sorted by offset, the ranges tile the data section exactly, from 0 to its end, without gap
  or overlap. A header length that is off (every tensor's bytes shifted) leaves the data section a different size
  than the ranges cover and is refused, as are overlapping ranges and bytes the header does not account for.

These checks read the header only (O(header)); the tensors are views of a private map of the file, read from the
page cache when used. (Writing is :mod:`ckpt_ema.output.writer`.) The ``safetensors`` package stays the
reference: the tests read every file with it too.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats import strict_json
from ckpt_ema.formats.base import Checkpoint, Format, StoredTensors, weights_checkpoint
from ckpt_ema.formats.mapping import map_privately

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

SAFETENSORS_SUFFIX = ".safetensors"
# The safetensors package refuses longer headers; so does this reader.
MAX_HEADER_BYTES = 100_000_000
ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsFile:
    """A safetensors file, checked and mapped: names, shapes, dtypes, metadata, and zero-copy tensor views."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_len, header = _read_header(f, size)
                try:
                    self.metadata, self.entries = _parse_header(header, size - 8 - header_len)
                except _Refused as exc:
                    raise _Refused(f"bad header: {exc}") from None
                self._data_start = 8 + header_len
                self._bytes = self._map(f, size)
        except OSError as exc:
            raise CkptEmaError(f"cannot read: {exc.strerror or exc}", path) from None
        except _Refused as exc:
            raise CkptEmaError(str(exc), path) from None

    def _map(self, f: Any, size: int) -> torch.Tensor | None:
        """The file's bytes as a uint8 tensor over a private map; None when it holds no tensor bytes."""
        if size == self._data_start:
            return None
        return torch.empty(0, dtype=torch.uint8).set_(map_privately(f, self.path, size))

    def shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """The shape and dtype the header gives tensor ``name``."""
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def tensor(self, name: str) -> torch.Tensor:
        """A view of tensor ``name`` on the mapped file (a copy only when its bytes are not aligned for its dtype)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._bytes is None:  # the header's ranges lie inside the file (checked): bytes, so a map
            raise AssertionError(f"{self.path}: tensor {name!r} has bytes in a file mapped as having none")
        offset = self._data_start + begin
        piece = self._bytes[offset : offset + end - begin]
        if offset % dtype.itemsize:
            piece = piece.clone()
        return piece.view(dtype).reshape(shape)


def safetensors_is_complete(path: Path) -> bool:
    """Whether the writer is done with a safetensors file: its header is all there and the file reaches the end of
    its furthest tensor. A header that does not parse, or bytes beyond the tensors, count as done (the file is
    corrupt, not growing: :class:`SafetensorsFile` says what is wrong)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                return False
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                return False
            header = f.read(header_len)
    except OSError:
        return False
    try:
        parsed = strict_json.parse(header)
        ends = [info["data_offsets"][1] for name, info in parsed.items() if name != "__metadata__"]
    except (strict_json.JsonRefused, AttributeError, TypeError, KeyError, IndexError):
        return True
    if not all(_is_count(end) for end in ends):
        return True
    return 8 + header_len + max(ends, default=0) <= size


class _Refused(Exception):
    pass


def _read_header(f: Any, size: int) -> tuple[int, bytes]:
    """The header's length and bytes, after checking that both fit in the file."""
    head = f.read(8)
    if len(head) < 8:
        raise _Refused("not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise _Refused(f"not a safetensors file: a header of {header_len} bytes (the format's limit is "
                       f"{MAX_HEADER_BYTES})")
    if 8 + header_len > size:
        raise _Refused("not a safetensors file, or truncated: the header is longer than the file")
    header = f.read(header_len)
    if len(header) != header_len:
        raise _Refused("truncated while reading the header")
    return header_len, header


def _parse_header(header: bytes, data_size: int) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """The metadata and the entries (dtype, shape, begin, end) of a header, after checking every rule above."""
    try:
        parsed = strict_json.parse(header)
    except strict_json.JsonRefused as exc:
        raise _Refused(str(exc)) from None
    if not isinstance(parsed, dict):
        raise _Refused("not a JSON object")
    metadata = parsed.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _Refused("__metadata__ does not map strings to strings")
    for key, value in metadata.items():
        _check_utf8(key, "a metadata key")
        _check_utf8(value, f"metadata {key!r}")
    entries = {}
    for name, info in parsed.items():
        _check_utf8(name, "a tensor name")
        entries[name] = _parse_entry(name, info)
    _check_tiling(entries, data_size)
    return metadata, entries


def _parse_entry(name: str, info: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != ENTRY_FIELDS:
        have = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise _Refused(f"tensor {name!r} is described by {have}, not exactly {sorted(ENTRY_FIELDS)}")
    dtype = DTYPE_CODES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise _Refused(f"tensor {name!r} has dtype {info['dtype']!r}, which ckpt-ema does not know")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise _Refused(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
        raise _Refused(f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * dtype.itemsize:
        raise _Refused(f"tensor {name!r} has {end - begin} bytes for {numel} x {dtype} ({numel * dtype.itemsize})")
    return dtype, tuple(shape), begin, end


def _check_tiling(entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], data_size: int) -> None:
    """The ranges, sorted, must cover [0, data_size) exactly once: no overlap, no gap, nothing past the end."""
    covered = 0
    for begin, end, name in sorted((b, e, n) for n, (_, _, b, e) in entries.items()):
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"leaves {begin - covered} bytes unused before it"
            raise _Refused(f"tensor {name!r} (bytes {begin}..{end}) {what}")
        covered = end
    if covered != data_size:
        if covered > data_size:
            raise _Refused(f"the tensors need {covered} bytes after the header, the file holds {data_size} "
                           "(truncated, or a header length that is too long)")
        raise _Refused(f"the file holds {data_size - covered} bytes after the last tensor (a header length that "
                       "is too short, or bytes appended)")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused(f"{what} is not valid UTF-8: {text!r}") from None


# ---------------------------------------------------------------------------------------------------- the format


def read_safetensors_weights(file: Path, key: str | None) -> tuple[StoredTensors, dict[str, Any]]:
    """The tensors of one safetensors file (made on request by its checked map), by stored name, and its
    ``__metadata__`` with each value read as JSON where it is JSON (a step saved as ``"400"`` is the number 400).
    ``key`` has no meaning here: a safetensors file holds only tensors."""
    handle = SafetensorsFile(file)
    return dict.fromkeys(handle.entries, handle), {k: _json_or_text(v) for k, v in handle.metadata.items()}


def open_safetensors(path: Path, key: str | None) -> Checkpoint:
    tensors, metadata = read_safetensors_weights(path, key)
    return weights_checkpoint(path, [(path, tensors)], metadata)


def _json_or_text(text: str) -> Any:
    try:
        return strict_json.parse(text.encode("utf-8"), floats=True)
    except strict_json.JsonRefused:
        return text


FORMAT = Format(
    name="a safetensors file",
    suffixes=(SAFETENSORS_SUFFIX,),
    recognises=lambda path: path.name.endswith(SAFETENSORS_SUFFIX),
    files=lambda path: [path],
    open=open_safetensors,
    is_complete=safetensors_is_complete,
)
