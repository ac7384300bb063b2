"""One run at a time per output: an exclusive lock held while a run writes an output (and its state).

Two runs writing one output at once would interleave their renames and leave files of neither whole. The lock is
``fcntl.flock`` on a file named after the output's real path, in a folder of this user's in the temporary folder
(nothing is ever written beside the output for it), taken without waiting: a second run refuses in one line naming
the process that holds it. The kernel releases a flock when its holder exits, however it exits, so a killed run
never leaves the output locked; the file itself is removed by the run that held it. Removing it races with a run
that opened it just before: such a run finds that the file it locked is no longer the one at the path, and tries
again on the new one. The lock covers the runs of one machine (flock on a network file system is not to be trusted).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckpt_ema.errors import CkptEmaError

def lock_path_of(output: Path) -> Path:
    """The lock file of ``output`` (a file or a folder; its folder must exist): named after its real path, in
    ``ckpt-ema-locks-UID`` in the temporary folder."""
    real = Path(os.path.realpath(output.parent)) / output.name
    return _lock_folder() / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.lock"


def _lock_folder() -> Path:
    folder = Path(tempfile.gettempdir()) / f"ckpt-ema-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``output``'s lock for the duration of the block, or raise a one-line error naming the holder."""
    path = lock_path_of(output)
    fd = _acquire(path, output)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _acquire(path: Path, output: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CkptEmaError(f"cannot lock the output: {exc.strerror or exc}", output) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"another ckpt-ema run (pid {holder})" if holder else "another ckpt-ema run"
            raise CkptEmaError(f"{who} is writing this output; wait for it to finish or choose another output",
                               output) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one


def _holder(fd: int) -> int | None:
    """The pid the holder wrote into the lock file (None while it has not written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
