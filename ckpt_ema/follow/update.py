"""Keep averages current as a run grows: fold in only the checkpoints that are new since the state was saved.

An update compares the run's listing with the state's manifest (:mod:`ckpt_ema.follow.state`) and does one of:

* **append**: every checkpoint folded before is unchanged in the listing (same bytes, same modification time) or
  gone, and the new ones come after the newest folded. Only the new ones are opened and read; each EMA continues
  its saved running mean (:func:`ckpt_ema.weighting.ema_continuation`), which gives the full rerun's result to
  float rounding (bit for bit with ``step``). A uniform mean of the newest K keeps no state: it is recomputed from
  the K newest checkpoints, which must still be there (a cost of K, not of the run's length).
* **up to date**: nothing new and the outputs belong to the state: nothing is written.
* **from the start**: no state, or one that cannot go on: other options, a checkpoint that changed since it was
  folded, a new one before the newest folded. Said in one line; when a checkpoint folded before is gone, a full
  rerun cannot give the same result, and that is a one-line error instead.

With nothing new, outputs that do not belong to the state (a kill between the state's commit and an output's
rename) or were asked in another dtype or sharding are rewritten from the state: an append of nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ckpt_ema.discover import Discovery, Source, discover, natural_key
from ckpt_ema.engine.fold import fold
from ckpt_ema.engine.layout import Layout
from ckpt_ema.engine.runner import DTYPES, check_device, chunk_elems
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.follow.state import (
    CandidateRecord,
    InputLink,
    Manifest,
    Recorded,
    StateFolder,
    listing_of,
    new_generation,
    output_generation,
    STATE_KEY,
)
from ckpt_ema.formats.base import Checkpoint
from ckpt_ema.options import AverageOptions
from ckpt_ema.output.atomic import check_not_an_input, output_files
from ckpt_ema.output.metadata import CARRIED_METADATA, output_metadata
from ckpt_ema.output.folder import ADAPTER_WEIGHTS, MODEL_WEIGHTS, FolderOutput, model_files_of
from ckpt_ema.output.sinks import SafetensorsOutput
from ckpt_ema.planning import Plan, weighting_for, within_window
from ckpt_ema.weighting import (EmaState, Weighting, ema_continuation, ema_total, ema_unresolved,
                                ema_unresolved_continued, ema_weighting, power_continuation, uniform_weighting)

# Options that do not change the running means: how the outputs are written (a change rewrites them from the
# state), and where and within what memory the fold runs.
OUTPUT_OPTIONS = ("out_dtype", "max_shard_size")
RUN_OPTIONS = ("device", "max_memory")


class FullInputsNeeded(CkptEmaError):
    """The state cannot go on and ``inputs`` named only part of the run (a watcher names the new checkpoints): the
    caller must name the whole run for an average from the start."""


class NothingYet(CkptEmaError):
    """No checkpoint carries any weight yet (every step so far is before update_after_step, with bias
    correction): a watcher waits for more."""


@dataclass(frozen=True)
class Target:
    """One average kept current: its name (a sweep's candidate), options and output: a .safetensors file, or with
    ``folder`` a model folder (:mod:`ckpt_ema.output.folder`)."""

    name: str
    options: AverageOptions
    output: Path
    folder: bool = False

    @property
    def weights(self) -> Path:
        """The output's weights: the file itself, or the model folder's (adapter) weights file."""
        if not self.folder:
            return self.output
        adapter = self.output / ADAPTER_WEIGHTS
        return adapter if output_files(adapter) else self.output / MODEL_WEIGHTS

    def sink(self, plan: Plan, metadata: dict[str, str]) -> SafetensorsOutput:
        """What writes the output; a model folder takes its model files from the newest checkpoint's folder."""
        if self.folder:
            return FolderOutput(self.output, model_files_of(plan.sources[-1].path), metadata,
                                self.options.max_shard_size)
        return SafetensorsOutput(self.output, metadata, self.options.max_shard_size)

    @property
    def keeps_mean(self) -> bool:
        """timm's EMA and the power EMA (``sigma_rel``), which go on from their running means; a uniform mean of
        the newest K reads them again."""
        return self.options.last is None


@dataclass
class Update:
    """What one update did."""

    action: str  # "appended", "averaged" (from the start), "up to date"
    message: str  # one line: what was reused, or why everything was redone
    plans: list[Plan]  # per target: every checkpoint folded so far (deleted ones too) and its final weight
    new: list[Source]  # the checkpoints read this time
    files: list[list[Path]] = field(default_factory=list)  # per target, the files written
    bytes_read: int = 0
    seconds: float = 0.0
    passes: int = 1  # reads of the checkpoints: more than one when the memory budget holds fewer candidates
    notes: list[str] = field(default_factory=list)  # e.g. stale temporary files of killed runs, removed


def update(inputs: Sequence[str | Path], targets: Sequence[Target], folder: StateFolder, *, progress: bool = False,
           desc: str = "averaging", on_discovery: Callable[[Discovery], None] | None = None,
           whole_run: bool = True) -> Update:
    """Bring ``targets`` (sharing every option but the decay or K) up to date with the checkpoints ``inputs`` name,
    from the state in ``folder`` where it can go on, from the start otherwise; see the module docstring.
    ``on_discovery`` sees the checkpoints found (what was left out and why) before any is read. ``whole_run``
    False: ``inputs`` name only the new checkpoints (and those a uniform mean reads again); an average from the
    start then raises :class:`FullInputsNeeded` rather than average a part of the run."""
    started = time.perf_counter()
    base = targets[0].options
    check_device(base.device)
    manifest = folder.load()
    reason = None if manifest is None else manifest.broken or _options_differ(manifest, targets)
    if manifest is not None and reason is None:
        lister = _Lister(manifest)
        found = _discover(inputs, base, lister)
        new = [s for s in found.sources if str(s.path.absolute()) not in lister.recognised]
        reason = _cannot_append(manifest, lister.changed, new)
        if reason is None:
            if on_discovery is not None:
                on_discovery(found)
            return _append(manifest, found, new, targets, folder, progress, desc, started, lister.listings)
    if manifest is not None and not whole_run:
        raise FullInputsNeeded(f"the state cannot go on ({reason})")
    if manifest is not None:
        gone = [r.path for r in manifest.inputs if not Path(r.path).exists()]
        if gone:
            more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
            raise CkptEmaError(f"cannot go on from the state ({reason}), and averaging from the start needs "
                               f"{gone[0]}{more}, which is gone; remove {folder.path} to average what is left",
                               targets[0].output)
    lister = _Lister(None)
    found = _discover(inputs, base, lister)
    if on_discovery is not None:
        on_discovery(found)
    message = (f"averaged {len(found.sources)} checkpoints from the start ("
               + ("no state yet)" if manifest is None else f"the state cannot go on: {reason})"))
    return _fold_and_commit(None, found, found.sources, targets, folder, progress, desc, started, message,
                            lister.listings)


def _discover(inputs: Sequence[str | Path], options: AverageOptions, known) -> Discovery:  # noqa: ANN001
    found = discover(list(inputs), options.key, options.per_checkpoint, known=known)
    return within_window(found, options.from_step, options.to_step)


def _options_differ(manifest: Manifest, targets: Sequence[Target]) -> str | None:
    """Why the state's means cannot go on under these targets' options (None: they can)."""
    if [(c.name, c.output) for c in manifest.candidates] != [(t.name, str(t.output.absolute())) for t in targets]:
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
        source = Source(path=path, step=record.step, step_from=record.step_from, nbytes=record.size)
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
        elif source.step is not None and source.step <= newest.step:
            return (f"{source.path} (step {source.step}) is new but not after the newest checkpoint averaged "
                    f"(step {newest.step})")
    return None


def _append(manifest: Manifest, found: Discovery, new: list[Source], targets: Sequence[Target],
            folder: StateFolder, progress: bool, desc: str, started: float,
            listings: dict[Path, tuple[int, int]]) -> Update:
    stale = [t for t, c in zip(targets, manifest.candidates)
             if output_generation(t.weights) != manifest.generation or _output_options_differ(c, t)]
    if not new and not stale:
        plans = _plans_from_state(manifest, found, targets)
        return Update("up to date", f"up to date: no new checkpoint after step {manifest.inputs[-1].step}", plans, [],
                      seconds=time.perf_counter() - started)
    listed = {str(s.path.absolute()) for s in found.sources}
    gone = sum(1 for r in manifest.inputs if r.path not in listed and not Path(r.path).exists())
    if new:
        steps = f"step {new[0].step}" if len(new) == 1 else f"steps {new[0].step}..{new[-1].step}"
        message = (f"appended {len(new)} new checkpoint{'s' if len(new) > 1 else ''} ({steps}) to the state of "
                   f"{len(manifest.inputs)}"
                   + (f" ({gone} of them since deleted)" if gone else ""))
    else:
        message = f"rewrote {', '.join(str(t.output) for t in stale)} from the state (no new checkpoint)"
    return _fold_and_commit(manifest, found, new, targets, folder, progress, desc, started, message, listings)


def _output_options_differ(record: CandidateRecord, target: Target) -> bool:
    now = target.options.flat()
    return any(now.get(k) != record.options.get(k) for k in OUTPUT_OPTIONS)


def _plans_from_state(manifest: Manifest, found: Discovery, targets: Sequence[Target]) -> list[Plan]:
    """Every checkpoint folded so far (a source from the listing, or from the record where it is gone), with the
    final weights the state recorded."""
    present = {str(s.path.absolute()): s for s in found.sources}
    sources = [present.get(r.path) or Source(Path(r.path), r.step, r.step_from, r.size) for r in manifest.inputs]
    if sources:
        sources[-1].metadata = {**manifest.carried, **sources[-1].metadata}
    discovery = Discovery(sources, found.skipped, found.notes)
    return [Plan(discovery, Weighting(tuple(r.step for r in manifest.inputs), tuple(c.weights)), t.options)
            for t, c in zip(targets, manifest.candidates)]


class _Tee:
    """An EMA candidate's finished chunks, to its output and to its state's running mean."""

    def __init__(self, output: SafetensorsOutput, mean: SafetensorsOutput) -> None:
        self.output, self.mean = output, mean

    def write(self, name: str, piece: torch.Tensor) -> None:
        self.output.write(name, piece)
        self.mean.write(name, piece)


@dataclass
class _Job:
    """One fold: the checkpoints read, in order; per candidate its lerps, initial mean, sink and how to open it."""

    checkpoints: list[Path | Checkpoint]
    lerps: list[list[float]] = field(default_factory=list)
    initial: list[Checkpoint | None] = field(default_factory=list)
    sinks: list[object] = field(default_factory=list)
    # per candidate: the files it writes, each with what its float tensors are ("output": the output's dtype,
    # "accum": the accumulator's)
    files: list[list[tuple[SafetensorsOutput, str]]] = field(default_factory=list)


def _fold_and_commit(manifest: Manifest | None, found: Discovery, new: list[Source], targets: Sequence[Target],
                     folder: StateFolder, progress: bool, desc: str, started: float, message: str,
                     listings: dict[Path, tuple[int, int]]) -> Update:
    """Fold ``new`` onto the state ``manifest`` describes (None: ``new`` is every checkpoint, from the start) and
    commit the outputs with the next state (:meth:`StateFolder.commit`)."""
    base = targets[0].options
    generation = new_generation()
    sources = found.sources if manifest is None else _sources_so_far(manifest, found, new)
    steps = [s.step for s in sources]
    reread = [] if manifest is None else _reread(manifest, sources, new, targets)
    job = _Job(_checkpoints(manifest, folder, sources, new, reread, base))
    n = len(job.checkpoints)
    plans: list[Plan] = []
    totals: list[float | None] = []
    for k, target in enumerate(targets):
        opts = target.options
        total = None
        if manifest is None:  # from the start: the full weighting
            if target.keeps_mean and opts.sigma_rel is None:
                weighting = ema_weighting(steps, opts.schedule, opts.bias_correction, opts.interpolate)
                total = ema_total(steps[-1], opts.schedule, opts.bias_correction)
            else:  # a power EMA needs no total: its earlier mean's share follows from the steps alone
                weighting = weighting_for(opts, steps)
            job.lerps.append(list(weighting.lerps))
            job.initial.append(None)
        elif not target.keeps_mean:  # a uniform mean of the newest K
            weighting = uniform_weighting(steps, opts.last)  # type: ignore[arg-type]
            newest = _newest_positions(opts.last, n, (len(reread), len(new)))  # type: ignore[arg-type]
            job.lerps.append(list(Weighting(tuple(range(n)), tuple(float(i in newest) for i in range(n))).lerps))
            job.initial.append(None)
        else:
            record = manifest.candidates[k]
            newest, new_steps = manifest.inputs[-1].step, [s.step for s in new]
            if opts.sigma_rel is not None:
                w = (power_continuation(new_steps, opts.sigma_rel, opts.interpolate, newest, record.unresolved)
                     if new else Weighting((newest,), (0.0,), record.unresolved or 0.0, prior=1.0))
                unresolved = w.unresolved
            else:
                w, state = ema_continuation(new_steps, opts.schedule, opts.bias_correction, opts.interpolate,
                                            EmaState(newest, record.total or 0.0))
                unresolved = (ema_unresolved(steps, opts.schedule, opts.bias_correction) if record.unresolved is None
                              else ema_unresolved_continued(record.unresolved, newest, new_steps, opts.schedule,
                                                            opts.bias_correction))
                total = state.total
            old = [x * w.prior for x in record.weights]
            old[-1] += w.weights[0]  # the newest folded before: its share of the next interval (linear rule)
            weighting = Weighting(tuple(steps), tuple(old) + w.weights[1:], unresolved)
            lerps = list(w.lerps) if manifest.theta else (list(w.lerps[1:]) or [0.0])  # no copy: no slot
            job.lerps.append([0.0] * len(reread) + lerps)
            job.initial.append(folder.open(record.mean) if w.prior > 0 and record.mean else None)
        plans.append(Plan(Discovery(sources, found.skipped, found.notes), weighting, opts))
        totals.append(total)
    if not any(any(w > 0 for w in p.weighting.weights) for p in plans):
        raise NothingYet("no checkpoint carries any weight yet")
    outputs = [t.sink(p, {**output_metadata(p), STATE_KEY: generation}) for t, p in zip(targets, plans)]
    check_not_an_input([f for out in outputs for f in _replaced_by(out)], plans[0].input_files())
    if any(t.folder for t in targets):
        from ckpt_ema.api import check_not_inside_an_input  # (the api imports this module)

        for t, out in zip(targets, outputs):
            if t.folder:
                check_not_inside_an_input(out.path, plans[0])

    state_read = [c for c in [*job.checkpoints, *job.initial] if isinstance(c, Checkpoint) and c.path.parent == folder.path]
    read = sum(s.nbytes for s in [*new, *reread]) + sum(c.path.stat().st_size for c in state_read)
    state_files: list[SafetensorsOutput] = []
    try:
        for k, (target, out) in enumerate(zip(targets, outputs)):
            if target.keeps_mean:
                mean = folder.new_mean(generation, k, out)
                state_files.append(mean)
                job.sinks.append(_Tee(out, mean))
                job.files.append([(out, "output"), (mean, "accum")])
            else:
                job.sinks.append(out)
                job.files.append([(out, "output")])
        theta: SafetensorsOutput | InputLink | None = None
        if base.interpolate == "linear" and any(t.keeps_mean for t in targets):
            # the newest checkpoint: linked where it is one file, else copied as read
            theta = (folder.link_input(generation, new[-1].path, listings.get(new[-1].path)) if new else None) \
                or folder.new_file(generation, "theta")
            state_files.append(theta)
        copy = theta if isinstance(theta, SafetensorsOutput) else None
        dtypes, passes = _run(job, copy, base, None if manifest is None else manifest.dtypes, folder.path, progress,
                              desc)
        records = {} if manifest is None else {r.path: r for r in manifest.inputs}
        next_manifest = Manifest(
            generation=generation,
            accum_dtype=base.accum_dtype,
            inputs=[records.get(str(s.path.absolute())) or _record(s, listings.get(s.path)) for s in sources],
            candidates=[CandidateRecord(t.name, str(t.output.absolute()), t.options.flat(), total,
                                        f"{generation}.mean-{k}.safetensors" if t.keeps_mean else None,
                                        list(p.weighting.weights), p.weighting.unresolved)
                        for k, (t, p, total) in enumerate(zip(targets, plans, totals))],
            theta=theta.path.name if theta is not None else None,
            dtypes=dtypes,
            carried={k: v for k, v in sources[-1].metadata.items() if k in CARRIED_METADATA},
        )
        files = folder.commit(next_manifest, state_files, outputs)
    except BaseException:
        folder.discard_if_made()
        raise
    finally:
        for sink in [*outputs, *state_files]:
            sink.abort()
    notes = [note for sink in [*outputs, *state_files] for note in sink.notes]
    return Update("averaged" if manifest is None else "appended", message, plans, list(new), files, read,
                  time.perf_counter() - started, passes, notes)


def _replaced_by(out: SafetensorsOutput) -> list[Path]:
    """The files writing ``out`` replaces: its weights' files and, for a model folder, the model files."""
    model = [out.folder / f.name for f in out.model_files] if isinstance(out, FolderOutput) else []
    return output_files(out.path) + model


def _newest_positions(k: int, n: int, appending: tuple[int, int] | None) -> list[int]:
    """Where the run's newest ``k`` checkpoints are among the ``n`` a fold reads: the last ``k`` from the start;
    appending (``(reread, new)``: how many are read again, how many are new), the last of those read again and of
    the new ones (the copy of the newest folded before, between them, is for the EMAs)."""
    if appending is None:
        return list(range(n - k, n))
    reread, new = appending
    return [*range(reread - max(k - new, 0), reread), *range(n - min(k, new), n)]


def _sources_so_far(manifest: Manifest, found: Discovery, new: list[Source]) -> list[Source]:
    """Every checkpoint folded before (from the listing, or from its record where it is gone), then the new ones;
    the newest folded before carries the training metadata the state kept."""
    present = {str(s.path.absolute()): s for s in found.sources}
    old = [present.get(r.path) or Source(Path(r.path), r.step, r.step_from, r.size) for r in manifest.inputs]
    old[-1].metadata = {**manifest.carried, **old[-1].metadata}
    return old + new


def _reread(manifest: Manifest, sources: list[Source], new: list[Source], targets: Sequence[Target]) -> list[Source]:
    """Checkpoints folded before that a uniform mean of the newest K needs again (it keeps no running mean)."""
    wanted = max((t.options.last or 0 for t in targets), default=0) - len(new)
    if wanted <= 0:
        return []
    old = sources[: len(sources) - len(new)]
    needed = old[-wanted:]
    for s in needed:
        if not s.path.exists():
            raise CkptEmaError(f"a uniform mean of the newest {wanted + len(new)} checkpoints needs this one again, "
                               "and it is gone (the trainer keeps fewer?)", s.path)
    return needed


def _checkpoints(manifest: Manifest | None, folder: StateFolder, sources: list[Source], new: list[Source],
                 reread: list[Source], options: AverageOptions) -> list[Path | Checkpoint]:
    """What the fold reads, in order: from the start, every checkpoint; appending, those ``reread``, the newest
    folded before (linear rule: its link or copy in the state), then the new ones. With nothing new and no copy,
    the first running mean stands in as the newest checkpoint (the layout and the non-float tensors), weighed by
    none. The fold strips ``--strip-prefix`` from every checkpoint: state files, which hold the names as averaged,
    get it back first; a linked checkpoint is read like any input."""
    if manifest is None:
        return [s.opened or s.path for s in sources]
    prior: list[Path | Checkpoint] = []
    if manifest.theta in manifest.links:
        prior = [folder.open(manifest.theta, options.key)]
    elif manifest.theta:
        prior = [folder.open(manifest.theta)]
    elif not new:
        prior = [folder.open(next(c.mean for c in manifest.candidates if c.mean))]
    if options.strip_prefix and prior and manifest.theta not in manifest.links:
        prior = [prior[0].with_prefix(options.strip_prefix)]
    return [s.path for s in reread] + prior + [s.opened or s.path for s in new]


def _record(source: Source, listing: tuple[int, int] | None) -> Recorded:
    if listing is None:
        raise CkptEmaError("gone before its listing could be taken", source.path)
    size, mtime = listing
    return Recorded(str(source.path.absolute()), int(source.step), source.step_from, size, mtime)  # type: ignore[arg-type]


def _run(job: _Job, theta: SafetensorsOutput | None, options: AverageOptions, recorded: dict[str, str] | None,
         state: Path, progress: bool, desc: str) -> tuple[dict[str, str], int]:
    """Run the job's fold (in as few passes as the memory budget allows), the newest checkpoint copied to
    ``theta`` in the first; returns the run's tensor dtypes and the number of passes. ``recorded``: the dtypes the
    state's manifest (in ``state``) lists, which must name the tensors read."""
    accum = DTYPES[options.accum_dtype]
    out_dtype = DTYPES[options.out_dtype] if options.out_dtype else None
    from ckpt_ema.sweeping import candidates_per_pass  # (sweeping.py imports this module)

    per_pass = candidates_per_pass(options, len(job.lerps))
    seen: dict[str, str] = {}
    bar = tqdm(unit="B", unit_scale=True, desc=desc, disable=not progress)

    def opener(group: range, copy: bool):  # noqa: ANN202
        def on_layout(layout: Layout, n_used: int) -> None:
            if recorded is not None and list(recorded) != list(layout.shapes):
                raise CkptEmaError("the state's manifest does not list the tensors its files hold; remove the folder "
                                   "to start over", state)
            dtypes = ({k: getattr(torch, v) for k, v in recorded.items()} if recorded is not None
                      else dict(layout.dtypes))
            seen.update({k: str(v).removeprefix("torch.") for k, v in dtypes.items()})
            for sink, kind in [f for c in group for f in job.files[c]] + ([(theta, "input")] if copy else []):
                sink.open(layout.shapes, {name: _dtype_for(kind, d, accum, out_dtype) for name, d in dtypes.items()})
            bar.total = (bar.total or 0) + n_used * layout.float_nbytes()
        return on_layout

    with bar:
        for start in range(0, len(job.lerps), per_pass):
            group = range(start, min(start + per_pass, len(job.lerps)))
            fold(job.checkpoints, [job.lerps[c] for c in group], [job.sinks[c] for c in group],  # type: ignore[misc]
                 key=options.key, strip_prefix=options.strip_prefix, device=options.device, accum_dtype=accum,
                 chunk_elems=chunk_elems(options, len(group)), on_bytes=bar.update,
                 on_layout=opener(group, start == 0 and theta is not None), initial=[job.initial[c] for c in group],
                 newest_to=theta if start == 0 else None)
    return seen, -(-len(job.lerps) // per_pass)


def _dtype_for(kind: str, dtype: torch.dtype, accum: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """A tensor's dtype in one of the files an update writes: the output (its input dtype, or --out-dtype), a
    running mean (the accumulator's), the newest checkpoint's copy (its own)."""
    if not dtype.is_floating_point or kind == "input":
        return dtype
    return (out_dtype or dtype) if kind == "output" else accum
