"""The records of a zip archive, located from its central directory and checked against the file and each other.

``torch.save`` (PyTorch >= 1.6) writes a zip archive: ``<prefix>/data.pkl`` (the pickled object) and one record
``<prefix>/data/<key>`` per storage, stored uncompressed at a 64-byte aligned offset so that it can be mapped.
Mapping a record is only as safe as its offset and size. :func:`read_directory` reads them from the central
directory (zip64 included) and checks every one before it is used. It reads the file as a buffer, the map the
tensors will view: the local headers lie all over the file, and are then read without a system call each, their
pages mapped once for the reader and the engine that reads the data after them.

* the end-of-central-directory record ends the file (no bytes after it) and the directory lies before it;
* every record's local header is where the directory says, names the same record, and its data ends before the
  directory; no two records overlap; names are unique UTF-8;
* no record is encrypted; stored records hold as many bytes as they expand to; only stored and deflated records
  exist (:func:`read_small_record` expands a deflated one under a size limit; tensor data must be stored).

Everything read is O(directory), never O(data).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

STORED, DEFLATED = 0, 8

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # one central directory entry
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # one local file header
_MAX_COMMENT = 0xFFFF
_ZIP64_EXTRA = 0x0001
_FLAG_ENCRYPTED = 0x0001 | 0x0040
_FLAG_UTF8 = 0x0800
_FLAG_DATA_DESCRIPTOR = 0x0008

# The largest central directory read into memory (about 2 million records; torch.save writes one per storage).
MAX_DIRECTORY_BYTES = 256 << 20


class ZipError(Exception):
    """The archive's structure is wrong or unsupported; the message is one line without the file's name."""


class Record(NamedTuple):
    """One member of the archive: ``size`` bytes (``stored_size`` in the file) starting at ``offset``."""

    name: str
    offset: int
    stored_size: int
    size: int
    method: int
    crc: int
    header_offset: int = 0  # where its local header starts
    entry_offset: int = 0  # where its entry in the central directory starts
    flags: int = 0  # its general-purpose flags (bit 3: a data descriptor follows the data)


def read_directory(data: Any) -> dict[str, Record]:
    """Every record of the zip archive ``data`` (the whole file as a buffer: bytes, a memoryview of its map), by
    name, after checking the archive's structure."""
    file_size = len(data)
    entries, directory_offset, directory_size, directory_end = _end_of_directory(data, file_size)
    if directory_size > MAX_DIRECTORY_BYTES:
        raise ZipError(f"its zip directory of {directory_size} bytes is larger than ckpt-ema reads "
                       f"({MAX_DIRECTORY_BYTES} bytes)")
    if directory_offset + directory_size > directory_end:
        raise ZipError("its zip directory runs past the end of the archive")
    directory = _read_at(data, directory_offset, directory_size)
    records: dict[str, Record] = {}
    starts: list[tuple[int, int, str]] = []  # (local header offset, data end, name)
    pos = 0
    for _ in range(entries):
        entry = pos
        name, raw_name, method, crc, stored_size, size, header_offset, pos = _central_entry(directory, pos)
        if name in records:
            raise ZipError(f"the zip archive holds two records named {name!r}")
        offset = _data_offset(data, name, raw_name, method, stored_size, header_offset, directory_offset)
        flags = _CENTRAL.unpack_from(directory, entry)[3]
        records[name] = Record(name, offset, stored_size, size, method, crc, header_offset,
                               directory_offset + entry, flags)
        starts.append((header_offset, offset + stored_size, name))
    if pos != directory_size:
        raise ZipError(f"its zip directory holds {directory_size - pos} bytes more than its {entries} records")
    starts.sort()
    for (_, end, name), (start, _, other) in zip(starts, starts[1:]):
        if start < end:
            raise ZipError(f"zip records {name!r} and {other!r} overlap")
    return records


