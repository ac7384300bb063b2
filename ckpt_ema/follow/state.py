"""What an average keeps beside its output to go on later (appending, watching), and the order it is written in.

The state folder (``OUT.ckpt-ema-state/`` beside ``OUT.safetensors`` or a model folder ``OUT/``;
``OUTDIR/ckpt-ema-state/`` for a sweep) holds one generation of state, under an id of its own (its files' names;
outputs never record it, so that they depend on their inputs and options alone):

* ``manifest.json``: the generation's id; each candidate's options, output (and the listing of the file holding it
  as committed) and total weight R (see "Appending" in :mod:`ckpt_ema.weighting`); each input folded so far as a listing shows it (absolute path, bytes, modification
  time, step, and the tokens it records), so that it is recognised later without being opened; the dtypes of the run's tensors and the
  newest checkpoint's training metadata, so that an output can be rewritten from the state alone;
* ``<id>.mean-<k>.safetensors``: candidate k's running mean, its float tensors in the accumulator's dtype (the
  output may be 16-bit; the mean goes on in full precision). When the output is one file holding exactly those
  tensors (a float32 run's output), the mean is a hard link to it: written and flushed once, no second copy;
* ``<id>.theta.<suffix>``: the newest checkpoint, for the linear rule, which weighs that checkpoint again in the
  next interval (the trainer may have deleted it by then). A checkpoint of one weight file is hard-linked (no
  copy: deleting the checkpoint leaves the link), and its listing recorded: a link that no longer matches it (the
  file rewritten in place) is refused. Otherwise (a folder of several files, another file system) its tensors are
  copied, as averaged, to ``<id>.theta.safetensors``.

Where hard links are not supported, each is a copy, written atomically.

**Commit protocol.** An update writes a new generation beside the old one:

1. the new state files and every output under temporary names, flushed to disk; the state files are then renamed
   to their own names, which nothing refers to yet;
2. with SIGINT and SIGTERM held back: ``manifest.json`` is replaced (a rename: the commit point), then every
   output is renamed over the old one;
3. the old generation's files are removed.

A failure or signal before the commit point leaves the old generation with the old outputs. A kill between the
commit point and the last output's rename (only SIGKILL or a power cut can land there) leaves outputs older than
the state: the next run sees their listing differ from the one recorded and rewrites them from the state, reading
no checkpoint (as it does for an output deleted or replaced since). Files of a
generation the manifest does not name are leftovers of an interrupted update, removed when the folder is loaded.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import Checkpoint
from ckpt_ema.formats.registry import checkpoint_files, is_weight_file, open_checkpoint
from ckpt_ema.formats.safetensors import SAFETENSORS_SUFFIX
from ckpt_ema.formats.torch_save import TORCH_SUFFIXES
from ckpt_ema.output.atomic import close_on_disk, copy_on_disk
from ckpt_ema.output.folder import FolderOutput
from ckpt_ema.output.like_input import LikeInputOutput
from ckpt_ema.output.sinks import SafetensorsOutput, index_path_of

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# The metadata key of an output (and of the state's own files) naming the generation it belongs to.
STATE_KEY = "ckpt_ema_state"
STATE_SUFFIX = ".ckpt-ema-state"
SWEEP_STATE_FOLDER = "ckpt-ema-state"


def state_folder_of(output: Path) -> Path:
    """Where the state of the average written to ``output`` lives: ``OUT.ckpt-ema-state`` beside ``OUT.safetensors``;
    ``DIR.ckpt-ema-state`` beside a model folder ``DIR/`` (outside it: the folder holds only what loaders read)."""
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(stem + STATE_SUFFIX)


def listing_of(path: Path) -> tuple[int, int]:
    """(bytes, newest modification time in ns) of a checkpoint's weight files, from the file system's listing:
    how an input is recognised without being opened."""
    size, mtime = 0, 0
    for file in checkpoint_files(path):
        st = file.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return size, mtime


@dataclass(frozen=True)
class Recorded:
    """One input the state has folded, as the listing showed it."""

    path: str  # absolute
    step: int
    step_from: str
    size: int
    mtime_ns: int
    # The tokens trained on that it records, which a window in tokens read from the checkpoints needs again at each
    # append (None: it records none; a manifest written before this field reads as None)
    tokens: int | None = None

    def matches(self, listing: tuple[int, int]) -> bool:
        return (self.size, self.mtime_ns) == listing


@dataclass(frozen=True)
class CandidateRecord:
    """One average the state carries on: its options, output, and (an EMA) its running mean and total weight R."""

    name: str
    output: str  # absolute
    options: dict[str, Any]  # AverageOptions.flat()
    total: float | None  # R; None for a uniform mean of the newest K, which keeps no mean
    mean: str | None  # file name in the state folder
    weights: list[float]  # each input's final weight, as the output's metadata records it
    unresolved: float | None = None  # the average's unresolved share, continued by an append (ema_unresolved_continued)
    # The output as committed: (bytes, modification time, inode) of the file that holds it (the weights file, or
    # the index of its shards). An output listed otherwise now was deleted, replaced, or never renamed into place
    # (a kill inside the commit), and is rewritten from the state.
    listing: list[int] | None = None


@dataclass(frozen=True)
class Manifest:
    generation: str
    accum_dtype: str
    inputs: list[Recorded]
    candidates: list[CandidateRecord]
    theta: str | None  # file name of the newest checkpoint's link or copy (linear rule)
    dtypes: dict[str, str]  # the run's tensors' dtypes, in layout order
    carried: dict[str, Any] = field(default_factory=dict)  # the newest checkpoint's training metadata
    # The state files that are hard links (to an output, or the newest checkpoint's weight file) and their
    # (bytes, modification time) when linked: a link that no longer matches was rewritten in place, and is refused.
    # ``theta`` in here is the checkpoint itself (read like any input); otherwise a copy of its tensors as averaged.
    links: dict[str, list[int]] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    # Why this state cannot go on although it is whole (set by StateFolder.load, never written): an update averages
    # from the start instead, as when a checkpoint changed.
    broken: str | None = field(default=None, compare=False)

    def to_json(self) -> str:
        fields = {**{k: v for k, v in vars(self).items() if k != "broken"}, "inputs": [vars(r) for r in self.inputs],
                  "candidates": [vars(c) for c in self.candidates]}  # (dataclasses.asdict: 10x slower)
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """Parse and check every field's type; anything else is a one-line error naming the file."""
        try:
            raw = json.loads(text)
            if raw.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, not {MANIFEST_VERSION}")
            inputs = [Recorded(str(r["path"]), _int(r["step"]), str(r["step_from"]), _int(r["size"]),
                               _int(r["mtime_ns"]), None if r.get("tokens") is None else _int(r["tokens"]))
                      for r in raw["inputs"]]
            candidates = [CandidateRecord(str(c["name"]), str(c["output"]), dict(c["options"]),
                                          None if c["total"] is None else _finite(c["total"]),
                                          None if c["mean"] is None else _file_name(c["mean"]),
                                          [_finite(w) for w in c["weights"]],
                                          None if c.get("unresolved") is None else _finite(c["unresolved"]),
                                          None if c.get("listing") is None else _listing(c["listing"]))
                          for c in raw["candidates"]]
            manifest = cls(_file_name(raw["generation"]), str(raw["accum_dtype"]), inputs, candidates,
                           None if raw["theta"] is None else _file_name(raw["theta"]),
                           {str(k): _dtype_name(v) for k, v in dict(raw["dtypes"]).items()}, dict(raw["carried"]),
                           {_file_name(k): [_int(x) for x in v] for k, v in dict(raw.get("links", {})).items()})
            if any(len(v) != 2 for v in manifest.links.values()) or not set(manifest.links) <= manifest.files():
                raise ValueError("a link that is not a state file")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CkptEmaError(f"unreadable state manifest ({exc}); remove the folder to start over", where) from None
        steps = [r.step for r in manifest.inputs]
        if (not steps or steps != sorted(set(steps)) or not manifest.candidates
                or any(len(c.weights) != len(steps) for c in manifest.candidates)):
            raise CkptEmaError("unreadable state manifest (no inputs, or steps out of order); remove the folder to "
                               "start over", where)
        return manifest

    def files(self) -> set[str]:
        return {MANIFEST} | {c.mean for c in self.candidates if c.mean} | ({self.theta} if self.theta else set())


