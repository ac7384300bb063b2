"""JSON from a checkpoint, parsed within limits: what a hostile header or index could otherwise do is refused.

``json.loads`` alone accepts ``NaN`` and ``Infinity``, turns ``1e400`` into ``inf``, spends quadratic time on a
5,000-digit integer (then refuses it with a traceback), keeps the last of two equal keys, and recurses once per
level of nesting. :func:`parse` refuses each of these in one line (:class:`JsonRefused`): the formats read here
(safetensors headers, Hugging Face indexes and trainer states) never need them.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError

# Nesting deeper than any checkpoint's JSON needs (a safetensors header is 3 levels deep, a trainer state 4).
MAX_DEPTH = 64
# A JSON string with its escapes; what is not a bracket; how a bracket changes the depth.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r'[^\[\]{}]+')
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# Digits of the longest integer accepted: 2**64 has 20.
MAX_INT_DIGITS = 20
# The largest JSON file read (a shard index's weight map of a million tensors is ~100 MB).
MAX_JSON_BYTES = 256 << 20


class JsonRefused(Exception):
    """The text is not JSON or breaks a limit; the message is one line."""


def parse(data: bytes, *, floats: bool = False) -> Any:
    """The JSON value in ``data`` (UTF-8, strict): no duplicate keys, integers of at most :data:`MAX_INT_DIGITS`
    digits, at most :data:`MAX_DEPTH` levels. Fractional numbers, ``NaN`` and infinities only where ``floats``
    allows them (a trainer state logs a NaN loss as ``NaN``); ``1e400`` is never read as infinity."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"not UTF-8 (byte {exc.start})") from None
    _check_depth(text)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int,
                          parse_constant=float if floats else _refuse_constant,
                          parse_float=_finite_float if floats else _refuse_float)
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"not valid JSON: {exc.msg} (at byte {exc.pos})") from None
    except RecursionError:  # unreachable after _check_depth, kept as the last guard
        raise JsonRefused(f"nested more than {MAX_DEPTH} levels deep") from None


def read_json(path: Path, what: str, floats: bool = False) -> Any:
    """The JSON in the file ``path`` (a ``what``: "shard index", "trainer state"), parsed by :func:`parse`; one
    line naming the file if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CkptEmaError(f"unreadable {what}: {exc.strerror or exc}", path) from None
    if len(data) > MAX_JSON_BYTES:
        raise CkptEmaError(f"unreadable {what}: larger than {MAX_JSON_BYTES} bytes", path)
    try:
        return parse(data, floats=floats)
    except JsonRefused as exc:
        raise CkptEmaError(f"unreadable {what}: {exc}", path) from None


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before the parser recurses into it. Strings (whose brackets
    do not nest) are dropped, then the depth is the largest running sum of +1 per opening and -1 per closing
    bracket: linear, at C speed."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH:
        raise JsonRefused(f"nested more than {MAX_DEPTH} levels deep")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonRefused(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number")


def _refuse_float(text: str) -> Any:
    raise JsonRefused(f"a fractional number ({text[:20]}) where only integers belong")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonRefused(f"a number too large for a float ({text[:20]})")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonRefused(f"an integer of {len(text)} digits")
    return int(text)
