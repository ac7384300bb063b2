"""Turn the user's inputs (files, globs, folders) into the run's checkpoints, each with its training step.

Folders are scanned (not recursively) for weight files, Hugging Face ``checkpoint-N/`` folders, PyTorch Distributed
Checkpoint folders and DeepSpeed checkpoints (``global_stepN/``; a DeepSpeed run's ``latest`` file must name one
that is there, else its newest checkpoint is lost and the run is refused). What trainers
write beside their periodic checkpoints is left out, and every file left out for a reason that is not obvious is
reported in :attr:`Discovery.skipped`:

* second names of one checkpoint: the same file reached twice (a symlink, a hard link such as timm's
  ``milestone-N``, overlapping globs) and byte-identical copies; the name kept is the periodic one, the name that
  most inputs share once their numbers are left out (``step_30.pt`` over a ``best.pt`` link to it);
* aliases (timm's ``last.pth.tar``/``model_best.pth.tar``, Lightning's ``last.ckpt``, ``best.*``, ``latest.*``)
  of a periodic checkpoint: the same bytes or the same step. An alias newer than every periodic checkpoint
  (Lightning's ``last.ckpt`` saved at the end of training) is no alias: it is kept, at its own step, with a note;
* timm's ``recovery-E-B.pth.tar`` snapshots, taken inside epoch E (between ``checkpoint-(E-1)`` and
  ``checkpoint-E``) at a step no name or metadata gives, and the partial files of a killed save (``tmp.pth.tar``);
* training state that is not weights (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin``);
* checkpoints a format leaves out of a run's folder (:attr:`~ckpt_ema.formats.base.Format.left_out`: NeMo 2's
  ``-last`` copy of the newest checkpoint).

Which files and folders are checkpoints, and where each records its step (its metadata:
:data:`ckpt_ema.formats.base.STEP_KEYS`, or Hugging Face's ``trainer_state.json``), the formats say
(:mod:`ckpt_ema.formats.registry`); a checkpoint that records none takes the last number in its file or folder
name.
"""

from __future__ import annotations

import filecmp
import glob
import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import OWN_OUTPUT_KEY, Checkpoint, tokens_from_metadata
from ckpt_ema.formats.registry import (check_run_folder, checkpoint_files, format_of, is_weight_file, probe, step_of,
                                       strip_weight_suffix, weight_suffixes)

# Copies of a periodic checkpoint under a fixed name (Lightning adds -vN when the name is taken).
ALIAS_PATTERN = re.compile(r"^(last|latest|model_best|best)(-v\d+)?\.(pth\.tar|ckpt|pt|pth|safetensors)$")
# timm's CheckpointSaver: recovery-<epoch>-<batch>.pth.tar inside an epoch; tmp files of a save that never finished.
RECOVERY_PATTERN = re.compile(r"^recovery-(\d+)-(\d+)\.pth\.tar$")
TIMM_PARTIAL_PATTERN = re.compile(r"^(tmp|recovery_tmp)\.pth\.tar$")

# Files that a Hugging Face Trainer (and others) save next to the weights; they are training state, not weights.
NOT_WEIGHTS_PATTERN = re.compile(
    r"^(optimizer|scheduler|scaler|rng_state(_\d+)?|training_args|trainer_state|lr_scheduler)\.(pt|pth|bin|json)$"
)
# The metadata key every output of ckpt-ema carries.
# What trainers write under a temporary name and rename once complete (Hugging Face's tmp-checkpoint-N folders,
# *.tmp, *.partial), and hidden files: never a checkpoint, and maybe half written. (timm's tmp.pth.tar: below.)
TEMPORARY_PATTERN = re.compile(r"^(\.|tmp-)|\.(tmp|partial)$")
SHARD_PATTERN = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")


@dataclass
class Source:
    """One checkpoint of the run: a weight file or a Hugging Face folder, where its step came from, and the tokens
    trained on up to it where it records them."""

    path: Path
    step: int
    step_from: str  # "metadata:<key>", "trainer_state.json", "name", or "order" (one update per checkpoint)
    nbytes: int
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    # The checkpoint opened (mapped) while probing its metadata, for the engine to read: see registry.probe.
    opened: Checkpoint | None = field(default=None, repr=False, compare=False)
    tokens: int | None = None  # its metadata's count (ckpt_ema.formats.base.TOKEN_KEYS); None: it records none


