"""Unpickle a checkpoint's pickle weights-only, with the standard library's unpickler: any protocol, a bounded cost,
only dense tensors and plain data, one-line refusals.

``pickle.Unpickler`` runs its opcode loop in C and runs no code of its own: it calls what the pickle names only
through ``find_class``, and reads storages only through ``persistent_load``. :func:`unpickle` closes the gaps
around it in three places:

* **Before anything runs** (:func:`scan`), the pickle's opcodes are read once: runs of fixed-size opcodes by one
  regular expression, the others one by one. Refused are opcodes outside :data:`OPCODES` (those torch's
  weights-only unpickler reads and the protocol 3-5 forms of the same data: bytes, short strings, sets, frames,
  MEMOIZE; never protocol 0/1's text opcodes, INST/OBJ, extension codes, DUP or out-of-band buffers), a protocol
  newer than this Python's, a GLOBAL without its two short lines, a memo index no pickler writes (the C unpickler
  would size its memo to twice the index), and a pickle whose charge passes ``max_bytes``. The charge is an upper
  bound of the memory the unpickler can be made to hold: every byte of a run costs :data:`RUN_BYTE_COST` (the most
  any opcode of a run allocates per byte), the others :data:`OPCODE_COSTS` plus their bytes (four times for text,
  which decodes to up to four bytes a character), the memo :data:`MEMO_CHARGE` (or twice its largest index, in
  8-byte slots), and every call :data:`CALL_COST` plus what it may build from its arguments, charged as it runs.
* **What the pickle can name** (``find_class``) is an explicit allow-list: dtypes as they are, and for every class
  and function a stand-in (a class of :class:`_StandIn`) that checks its arguments before it builds anything:
  plain data (OrderedDict, set, bytes, torch.Size, ...) and the caller's safe types, charged per element; tensors
  rebuilt from a storage they lie inside (:func:`_tensor_record`); parameters. Rebuilds of what cannot be averaged
  (sparse, quantized, meta, nested tensors, ...) and direct constructions of tensors and storages (which would
  allocate what the pickle asks for) are refused with the reason. Anything else is refused by name.
* **What the pickle can act on.** The unpickler never holds a tensor, a storage or a real class or function:
  storages are :class:`StorageRecord`s (``persistent_load`` returns them), rebuilt tensors are
  :class:`TensorRecord`s, and stand-ins cannot be changed. A BUILD on any of these is refused, and none can be the
  target of SETITEM, APPEND or ADDITEMS (a tensor would be written to, set onto another storage or copied whole;
  a class or function would be changed for the whole process). :func:`with_tensors` turns the records into tensors
  over the caller's storages once the pickle has run.

Every refusal is a :class:`PickleRefused` whose message is one line; the caller adds the file's name.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import io
import pickle
import pickletools
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

import torch

# The opcodes a pickle may hold: torch's weights-only unpickler reads them (protocol 2, which torch.save writes by
# default), or they are protocol 3-5's forms of the same data.
OPCODES = frozenset({
    "PROTO", "STOP", "FRAME", "MARK", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1",
    "BININT2", "LONG1", "BINFLOAT", "SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES",
    "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST",
    "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
    "BINPERSID",
})

# What each byte of a run may make the unpickler hold: at most a 1-tuple (48 bytes) for a one-byte opcode (TUPLE1
# wrapping the tuple before it), less for the others (a stack, memo or mark slot, a small int or float, a short
# string: no more than 4 bytes a character and its header for 5 bytes of opcode and length).
RUN_BYTE_COST = 64
# Opcodes read one by one: an upper bound of what each may make the unpickler hold besides four times its bytes.
OPCODE_COST = 96
OPCODE_COSTS = {"EMPTY_SET": 256, "FROZENSET": 256, "EMPTY_DICT": 128, "EMPTY_LIST": 128, "LONG_BINPUT": 128}
# The C unpickler's memo is an array of 8-byte slots, grown to twice an index past its end. LONG_BINPUT indices
# below MEMO_FAST_LIMIT pass in a run (the memo's MEMO_CHARGE covers them); a larger one is read on its own, and
# must not exceed its position (a pickler counts its memo from 0, one entry per object built before).
MEMO_FAST_LIMIT = 1 << 16
MEMO_CHARGE = 2 * MEMO_FAST_LIMIT * 8
# What one call may build besides its arguments' elements (a tensor record, a parameter, an OrderedDict).
CALL_COST = 2048
# What one element of an iterable argument may cost a call that copies it into a new container (set("text")).
ELEMENT_COST = 128

# The longest line an opcode may hold (GLOBAL's module and name).
LINE_LIMIT = 4096

# Rebuilds of what cannot be averaged, each refused before it runs.
REBUILDS_REFUSED = {
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (it has no data)",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_wrapper_subclass": "a tensor subclass without storage",
    "_rebuild_device_tensor_from_numpy": "a tensor rebuilt from a numpy array",
    "_rebuild_device_tensor_from_cpu_tensor": "a tensor rebuilt on another device",
}


class PickleRefused(Exception):
    """The pickle cannot be loaded safely; the message is one line without the file's name."""