def read_small_record(data: Any, record: Record, limit: int) -> bytes:
    """The bytes of ``record`` (a pickle, a version string), expanded if deflated; at most ``limit`` bytes.

    The record's CRC-32 is checked when the archive records one (torch.save can be told to skip it, and then
    writes 0): cheap at this size, and a corrupt pickle is then refused before it is parsed.
    """
    if record.size > limit:
        raise ZipError(f"record {record.name!r} holds {record.size} bytes, more than the {limit} ckpt-ema reads")
    if record.stored_size > record.size + record.size // 1000 + 1024:  # deflate never grows data more than this
        raise ZipError(f"record {record.name!r} takes {record.stored_size} bytes to store {record.size}")
    content = _read_at(data, record.offset, record.stored_size)
    if record.method == DEFLATED:
        inflater = zlib.decompressobj(-15)
        try:
            content = inflater.decompress(content, record.size + 1)  # never more than the record claims (zip bombs)
        except zlib.error as exc:
            raise ZipError(f"record {record.name!r} is not valid deflate data: {exc}") from None
        if not inflater.eof:
            raise ZipError(f"record {record.name!r} expands to more than the {record.size} bytes it claims")
    if len(content) != record.size:
        raise ZipError(f"record {record.name!r} holds {len(content)} bytes, not the {record.size} it claims")
    if record.crc and zlib.crc32(content) != record.crc:
        raise ZipError(f"record {record.name!r} is corrupt (its CRC-32 does not match)")
    return content


def crc_fields(data: Any, record: Record) -> list[int]:
    """Where ``record``'s CRC-32 is written in the archive ``data``: its local header, its directory entry, and its
    data descriptor when it has one (what a writer that changes the record's bytes must rewrite)."""
    where = [record.header_offset + 14, record.entry_offset + 16]
    if record.flags & _FLAG_DATA_DESCRIPTOR:
        end = record.offset + record.stored_size
        where.append(end + 4 if _read_at(data, end, 4) == b"PK\x07\x08" else end)
    return where


def _end_of_directory(data: Any, file_size: int) -> tuple[int, int, int, int]:
    """(number of records, directory offset, directory size, where the directory must end) from the archive's end."""
    tail_size = min(file_size, _EOCD.size + _MAX_COMMENT)
    tail = _read_at(data, file_size - tail_size, tail_size)
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0 and not _ends_at(tail, pos):
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    if pos < 0:
        raise ZipError("truncated (a zip archive without its end-of-directory record at its end)")
    _, disk, directory_disk, disk_entries, entries, size, offset, _ = _EOCD.unpack_from(tail, pos)
    eocd_offset = file_size - tail_size + pos
    locator_offset = eocd_offset - _ZIP64_LOCATOR.size
    if locator_offset >= 0 and _read_at(data, locator_offset, 4) == b"PK\x06\x07":
        _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack(_read_at(data, locator_offset, _ZIP64_LOCATOR.size))
        if zip64_offset + _ZIP64_EOCD.size > locator_offset:
            raise ZipError("its zip64 end-of-directory record lies outside the archive")
        (signature, _, _, _, disk, directory_disk, disk_entries, entries, size,
         offset) = _ZIP64_EOCD.unpack(_read_at(data, zip64_offset, _ZIP64_EOCD.size))
        if signature != b"PK\x06\x06":
            raise ZipError("its zip64 end-of-directory record is missing")
        eocd_offset = zip64_offset
    if disk or directory_disk or disk_entries != entries:
        raise ZipError("a multi-part zip archive; ckpt-ema reads single files")
    return entries, offset, size, eocd_offset


def _ends_at(tail: bytes, pos: int) -> bool:
    """Whether an end-of-directory record at ``pos``, with its comment, ends exactly where ``tail`` does."""
    return pos + _EOCD.size <= len(tail) and pos + _EOCD.size + struct.unpack_from("<H", tail, pos + 20)[0] == len(tail)


