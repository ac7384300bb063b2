"""Unpickle a checkpoint's pickle with torch's weights-only unpickler: any protocol, a bounded cost, one-line refusals.

torch's weights-only ``Unpickler`` (``torch._weights_only_unpickler``) runs no code: it builds tensors, plain
Python data and the types of an allow-list, nothing else. :func:`unpickle` feeds it through :class:`_Feed`, which
parses the pickle one opcode at a time (``pickletools.genops``) and acts before each opcode runs, to close three
gaps:

* **Protocols.** torch's unpickler reads the opcodes of pickle protocol 2, which ``torch.save`` writes by default;
  a file saved with ``pickle_protocol=4`` or 5 holds opcodes it refuses (FRAME, MEMOIZE, SHORT_BINUNICODE,
  STACK_GLOBAL, BINBYTES, ...). The feed rewrites them into their protocol-2 forms (STACK_GLOBAL becomes GLOBAL,
  so every global still goes through torch's allow-list) or performs their pure stack effect itself (MEMOIZE,
  POP, the bytes opcodes), and announces protocol 2, so torch never warns about the protocol.
* **Cost.** Every opcode is charged an upper bound of the memory it can make the unpickler hold
  (:data:`OPCODE_COSTS`, plus every byte read, plus what a call may build from its arguments), and the pickle is
  refused once the charge passes ``max_bytes``: no pickle, however crafted or compressed, takes more memory than
  the caller allows.
* **Kinds of object.** Before a call runs (REDUCE, NEWOBJ) its callable must rebuild a dense tensor from a storage
  (:data:`REBUILDS_DENSE`) or build plain data (:data:`DATA_CALLABLES`, the caller's allowed types). Sparse,
  quantized, meta and nested tensors, tensors rebuilt from numpy arrays, and storages or tensors constructed
  directly (which allocate whatever size the pickle names) are refused before they are built.

Every refusal is a :class:`PickleRefused` whose message is one line; the caller adds the file's name.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
import pickletools
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import torch
import torch._weights_only_unpickler as weights_only

# Upper bounds of the memory one opcode can make the unpickler hold beyond the bytes it reads (charged as read).
# The default covers a stack slot and a small object (an int, a float, a short string's header); containers are
# charged their empty size, memo entries a dict slot, calls what a tensor and its storage view take (all of
# tests/test_unpickle.py's worst cases stay under these; a real state dict is charged ~2.4x what it takes).
OPCODE_COST = 96
OPCODE_COSTS = {"EMPTY_SET": 256, "FROZENSET": 256, "EMPTY_DICT": 128, "EMPTY_LIST": 128, "MARK": 128,
                "BINPUT": 128, "LONG_BINPUT": 128, "MEMOIZE": 128, "REDUCE": 2048, "NEWOBJ": 2048}
# What one element of an iterable argument may cost a call that copies it into a new container (set("text")).
ELEMENT_COST = 128

# The opcodes the feed rewrites, performs itself or checks before torch's unpickler runs them.
ACTED_ON = frozenset({"PROTO", "FRAME", "SHORT_BINUNICODE", "BINUNICODE8", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
                      "MEMOIZE", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8", "POP", "POP_MARK",
                      "ADDITEMS", "FROZENSET"})

# The longest line an opcode may hold (GLOBAL's module and name; protocol 0's numbers).
LINE_LIMIT = 4096

# The protocol torch's weights-only unpickler reads; the feed presents every pickle as this one.
PROTOCOL_2 = b"\x80\x02"

# Rebuilds of dense tensors over a storage the caller's persistent_load returned (torch.save's own reductions).
REBUILDS_DENSE = tuple(getattr(torch._utils, name) for name in (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state") if hasattr(torch._utils, name))
# Those that view a storage: (storage, storage_offset, size, stride, ...), and _rebuild_tensor_v3's dtype at 6.
REBUILDS_FROM_STORAGE = REBUILDS_DENSE[:3]
# Rebuilds of what cannot be averaged, each refused before it runs (a torch version may lack some).
REBUILDS_REFUSED = {getattr(torch._utils, name): what for name, what in (
    ("_rebuild_sparse_tensor", "a sparse tensor"),
    ("_rebuild_qtensor", "a quantized tensor"),
    ("_rebuild_meta_tensor_no_storage", "a meta tensor (it has no data)"),
    ("_rebuild_nested_tensor", "a nested tensor"),
    ("_rebuild_wrapper_subclass", "a tensor subclass without storage"),
    ("_rebuild_device_tensor_from_numpy", "a tensor rebuilt from a numpy array"),
    ("_rebuild_device_tensor_from_cpu_tensor", "a tensor rebuilt on another device"),
) if hasattr(torch._utils, name)}
# Callables of torch's allow-list that build plain data no larger than their arguments (charged per element).
DATA_CALLABLES = (
    collections.OrderedDict,
    collections.Counter,
    set,
    frozenset,
    complex,
    bytes,
    bytearray,
    _codecs.encode,
    torch.Size,
    torch.device,
    torch.serialization._get_layout,
    torch.nn.Parameter,
)


class PickleRefused(Exception):
    """The pickle cannot be loaded safely; the message is one line without the file's name."""