class PickleCorrupt(PickleRefused):
    """The pickle is not one a pickler wrote: truncated, an unknown opcode, a stack that does not add up."""


class _Record:
    """What the unpickler holds in place of a tensor or storage: it can be passed around and stored, not acted on."""

    __slots__ = ()
    what = "a tensor"

    def __setstate__(self, state: Any) -> None:  # BUILD: torch.save never applies it to a tensor or storage
        raise PickleCorrupt(f"BUILD on {self.what}")


class StorageRecord(_Record):
    """A storage a persistent id names: ``key`` in the file, ``nbytes`` of ``dtype`` (what ``persistent_load``
    returns, after checking it against the file)."""

    __slots__ = ("dtype", "key", "nbytes")
    what = "a storage"

    def __init__(self, key: str, dtype: torch.dtype, nbytes: int) -> None:
        self.key, self.dtype, self.nbytes = key, dtype, nbytes


class TensorRecord(_Record):
    """A dense tensor to view on ``storage``: checked to lie inside it."""

    __slots__ = ("dtype", "metadata", "offset", "requires_grad", "size", "storage", "stride")

    def __init__(self, storage: StorageRecord, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                 dtype: torch.dtype, requires_grad: bool, metadata: dict[str, Any] | None) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype, self.requires_grad, self.metadata = dtype, requires_grad, metadata


class ParameterRecord(_Record):
    """``torch.nn.Parameter(data, requires_grad)`` with the Python attributes in ``state``."""

    __slots__ = ("data", "requires_grad", "state")

    def __init__(self, data: _Record | None, requires_grad: bool, state: Any) -> None:
        self.data, self.requires_grad, self.state = data, requires_grad, state


class SubclassRecord(_Record):
    """``torch._tensor._rebuild_from_type_v2``'s tensor: ``base`` as ``new_type`` with the attributes in ``state``."""

    __slots__ = ("base", "new_type", "state")

    def __init__(self, base: _Record, new_type: type, state: Any) -> None:
        self.base, self.new_type, self.state = base, new_type, state


def unpickle(data: Any, persistent_load: Callable[[Any], Any], *, safe_globals: list[Any], max_bytes: int,
             start: int = 0) -> tuple[Any, int]:
    """The object pickled in ``data`` (bytes, or any buffer) from ``start``, and the position after its STOP.

    Tensors in it are records until :func:`with_tensors` builds them. Storages come from ``persistent_load(pid)``,
    which returns a :class:`StorageRecord`; ``safe_globals`` (classes and functions, or ``(object, "module.name")``
    pairs) extends the allow-list for this call; the unpickling may take at most ``max_bytes`` as charged here.
    """
    budget = _Budget(max_bytes)
    end, charge = scan(data, start)
    budget.charge(charge)
    pickled = data if start == 0 and end == len(data) else data[start:end]
    unpickler = _Unpickler(io.BufferedReader(io.BytesIO(pickled), 1 << 16), _allow_list(safe_globals))
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    token = _BUDGET.set(budget)
    try:
        return unpickler.load(), end
    except PickleRefused:
        raise
    except RecursionError:
        raise PickleCorrupt("the pickle nests too deeply") from None
    except MemoryError:
        raise PickleRefused("the pickle needs more memory than there is") from None
    except Exception as exc:  # a corrupt pickle breaks the unpickler in any way (KeyError, struct.error, ...)
        raise PickleCorrupt(_first_line(exc)) from None
    finally:
        _BUDGET.reset(token)