def _int(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise ValueError(f"{x!r} is not an integer")
    return x


def _finite(x: Any) -> float:
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{x!r} is not a weight")
    return float(x)


def _listing(x: Any) -> list[int]:
    if not isinstance(x, list) or len(x) != 3:
        raise ValueError(f"{x!r} is not a listing")
    return [_int(v) for v in x]


def _dtype_name(x: Any) -> str:
    if not isinstance(x, str) or not isinstance(getattr(torch, x, None), torch.dtype):
        raise ValueError(f"{x!r} is not a dtype")
    return x


def _file_name(x: Any) -> str:
    if not isinstance(x, str) or not x or "/" in x or x.startswith("."):
        raise ValueError(f"{x!r} is not a file name")
    return x


class StateFolder:
    """The state folder of one average or sweep: load the committed generation, write and commit the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._made = False  # whether this process made the folder (and should remove it if nothing is committed)

    def load(self) -> Manifest | None:
        """The committed generation (None: no state), its files checked to exist; leftovers of an interrupted update
        (files of another generation, temporary files) are removed."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = Manifest.from_json(manifest_path.read_text(), manifest_path)
        except OSError as exc:
            raise CkptEmaError(f"cannot read: {exc.strerror or exc}", manifest_path) from None
        for name in manifest.files():
            if not (self.path / name).is_file():
                raise CkptEmaError(f"the state file {name} that the manifest names is missing; remove the folder to "
                                   "start over", self.path)
        for name, listing in manifest.links.items():
            st = (self.path / name).stat()
            if [st.st_size, st.st_mtime_ns] != listing:
                what = (f"the newest checkpoint averaged, {manifest.inputs[-1].path}," if name == manifest.theta else
                        "an output")
                manifest = replace(manifest, broken=f"{what} was rewritten in place since, and the state's link to "
                                                    "it with it")
                break
        self.remove_leftovers(manifest)
        return manifest

    def remove_leftovers(self, manifest: Manifest | None) -> None:
        keep = manifest.files() if manifest is not None else set()
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            if entry.name not in keep and entry.is_file():
                entry.unlink(missing_ok=True)

    def open(self, name: str, key: str | None = None) -> Checkpoint:
        """One of the state's tensor files, read (and validated) like any checkpoint (``key``: a linked input's)."""
        return open_checkpoint(self.path / name, key)

    def new_file(self, generation: str, role: str) -> SafetensorsOutput:
        """A sink for one state file of a new generation, renamed to its name in :meth:`commit`."""
        self._make()
        return SafetensorsOutput(self.path / f"{generation}.{role}.safetensors", {STATE_KEY: generation}, None)

    def new_mean(self, generation: str, k: int, output: SafetensorsOutput | LikeInputOutput) -> MeanFile:
        """A sink for candidate k's running mean, a link to ``output`` where it holds the same bytes."""
        self._make()
        return MeanFile(self.path / f"{generation}.mean-{k}.safetensors", {STATE_KEY: generation}, output)

    def link_input(self, generation: str, checkpoint: Path, listing: tuple[int, int] | None) -> InputLink | None:
        """The newest checkpoint ``checkpoint`` (listed as ``listing`` when it was averaged) hard-linked into the
        state as ``<generation>.theta<suffix>``; None when it is not one weight file, the link cannot be made (no
        hard links, another file system) or the file is no longer the one listed."""
        files = checkpoint_files(checkpoint) if listing is not None else []
        if len(files) != 1 or not is_weight_file(files[0]):
            return None
        file = files[0]
        suffix = next(x for x in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES) if file.name.endswith(x))
        self._make()
        link = self.path / f"{generation}.theta{suffix}"
        try:
            os.link(file, link)
            st = link.stat()
        except OSError:
            link.unlink(missing_ok=True)
            return None
        if (st.st_size, st.st_mtime_ns) != listing:
            link.unlink(missing_ok=True)
            return None
        return InputLink(link)

    def commit(self, manifest: Manifest, state_files: Sequence[SafetensorsOutput | InputLink],
               outputs: Sequence[SafetensorsOutput | LikeInputOutput]) -> list[list[Path]]:
        """Make the new generation and its outputs current, in the order of the module docstring; returns the
        files each output wrote. The sinks must be written (not prepared); on failure they are left for the caller
        to abort."""
        self._make()
        for sink in [*state_files, *outputs]:
            sink.prepare()
        for sink in state_files:
            sink.publish_shards()  # their own new names: nothing refers to them yet
            if isinstance(sink, InputLink) or (isinstance(sink, MeanFile) and sink.linked):
                st = sink.path.stat()
                manifest.links[sink.path.name] = [st.st_size, st.st_mtime_ns]
        by_output = {c.output: k for k, c in enumerate(manifest.candidates)}
        for sink in outputs:  # renaming keeps a file's listing: what it is now is what it will be in place
            k = by_output[str((sink.folder if isinstance(sink, FolderOutput) else sink.path).absolute())]
            manifest.candidates[k] = replace(manifest.candidates[k], listing=list(sink.prepared_listing()))
        with signals_held():
            _write_file_atomically(self.path / MANIFEST, manifest.to_json().encode())  # the commit point
            for sink in outputs:
                sink.retire_previous()
                sink.publish_shards()
                sink.publish_index()
                sink.remove_stale()
            _fsync_folder(self.path)
            for folder in {s.path.parent for s in outputs}:
                _fsync_folder(folder)
        self.remove_leftovers(manifest)
        return [sink.written for sink in outputs]

    def _make(self) -> None:
        if not self.path.is_dir():
            self.path.mkdir()
            self._made = True

    def discard_if_made(self) -> None:
        """After a failed update: remove the folder if this process made it and nothing was committed to it."""
        if self._made and self.path.is_dir() and not (self.path / MANIFEST).exists():
            self.remove()
        self._made = False

    def remove(self) -> None:
        """Remove the state altogether (an average that keeps none, written over one that did)."""
        if self.path.is_dir():
            for entry in self.path.iterdir():
                entry.unlink(missing_ok=True)
            self.path.rmdir()