class PickleCorrupt(PickleRefused):
    """The pickle is not one a pickler wrote: truncated, an unknown opcode, a stack that does not add up."""


def unpickle(stream: BinaryIO, persistent_load: Callable[[Any], Any], *, safe_globals: list[Any],
             max_bytes: int) -> Any:
    """The object pickled in ``stream`` from its position, which is left just after the pickle's STOP opcode.

    Storages come from ``persistent_load(pid)``; ``safe_globals`` extends torch's allow-list for this call (as
    ``torch.serialization.safe_globals`` does); the unpickling may take at most ``max_bytes`` as charged here.
    torch's warnings are never shown: what they would warn about is refused or made unnecessary first.
    """
    feed = _Feed(stream, max_bytes, tuple(_allowed_types(safe_globals)))
    unpickler = weights_only.Unpickler(feed, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    feed.unpickler = unpickler
    with torch.serialization.safe_globals(safe_globals), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return unpickler.load()
        except PickleRefused:
            raise
        except pickle.UnpicklingError as exc:
            if "Unsupported operand" in str(exc):
                raise PickleCorrupt("an opcode that torch.save never writes") from None
            raise PickleRefused(_explain(str(exc))) from None
        except RecursionError:
            raise PickleCorrupt("the pickle nests too deeply") from None
        except MemoryError:
            raise PickleRefused("the pickle needs more memory than there is") from None
        except Exception as exc:  # a corrupt pickle breaks the unpickler in any way (KeyError, struct.error, ...)
            raise PickleCorrupt(f"{_first_line(exc)}") from None
        finally:
            torch._utils._sparse_tensors_to_validate.clear()  # stays empty: sparse tensors are refused first


def skip(stream: BinaryIO, max_bytes: int) -> None:
    """Move ``stream`` past the pickle that starts at its position, building nothing (at most ``max_bytes``)."""
    feed = _Feed(stream, max_bytes, ())
    try:
        for _ in feed._ops:
            feed._source.take()
    except ValueError as exc:
        raise PickleCorrupt(f"{_first_line(exc)}") from None


def _allowed_types(safe_globals: list[Any]) -> Iterator[Any]:
    for entry in safe_globals:
        yield entry[0] if isinstance(entry, tuple) else entry


class _Feed:
    """The file torch's unpickler reads: the pickle's opcodes one by one, in protocol 2, each checked before it runs.

    The unpickler reads an opcode (``read(1)``) and its argument, runs it, and only then reads the next opcode. So
    when the feed is asked for a byte past the current opcode's last one, the previous opcode has run and the
    unpickler's stack is the one the next opcode will act on: the moment to check it, or to perform the opcode.
    """

    def __init__(self, stream: BinaryIO, max_bytes: int, allowed_types: tuple[Any, ...]) -> None:
        self._max_bytes = max_bytes
        self._charged = 0
        self._allowed_types = allowed_types
        self._source = _Source(stream, self._charge)
        self._ops = pickletools.genops(self._source)
        self._pending = b""  # the current opcode's bytes, in protocol 2, not yet read by the unpickler
        self.unpickler: Any = None

    def read(self, n: int) -> bytes:
        if not self._pending and n:  # read(0) is an empty string's text, not the next opcode
            self._pending = self._next_opcode()
        chunk, self._pending = self._pending[:n], self._pending[n:]
        return chunk

    def readline(self) -> bytes:
        end = self._pending.find(b"\n") + 1
        if not end:  # only GLOBAL reads lines, and the feed hands over both of its lines at once
            raise PickleCorrupt("a GLOBAL opcode without its two lines")
        line, self._pending = self._pending[:end], self._pending[end:]
        return line

    def _next_opcode(self) -> bytes:
        """The protocol-2 bytes of the next opcode torch's unpickler must run, after checking what it acts on."""
        while True:
            try:
                opcode, arg, _ = next(self._ops)
            except StopIteration:
                return b""  # past STOP: torch never reads on
            except ValueError as exc:  # a truncated argument, an unknown opcode
                raise PickleCorrupt(f"{_first_line(exc)}") from None
            name = opcode.name
            self._charge(OPCODE_COSTS.get(name, OPCODE_COST))
            raw = self._source.take()
            if name not in ACTED_ON:  # most opcodes: torch's unpickler runs them as they are
                return raw
            translated = self._translate(name, arg, raw)
            if translated is not None:
                return translated

    def _translate(self, name: str, arg: Any, raw: bytes) -> bytes | None:
        """The bytes to give torch's unpickler for one opcode, or None when the feed has performed it itself."""
        u = self.unpickler
        if name == "PROTO":
            if arg > pickle.HIGHEST_PROTOCOL:
                raise PickleRefused(f"pickle protocol {arg} is newer than this Python reads")
            return PROTOCOL_2
        if name == "FRAME":
            return None
        if name in ("SHORT_BINUNICODE", "BINUNICODE8"):
            text = arg.encode("utf-8", "surrogatepass")
            return b"X" + struct.pack("<I", len(text)) + text
        if name == "STACK_GLOBAL":
            qualname, module = u.stack.pop(), u.stack.pop()
            if not (isinstance(module, str) and isinstance(qualname, str)) or "\n" in module + qualname:
                raise PickleCorrupt("STACK_GLOBAL without a module and a name")
            return b"c" + f"{module}\n{qualname}\n".encode("utf-8", "surrogatepass")
        if name in ("REDUCE", "NEWOBJ"):
            self._check_call(u.stack[-2], u.stack[-1])
            return raw
        if name == "BUILD" and isinstance(u.stack[-2], torch.Tensor):  # set_() on a tensor: torch.save never does
            raise PickleCorrupt("BUILD on a tensor")
        if name == "MEMOIZE":
            u.memo[len(u.memo)] = u.stack[-1]
        elif name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8"):
            u.stack.append(arg)
        elif name == "BYTEARRAY8":
            u.stack.append(bytearray(arg))
        elif name == "POP":
            u.stack.pop()
        elif name == "POP_MARK":
            u.pop_mark()
        elif name == "ADDITEMS":
            items = u.pop_mark()
            if type(u.stack[-1]) is not set:
                raise PickleCorrupt("ADDITEMS to something that is not a set")
            u.stack[-1].update(items)
        elif name == "FROZENSET":
            u.stack.append(frozenset(u.pop_mark()))
        else:
            return raw  # torch's own opcodes, and those it refuses (NEXT_BUFFER, protocol 0's)
        return None

    def _check_call(self, func: Any, args: Any) -> None:
        """Refuse, before it runs, a call that neither rebuilds a dense tensor nor builds plain data."""
        if func in REBUILDS_REFUSED:
            raise PickleRefused(f"it holds {REBUILDS_REFUSED[func]}; only dense tensors can be averaged")
        if not isinstance(args, tuple):
            raise PickleCorrupt("a call whose arguments are not a tuple")
        if func is torch._tensor._rebuild_from_type_v2:  # a tensor of a subclass, or with Python attributes
            if len(args) != 4 or not isinstance(args[2], tuple):
                raise PickleCorrupt("bad arguments to _rebuild_from_type_v2")
            self._check_call(args[0], args[2])
        elif func in DATA_CALLABLES:
            for arg in args:
                if isinstance(arg, int) and func in (bytes, bytearray):
                    self._charge(arg)  # bytes(n) allocates n bytes
                elif isinstance(arg, str | bytes | bytearray | list | tuple | dict | set | frozenset):
                    self._charge(ELEMENT_COST * len(arg))
        elif func in REBUILDS_FROM_STORAGE:
            _check_fits_storage(func, args)
        elif func not in REBUILDS_DENSE and func not in self._allowed_types:
            raise PickleRefused(f"refusing to build {getattr(func, '__qualname__', type(func).__name__)} while "
                                "loading: only tensors as torch.save writes them and plain data are loaded")

    def _charge(self, nbytes: int) -> None:
        self._charged += nbytes
        if self._charged > self._max_bytes:
            raise PickleRefused(f"the pickle needs more than {self._max_bytes} bytes of memory to load "
                                "(the limit unpickling may take)")


def _check_fits_storage(func: Any, args: tuple[Any, ...]) -> None:
    """Refuse, before torch runs it, a rebuild whose tensor reaches past its storage: torch would grow the storage
    to fit (a resizable one, such as a copy), reading memory that is not the file's, or allocate what the pickle
    asks for."""
    if len(args) < 4 or not isinstance(args[0], torch.storage.TypedStorage):
        raise PickleCorrupt("a tensor rebuilt without a storage")
    storage, offset, size, stride = args[:4]
    dtype = args[6] if func is torch._utils._rebuild_tensor_v3 and len(args) > 6 else storage.dtype
    if not (isinstance(dtype, torch.dtype) and _are_counts((offset,)) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride) and _are_counts(size) and _are_counts(stride)):
        raise PickleCorrupt("a tensor with a bad offset, size or stride")
    if all(size):
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if extent * dtype.itemsize > storage._untyped_storage.nbytes():
            raise PickleCorrupt(f"a tensor of size {list(size)} and stride {list(stride)} at offset {offset} reaches "
                                f"past its storage of {storage._untyped_storage.nbytes()} bytes")