def with_tensors(obj: Any, storage_of: Callable[[StorageRecord], torch.UntypedStorage]) -> Any:
    """``obj`` with every record replaced by what it describes: tensors viewing ``storage_of(record.storage)``,
    parameters, tensors with attributes. Containers are changed in place (tuples and frozensets rebuilt), each
    object once, whatever refers to it; one-line refusals."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tensors(storage_of).resolve(obj)
    except PickleRefused:
        raise
    except RecursionError:
        raise PickleCorrupt("the pickle nests too deeply") from None
    except Exception as exc:  # torch refuses the tensor: requires_grad on integers, bad metadata, ...
        raise PickleCorrupt(_first_line(exc)) from None


# ----------------------------------------------------------------------------------------------------- the scan


def _opcode_bytes(names: Iterable[str]) -> bytes:
    return bytes(sorted(op.code.encode("latin-1")[0] for op in pickletools.opcodes if op.name in names))


def _code(name: str) -> int:
    return _opcode_bytes([name])[0]


# The opcodes a run expression takes: the fixed-size ones by argument size (LONG_BINPUT below MEMO_FAST_LIMIT), and
# LONG1 and strings of at most RUN_TEXT_LIMIT bytes, one alternative per length; STOP, PROTO, empty sets, dicts and
# lists (which cost more than RUN_BYTE_COST) and the other variable-size opcodes are read one by one.
RUN_TEXT_LIMIT = 127
_RUN_NO_ARGUMENT = _opcode_bytes({"MARK", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "TUPLE",
                                  "TUPLE1", "TUPLE2", "TUPLE3", "APPEND", "APPENDS", "SETITEM", "SETITEMS",
                                  "ADDITEMS", "MEMOIZE", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID"})


def _counted(name: str, width: int, limit: int) -> bytes:
    """An expression for opcode ``name`` with a ``width``-byte length of at most ``limit`` and that many bytes."""
    lengths = b"|".join(re.escape(n.to_bytes(width, "little")) + b".{%d}" % n for n in range(limit + 1))
    return re.escape(_opcode_bytes({name})) + b"(?:" + lengths + b")"


_RUN = re.compile(
    b"(?:[" + re.escape(_RUN_NO_ARGUMENT) + b"]"
    + b"|[" + re.escape(_opcode_bytes({"BININT1", "BINGET", "BINPUT"})) + b"]."
    + b"|" + re.escape(_opcode_bytes({"BININT2"})) + b".."
    + b"|[" + re.escape(_opcode_bytes({"BININT", "LONG_BINGET"})) + b"]...."
    + b"|" + re.escape(_opcode_bytes({"LONG_BINPUT"})) + b"..\x00\x00"
    + b"|[" + re.escape(_opcode_bytes({"BINFLOAT", "FRAME"})) + b"].{8}"
    + b"|" + _counted("BINUNICODE", 4, RUN_TEXT_LIMIT) + b"|" + _counted("SHORT_BINUNICODE", 1, RUN_TEXT_LIMIT)
    + b"|" + _counted("LONG1", 1, 8) + b")*", re.DOTALL)
# Opcodes whose argument is a length and that many bytes: the length's struct.
_COUNTED = {_code(name): struct.Struct(fmt) for name, fmt in (
    ("BINUNICODE", "<I"), ("SHORT_BINUNICODE", "<B"), ("BINUNICODE8", "<Q"), ("SHORT_BINSTRING", "<B"),
    ("BINBYTES", "<I"), ("SHORT_BINBYTES", "<B"), ("BINBYTES8", "<Q"), ("BYTEARRAY8", "<Q"), ("LONG1", "<B"))}
# What each byte of an opcode read one by one is charged: text decodes to up to four bytes a character.
_OPCODE_CHARGE = [4 if op in _opcode_bytes({"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                                             "GLOBAL"}) else 1 for op in range(256)]
_FIXED_SIZE = {op.code.encode("latin-1")[0]: op.arg.n if op.arg else 0
               for op in pickletools.opcodes if op.name in OPCODES and (op.arg is None or op.arg.n > 0)}
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
# GLOBAL's argument: a module and a name, each a line of at most LINE_LIMIT bytes.
_GLOBAL_LINES = re.compile(b"[^\n]{0,%d}\n[^\n]{0,%d}\n" % (LINE_LIMIT - 1, LINE_LIMIT - 1))
_STOP, _PROTO, _GLOBAL, _LONG_BINPUT = _code("STOP"), _code("PROTO"), _code("GLOBAL"), _code("LONG_BINPUT")
_BINUNICODE = _code("BINUNICODE")
_UINT4 = struct.Struct("<I")


def scan(data: Any, start: int = 0) -> tuple[int, int]:
    """The position after the STOP of the pickle at ``start`` in ``data``, and the memory the unpickler may take
    to run it besides calls (see the module docstring), after checking every opcode up to that STOP."""
    try:
        return _scan(data, start)
    except (IndexError, struct.error):  # an opcode's argument, or STOP, past the end
        raise PickleCorrupt("truncated (an opcode's argument or the STOP opcode is missing)") from None


def _scan(data: Any, pos: int) -> tuple[int, int]:
    match, size, charge, memo_top = _RUN.match, len(data), MEMO_CHARGE, 0
    while True:
        end = match(data, pos).end()  # type: ignore[union-attr]  # it matches the empty string too
        charge += RUN_BYTE_COST * (end - pos)
        pos = end
        op = data[pos]
        if op == _BINUNICODE:  # protocol 2's strings: first, for speed
            end = pos + 5 + _UINT4.unpack_from(data, pos + 1)[0]
        elif op in _COUNTED:
            length = _COUNTED[op]
            end = pos + 1 + length.size + length.unpack_from(data, pos + 1)[0]
        elif op == _STOP:
            return pos + 1, charge + 16 * memo_top  # the C unpickler's memo grows to twice the largest index
        elif op in _FIXED_SIZE:  # what the run expression does not take: PROTO, empty containers, large memo indices
            end = pos + 1 + _FIXED_SIZE[op]
            if end > size:
                break
            if op == _PROTO and data[pos + 1] > pickle.HIGHEST_PROTOCOL:
                raise PickleRefused(f"pickle protocol {data[pos + 1]} is newer than this Python reads")
            if op == _LONG_BINPUT:  # no larger than the number of opcodes before it (a pickler counts from 0)
                index = _UINT4.unpack_from(data, pos + 1)[0]
                if index > pos:
                    raise PickleCorrupt(f"a memo index ({index}) that no pickler writes at position {pos}")
                memo_top = max(memo_top, index + 1)
        elif op == _GLOBAL:
            lines = _GLOBAL_LINES.match(data, pos + 1)
            if lines is None:
                raise PickleCorrupt(f"a GLOBAL opcode without its two lines at position {pos}")
            end = lines.end()
        elif op in _NAMES:
            raise PickleCorrupt(f"an opcode that torch.save never writes ({_NAMES[op]} at position {pos})")
        else:
            raise PickleCorrupt(f"an unknown opcode {bytes([op])!r} at position {pos}")
        if end > size:
            break
        charge += _OPCODE_CHARGE[op] * (end - pos) + OPCODE_COSTS.get(_NAMES[op], OPCODE_COST)
        pos = end
    raise PickleCorrupt(f"truncated (in {_NAMES[op]} at position {pos})")


# ---------------------------------------------------------------------------------------------- the unpickler


class _Budget:
    """The memory one unpickling may still take: charged by the scan, then by every call as it runs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.charged = 0

    def charge(self, nbytes: int) -> None:
        self.charged += nbytes
        if self.charged > self.max_bytes:
            raise PickleRefused(f"the pickle needs more than {self.max_bytes} bytes of memory to load "
                                "(the limit unpickling may take)")