@dataclass
class InputLink:
    """The newest checkpoint's weight file, hard-linked into the state folder under its own name (a state file
    that needs no writing: see :meth:`StateFolder.link_input`)."""

    path: Path
    notes: list[str] = field(default_factory=list)
    published: bool = False

    def prepare(self) -> None:
        pass

    def publish_shards(self) -> None:
        self.published = True

    def abort(self) -> None:
        if not self.published:  # the update failed before its commit began
            self.path.unlink(missing_ok=True)


class MeanFile(SafetensorsOutput):
    """A candidate's running mean. When its output is one file holding exactly the mean's tensors and dtypes (every
    float tensor in the accumulator's dtype), nothing is written: the output's file, once flushed, is hard-linked
    (or, where links fail, copied) to the mean's name. Otherwise it is a file of its own."""

    def __init__(self, path: Path, metadata: dict[str, str], output: SafetensorsOutput | LikeInputOutput) -> None:
        super().__init__(path, metadata, None)
        self.output = output
        self._source: Path | None = None  # the output's temporary file, when the mean is it

    @property
    def linked(self) -> bool:
        return self._source is not None

    def open(self, shapes, dtypes, **kwargs) -> None:  # noqa: ANN001
        self._source = self.output.single_file_of(shapes, dtypes)
        if not self.linked:
            super().open(shapes, dtypes, **kwargs)

    def write(self, name: str, piece) -> None:  # noqa: ANN001
        if not self.linked:
            super().write(name, piece)

    def prepare(self) -> None:
        if not self.linked:
            super().prepare()

    def publish_shards(self) -> None:
        """Link (or copy) the output's prepared file to the mean's name; the output is renamed after this."""
        if not self.linked:
            return super().publish_shards()
        source = self._source
        assert source is not None and source.exists(), "the mean is published before its output"
        try:
            os.link(source, self.path)
            return
        except OSError:
            pass
        try:
            f, tmp = self._temporary(self.path)
            copy_on_disk(source, f, tmp)
            os.replace(tmp, self.path)
            self._temporaries.remove(tmp)
        except OSError as exc:
            raise CkptEmaError(f"cannot write the state: {exc.strerror or exc}", self.path) from None


def new_generation() -> str:
    """A fresh id for the state files of one update (never recorded in an output: outputs depend on their inputs
    and options alone)."""
    return uuid.uuid4().hex[:16]


def output_listing(weights: Path) -> list[int] | None:
    """(bytes, modification time, inode) of the file that holds the output ``weights``: the index of its shards,
    or the file itself; None when there is neither."""
    for path in (index_path_of(weights), weights):
        try:
            st = path.stat()
        except OSError:
            continue
        return [st.st_size, st.st_mtime_ns, st.st_ino]
    return None


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they are delivered on leaving), so that the renames of a commit are not
    split by Ctrl-C or a polite kill. Only the main thread can do this; elsewhere nothing is held."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (ValueError, OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _write_file_atomically(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        f = os.fdopen(fd, "wb")
        f.write(data)
        close_on_disk(f, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CkptEmaError(f"cannot write the state: {exc.strerror or exc}", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
