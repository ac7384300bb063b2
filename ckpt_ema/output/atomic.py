"""Writing files so that readers see the old file or the whole new one, never a partial one.

A file is written under a temporary name in its destination folder, flushed to disk, then renamed over the
destination: a rename within one folder is atomic, so a failure or Ctrl-C at any moment leaves the earlier file
as it was.

Temporary names say who wrote them: ``.NAME.<pid>@<host>.<random>.tmp``. A run killed outright (``kill -9``, a
power cut) cannot remove its own; the next write of NAME removes those whose writer, on this host, is no longer
running (:func:`remove_stale_temporaries`), and reports any other.

Before writing, :func:`check_not_an_input` refuses an output that is, or links to, one of the run's own inputs:
writing it would replace a training checkpoint with the average.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO

from ckpt_ema.errors import CkptEmaError


# What follows NAME in the file name of a shard: NAME-00001-of-00003.safetensors.
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors")
# The longest name a file may have on the usual filesystems (ext4, xfs, btrfs, NTFS, APFS).
NAME_MAX = 255
# What the longest file an output NAME.safetensors creates adds to NAME: "-00001-of-00001" for a shard, and the
# temporary name's "." + ".<pid>@<host>.<random>.tmp" around it (the index's ".index.json" is shorter).
SHARD_SUFFIX_BYTES = len("-00001-of-00001")
# The host in a temporary name: letters, digits, "-" and "_", at most this many (the pid is at most 7 digits).
HOST_BYTES = 16
TEMPORARY_EXTRA_BYTES = 1 + 1 + 7 + 1 + HOST_BYTES + 1 + 8 + len(".tmp")


def check_output_path(path: str | Path) -> Path:
    """Fail before any work is done when the output cannot be written where the user asked."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise CkptEmaError("the output must be a .safetensors file", path)
    longest = len(path.name.encode("utf-8", "surrogateescape")) + SHARD_SUFFIX_BYTES + TEMPORARY_EXTRA_BYTES
    if longest > NAME_MAX:
        room = NAME_MAX - SHARD_SUFFIX_BYTES - TEMPORARY_EXTRA_BYTES
        raise CkptEmaError(f"the output's name is too long: it may have at most {room} bytes, so that its shards' "
                           f"temporary files stay within {NAME_MAX}", path)
    if not path.parent.is_dir():
        raise CkptEmaError("the output's folder does not exist", path)
    if path.is_dir():
        raise CkptEmaError("the output is a folder", path)
    if not os.access(path.parent, os.W_OK):
        raise CkptEmaError("the output's folder is not writable", path)
    return path


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def close_on_disk(f: BinaryIO, tmp: Path) -> None:
    """Flush ``f`` to the disk and close it; give ``tmp`` the mode a plain open() would (mkstemp makes 0600)."""
    with f:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~umask())


def copy_on_disk(source: Path, f: BinaryIO, tmp: Path) -> None:
    """Copy the file ``source`` into the new temporary file ``f`` (at ``tmp``), flushed to disk and closed."""
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 24)
    close_on_disk(f, tmp)


def _writer_tag() -> str:
    """``<pid>@<host>``: who writes a temporary file (the host shortened to HOST_BYTES safe characters)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:HOST_BYTES]
    return f"{os.getpid()}@{host}"


def create_temporary(final: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``final`` named ``.NAME.<pid>@<host>.<random>.tmp``; its descriptor."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.{_writer_tag()}.", suffix=".tmp", dir=final.parent)
    return fd, Path(name)


def create_temporary_folder(final: Path) -> Path:
    """A new, empty temporary folder beside ``final`` named like :func:`create_temporary`'s files."""
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{_writer_tag()}.", suffix=".tmp", dir=final.parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def remove_stale_temporaries(final: Path) -> list[str]:
    """Remove the temporary files of ``final`` that a killed writer left: those this host's processes made whose
    process no longer runs. Returns a note for each removed, and for each left alone (another host's, a running
    process's, or a name without its writer); a file that vanishes meanwhile is another writer's business."""
    pattern = re.compile(re.escape(f".{final.name}.") + r"(?:(\d+)@([A-Za-z0-9_-]*)\.)?[^.]+\.tmp")
    here = _writer_tag().split("@", 1)[1]
    notes: list[str] = []
    try:
        found = sorted(final.parent.glob(glob_escape(f".{final.name}.") + "*.tmp"))
    except OSError:
        return notes
    for path in found:
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        pid, host = match.group(1), match.group(2)
        if pid is not None and host == here and not _running(int(pid)):
            try:
                if path.is_dir() and not path.is_symlink():  # a checkpoint folder's copy (--like-input)
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                notes.append(f"{path}: a stale temporary file of a killed run (process {pid}); "
                             f"cannot remove it: {exc.strerror or exc}")
                continue
            notes.append(f"removed {path}, a temporary file left by a killed run (process {pid})")
        else:
            writer = f"process {pid} on {host}" if pid is not None else "an unknown writer"
            notes.append(f"{path}: a temporary file of {final.name} by {writer}, left alone (remove it if no other "
                         f"run is writing {final.name})")
    return notes


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_not_an_input(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse outputs that would replace or remove an input file: the same file, a symlink to one or a hard link
    to one. ``inputs``: every file the checkpoints consist of (the shards of a set, its index, a folder's weights);
    ``outputs``: every file writing would create, replace or remove."""
    by_identity: dict[tuple[int, int], Path] = {}
    for path in inputs:
        found = _identity(path)
        if found is not None:
            by_identity.setdefault(found, path)
    for output in outputs:
        found = _identity(output)
        if found is None or found not in by_identity:
            continue
        source = by_identity[found]
        if output.is_symlink():
            how = f"is a symlink to the input {source}"
        elif os.path.abspath(output) == os.path.abspath(source):
            how = "is one of the inputs"
        else:
            how = f"is the same file as the input {source} (a hard link)"
        raise CkptEmaError(f"the output {how}: writing it would replace a checkpoint; choose another output", output)


def output_files(path: Path) -> list[Path]:
    """Every existing file that writing the output ``path`` may replace or remove: the file, its index and the
    shards of an earlier sharded output (``NAME-0000k-of-0000n.safetensors``)."""
    stem = path.name[: -len(".safetensors")]
    shards = [p for p in path.parent.glob(f"{glob_escape(stem)}-*-of-*.safetensors")
              if SHARD_NAME.fullmatch(p.name[len(stem):])]
    return [path, index_path_of(path), *shards]


def index_path_of(path: Path) -> Path:
    """``NAME.safetensors.index.json`` beside ``NAME.safetensors``: where a sharded output's index goes."""
    return path.with_name(path.name + ".index.json")


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, flush it, then rename it to ``path``. Stale
    temporary files of ``path`` left by killed runs are removed first."""
    remove_stale_temporaries(path)
    fd, tmp = create_temporary(path)
    os.close(fd)
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