# The budget of the unpickling under way in this thread (stand-ins are shared; budgets are not).
_BUDGET: ContextVar[_Budget] = ContextVar("unpickling budget")


class _Unpickler(pickle.Unpickler):
    """The standard library's unpickler, resolving globals through an allow-list of stand-ins only."""

    def __init__(self, file: io.BufferedReader, allowed: dict[str, Any]) -> None:
        super().__init__(file, encoding="utf-8")
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2's names, which protocol 2 pickles hold
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._allowed.get(f"{module}.{name}")
        if found is None:
            raise PickleRefused(f"refusing to load: the checkpoint pickles {module}.{name}, which could run code "
                                "when loaded. ckpt-ema loads only tensors and a short list of harmless types; save "
                                "the model's state_dict() instead")
        return found


class _StandIn(type):
    """The class of every stand-in ``find_class`` hands out in place of a class or function.

    Calling a stand-in (REDUCE) runs its ``build``; NEWOBJ runs its ``__new__``, which builds the real class's
    object (or refuses, for functions); BUILD on it finds its ``__setstate__``, which refuses: a stand-in cannot be
    changed, and the real class or function is never within the pickle's reach.
    """

    def __call__(cls, *args: Any) -> Any:
        return cls.build(*args)  # type: ignore[attr-defined]


