"""Follow a training run: fold each checkpoint into the averages as soon as the trainer has finished writing it.

Every ``poll`` seconds (counted from the start of the previous look, so that an update does not stretch the cycle)
the inputs are listed again (files, globs, folders, as ``average`` reads them; trainers' temporary names and hidden
files are left out by :mod:`ckpt_ema.discover`). A checkpoint not folded yet is taken when its format says the
writer is done with it (:func:`ckpt_ema.formats.registry.is_complete`: a torch.save zip ends with the record that
closes its central directory, a safetensors file reaches the end of its furthest tensor, a sharded set's or a
folder's every weight file does, a DCP folder has its ``.metadata``, DeepSpeed's ``latest`` names the tag or came
after it) and

* its newest modification time is already :data:`SETTLE_SECONDS` old: taken at once (a trainer keeping its last K
  may delete it soon, and nothing has written to it for a while); or else
* its listing (bytes, modification time) is the same at a second look, made in the same poll once it is
  :data:`SETTLE_SECONDS` old (or ``poll`` seconds later, if sooner).

(An old-style pickle has no end mark: it is taken on its age or a steady listing alone, and the weights-only reader
refuses one cut short.) A checkpoint that comes after one still being written or settling (in name order) waits
for it, so that nothing is folded out of order. Each update (:func:`ckpt_ema.pipeline.run`) rewrites the
outputs atomically with their state and is reported in one line; a checkpoint deleted between the listing and the
update's reading is named and the update made again at once without it.

Nothing is lost silently: a checkpoint listed but deleted before it could be read is named, and so is one never
listed at all that the run's steps say existed (:func:`unseen_steps`: steps 10, 30, 40 folded, 10 apart as most of
the run's are, so step 20 was saved and deleted between two looks). Until the run's first checkpoint is listed the
inputs are looked at every :data:`FIRST_POLL_SECONDS`, so that the first one is seen even behind a fast trainer
(what comes before the first checkpoint seen, no spacing can tell). An incomplete checkpoint that stops changing
for :data:`STALLED_SECONDS` is named too (newer ones wait behind it).

An input path that does not exist is an error at once (:func:`check_inputs`): a typo would otherwise be watched
forever. A glob that matches nothing yet, or a folder without a checkpoint yet, is waited for: a run that has not
saved its first checkpoint looks just like that.

SIGINT or SIGTERM stops the watch once the update under way, if any, is committed (a second one abandons it: the
outputs stay as the last update left them); ``until_step`` stops it once a checkpoint at that step or later is
folded.
"""

from __future__ import annotations

import glob
import itertools
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ckpt_ema.discover import Source, expand_inputs, step_from_name
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.follow.state import StateFolder, listing_of
from ckpt_ema import pipeline
from ckpt_ema.formats.registry import is_complete
from ckpt_ema.pipeline import FullInputsNeeded, NothingYet, Outcome, Target

DEFAULT_POLL_SECONDS = 2.0
# How often the inputs are looked at until a first checkpoint is listed (an empty folder lists at no cost).
FIRST_POLL_SECONDS = 0.1
# How long nothing must have written to a new complete checkpoint before it is read.
SETTLE_SECONDS = 0.5
# How long an incomplete checkpoint may stay unchanged before it is named (it may be truncated for good).
STALLED_SECONDS = 60.0
# Tries of an update when checkpoints vanish between the listing and the reading (a trainer keeping K).
RETRIES = 3
# Missing steps listed one by one in a line up to this many; more are given as a range.
MISSING_LISTED = 5