@dataclass
class Candidate:
    """A checkpoint while :func:`discover` sorts the run out, before every step is settled: ``step`` is None where
    neither its metadata nor its name gives one (or the name's number is no step: an alias's ``-v1``, a timm
    recovery snapshot's), until discovery counts one update per checkpoint. The fields are :class:`Source`'s."""

    path: Path
    step: int | None
    step_from: str
    nbytes: int
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    opened: Checkpoint | None = field(default=None, repr=False, compare=False)
    tokens: int | None = None

    @classmethod
    def of(cls, source: Source) -> Candidate:
        """A source recognised from an earlier run, its recorded step and tokens standing."""
        return cls(source.path, source.step, source.step_from, source.nbytes, source.metadata, source.opened,
                   source.tokens)

    def known_step(self) -> int:
        """The step, where discovery has established that there is one (a None here is a bug in discovery)."""
        if self.step is None:
            raise AssertionError(f"{self.path}: no step, where discovery has given every checkpoint one")
        return self.step

    def settled(self, step: int, step_from: str) -> Source:
        """The source, at its final step."""
        return Source(self.path, step, step_from, self.nbytes, self.metadata, self.opened, self.tokens)


@dataclass
class Discovery:
    sources: list[Source]
    skipped: list[str]  # "<path>: <why>", one per file left out
    notes: list[str]  # things the user should know, e.g. that steps are unknown


def natural_key(text: str) -> list[Any]:
    """Sort key under which ``ckpt_2`` comes before ``ckpt_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def step_from_name(path: Path) -> int | None:
    """The last number in a file or folder name (``epoch=3-step=400.ckpt`` -> 400), ignoring its suffixes."""
    numbers = re.findall(r"\d+", strip_weight_suffix(path.name))
    return int(numbers[-1]) if numbers else None


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is to be scanned for checkpoints rather than read as one: it is no checkpoint itself
    (:func:`ckpt_ema.formats.registry.format_of`), or one that also holds the run (a Trainer's output, its final
    model beside the checkpoint-N/ folders: :attr:`~ckpt_ema.formats.base.Format.holds_run`)."""
    fmt = format_of(folder)
    return fmt is None or fmt.holds_run(folder)