def _stand_in(name: str, build: Callable[..., Any], new: Callable[..., Any] | None = None,
              **attributes: Any) -> type:
    """A stand-in named ``name``: REDUCE runs ``build(*args)``, NEWOBJ ``new(*args)`` (refused without one)."""

    def on_new(cls: type, *args: Any) -> Any:
        if new is None:
            raise PickleCorrupt(f"NEWOBJ on {name}, which is not a class")
        return new(*args)

    def on_build(state: Any) -> None:
        raise PickleCorrupt(f"BUILD on {name}")

    return _StandIn(name, (), {"build": staticmethod(build), "__new__": on_new,
                               "__setstate__": staticmethod(on_build), **attributes})


def _charge_call(args: tuple[Any, ...], sizes: bool = False) -> None:
    """Charge a call what it may build: CALL_COST, each element of its sized arguments, and with ``sizes`` (bytes,
    bytearray) the integers that are sizes to allocate."""
    nbytes = CALL_COST
    for arg in args:
        if sizes and isinstance(arg, int):
            nbytes += max(arg, 0)
        elif isinstance(arg, str | bytes | bytearray | list | tuple | dict | set | frozenset):
            nbytes += ELEMENT_COST * len(arg)
    _BUDGET.get().charge(nbytes)


def _data(real: Any, name: str) -> type:
    """The stand-in of a class or function that builds plain data, charged per element of its arguments."""
    sizes = real in (bytes, bytearray)

    def build(*args: Any) -> Any:
        if not args:  # OrderedDict(): one per tensor torch.save writes (its hooks)
            _BUDGET.get().charge(CALL_COST)
            return real()
        _charge_call(args, sizes)
        return real(*args)

    def new(*args: Any) -> Any:
        _charge_call(args, sizes)
        return real.__new__(real, *args)

    return _stand_in(name, build, new if isinstance(real, type) else None)


def _refused(name: str, message: str, **attributes: Any) -> type:
    """The stand-in of a class or function that is never called: calling it, or NEWOBJ, refuses with ``message``."""

    def refuse(*args: Any) -> Any:
        raise PickleRefused(message)

    return _stand_in(name, refuse, refuse, **attributes)


def _constructor(real: Any, **attributes: Any) -> type:
    """A class that would allocate what the pickle asks for (a tensor, a storage): named as data, never called."""
    return _refused(real.__qualname__, f"refusing to build {real.__qualname__} while loading: only tensors as "
                    "torch.save writes them and plain data are loaded", **attributes)


def _tensor_record(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any, requires_grad: Any,
                   metadata: Any) -> TensorRecord:
    """A tensor of ``storage`` (of the storage's dtype when ``dtype`` is None) after checking its geometry: torch
    would grow a storage to fit a tensor that reaches past it (reading memory that is not the file's), or allocate
    what the pickle asks for."""
    _BUDGET.get().charge(CALL_COST)
    if type(storage) is not StorageRecord:
        raise PickleCorrupt("a tensor rebuilt without a storage")
    if dtype is None:
        dtype = storage.dtype
    if not (isinstance(dtype, torch.dtype) and type(offset) is int and offset >= 0 and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)):
        raise PickleCorrupt("a tensor with a bad offset, size or stride")
    last, empty = offset, False  # the last element's index in the storage, unless the tensor has none
    for n, s in zip(size, stride):
        if type(n) is not int or type(s) is not int or n < 0 or s < 0:
            raise PickleCorrupt("a tensor with a bad offset, size or stride")
        if n:
            last += (n - 1) * s
        else:
            empty = True
    if type(requires_grad) is not bool or not (metadata is None or isinstance(metadata, dict)):
        raise PickleCorrupt("a tensor with bad requires_grad or metadata")
    if not empty and (last + 1) * dtype.itemsize > storage.nbytes:
        raise PickleCorrupt(f"a tensor of size {list(size)} and stride {list(stride)} at offset {offset} reaches "
                            f"past its storage of {storage.nbytes} bytes")
    return TensorRecord(storage, offset, tuple(size), tuple(stride), dtype, requires_grad, metadata or None)