def check_inputs(inputs: Sequence[str | Path]) -> None:
    """Refuse an input that is neither an existing path nor a glob pattern (see the module docstring)."""
    for raw in inputs:
        text = str(raw)
        if not glob.has_magic(text) and not Path(text).expanduser().exists():
            raise CkptEmaError("no such file or folder", text)


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
        self._noted: set[str] = set()  # the lines said once (skipped files, stalled checkpoints, waiting reasons)
        self._missed_paths: set[Path] = set()
        self._missed_steps: set[int] = set()  # steps named as missed, from a missed path's name or the run's spacing
        self._listed_any = False  # whether a look has listed a checkpoint (the first polls are faster until then)

    def run(self) -> Outcome | None:
        """Poll and update until stopped; returns the last update (None: nothing was ever folded)."""
        check_inputs(self.inputs)
        with _stop_on_signals(self.stop):
            while not self.stop.is_set():
                started = time.monotonic()
                if self.step():
                    break
                poll = self.poll if self._listed_any else min(self.poll, FIRST_POLL_SECONDS)
                self.stop.wait(max(0.0, poll - (time.monotonic() - started)))
        return self.last

    def step(self) -> bool:
        """One poll: fold what is ready; when a complete checkpoint was written too recently to take, look again once
        it has settled (or after ``poll``, if sooner). True once ``until_step`` is reached."""
        reached, settle_at = self._look()
        if settle_at is not None and not reached and not self.stop.is_set():
            self.stop.wait(min(self.poll, max(0.0, (settle_at - time.time_ns()) / 1e9)))
            reached, _ = self._look()
        return reached

    def _look(self) -> tuple[bool, int | None]:
        """List the inputs and fold what is ready (:meth:`_fold`); returns whether ``until_step`` is reached, and
        when the first checkpoint too young to take will have settled (None: there is none)."""
        manifest = self.folder.load()
        folded = {} if manifest is None else {r.path: (r.size, r.mtime_ns) for r in manifest.inputs}
        present, ready, settle_at = self._ready(folded)
        return self._fold(manifest is None, folded, present, ready), settle_at

    def _fold(self, first: bool, folded: dict[str, tuple[int, int]], present: list[Path], ready: list[Path]) -> bool:
        """One update folding ``ready`` (``first``: no state yet); a checkpoint the trainer deletes before the
        update has opened it is named and left out, and the update tried again at once without it. True once
        ``until_step`` is reached."""
        for _ in range(RETRIES):
            if not ready and (self.last is not None or not present):
                return False
            wanted = max((t.options.last or 0 for t in self.targets), default=0)
            if first and len(ready) < max(wanted, 1):
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
                for path in gone:  # deleted by the trainer meanwhile
                    if path in ready:
                        self._missed(path, folded)
                present = [p for p in present if p not in gone]
                ready = [p for p in ready if p not in gone]
        else:
            return False
        for path in ready:
            self._seen.pop(path, None)
        self.last = done
        self._name_unseen(done.plans[0].sources)
        if done.action != "up to date":
            self.on_update(done)
        newest = done.plans[0].sources[-1].step
        return self.until_step is not None and newest >= self.until_step

    def _ready(self, folded: dict[str, tuple[int, int]]) -> tuple[list[Path], list[Path], int | None]:
        """(checkpoints folded before and still listed unchanged; new ones ready to fold, in order, up to the first
        that is not; when the complete ones written less than ``SETTLE_SECONDS`` ago will have settled, None if
        none was). A new checkpoint is ready once complete and either that old or listed the same at the previous
        look. A checkpoint listed before, never folded and gone now is named (:meth:`_missed`)."""
        now = time.time_ns()
        try:
            paths, skipped = expand_inputs(self.inputs)
        except CkptEmaError as exc:  # nothing to read yet (an empty folder, a glob matching nothing)
            self._say_once(f"waiting: {exc}")
            paths, skipped = [], []
        for line in skipped:
            self._say_once(f"skipped {line}")
        present: list[Path] = []
        ready: list[Path] = []
        settle_at = None
        for path in paths:
            if path.absolute() in self._ours:
                continue
            self._listed_any = True
            try:
                listing = listing_of(path)
            except (OSError, CkptEmaError):
                if path.exists():
                    break  # a folder still being filled: newer ones wait behind it
                continue  # deleted since it was listed: named below
            if folded.get(str(path.absolute())) == listing:
                present.append(path)
                continue
            settled = now - listing[1] >= SETTLE_SECONDS * 1e9 or self._seen.get(path) == listing
            self._seen[path] = listing
            if not is_complete(path):
                self._stalled(path, listing, now)
                break  # newer ones wait behind it
            if settled and settle_at is None:
                ready.append(path)
            elif not settled:  # it, and the newer ones behind it, are taken at the next look
                settle_at = max(settle_at or 0, listing[1] + int(SETTLE_SECONDS * 1e9))
        for path in [p for p in self._seen if not p.exists()]:
            self._missed(path, folded)
        return present, ready, settle_at

    def _missed(self, path: Path, folded: dict[str, tuple[int, int]]) -> None:
        """Say (once) that a checkpoint the trainer deleted before it could be read is not in the averages."""
        self._seen.pop(path, None)
        if str(path.absolute()) in folded or path in self._missed_paths:
            return
        self._missed_paths.add(path)
        step = step_from_name(path)
        if step is not None:
            self._missed_steps.add(step)
        self.on_note(f"{path} was deleted before it could be read: its interval is interpolated from its neighbours")

    def _name_unseen(self, sources: Sequence[Source]) -> None:
        """Say (one line per gap) which steps the run's spacing says were saved but never listed here, deleted by
        the trainer between two looks (:func:`unseen_steps`). The steps known to the run are those folded and
        those named as missed already (a checkpoint listed, then deleted before it was read)."""
        if any(s.step_from == "order" for s in sources):
            return  # steps counted per checkpoint: a gap says nothing
        steps = sorted({s.step for s in sources} | self._missed_steps)
        spacing = run_spacing(steps)
        if spacing is None:
            return
        for before, after in unseen_steps(steps, spacing):
            missing = list(range(before + spacing, after, spacing))
            self._missed_steps.update(missing)
            they = "it" if len(missing) == 1 else "they"
            which = (f"step {missing[0]} was" if len(missing) == 1 else
                     f"steps {', '.join(map(str, missing))} were" if len(missing) <= MISSING_LISTED else
                     f"steps {missing[0]}..{missing[-1]} ({len(missing)} checkpoints) were")
            self.on_note(f"{which} never seen: deleted before {they} could be read (the run saves every {spacing} "
                         f"steps, and steps {before} and {after} were seen): interpolated from the neighbours")

    def _stalled(self, path: Path, listing: tuple[int, int], now: int) -> None:
        """Say (once) that an incomplete checkpoint has not changed for :data:`STALLED_SECONDS`."""
        idle = (now - listing[1]) / 1e9
        if idle >= STALLED_SECONDS:
            self._say_once(f"{path} has not changed for {idle:.0f} s but is not complete (truncated?): newer "
                           "checkpoints wait behind it")

    def _say_once(self, line: str) -> None:
        if line not in self._noted:
            self._noted.add(line)
            self.on_note(line)


def run_spacing(steps: Sequence[int]) -> int | None:
    """The steps between a run's checkpoints, from its folded ``steps``: the most common distance between
    consecutive ones (the smallest of equally common ones), when at least half of the distances are that one;
    None for a run saving at growing intervals (1, 2, 4, 8, ...), which says nothing about what lies between."""
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    if not gaps:
        return None
    counts = Counter(gaps)
    spacing = min(counts, key=lambda d: (-counts[d], d))
    return spacing if 2 * counts[spacing] >= len(gaps) else None


def unseen_steps(steps: Sequence[int], spacing: int) -> list[tuple[int, int]]:
    """The gaps in a run's folded ``steps`` where checkpoints were saved but never seen: (step before, step after)
    wherever two consecutive steps lie a whole multiple (2 or more) of the run's ``spacing`` apart."""
    return [(a, b) for a, b in itertools.pairwise(steps) if b - a > spacing and (b - a) % spacing == 0]


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