def _expand(inputs: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand globs and scan folders; returns candidate checkpoints and what was skipped."""
    found: list[Path] = []
    skipped: list[str] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text).expanduser()
        if path.exists():
            matches = [path]
        elif glob.has_magic(text):
            matches = sorted((Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)
                              if not TEMPORARY_PATTERN.search(Path(m).name)), key=lambda p: natural_key(str(p)))
            if not matches:
                raise CkptEmaError("no checkpoint matches this pattern", text)
        else:
            raise CkptEmaError("no such file or folder", text)
        for match in matches:
            if match.is_dir() and is_run_folder(match):
                found_here, skipped_here = _scan_folder(match)
                found += found_here
                skipped += skipped_here
            elif match.is_dir() or is_weight_file(match):
                if NOT_WEIGHTS_PATTERN.match(match.name):
                    skipped.append(f"{match}: training state, not weights")
                elif TIMM_PARTIAL_PATTERN.match(match.name):
                    skipped.append(f"{match}: {PARTIAL_SAVE}")
                else:
                    found.append(match)
            elif not glob.has_magic(text):
                raise CkptEmaError(
                    f"not a checkpoint file (expected {', '.join(weight_suffixes())} or a folder)", match)
    return found, skipped


PARTIAL_SAVE = "the partial file of a timm save that never finished, not a checkpoint"


def _scan_folder(folder: Path) -> tuple[list[Path], list[str]]:
    found: list[Path] = []
    skipped: list[str] = []
    check_run_folder(folder)
    own = format_of(folder)  # the run's own final model, when the run's folder holds one (see is_run_folder)
    final = set(own.files(folder)) if own is not None else set()
    for entry in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if TEMPORARY_PATTERN.search(entry.name):
            if not entry.name.startswith("."):
                skipped.append(f"{entry}: a trainer's temporary name, maybe still being written")
            continue
        if entry.is_dir():
            fmt = format_of(entry)
            why = fmt.left_out(entry) if fmt is not None else None
            if why is not None:
                skipped.append(f"{entry}: {why}")
            elif fmt is not None and fmt.in_run(entry):
                found.append(entry)
        elif is_weight_file(entry):
            if NOT_WEIGHTS_PATTERN.match(entry.name):
                skipped.append(f"{entry}: training state, not weights")
            elif TIMM_PARTIAL_PATTERN.match(entry.name):
                skipped.append(f"{entry}: {PARTIAL_SAVE}")
            elif entry in final:
                skipped.append(f"{entry}: the final model saved beside the run's checkpoint folders, not averaged "
                               "again")
            elif SHARD_PATTERN.search(entry.name):
                skipped.append(f"{entry}: one shard of a sharded set; pass the folder that holds its index json")
            else:
                found.append(entry)
    if not found:
        raise CkptEmaError("no checkpoint found in this folder", folder)
    return found, skipped


def family(path: Path) -> str:
    """A name with its numbers left out: ``step_#.pt``. Periodic checkpoints share one family."""
    return re.sub(r"\d+", "#", path.name)


def preferred(paths: list[Path], families: dict[str, int]) -> Path:
    """Of several names of one checkpoint, the periodic one: not an alias's name, then the family most inputs
    belong to (timm's ``checkpoint-4`` over ``milestone-5``, ``step_30.pt`` over a ``best.pt`` link), then the
    first given."""
    return min(paths, key=lambda p: (bool(ALIAS_PATTERN.match(p.name)), -families[family(p)], paths.index(p)))


def _drop_second_names(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """One name per file: a path given twice, a symlink and a hard link count once, under the periodic name."""
    groups: dict[object, list[Path]] = {}
    skipped: list[str] = []
    for path in paths:
        names = groups.setdefault(_identity(path), [])
        if path in names:
            skipped.append(f"{path}: given twice, counted once")
        else:
            names.append(path)
    families = Counter(map(family, paths)) if any(len(names) > 1 for names in groups.values()) else Counter()
    kept = []
    for names in groups.values():
        keep = preferred(names, families) if len(names) > 1 else names[0]
        kept.append(keep)
        skipped += [f"{p}: the same file as {keep}" for p in names if p != keep]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(kept, key=order.__getitem__), skipped


# Bytes read from each end of a file to tell copies apart before comparing them whole.
FINGERPRINT_BYTES = 1 << 16


def fingerprint(path: Path) -> tuple:
    """Size and the bytes at both ends of every file of a checkpoint: equal for copies, and different for two
    different checkpoints unless they differ only in the middle (then a whole comparison tells)."""
    parts: list[object] = []
    for file in checkpoint_files(path):
        try:
            size = file.stat().st_size
            with open(file, "rb") as f:
                head = f.read(FINGERPRINT_BYTES)
                f.seek(max(size - FINGERPRINT_BYTES, len(head)))
                parts += [size, hashlib.sha1(head + f.read()).digest()]
        except OSError:
            parts.append(file)  # unreadable: reading it later says why
    return tuple(parts)


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two checkpoints (files or folders) are byte for byte the same."""
    files_a, files_b = checkpoint_files(a), checkpoint_files(b)
    try:
        return len(files_a) == len(files_b) and all(filecmp.cmp(fa, fb, shallow=False)
                                                    for fa, fb in zip(files_a, files_b))
    except OSError:
        return False


def _drop_copies(sources: list[Candidate], skipped: list[str]) -> list[Candidate]:
    """One checkpoint per content: of byte-identical copies that are second names (:func:`_second_name`: timm's
    aliases where hard links fail, ``latest.pt``, a milestone copy), keep the periodic name; the others are named
    in ``skipped``."""
    by_size: dict[int, list[Candidate]] = {}
    for s in sources:
        by_size.setdefault(s.nbytes, []).append(s)
    groups: dict[tuple, list[Candidate]] = {}
    for same_size in by_size.values():
        if len(same_size) > 1 and _may_hold_second_names(same_size):  # else no file is opened (an append's old ones)
            for s in same_size:
                groups.setdefault(fingerprint(s.path), []).append(s)
    dropped: list[Candidate] = []
    families = Counter(family(s.path) for s in sources) if groups else Counter()
    for group in groups.values():
        while len(group) > 1:
            keep = next(s for s in group if s.path == preferred([t.path for t in group], families))
            copies = [s for s in group if s is not keep and _second_name(s, keep) and same_bytes(s.path, keep.path)]
            for copy in copies:
                skipped.append(f"{copy.path}: an alias of {keep.path} (the same bytes), not averaged a second time"
                               if ALIAS_PATTERN.match(copy.path.name) else
                               f"{copy.path}: the same bytes as {keep.path}, counted once")
            dropped += copies
            group = [s for s in group if s is not keep and s not in copies]
    gone = {id(s) for s in dropped}
    return [s for s in sources if id(s) not in gone]


def _may_hold_second_names(group: list[Candidate]) -> bool:
    """Whether any checkpoint of ``group`` could be a second name of another (:func:`_second_name`): not when they
    are periodic checkpoints of one family at distinct known steps, the usual run, whose bytes are then not read."""
    steps = [s.step for s in group]
    return (None in steps or len(set(steps)) < len(steps) or len({family(s.path) for s in group}) > 1
            or any(ALIAS_PATTERN.match(s.path.name) for s in group))


def _second_name(copy: Candidate, keep: Candidate) -> bool:
    """Whether a byte-identical ``copy`` is a second name of ``keep``, not the same weights saved again later: an
    alias's name, another name family (timm's ``milestone-5`` beside ``checkpoint-4``), or the same step. Two
    periodic checkpoints of one family at different steps stay two (weights that did not change are still two
    samples of the run)."""
    return (bool(ALIAS_PATTERN.match(copy.path.name)) or family(copy.path) != family(keep.path)
            or copy.step is None or keep.step is None or copy.step == keep.step)


def _resolve_trainer_files(sources: list[Candidate], skipped: list[str],
                           notes: list[str]) -> tuple[list[Candidate], list[str], list[str]]:
    """Recovery snapshots, copies and aliases among ``sources`` (steps known from metadata and names): see the
    module docstring."""
    recovery = [s for s in sources if RECOVERY_PATTERN.match(s.path.name)]
    if recovery and len(recovery) < len(sources):
        for s in recovery:
            epoch = int(RECOVERY_PATTERN.match(s.path.name)[1])  # type: ignore[index]
            skipped.append(f"{s.path}: a timm recovery snapshot, taken inside epoch {epoch} (after checkpoint-"
                           f"{epoch - 1}) at a step no name or metadata gives: not averaged (pass recovery files "
                           "alone to average them, in their order)")
        sources = [s for s in sources if not RECOVERY_PATTERN.match(s.path.name)]
    elif recovery:
        for s in recovery:  # recovery files alone: one update each, in (epoch, batch) order
            s.step, s.step_from = None, "name"
    sources = _drop_copies(sources, skipped)

    periodic = [s for s in sources if not ALIAS_PATTERN.match(s.path.name)]
    if not periodic:
        return sources, skipped, notes  # only aliases given: they are what the user wants averaged
    newest = max((s.step for s in periodic if s.step is not None), default=None)
    kept = list(periodic)
    for alias in (s for s in sources if ALIAS_PATTERN.match(s.path.name)):
        same_step = next((p for p in periodic if alias.step is not None and p.step == alias.step), None)
        if same_step is not None:
            skipped.append(f"{alias.path}: an alias of {same_step.path} (the same step {alias.step}), not averaged a "
                           "second time")
        elif alias.step is not None and newest is not None and alias.step > newest:
            kept.append(alias)
            notes.append(f"{alias.path} is newer than every periodic checkpoint (step {alias.step}, the newest "
                         f"periodic one {newest}): averaged as its own step")
        elif alias.step is not None:
            kept.append(alias)
            notes.append(f"{alias.path} has a step no periodic checkpoint has ({alias.step}): averaged at that step")
        else:
            skipped.append(f"{alias.path}: an alias of a periodic checkpoint without a step of its own, not "
                           "averaged a second time")
    order = {id(s): i for i, s in enumerate(sources)}  # (by identity: comparing Candidates field by field is slow)
    return sorted(kept, key=lambda s: order[id(s)]), skipped, notes


def _identity(path: Path) -> object:
    """The file itself, whatever its name: symlinks and hard links (timm's milestone-N and last copies) count once."""
    try:
        st = path.stat()
    except OSError as exc:  # a dangling link, a symlink loop
        raise CkptEmaError(f"cannot read: {exc.strerror or exc}", path) from None
    return st.st_dev, st.st_ino


def _file_size(path: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(path) if f.is_file())


def expand_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[str]]:
    """The checkpoint files and folders that ``inputs`` name, second names of one file left out; and what was."""
    if not inputs:
        raise CkptEmaError("no checkpoints given")
    paths, skipped = _expand(list(inputs))
    paths, more_skipped = _drop_second_names(paths)
    if not paths:
        raise CkptEmaError(f"no checkpoint found in {', '.join(str(i) for i in inputs)}")
    return paths, skipped + more_skipped


def _drop_own_outputs(sources: list[Candidate], skipped: list[str]) -> tuple[list[Candidate], list[str]]:
    """Leave out earlier outputs of ckpt-ema (an average saved in the run folder) when training checkpoints remain."""
    training = [s for s in sources if OWN_OUTPUT_KEY not in s.metadata]
    if not training or len(training) == len(sources):
        return sources, skipped
    skipped = skipped + [f"{s.path}: an output of ckpt-ema, not a training checkpoint" for s in sources if s not in training]
    return training, skipped


def discover(inputs: list[str | Path], key: str | None = None, per_checkpoint: bool = False,
             known: Callable[[Path], Source | None] | None = None) -> Discovery:
    """Resolve ``inputs`` to the run's checkpoints, in training order, reading only their metadata.

    Order is by step; steps that repeat across different checkpoints are an error. When some checkpoint has no
    step (none in its metadata or its name), or ``per_checkpoint`` is set, every checkpoint counts as one update
    (steps 1, 2, ...) in natural name order.

    ``known(path)``, if given, returns the source of a checkpoint recognised from its listing alone (one an earlier
    run recorded, see :mod:`ckpt_ema.follow`), which is then not opened; its recorded step stands, and when steps
    are counted per checkpoint the others are numbered after the newest of them.
    """
    paths, skipped = expand_inputs(inputs)

    sources: list[Candidate] = []
    for path in paths:
        recorded = known(path) if known is not None else None
        if recorded is not None:
            sources.append(Candidate.of(recorded))
            continue
        meta, opened = probe(path, key)
        found = step_of(path, meta)
        if found is not None:
            step, step_from = found
        elif ALIAS_PATTERN.match(path.name):
            step, step_from = None, "name"  # last-v1.ckpt: the 1 is no step
        else:
            step, step_from = step_from_name(path), "name"
        nbytes = opened.nbytes if opened is not None and opened.nbytes is not None else _file_size(path)
        sources.append(Candidate(path=path, step=step, step_from=step_from, nbytes=nbytes, metadata=meta,
                                 opened=opened, tokens=tokens_from_metadata(meta)))
    sources, skipped = _drop_own_outputs(sources, skipped)
    # Where the weights were taken from, when the format left a choice: said once per distinct answer.
    notes = [f"weights: {text}" for text in dict.fromkeys(
        s.opened.weights_from for s in sources if s.opened is not None and s.opened.weights_from)]
    sources, skipped, notes = _resolve_trainer_files(sources, skipped, notes)

    unknown = [s for s in sources if s.step is None]
    counted = [s for s in sources if s.step_from == "order"]  # recognised, from a run that counted checkpoints
    if per_checkpoint or unknown or counted:
        if unknown and not per_checkpoint:
            notes.append(
                f"no training step in the metadata or name of {unknown[0].path}"
                + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
                + ": counting one update per checkpoint, in name order"
            )
        sources.sort(key=lambda s: natural_key(str(s.path)))
        step = max((s.known_step() for s in counted), default=0)
        per_update: list[Source] = []
        for source in sources:
            if source.step_from == "order":
                per_update.append(source.settled(source.known_step(), "order"))
            else:
                step += 1
                per_update.append(source.settled(step, "order"))
        if counted:
            per_update.sort(key=lambda s: s.step)
        return Discovery(per_update, skipped, notes)

    by_step = sorted((s.settled(s.known_step(), s.step_from) for s in sources),
                     key=lambda s: (s.step, natural_key(str(s.path))))
    for before, after in zip(by_step, by_step[1:]):
        if before.step == after.step:
            raise CkptEmaError(f"two different checkpoints have step {after.step}: {before.path} and {after.path} (if "
                               "one is a copy of the other, leave it out; --per-checkpoint ignores steps)", after.path)
    return Discovery(by_step, skipped, notes)