def _rebuild_tensor(*args: Any) -> TensorRecord:
    """torch._utils._rebuild_tensor(storage, storage_offset, size, stride)."""
    if len(args) != 4:
        raise PickleCorrupt("bad arguments to _rebuild_tensor")
    return _tensor_record(*args, None, False, None)


def _rebuild_tensor_v2(*args: Any) -> TensorRecord:
    """torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
    metadata=None); the hooks, always empty (torch.save never writes hooks), are left out."""
    if len(args) not in (6, 7):
        raise PickleCorrupt("bad arguments to _rebuild_tensor_v2")
    return _tensor_record(args[0], args[1], args[2], args[3], None, args[4], args[6] if len(args) == 7 else None)


def _rebuild_tensor_v3(*args: Any) -> TensorRecord:
    """torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
    metadata=None): a storage of bytes viewed as ``dtype``."""
    if len(args) not in (7, 8):
        raise PickleCorrupt("bad arguments to _rebuild_tensor_v3")
    if not isinstance(args[6], torch.dtype):
        raise PickleCorrupt("a tensor with a bad offset, size or stride")
    return _tensor_record(args[0], args[1], args[2], args[3], args[6], args[4], args[7] if len(args) == 8 else None)


def _parameter(data: Any, requires_grad: Any, state: Any = None) -> ParameterRecord:
    _BUDGET.get().charge(CALL_COST)
    if not (data is None or isinstance(data, TensorRecord | ParameterRecord | SubclassRecord)):
        raise PickleCorrupt("a parameter of something that is not a tensor")
    if type(requires_grad) is not bool:
        raise PickleCorrupt("a parameter with a bad requires_grad")
    return ParameterRecord(data, requires_grad, state)


def _rebuild_parameter(*args: Any) -> ParameterRecord:
    """torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)."""
    if len(args) != 3:
        raise PickleCorrupt("bad arguments to _rebuild_parameter")
    return _parameter(args[0], args[1])


def _rebuild_parameter_with_state(*args: Any) -> ParameterRecord:
    """torch._utils._rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)."""
    if len(args) != 4:
        raise PickleCorrupt("bad arguments to _rebuild_parameter_with_state")
    return _parameter(args[0], args[1], args[3])


def _new_parameter(*args: Any) -> ParameterRecord:
    """torch.nn.Parameter(data=None, requires_grad=True), called or NEWOBJ'd."""
    if len(args) > 2:
        raise PickleCorrupt("bad arguments to Parameter")
    return _parameter(args[0] if args else None, args[1] if len(args) > 1 else True)


def _rebuild_from_type_v2(*args: Any) -> SubclassRecord:
    """torch._tensor._rebuild_from_type_v2(func, new_type, args, state): a tensor with Python attributes, rebuilt by
    ``func`` (a stand-in, which checks its own arguments) as a Tensor or Parameter."""
    if len(args) != 4 or not isinstance(args[2], tuple) or type(args[0]) is not _StandIn:
        raise PickleCorrupt("bad arguments to _rebuild_from_type_v2")
    func, new_type, func_args, state = args
    base = func(*func_args)
    if not isinstance(base, TensorRecord | ParameterRecord | SubclassRecord):
        raise PickleCorrupt("_rebuild_from_type_v2 of something that is not a tensor")
    real_type = _TENSOR_TYPES.get(new_type)
    if real_type is None:
        raise PickleRefused(f"refusing to build a tensor of type {getattr(new_type, '__name__', new_type)!r}: only "
                            "tensors and parameters are loaded")
    return SubclassRecord(base, real_type, state)


