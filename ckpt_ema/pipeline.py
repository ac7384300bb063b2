"""The one path of every average: find the checkpoints, choose the weights, fold, commit.

Every average goes through :func:`run`: to a file, a model folder or memory; a sweep's candidates; an append to a
kept state; each update of ``--watch``; each rank under torchrun. It takes the inputs and the :class:`Target`
averages, and a :class:`~ckpt_ema.follow.state.StateFolder` when what the averages need to go on later is kept
beside their outputs. With a state, it compares the run's listing with the state's manifest and does one of:

* **append**: every checkpoint folded before is unchanged in the listing (same bytes, same modification time) or
  gone, and the new ones come after the newest folded. Only the new ones are opened and read; each EMA continues
  its saved running mean (:func:`ckpt_ema.weighting.ema_continuation`), which gives the full rerun's result to
  float rounding (bit for bit with ``step``). A uniform mean of the newest K keeps no running mean: it is
  recomputed from the K newest checkpoints, which must still be there (a cost of K, not of the run's length).
* **up to date**: nothing new and every output is the one the state committed: nothing is written.
* **from the start**: no state, or one that cannot go on: other options, a checkpoint that changed since it was
  folded, a new one before the newest folded. Said in one line; when a checkpoint folded before is gone, a full
  rerun cannot give the same result, and that is a one-line error instead.

With nothing new, outputs that are not the ones the state committed (deleted, replaced, a kill between the state's
commit and an output's rename) or were asked in another dtype or sharding are rewritten from the state: an append
of nothing. Without a state every run is from the start. The weights are chosen by
:func:`ckpt_ema.planning.candidate_fold`, the fold run by :func:`ckpt_ema.engine.runner.run_job`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckpt_ema.discover import Discovery, Source, discover, natural_key
from ckpt_ema.engine import distributed
from ckpt_ema.engine.distributed import World
from ckpt_ema.engine.runner import Job, Tee, check_device, commit_on_ranks, run_job
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.follow.state import (
    CandidateRecord,
    InputLink,
    Manifest,
    Recorded,
    StateFolder,
    listing_of,
    new_generation,
    output_listing,
)
from ckpt_ema.formats.base import Checkpoint
from ckpt_ema.options import AverageOptions
from ckpt_ema.output.atomic import check_not_an_input, output_files
from ckpt_ema.output.folder import ADAPTER_WEIGHTS, MODEL_WEIGHTS, FolderOutput, model_files_of
from ckpt_ema.output.like_input import LikeInputOutput, metadata_file_of
from ckpt_ema.output.metadata import CARRIED_METADATA, output_metadata
from ckpt_ema.output.sinks import MemoryOutput, SafetensorsOutput
from ckpt_ema.planning import (Appending, Plan, candidate_fold, keeps_mean, nothing_to_average, weighting_for,
                               window_of, within_window)
from ckpt_ema.weighting import Weighting

# Options that do not change the running means: how the outputs are written (a change rewrites them from the
# state), and where and within what memory the fold runs.
OUTPUT_OPTIONS = ("out_dtype", "max_shard_size")
RUN_OPTIONS = ("device", "max_memory")
# What writes an output to disk: a .safetensors file (or a model folder), or a checkpoint like the input.
OutputFile = SafetensorsOutput | LikeInputOutput


class FullInputsNeeded(CkptEmaError):
    """The state cannot go on and ``inputs`` named only part of the run (a watcher names the new checkpoints): the
    caller must name the whole run for an average from the start."""


class NothingYet(OptionError):
    """No checkpoint carries any weight yet (every step so far is at or before update_after_step): a watcher
    waits for more."""


@dataclass(frozen=True)
class Target:
    """One average: its name (a sweep's candidate), options and output: a .safetensors file, with ``folder`` a
    model folder (:mod:`ckpt_ema.output.folder`), with ``like_input`` a checkpoint of the run's own format
    (:mod:`ckpt_ema.output.like_input`), or None to keep the tensors in memory."""

    name: str
    options: AverageOptions
    output: Path | None
    folder: bool = False
    like_input: bool = False

    @property
    def weights(self) -> Path | None:
        """The file that records the output: the file itself, the model folder's (adapter) weights file, or the
        DCP metadata of a checkpoint written like the input."""
        if self.output is None or not (self.folder or self.like_input):
            return self.output
        if self.like_input:
            return metadata_file_of(self.output)
        adapter = self.output / ADAPTER_WEIGHTS
        return adapter if output_files(adapter) else self.output / MODEL_WEIGHTS

    def sink(self, plan: Plan, metadata: dict[str, str]) -> OutputFile | MemoryOutput:
        """What writes the output; a model folder takes its model files from the newest checkpoint's folder, a
        checkpoint like the input is a copy of the newest checkpoint."""
        if self.output is None:
            return MemoryOutput()
        newest = plan.sources[-1].path
        if self.like_input:
            return LikeInputOutput(self.output, newest, self.options.key, self.options.strip_prefix, metadata,
                                   opened=plan.sources[-1].opened)
        if self.folder:
            return FolderOutput(self.output, model_files_of(newest), metadata, self.options.max_shard_size)
        return SafetensorsOutput(self.output, metadata, self.options.max_shard_size)

    @property
    def keeps_mean(self) -> bool:
        """Whether it goes on from a running mean (:func:`ckpt_ema.planning.keeps_mean`)."""
        return keeps_mean(self.options)


@dataclass
class Outcome:
    """What one run of the pipeline did."""

    action: str  # "appended", "averaged" (from the start), "up to date"
    message: str  # one line: what was reused, or why everything was redone
    plans: list[Plan]  # per target: every checkpoint folded so far (deleted ones too) and its final weight
    new: list[Source]  # the checkpoints read this time
    files: list[list[Path]] = field(default_factory=list)  # per target, the files written
    tensors: list[dict[str, torch.Tensor] | None] = field(default_factory=list)  # per target kept in memory
    bytes_read: int = 0
    seconds: float = 0.0
    passes: int = 1  # reads of the checkpoints: more than one when the memory budget holds fewer candidates
    notes: list[str] = field(default_factory=list)  # e.g. stale temporary files of killed runs, removed


def run(inputs: Sequence[str | Path], targets: Sequence[Target], state: StateFolder | None = None, *,
        world: World | None = None, progress: bool = False, desc: str = "averaging",
        on_discovery: Callable[[Discovery], None] | None = None, whole_run: bool = True) -> Outcome:
    """Bring ``targets`` (sharing every option but the weights) up to date with the checkpoints ``inputs`` name:
    from ``state`` where it can go on, from the start otherwise (see the module docstring). ``on_discovery`` sees
    the checkpoints found (what was left out and why) before any is read. ``whole_run`` False: ``inputs`` name
    only the new checkpoints (and those a uniform mean reads again); an average from the start then raises
    :class:`FullInputsNeeded` rather than average a part of the run. A ``world`` of several processes folds a
    share on each (no state: each rank would keep its own)."""
    started = time.perf_counter()
    base = targets[0].options
    check_device(base.device)
    if state is not None and world is not None and world.is_distributed:
        raise CkptEmaError("several processes keep no state: ask for none")
    manifest = state.load() if state is not None else None
    reason = None if manifest is None else manifest.broken or _options_differ(manifest, targets)
    if manifest is not None and reason is None:
        lister = _Lister(manifest)
        found = _discover(inputs, base, lister)
        new = [s for s in found.sources if str(s.path.absolute()) not in lister.recognised]
        reason = _cannot_append(manifest, lister.changed, new)
        if reason is None:
            if on_discovery is not None:
                on_discovery(found)
            assert state is not None
            return _append(manifest, found, new, targets, state, progress, desc, started, lister.listings)
    if manifest is not None and not whole_run:
        raise FullInputsNeeded(f"the state cannot go on ({reason})")
    if manifest is not None:
        assert state is not None
        gone = [r.path for r in manifest.inputs if not Path(r.path).exists()]
        if gone:
            more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
            raise CkptEmaError(f"cannot go on from the state ({reason}), and averaging from the start needs "
                               f"{gone[0]}{more}, which is gone; remove {state.path} to average what is left",
                               targets[0].output)
    lister = _Lister(None)
    found = _discover(inputs, base, lister if state is not None else None)
    if on_discovery is not None:
        on_discovery(found)
    message = f"averaged {_count(len(found.sources))} from the start"
    if state is not None:
        message += " (no state yet)" if manifest is None else f" (the state cannot go on: {reason})"
    return _fold_and_commit(None, found, found.sources, targets, state, progress, desc, started, message,
                            lister.listings, world)


def _count(n: int) -> str:
    return f"{n} checkpoint{'' if n == 1 else 's'}"


def _discover(inputs: Sequence[str | Path], options: AverageOptions, known: _Lister | None) -> Discovery:
    found = discover(list(inputs), options.key, options.per_checkpoint, known=known)
    return within_window(found, options.from_step, options.to_step)


def _options_differ(manifest: Manifest, targets: Sequence[Target]) -> str | None:
    """Why the state's means cannot go on under these targets' options (None: they can)."""
    if ([(c.name, c.output) for c in manifest.candidates]
            != [(t.name, str(t.output.absolute()) if t.output else None) for t in targets]):
        return "the averages asked for are not those the state carries"
    for record, target in zip(manifest.candidates, targets):
        now = target.options.flat()
        differ = sorted(k for k in set(now) | set(record.options)
                        if k not in OUTPUT_OPTIONS + RUN_OPTIONS and now.get(k) != record.options.get(k))
        if differ:
            k = differ[0]
            return f"--{k.replace('_', '-')} was {record.options.get(k)!r}, now {now.get(k)!r}"
    if manifest.accum_dtype != targets[0].options.accum_dtype:
        return f"--accum-dtype was {manifest.accum_dtype}, now {targets[0].options.accum_dtype}"
    return None


class _Lister:
    """discover()'s ``known``: each checkpoint's listing is taken as discovery meets it, before the checkpoint is
    opened (what is recorded is then what was read, even if the trainer deletes the file right after); a recorded
    checkpoint whose listing is unchanged comes back as a source, and is not opened."""

    def __init__(self, manifest: Manifest | None) -> None:
        self.records = {} if manifest is None else {r.path: r for r in manifest.inputs}
        self.listings: dict[Path, tuple[int, int]] = {}
        self.recognised: dict[str, Source] = {}
        self.changed: list[str] = []

    def __call__(self, path: Path) -> Source | None:
        try:
            listing = listing_of(path)
        except (OSError, CkptEmaError):
            return None  # opening it says what is wrong
        self.listings[path] = listing
        key = str(path.absolute())
        record = self.records.get(key)
        if record is None:
            return None
        if not record.matches(listing):
            self.changed.append(key)
            return None
        source = Source(path=path, step=record.step, step_from=record.step_from, nbytes=record.size,
                        tokens=record.tokens)
        self.recognised[key] = source
        return source


def _cannot_append(manifest: Manifest, changed: list[str], new: list[Source]) -> str | None:
    """Why the listing cannot be appended to the state (None: it can)."""
    if changed:
        return f"{changed[0]} changed since it was averaged"
    newest = manifest.inputs[-1]
    for source in new:
        if newest.step_from == "order":
            if natural_key(str(source.path.absolute())) < natural_key(newest.path):
                return f"{source.path} is new but comes before {newest.path}, the newest averaged, in name order"
        elif source.step <= newest.step:
            return (f"{source.path} (step {source.step}) is new but not after the newest checkpoint averaged "
                    f"(step {newest.step})")
    return None


def _append(manifest: Manifest, found: Discovery, new: list[Source], targets: Sequence[Target],
            state: StateFolder, progress: bool, desc: str, started: float,
            listings: dict[Path, tuple[int, int]]) -> Outcome:
    stale = [t for t, c in zip(targets, manifest.candidates)
             if t.weights is None or output_listing(t.weights) != c.listing or _output_options_differ(c, t)]
    if not new and not stale:
        plans = _plans_from_state(manifest, found, targets)
        return Outcome("up to date", f"up to date: no new checkpoint after step {manifest.inputs[-1].step}", plans,
                       [], seconds=time.perf_counter() - started)
    listed = {str(s.path.absolute()) for s in found.sources}
    gone = sum(1 for r in manifest.inputs if r.path not in listed and not Path(r.path).exists())
    if new:
        steps = f"step {new[0].step}" if len(new) == 1 else f"steps {new[0].step}..{new[-1].step}"
        message = (f"appended {len(new)} new checkpoint{'s' if len(new) > 1 else ''} ({steps}) to the state of "
                   f"{len(manifest.inputs)}" + (f" ({gone} of them since deleted)" if gone else ""))
    else:
        message = (f"rewrote {', '.join(str(t.output) for t in stale)} from the state (no new checkpoint; the "
                   "output was not the one the state wrote, or other output options)")
    return _fold_and_commit(manifest, found, new, targets, state, progress, desc, started, message, listings, None)


def _output_options_differ(record: CandidateRecord, target: Target) -> bool:
    now = target.options.flat()
    return any(now.get(k) != record.options.get(k) for k in OUTPUT_OPTIONS)


def _plans_from_state(manifest: Manifest, found: Discovery, targets: Sequence[Target]) -> list[Plan]:
    """Every checkpoint folded so far, with the final weights the state recorded."""
    discovery = Discovery(_sources_so_far(manifest, found, []), found.skipped, found.notes)
    return [Plan(discovery, Weighting(tuple(r.step for r in manifest.inputs), tuple(c.weights), c.unresolved or 0.0),
                 t.options) for t, c in zip(targets, manifest.candidates)]


def _fold_and_commit(manifest: Manifest | None, found: Discovery, new: list[Source], targets: Sequence[Target],
                     state: StateFolder | None, progress: bool, desc: str, started: float, message: str,
                     listings: dict[Path, tuple[int, int]], world: World | None) -> Outcome:
    """Fold ``new`` onto the state ``manifest`` describes (None: ``new`` is every checkpoint, from the start) and
    commit the outputs, with the next state when there is one (:meth:`StateFolder.commit`)."""
    base = targets[0].options
    sources = found.sources if manifest is None else _sources_so_far(manifest, found, new)
    again = [] if manifest is None else _read_again(sources, len(sources) - len(new), targets)
    reread = [sources[i] for i in again]
    prior = [] if manifest is None else _prior(manifest, state, new, reread, base)  # type: ignore[arg-type]
    job = Job([s.path for s in reread] + prior + [s.opened or s.path for s in new])
    appending = None
    if manifest is not None:
        order = [*again, *([None] if prior else []), *range(len(sources) - len(new), len(sources))]
        appending = Appending(manifest.inputs[-1].step, [s.step for s in new], order, bool(manifest.theta))
    folds = [candidate_fold(t.options, sources, None if manifest is None else manifest.candidates[k], appending)  # type: ignore[arg-type]
             for k, t in enumerate(targets)]
    discovery = Discovery(sources, found.skipped, found.notes)
    plans = [Plan(discovery, f.weighting, t.options) for t, f in zip(targets, folds)]
    if not any(any(w > 0 for w in p.weighting.weights) for p in plans):
        error = nothing_to_average(base)
        raise NothingYet(error.param, error.problem)
    outputs: list[OutputFile | MemoryOutput] = [t.sink(p, output_metadata(p)) for t, p in zip(targets, plans)]
    files = [out for out in outputs if not isinstance(out, MemoryOutput)]
    check_not_an_input([f for file in files for f in _replaced_by(file)], plans[0].input_files())
    for file in files:
        check_not_inside_an_input(file.folder if isinstance(file, FolderOutput) else file.path, plans[0])
    generation = new_generation()
    state_files: list[SafetensorsOutput | InputLink] = []
    try:
        for k, (target, out, f) in enumerate(zip(targets, outputs, folds)):
            initial = state.open(manifest.candidates[k].mean) if (  # type: ignore[union-attr, arg-type]
                f.continues and manifest is not None and manifest.candidates[k].mean) else None
            if state is not None and target.keeps_mean and not isinstance(out, MemoryOutput):
                mean = state.new_mean(generation, k, out)
                state_files.append(mean)
                job.add(f.lerps, initial, Tee(out, mean), [(out, "output"), (mean, "accum")])
            else:
                job.add(f.lerps, initial, out, [(out, "output")])
        theta: SafetensorsOutput | InputLink | None = None
        if state is not None and base.interpolate == "linear" and any(t.keeps_mean for t in targets):
            # the newest checkpoint: linked where it is one file, else copied as read
            theta = (state.link_input(generation, new[-1].path, listings.get(new[-1].path)) if new else None) \
                or state.new_file(generation, "theta")
            state_files.append(theta)
        job.newest_copy = theta if isinstance(theta, SafetensorsOutput) else None
        state_read = {c.path for c in [*job.checkpoints, *job.initial] if isinstance(c, Checkpoint)
                      and state is not None and c.path.parent == state.path}
        read = sum(s.nbytes for s in [*new, *reread]) + sum(path.stat().st_size for path in state_read)
        if manifest is not None and state is not None:
            job.recorded_dtypes, job.recorded_in = manifest.dtypes, state.path
        if world is not None and world.is_distributed:
            dtypes, passes = _fold_on_ranks(job, files, base, world, progress, desc)  # committed together
            written = [out.written for out in files]
        elif state is None:
            dtypes, passes = run_job(job, base, progress=progress, desc=desc)
            written = [[] if isinstance(out, MemoryOutput) else out.commit() for out in outputs]
        else:
            dtypes, passes = run_job(job, base, progress=progress, desc=desc)
            records = {} if manifest is None else {r.path: r for r in manifest.inputs}
            next_manifest = Manifest(
                generation=generation,
                accum_dtype=base.accum_dtype,
                inputs=[records.get(str(s.path.absolute())) or _record(s, listings.get(s.path)) for s in sources],
                candidates=[CandidateRecord(t.name, str(t.output.absolute()) if t.output else "", t.options.flat(),
                                            f.total, f"{generation}.mean-{k}.safetensors" if t.keeps_mean else None,
                                            list(p.weighting.weights), p.weighting.unresolved)
                            for k, (t, p, f) in enumerate(zip(targets, plans, folds))],
                theta=theta.path.name if theta is not None else None,
                dtypes=dtypes,
                carried={k: v for k, v in sources[-1].metadata.items() if k in CARRIED_METADATA},
            )
            written = state.commit(next_manifest, state_files, files)
    except BaseException:
        if state is not None:
            state.discard_if_made()
        raise
    finally:
        for sink in [*files, *state_files]:
            sink.abort()
    notes = [note for sink in [*files, *state_files] for note in sink.notes]
    tensors = [out.tensors if isinstance(out, MemoryOutput) else None for out in outputs]
    return Outcome("averaged" if manifest is None else "appended", message, plans, list(new), written, tensors,
                   read, time.perf_counter() - started, passes, notes)


def _fold_on_ranks(job: Job, outputs: list[OutputFile], options: AverageOptions, world: World,
                   progress: bool, desc: str) -> tuple[dict[str, str], int]:
    """This rank's share of the fold under torchrun, and the commit the ranks agree to
    (:func:`ckpt_ema.engine.runner.commit_on_ranks`); a failure on any rank is raised on every rank, after every
    rank has removed its temporary files."""
    if len(outputs) != len(job.sinks):
        raise CkptEmaError("several processes write their shares to files: give an output file")
    device = world.device(options.device)
    done: list[tuple[dict[str, str], int]] = []
    with distributed.process_group(world, device):
        try:
            distributed.on_every_rank(lambda: done.append(run_job(job, options, progress=progress and world.rank == 0,
                                                                  desc=desc, world=world, device=device)))
            commit_on_ranks(outputs, world)
        except CkptEmaError:  # raised on every rank alike by on_every_rank
            for out in outputs:
                out.abort()
            distributed.barrier()  # the first rank to exit makes torchrun stop the others: let all clean up first
            raise
    return done[0]


def check_not_inside_an_input(path: Path, plan: Plan) -> None:
    """Refuse an output written into an input checkpoint's folder (a DCP or DeepSpeed folder, a checkpoint-N/):
    it would change what that checkpoint is."""
    target = path.resolve()
    for source in plan.sources:
        if source.path.is_dir() and (source.path.resolve() == target or source.path.resolve() in target.parents):
            raise CkptEmaError(f"the output would be written into the input checkpoint {source.path}", path)


def _replaced_by(out: OutputFile) -> list[Path]:
    """The files writing ``out`` replaces: its weights' files and, for a model folder, the model files; every file
    of an earlier checkpoint written like the input."""
    if isinstance(out, LikeInputOutput):
        return sorted(p for p in out.path.rglob("*") if p.is_file()) if out.path.is_dir() else []
    model = [out.folder / f.name for f in out.model_files] if isinstance(out, FolderOutput) else []
    return output_files(out.path) + model


def _sources_so_far(manifest: Manifest, found: Discovery, new: list[Source]) -> list[Source]:
    """Every checkpoint folded before (from the listing, or from its record where it is gone), then the new ones;
    the newest folded before carries the training metadata the state kept."""
    present = {str(s.path.absolute()): s for s in found.sources}
    old = [present.get(r.path) or Source(Path(r.path), r.step, r.step_from, r.size, tokens=r.tokens)
           for r in manifest.inputs]
    old[-1].metadata = {**manifest.carried, **old[-1].metadata}
    return old + new


def _read_again(sources: list[Source], folded: int, targets: Sequence[Target]) -> list[int]:
    """The indices of the checkpoints folded before (the first ``folded`` of ``sources``) that an average keeping
    no running mean (a uniform mean of the newest K, a window merge) weighs: it reads them again."""
    wanted: set[int] = set()
    for t in targets:
        if t.keeps_mean:
            continue
        needed = [i for i, w in enumerate(weighting_for(t.options, sources).weights) if w > 0 and i < folded]
        for i in needed:
            if not sources[i].path.exists():
                what = (f"a uniform mean of the newest {t.options.last} checkpoints" if t.options.last is not None
                        else f"a {t.options.weights} merge over {window_of(t.options, sources)} steps")
                raise CkptEmaError(f"{what} needs this one again, and it is gone (the trainer keeps fewer?)",
                                   sources[i].path)
        wanted.update(needed)
    return sorted(wanted)


def _prior(manifest: Manifest, state: StateFolder, new: list[Source], reread: list[Source],
           options: AverageOptions) -> list[Path | Checkpoint]:
    """What an append reads between the checkpoints read again and the new ones: the newest folded before (the
    linear rule's copy or link in the state). With nothing to read at all (nothing new, nothing read again, no
    copy), the first running mean stands in as the newest checkpoint (the layout and the non-float tensors),
    weighed by none. The fold strips ``--strip-prefix`` from every checkpoint: state files, which hold the names
    as averaged, get it back first; a linked checkpoint is read like any input."""
    if manifest.theta in manifest.links:
        return [state.open(manifest.theta, options.key)]
    if manifest.theta:
        prior = state.open(manifest.theta)
    elif not new and not reread:
        prior = state.open(next(c.mean for c in manifest.candidates if c.mean))
    else:
        return []
    return [prior.with_prefix(options.strip_prefix) if options.strip_prefix else prior]


def _record(source: Source, listing: tuple[int, int] | None) -> Recorded:
    if listing is None:
        raise CkptEmaError("gone before its listing could be taken", source.path)
    size, mtime = listing
    return Recorded(str(source.path.absolute()), source.step, source.step_from, size, mtime, source.tokens)
