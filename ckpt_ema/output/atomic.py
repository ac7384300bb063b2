"""Writing files so that readers see the old file or the whole new one, never a partial one.

A file is written under a temporary name in its destination folder, flushed to disk, then renamed over the
destination: a rename within one folder is atomic, so a failure or Ctrl-C at any moment leaves the earlier file
as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ckpt_ema.errors import CkptEmaError


def check_output_path(path: str | Path) -> Path:
    """Fail before any work is done when the output cannot be written where the user asked."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise CkptEmaError("the output must be a .safetensors file", path)
    if not path.parent.is_dir():
        raise CkptEmaError("the output's folder does not exist", path)
    if path.is_dir():
        raise CkptEmaError("the output is a folder", path)
    if not os.access(path.parent, os.W_OK):
        raise CkptEmaError("the output's folder is not writable", path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def close_on_disk(f: BinaryIO, tmp: Path) -> None:
    """Flush ``f`` to the disk and close it; give ``tmp`` the mode a plain open() would (mkstemp makes 0600)."""
    with f:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, flush it, then rename it to ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        close_on_disk(open(tmp, "rb+"), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomically(source: Path, path: Path) -> None:
    """A complete copy of ``source`` at ``path``, or nothing."""
    write_atomically(path, lambda tmp: shutil.copyfile(source, tmp))