_TENSOR = _constructor(torch.Tensor)
_PARAMETER = _stand_in("Parameter", _new_parameter, _new_parameter)
# The stand-ins _rebuild_from_type_v2 may name as the type to rebuild, and the types they stand for.
_TENSOR_TYPES = {_TENSOR: torch.Tensor, _PARAMETER: torch.nn.Parameter}


def _dtype_of_storage_class(storage_class: type) -> torch.dtype | None:
    """The dtype of a storage class's elements, as torch.load reads it (TypedStorage has none of its own)."""
    if storage_class is torch.UntypedStorage:
        return torch.uint8
    if storage_class is torch.storage.TypedStorage:
        return None
    return torch.serialization.StorageType(storage_class.__name__).dtype


def storage_dtype(storage_type: Any) -> torch.dtype | None:
    """The dtype of the storage class a persistent id names, as ``find_class`` hands it out; None for anything
    else."""
    return getattr(storage_type, "storage_dtype", None) if type(storage_type) is _StandIn else None


def _torch_allow_list() -> dict[str, Any]:
    """What torch.save's pickles name, by ``module.name``: dtypes and quantization schemes as they are, stand-ins for
    everything that can be called (torch's weights-only allow-list, with the policy for each)."""
    allowed: dict[str, Any] = {f"torch.{name}": value for name, value in vars(torch).items()
                               if isinstance(value, torch.dtype | torch.qscheme)}
    for real in (collections.OrderedDict, collections.Counter, set, complex, bytearray, torch.Size, torch.device):
        allowed[f"{real.__module__}.{real.__qualname__}"] = _data(real, real.__qualname__)
    allowed["_codecs.encode"] = _data(_codecs.encode, "encode")
    allowed["torch.serialization._get_layout"] = _data(torch.serialization._get_layout, "_get_layout")
    allowed["torch.Tensor"] = _TENSOR
    allowed["torch.nn.parameter.Parameter"] = _PARAMETER
    for tensor_class in torch._tensor_classes:
        allowed[f"{tensor_class.__module__}.{tensor_class.__name__}"] = _constructor(tensor_class)
    for storage_class in torch._storage_classes:
        allowed[f"{storage_class.__module__}.{storage_class.__name__}"] = _constructor(
            storage_class, storage_dtype=_dtype_of_storage_class(storage_class))
    rebuilds: dict[str, Callable[..., Any]] = {
        "_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3, "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter_with_state}
    for name, build in rebuilds.items():
        allowed[f"torch._utils.{name}"] = _stand_in(name, build)
    for name, what in REBUILDS_REFUSED.items():
        allowed[f"torch._utils.{name}"] = _refused(name, f"it holds {what}; only dense tensors can be averaged")
    allowed["torch._tensor._rebuild_from_type_v2"] = _stand_in("_rebuild_from_type_v2", _rebuild_from_type_v2)
    return allowed


_TORCH_ALLOW_LIST = _torch_allow_list()
# Stand-ins of the callers' safe globals, by the real object (so that each is made once).
_SAFE_STAND_INS: dict[Any, type] = {}
# The allow-list for each list of safe globals seen.
_ALLOW_LISTS: dict[tuple[Any, ...], dict[str, Any]] = {}


def _allow_list(safe_globals: list[Any]) -> dict[str, Any]:
    """torch's allow-list extended with ``safe_globals``: each a class or function (named by its module and name)
    or an ``(object, "module.name")`` pair; classes that build plain data are charged per element like torch's."""
    key = tuple(safe_globals)
    allowed = _ALLOW_LISTS.get(key)
    if allowed is None:
        allowed = dict(_TORCH_ALLOW_LIST)
        for entry in safe_globals:
            real, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__name__}")
            if real not in _SAFE_STAND_INS:
                _SAFE_STAND_INS[real] = _data(real, str(getattr(real, "__qualname__", name)))
            allowed[name] = _SAFE_STAND_INS[real]
        _ALLOW_LISTS[key] = allowed
    return allowed


# ------------------------------------------------------------------------------------------------ the tensors