def _central_entry(directory: bytes, pos: int) -> tuple[str, bytes, int, int, int, int, int, int]:
    """The record described at ``pos`` of the central directory: its name (and as stored), method, CRC-32, stored
    size, size and local header's offset; and the next entry's pos."""
    if pos + _CENTRAL.size > len(directory):
        raise ZipError("its zip directory is shorter than the number of records it claims")
    (signature, _, _, flags, method, _, _, crc, stored_size, size, name_len, extra_len, comment_len, disk, _, _,
     header_offset) = _CENTRAL.unpack_from(directory, pos)
    if signature != b"PK\x01\x02":
        raise ZipError("its zip directory is corrupt (a record without its signature)")
    end = pos + _CENTRAL.size + name_len + extra_len + comment_len
    if end > len(directory):
        raise ZipError("its zip directory is corrupt (a record runs past its end)")
    raw_name = directory[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len]
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise ZipError(f"a zip record's name is not UTF-8: {raw_name!r}") from None
    if extra_len or 0xFFFFFFFF in (size, stored_size, header_offset):
        extra = directory[pos + _CENTRAL.size + name_len : pos + _CENTRAL.size + name_len + extra_len]
        size, stored_size, header_offset = _zip64_values(extra, name, size, stored_size, header_offset)
    if flags & _FLAG_ENCRYPTED:
        raise ZipError(f"zip record {name!r} is encrypted")
    if disk:
        raise ZipError("a multi-part zip archive; ckpt-ema reads single files")
    if method not in (STORED, DEFLATED):
        raise ZipError(f"zip record {name!r} is compressed with method {method}, which ckpt-ema does not read")
    if method == STORED and stored_size != size:
        raise ZipError(f"zip record {name!r} is stored but claims {size} bytes in {stored_size}")
    return name, raw_name, method, crc, stored_size, size, header_offset, end


def _zip64_values(extra: bytes, name: str, size: int, stored_size: int, header_offset: int) -> tuple[int, int, int]:
    """Sizes and offset, taken from the zip64 extra field for those the 32-bit fields mark as too large."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise ZipError(f"zip record {name!r} has a corrupt extra field")
        fields.setdefault(tag, extra[pos + 4 : pos + 4 + length])
        pos += 4 + length
    values = [size, stored_size, header_offset]
    wide = fields.get(_ZIP64_EXTRA, b"")
    used = 0
    for i, value in enumerate(values):
        if value == 0xFFFFFFFF:
            if used + 8 > len(wide):
                raise ZipError(f"zip record {name!r} lacks the zip64 field its sizes refer to")
            values[i] = struct.unpack_from("<Q", wide, used)[0]
            used += 8
    return values[0], values[1], values[2]


def _data_offset(data: Any, name: str, raw_name: bytes, method: int, stored_size: int, header_offset: int,
                 directory_offset: int) -> int:
    """Where record ``name``'s data starts, after checking its local header against the directory's entry."""
    if header_offset + _LOCAL.size > directory_offset:
        raise ZipError(f"zip record {name!r} starts outside the archive's data")
    signature, _, flags, local_method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(data, header_offset)
    if signature != b"PK\x03\x04":
        raise ZipError(f"zip record {name!r} is not where the zip directory says")
    if data[header_offset + _LOCAL.size : header_offset + _LOCAL.size + name_len] != raw_name:
        raise ZipError(f"zip record {name!r} is not where the zip directory says (another name is there)")
    if local_method != method or flags & _FLAG_ENCRYPTED:
        raise ZipError(f"zip record {name!r}: its local header and the zip directory disagree")
    offset = header_offset + _LOCAL.size + name_len + extra_len
    if offset + stored_size > directory_offset:
        raise ZipError(f"zip record {name!r} runs past the archive's data (truncated or corrupt?)")
    return offset


def _read_at(data: Any, offset: int, size: int) -> bytes:
    chunk = bytes(data[offset : offset + size])
    if len(chunk) != size:
        raise ZipError("the file is shorter than its zip directory says (truncated?)")
    return chunk
