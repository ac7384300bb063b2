"""The safetensors format, written as a stream: the header first (every shape is known before any tensor is
computed), then the tensors' bytes in order as they are produced, so the output never has to be in memory at once.

The ``safetensors`` package stays the reference: the tests read every file written here with it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.safetensors import CODE_OF_DTYPE


def header_bytes(
    shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8-byte length and JSON header for tensors stored in the given order; and each tensor's byte range.

    A name the format cannot hold is refused (:func:`check_tensor_name`) rather than written into the header."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, shape in shapes.items():
        check_tensor_name(name)
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


def check_tensor_name(name: str) -> None:
    """A tensor name safetensors can store: valid UTF-8 (a name unpickled from bytes may hold lone surrogates,
    which JSON would escape into a header other readers reject) and not ``__metadata__``, the header's key for
    the file's metadata (the tensor would replace it, or be read as metadata)."""
    if name == "__metadata__":
        raise CkptEmaError("a tensor is named '__metadata__', the key safetensors reserves for the file's metadata: "
                           "it cannot be written (rename it in the checkpoints, or choose other weights with --key)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CkptEmaError(f"tensor name {name!r} is not valid UTF-8, which safetensors requires") from None


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
        # (numpy's stubs give ndarray its buffer protocol, __buffer__, only from Python 3.12)
        self.file.write(memoryview(data.numpy()))  # type: ignore[arg-type]
        self._written += data.numel()

    def close(self) -> None:
        if self._written != self.total:
            raise AssertionError(f"wrote {self._written} of {self.total} tensor bytes")