def _are_counts(values: tuple[Any, ...]) -> bool:
    return all(type(v) is int and v >= 0 for v in values)


class _Source:
    """``stream`` as genops reads it: every byte charged before it is read, the current opcode's bytes kept."""

    def __init__(self, stream: BinaryIO, charge: Callable[[int], None]) -> None:
        self._stream = stream
        self._charge = charge
        self._raw = bytearray()

    def read(self, n: int) -> bytes:
        self._charge(n)  # before reading: a length in the pickle may claim any size
        data = self._stream.read(n)
        self._raw += data
        return data

    def readline(self) -> bytes:
        line = self._stream.readline(LINE_LIMIT)
        self._charge(len(line))
        self._raw += line
        return line

    def tell(self) -> int:
        return self._stream.tell()

    def take(self) -> bytes:
        """The bytes read since the last call: one opcode with its argument."""
        raw, self._raw = bytes(self._raw), bytearray()
        return raw


def _explain(message: str) -> str:
    """One line for torch's UnpicklingError: a global off the allow-list, or what else torch objects to."""
    unsupported = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", message)
    if unsupported:
        return (f"refusing to load: the checkpoint pickles {unsupported.group(1)}, which could run code when "
                "loaded. ckpt-ema loads only tensors and a short list of harmless types; save the model's "
                "state_dict() instead")
    return f"refusing to load: {_first_line(message)}"


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
