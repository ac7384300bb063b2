"""Two Linux calls for writing a large output, each a no-op where it does not exist.

* ``fallocate`` reserves the output's blocks before anything is folded: a disk too full for the output says so at
  once, in one line, instead of after most of the run (and the filesystem can lay the file out in one piece).
* ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts writing bytes to disk without waiting: called as the output
  grows, the disk works while the next chunks are folded, and the fsync that makes the output durable before
  its rename has little left to wait for, instead of all of it.

Python's os module has neither (os.posix_fallocate falls back to writing zeros where the filesystem cannot
reserve blocks, which would double the writing), so they are called through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 1  # reserve blocks past the end without changing the file's size
SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range; do not wait


def _libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    try:  # the process's own symbols, libc's among them (find_library would run ldconfig on every start)
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # no such call in this libc (macOS), or no libc (Windows)
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_fallocate = _libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_sync_file_range = _libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve ``nbytes`` of disk for the file ``fd`` (its size stays as it is). Raises OSError(ENOSPC) when the
    disk cannot hold them; a filesystem that cannot reserve space (tmpfs on old kernels, NFS) is left alone."""
    if _fallocate is None or nbytes <= 0:
        return
    if _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, nbytes) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(code, f"{os.strerror(code)} (this file needs {nbytes / 1e6:.1f} MB)")


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing bytes [offset, offset + nbytes) of ``fd`` to disk, without waiting (a hint: errors surface
    at the fsync that follows)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
