"""Follow a training run: fold each checkpoint into the averages as soon as the trainer has finished writing it.

Every ``poll`` seconds the inputs are listed again (files, globs, folders, as ``average`` reads them; trainers'
temporary names and hidden files are left out by :mod:`ckpt_ema.discover`). A checkpoint not folded yet is taken
when

* its listing (bytes, modification time) is the same as at the previous poll: the trainer has stopped writing it;
* its format says it is whole (:func:`checkpoint_is_complete`): a torch.save zip ends with the record that closes
  its central directory, a safetensors file ends where its furthest tensor does, a folder's or a sharded set's
  every weight file does. (An old-style pickle has no such end mark: it is taken on a steady listing alone, and
  the weights-only reader refuses one cut short.)

A complete checkpoint that comes after one still being written (in name order) waits for it, so that nothing is
folded out of order. Each update (:func:`ckpt_ema.pipeline.run`) rewrites the outputs atomically with
their state and is reported in one line. SIGINT or SIGTERM stops the watch once the update under way, if any, is
committed (a second one abandons it: the outputs stay as the last update left them); ``until_step`` stops it once a
checkpoint at that step or later is folded.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ckpt_ema.discover import expand_inputs
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.follow.state import StateFolder, listing_of
from ckpt_ema import pipeline
from ckpt_ema.pipeline import FullInputsNeeded, NothingYet, Outcome, Target
from ckpt_ema.formats.checkpoint import checkpoint_files
from ckpt_ema.formats.safetensors import safetensors_is_complete
from ckpt_ema.formats.torch_save import zip_is_complete

DEFAULT_POLL_SECONDS = 2.0
# How long a new checkpoint whole by its format must keep the same listing before it is read.
SETTLE_SECONDS = 0.5
# Looks at the inputs per poll when checkpoints vanish between the listing and the reading (a trainer keeping K).
RETRIES = 3


def checkpoint_is_complete(path: Path) -> bool:
    """Whether every weight file of the checkpoint at ``path`` (a file, a folder, a sharded set) is whole by its
    format (see the module docstring); an old-style pickle counts as whole (nothing in it says otherwise)."""
    try:
        files = checkpoint_files(path)
    except CkptEmaError:  # a folder whose weights or index are not there yet
        return False
    for file in files:
        try:
            with open(file, "rb") as f:
                magic = f.read(4)
        except OSError:
            return False
        if file.name.endswith(".safetensors"):
            if not safetensors_is_complete(file):
                return False
        elif magic.startswith(b"PK") and not zip_is_complete(file):
            return False
    return True


class Watcher:
    """The polling loop of ``--watch``: which checkpoints are ready, and the updates that fold them."""

    def __init__(self, inputs: Sequence[str | Path], targets: Sequence[Target], folder: StateFolder, *,
                 poll: float = DEFAULT_POLL_SECONDS, until_step: int | None = None,
                 on_update: Callable[[Outcome], None] = lambda u: None, on_note: Callable[[str], None] = lambda s: None,
                 progress: bool = False) -> None:
        self.inputs, self.targets, self.folder = list(inputs), list(targets), folder
        self.poll, self.until_step = poll, until_step
        self.on_update, self.on_note, self.progress = on_update, on_note, progress
        self.stop = threading.Event()
        self.last: Outcome | None = None
        self._seen: dict[Path, tuple[int, int]] = {}  # listing at the previous poll of what is not folded yet
        self._ours = {t.output.absolute() for t in targets if t.output is not None}
        self._noted: set[str] = set()  # the skipped-file lines said
        self._missed_paths: set[Path] = set()

    def run(self) -> Outcome | None:
        """Poll and update until stopped; returns the last update (None: nothing was ever folded)."""
        with _stop_on_signals(self.stop):
            while not self.stop.is_set():
                if self.step():
                    break
                self.stop.wait(self.poll)
        return self.last

    def step(self) -> bool:
        """One poll: fold what is ready. True once ``until_step`` is reached."""
        for _ in range(RETRIES):
            manifest = self.folder.load()
            folded = {} if manifest is None else {r.path: (r.size, r.mtime_ns) for r in manifest.inputs}
            present, ready = self._ready(folded)
            if not ready and (self.last is not None or not present):
                return False
            wanted = max((t.options.last or 0 for t in self.targets), default=0)
            if manifest is None and len(ready) < max(wanted, 1):
                return False  # a uniform mean of the newest K waits for K checkpoints
            # Only the new checkpoints are named (and the newest K a uniform mean reads again): a trainer keeping its
            # last K deletes old ones all the time, and an update naming a file deleted meanwhile must start again.
            # Should the update have to start over (other options than the state's), it is given the whole run.
            few = (present[-wanted:] if wanted else []) + ready or present[-1:]
            try:
                try:
                    done = pipeline.run(few, self.targets, self.folder, progress=self.progress, desc="updating",
                                        whole_run=False)
                except FullInputsNeeded:
                    done = pipeline.run(present + ready, self.targets, self.folder, progress=self.progress,
                                        desc="updating")
                break
            except NothingYet:
                return False  # every step so far is before update_after_step
            except CkptEmaError:
                gone = [p for p in present + ready if not p.exists()]
                if not gone:
                    raise
                for path in gone:  # deleted by the trainer meanwhile: look again
                    if path in ready:
                        self._missed(path, folded)
        else:
            return False
        for path in ready:
            self._seen.pop(path, None)
        self.last = done
        if done.action != "up to date":
            self.on_update(done)
        newest = done.plans[0].sources[-1].step
        return self.until_step is not None and newest is not None and newest >= self.until_step

    def _ready(self, folded: dict[str, tuple[int, int]]) -> tuple[list[Path], list[Path]]:
        """(checkpoints folded before and still listed unchanged; new ones whole and steady, in order, up to the
        first that is not). A new checkpoint whole by its format but not seen at the previous poll is confirmed by
        a second listing ``settle`` seconds later, so that a trainer's next save need not wait a whole poll."""
        try:
            paths, skipped = expand_inputs(self.inputs)
        except CkptEmaError:
            return [], []  # nothing to read yet (an empty folder)
        for line in skipped:
            if line not in self._noted:
                self._noted.add(line)
                self.on_note(f"skipped {line}")
        present: list[Path] = []
        ready: list[Path] = []
        unconfirmed: list[tuple[Path, tuple[int, int]]] = []
        for path in paths:
            if path.absolute() in self._ours:
                continue
            try:
                listing = listing_of(path)
            except (OSError, CkptEmaError):
                if path.exists():
                    break  # a folder still being filled: newer ones wait behind it
                self._missed(path, folded)
                continue
            if folded.get(str(path.absolute())) == listing:
                present.append(path)
                continue
            if not checkpoint_is_complete(path):
                self._seen[path] = listing
                break  # newer ones wait behind it
            if self._seen.get(path) == listing and not unconfirmed:
                ready.append(path)
            else:
                unconfirmed.append((path, listing))
            self._seen[path] = listing
        if unconfirmed:
            self.stop.wait(min(self.poll, SETTLE_SECONDS))
            for path, listing in unconfirmed:
                try:
                    if listing_of(path) != listing:
                        break
                except (OSError, CkptEmaError):
                    if path.exists():
                        break
                    self._missed(path, folded)  # whole but deleted while settling: the next ones can go on
                    continue
                ready.append(path)
        return present, ready

    def _missed(self, path: Path, folded: dict[str, tuple[int, int]]) -> None:
        """Say (once) that a checkpoint the trainer deleted before it could be read is not in the averages."""
        self._seen.pop(path, None)
        if str(path.absolute()) in folded or path in self._missed_paths:
            return
        self._missed_paths.add(path)
        self.on_note(f"{path} was deleted before it could be read: its interval is interpolated from its neighbours")


def watch(inputs: Sequence[str | Path], targets: Sequence[Target], folder: StateFolder, **kwargs: object
          ) -> Outcome | None:
    """Follow the run until SIGINT/SIGTERM or ``until_step`` (see :class:`Watcher`); returns the last update."""
    return Watcher(inputs, targets, folder, **kwargs).run()  # type: ignore[arg-type]


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """The first SIGINT or SIGTERM sets ``stop`` (the update under way finishes and commits); a second raises
    KeyboardInterrupt (the update under way is abandoned, its temporary files removed)."""
    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