# Objects that hold no other objects (a torch.Size holds integers only: its constructor takes nothing else).
_LEAVES = frozenset({str, int, float, bool, type(None), bytes, bytearray, complex, torch.dtype, torch.Size,
                     torch.device, torch.layout, torch.qscheme, _StandIn})


class _Tensors:
    """Replaces records by tensors over ``storage_of``'s storages, each object once (its result kept by id, with
    the object itself so that no id is reused while the walk goes on)."""

    def __init__(self, storage_of: Callable[[StorageRecord], torch.UntypedStorage]) -> None:
        self._storage_of = storage_of
        self._done: dict[int, tuple[Any, Any]] = {}
        self._empty: dict[torch.dtype, torch.Tensor] = {}  # one per dtype, whose new() is the cheapest new tensor

    def resolve(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _LEAVES:
            return obj
        done = self._done.get(id(obj))
        if done is not None:
            return done[1]
        if kind is TensorRecord:
            result: Any = self._tensor(obj)
        elif isinstance(obj, _Record):
            result = self._record(obj)
        elif isinstance(obj, dict):
            self._done[id(obj)] = (obj, obj)  # before its items: they may refer to it
            result = self._dict(obj)
        elif kind is list:
            self._done[id(obj)] = (obj, obj)
            for i, item in enumerate(obj):
                new = self.resolve(item)
                if new is not item:
                    obj[i] = new
            result = obj
        elif kind is tuple or kind is frozenset:
            items = [self.resolve(item) for item in obj]
            changed = any(new is not item for new, item in zip(items, obj))
            result = kind(items) if changed else obj
        elif kind is set:
            self._done[id(obj)] = (obj, obj)
            items = [self.resolve(item) for item in obj]
            if any(new is not item for new, item in zip(items, obj)):
                obj.clear()
                obj.update(items)
            result = obj
        else:  # an object of a safe type: its attributes
            attributes = getattr(obj, "__dict__", None)
            if type(attributes) is dict:
                self._done[id(obj)] = (obj, obj)
                self._dict(attributes)
            result = obj
        self._done[id(obj)] = (obj, result)
        return result

    def _dict(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        """A dict (or OrderedDict, Counter) changed in place: its values, and its keys if any is not a leaf."""
        if any(type(key) not in _LEAVES for key in obj):
            items = [(self.resolve(key), value) for key, value in obj.items()]
            dict.clear(obj)
            dict.update(obj, items)
        done = self._done
        for key, value in obj.items():
            kind = type(value)
            if kind is TensorRecord and id(value) not in done:  # a state dict's tensors: the common case, first
                new: Any = self._tensor(value)
                done[id(value)] = (value, new)
                obj[key] = new
            elif kind not in _LEAVES:
                new = self.resolve(value)
                if new is not value:
                    obj[key] = new
        attributes = getattr(obj, "__dict__", None)  # an OrderedDict's, set by BUILD
        if type(attributes) is dict:
            self._dict(attributes)
        return obj

    def _tensor(self, record: TensorRecord) -> torch.Tensor:
        dtype = record.dtype
        empty = self._empty.get(dtype)
        if empty is None:
            empty = self._empty[dtype] = torch.empty(0, dtype=dtype)
        tensor = empty.new().set_(self._storage_of(record.storage), record.offset, record.size, record.stride)
        if record.requires_grad:
            tensor.requires_grad = True
        if record.metadata:
            torch._utils.set_tensor_metadata(tensor, record.metadata)
        return tensor

    def _record(self, record: _Record) -> Any:
        """A parameter, a tensor with attributes, or a storage the pickle holds as it is (as torch.load gives it)."""
        if isinstance(record, ParameterRecord):
            data = torch.empty(0) if record.data is None else self.resolve(record.data)  # as Parameter(None) does
            parameter = torch.nn.Parameter(data, record.requires_grad)
            if record.state is not None:
                torch._utils._set_obj_state(parameter, self.resolve(record.state))
            return parameter
        if isinstance(record, SubclassRecord):
            base = self.resolve(record.base)
            return torch._tensor._rebuild_from_type_v2(lambda: base, record.new_type, (), self.resolve(record.state))
        assert isinstance(record, StorageRecord)
        return torch.storage.TypedStorage(wrap_storage=self._storage_of(record), dtype=record.dtype, _internal=True)


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
