"""The Python API: plan an average, run it, write it; many averages at once (a sweep); follow a run. The CLI is a
skin over these functions: it builds the options, calls them with a :class:`Reporter`, and prints what they return.

    import ckpt_ema
    result = ckpt_ema.average(["runs/cifar"], "ema.safetensors", decay=0.999, warmup=True)
    model.load_state_dict(result.state_dict)

Every function takes an :class:`~ckpt_ema.options.AverageOptions`, or the keyword arguments that build one
(:meth:`AverageOptions.build`: ``decay`` or ``half_life``, the warmup's, and every other field), or both (the
keywords then replace the options' fields). Every average runs through :func:`ckpt_ema.pipeline.run`. Everything
runs in this process unless ``world`` (a :class:`~ckpt_ema.engine.distributed.World` of several processes, as under
torchrun) asks for the multi-process path.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ema.discover import Discovery
from ckpt_ema.engine.distributed import World
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.follow.state import SWEEP_STATE_FOLDER, StateFolder, state_folder_of
from ckpt_ema.follow.watch import check_inputs
from ckpt_ema.follow.watch import watch as follow_run
from ckpt_ema.formats.registry import load_state_dict
from ckpt_ema.options import AverageOptions
from ckpt_ema.output.atomic import check_output_path
from ckpt_ema.output.folder import check_folder_output, is_folder_output
from ckpt_ema.output.like_input import check_like_input_options, check_like_input_output
from ckpt_ema.output.lock import output_lock
from ckpt_ema.pipeline import Outcome, Target
from ckpt_ema.pipeline import run as run_pipeline
from ckpt_ema.planning import Plan, make_plan, percent
from ckpt_ema.sweeping import (FINAL_MODEL, Candidate, Scorer, Scoring, SweepResult, choose, draw,
                               identical_candidates, remove_earlier_sweep, sweep_variants, sweep_warnings)

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack

    from ckpt_ema.options import OptionFields

Inputs = "list[str | Path] | str | Path"
DEFAULT_POLL_SECONDS = 2.0


@dataclass
class Reporter:
    """Where an API call's words go: a progress bar (``progress``), and lines for a person (``say``: notes,
    warnings, what was reused, the summary). Silent by default; the CLI passes one that prints to stderr."""

    progress: bool = False
    say: Callable[[str], None] | None = None

    def line(self, text: str) -> None:
        if self.say is not None:
            self.say(text)

    def note(self, text: str) -> None:
        self.line(f"note: {text}")

    def warning(self, text: str) -> None:
        self.line(f"warning: {text}")

    def discovery(self, found: Discovery) -> None:
        """What discovery left out and why, and what it noticed."""
        for text in found.skipped:
            self.line(f"skipped {text}")
        for text in found.notes:
            self.note(text)


def resolve_options(options: AverageOptions | None, fields: dict[str, Any]) -> AverageOptions:
    """``options`` (default: all defaults) with the keyword ``fields`` applied on top."""
    if options is None:
        return AverageOptions.build(**fields)
    return options.replaced(**fields) if fields else options


def _input_list(inputs: Sequence[str | Path] | str | Path) -> list[str | Path]:
    return [inputs] if isinstance(inputs, str | Path) else list(inputs)


@dataclass
class AverageResult:
    """What ``average`` did: the plan, the output files written, the time taken; the weights on request."""

    _state_dict: dict[str, torch.Tensor] | None
    plan: Plan
    output: Path | None
    seconds: float
    bytes_read: int = 0
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. stale temporary files of killed runs, removed
    note: str | None = None  # with a state: what was appended, or why it averaged from the start
    action: str = "averaged"  # "averaged" (from the start), "appended", "up to date"

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights: kept in memory without an output file, else read back from it."""
        if self._state_dict is None:
            assert self.output is not None
            written = self.files[-1] if self.files and self.files[-1].name.endswith(".index.json") else self.output
            self._state_dict, _ = load_state_dict(written)
        return self._state_dict

    def summary(self) -> str:
        size = sum(f.stat().st_size for f in self.files)
        where = ""
        weights = [f for f in self.files if f.name.endswith((".safetensors", ".index.json"))]
        if weights:
            shown = weights[-1] if len(weights) > 1 else self.output
            shards = f" + {len(weights) - 1} shards" if len(weights) > 1 else ""
            others = [f.name for f in self.files if f not in weights]
            beside = f" + {', '.join(others)}" if others else ""
            where = f" -> {shown}{shards}{beside} ({human_bytes(size)})"
        elif self.files:  # a checkpoint written like the input
            where = (f" -> {self.output}/ (step {self.plan.sources[-1].step}'s checkpoint, its model averaged: "
                     f"{len(self.files)} files, {human_bytes(size)})")
        sources = self.plan.sources
        weighed = sum(1 for w in self.plan.weighting.weights if w > 0)
        counted = (f"{weighed} checkpoint{'' if weighed == 1 else 's'}" if weighed == len(sources) else
                   f"{weighed} of {len(sources)} checkpoints")
        warned = (f"; warning: {self.plan.first_share:.0%} of the weight is on the first checkpoint"
                  if self.plan.first_checkpoint_warnings() else "")
        window = self.plan.weighting.effective_window()
        return (f"averaged {counted} (steps {sources[0].step}..{sources[-1].step}, effective window "
                f"{window} checkpoint{'' if window == 1 else 's'}, unresolved {percent(self.plan.weighting.unresolved)})"
                f"{where} in {self.seconds:.1f} s "
                f"({human_bytes(self.bytes_read / max(self.seconds, 1e-9))}/s){warned}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def plan(inputs: list[str | Path] | str | Path, options: AverageOptions | None = None,
         **fields: Unpack[OptionFields]) -> Plan:
    """Resolve the checkpoints and their weights without reading any tensor (what ``--dry-run`` shows)."""
    return make_plan(_input_list(inputs), resolve_options(options, dict(fields)))


def check_output(output: str | Path) -> Path:
    """Fail before any work is done when ``output`` (a .safetensors file, or a folder: ``DIR/`` or an existing
    one) cannot be written."""
    return check_folder_output(output) if is_folder_output(output) else check_output_path(output)


def average(inputs: Sequence[str | Path] | str | Path, output: str | Path | None = None,
            options: AverageOptions | None = None, *, keep_state: bool = True, world: World | None = None,
            report: Reporter | None = None, progress: bool = False, watch: bool = False,
            poll: float = DEFAULT_POLL_SECONDS, until_step: int | None = None, like_input: bool = False,
            **fields: Unpack[OptionFields]) -> AverageResult | None:
    """Average checkpoints with timm's EMA recurrence (or a power EMA, or a uniform mean of the newest ``last``);
    write the result to ``output`` (.safetensors, or a model folder ``DIR/``) if given, else keep it in memory
    (``result.state_dict``). With ``like_input``, ``output`` is a folder that becomes a checkpoint of the run's own
    format: the newest checkpoint with its model entries averaged (:mod:`ckpt_ema.output.like_input`).

    With an output and ``keep_state``, what the average needs to go on is kept beside it (``OUT.ckpt-ema-state``)
    and a later call folds in only the checkpoints that are new since (:mod:`ckpt_ema.pipeline`); ``result.note``
    says what was reused. With ``watch``, the run is followed: each new checkpoint is folded in once the trainer
    has written it, until SIGINT/SIGTERM or a checkpoint at ``until_step`` (returns the last update; None when
    nothing was folded). Several processes (``world``) keep no state. ``report`` receives progress and notes.

    Raises :class:`~ckpt_ema.errors.CkptEmaError` on bad input, before anything is written.
    """
    opts = resolve_options(options, dict(fields))
    report = report or Reporter(progress=progress)
    shared = world is not None and world.is_distributed
    if output is None:
        if watch or like_input:
            raise OptionError("watch" if watch else "like_input", "needs an output to write")
        target = Target("average", opts, None)
        done = run_pipeline(_input_list(inputs), [target], world=world, progress=report.progress,
                            on_discovery=report.discovery)
        return _average_result(done, target, report, state_kept=False, said=False)
    if like_input:
        check_like_input_options(opts.out_dtype, shared)
        out = check_like_input_output(Path(output))
    else:
        out = check_output(output)  # before reading anything: a typo in -o should not cost a whole run
    target = Target("average", opts, out, folder=is_folder_output(output) and not like_input, like_input=like_input)
    _check_watch(watch, keep_state, shared, until_step, poll)
    state = StateFolder(state_folder_of(out)) if keep_state and not shared else None
    with _locked(out, world):
        kept = _keep_current(_input_list(inputs), [target], state, world, report, watch, poll, until_step)
        if not keep_state and (world is None or world.rank == 0):
            StateFolder(state_folder_of(out)).remove()  # it no longer describes the output
    if kept is None:
        return None
    return _average_result(kept, target, report, state_kept=state is not None, said=watch)


def run(the_plan: Plan, output: str | Path | None = None, *, report: Reporter | None = None,
        world: World | None = None) -> AverageResult:
    """Average what ``the_plan`` planned (:func:`plan`) into ``output`` (or memory), keeping no state."""
    inputs = [s.path for s in the_plan.sources]
    result = average(inputs, output, the_plan.options, keep_state=False, world=world, report=report)
    assert result is not None
    return result


def _average_result(done: Outcome, target: Target, report: Reporter, *, state_kept: bool,
                    said: bool) -> AverageResult:
    """The result of one average, its notes, warnings and summary said (the summary only when it wrote); ``said``:
    a watch said each update as it went."""
    plan = done.plans[0]
    result = AverageResult(done.tensors[0] if done.tensors else None, plan,
                           target.weights if target.folder else target.output, done.seconds, done.bytes_read,
                           done.files[0] if done.files else [], done.notes, done.message, done.action)
    if said:
        return result
    for text in [*plan.notes, *done.notes]:
        report.note(text)
    if state_kept:
        report.line(update_line(done, [target]))
    if done.action != "up to date":
        for text in plan.warnings():  # after the run: a failing run's error stays its one line
            report.warning(text)
        report.line(result.summary())
    return result


def update_line(done: Outcome, targets: Sequence[Target]) -> str:
    """One line per update: the newest step, what was done, the time, where."""
    return f"step {done.plans[0].sources[-1].step}: {done.message}; {done.seconds:.2f} s -> {_where(targets)}"


def _where(targets: Sequence[Target]) -> str:
    first = targets[0].output
    return str(first) if len(targets) == 1 or first is None else f"{first.parent}/ ({len(targets)} candidates)"


def _keep_current(inputs: list[str | Path], targets: list[Target], state: StateFolder | None, world: World | None,
                  report: Reporter, watch: bool, poll: float, until_step: int | None) -> Outcome | None:
    """One run of the pipeline, or with ``watch`` one per new checkpoint until stopped (the last; None: none)."""
    if not watch:
        return run_pipeline(inputs, targets, state, world=world, progress=report.progress,
                            on_discovery=report.discovery)
    assert state is not None
    check_inputs(inputs)  # a path that is not there: one line now, not a watch that never ends
    report.line(f"watching {', '.join(map(str, inputs))} (every {poll:g} s"
                f"{'' if until_step is None else f', until step {until_step}'}); Ctrl-C stops")
    done = follow_run(inputs, targets, state, poll=poll, until_step=until_step,
                      on_update=lambda u: report.line(update_line(u, targets)), on_note=report.line,
                      progress=report.progress)
    if done is None:
        report.line("stopped before any checkpoint was folded")
    else:
        sources = done.plans[0].sources
        report.line(f"stopped: {_where(targets)} holds steps {sources[0].step}..{sources[-1].step} "
                    f"({len(sources)} checkpoints)")
    return done


def _check_watch(watch: bool, keep_state: bool, shared: bool, until_step: int | None, poll: float) -> None:
    """Following a run keeps state beside the outputs, in one process."""
    if watch and not keep_state:
        raise OptionError("watch", "keeps state beside the output: it does not go with --no-state (keep_state False)")
    if watch and shared:
        raise OptionError("watch", "keeps state beside the output: several processes (torchrun) keep none")
    if until_step is not None and not watch:
        raise OptionError("until_step", "goes with --watch (watch True)")
    if not poll > 0:
        raise OptionError("poll", f"must be > 0 seconds, got {poll}")


@contextmanager
def _locked(output: Path, world: World | None) -> Iterator[None]:
    """``output``'s lock (:mod:`ckpt_ema.output.lock`), taken by rank 0 alone under torchrun (the ranks write the
    output together; a refusal there stops the others through torchrun)."""
    with output_lock(output) if world is None or world.rank == 0 else nullcontext():
        yield


def sweep(inputs: Sequence[str | Path] | str | Path, outdir: str | Path, *, decays: Sequence[float] = (),
          half_lives: Sequence[float] = (), lasts: Sequence[int] = (), sigma_rels: Sequence[float] = (),
          shapes: Sequence[str] = (), windows: Sequence[int] = (), token_windows: Sequence[int] = (),
          options: AverageOptions | None = None, score: Scoring | Scorer | None = None, plot: bool = True,
          keep_state: bool = True, world: World | None = None, report: Reporter | None = None,
          progress: bool = False, watch: bool = False, poll: float = DEFAULT_POLL_SECONDS,
          until_step: int | None = None, **fields: Unpack[OptionFields]) -> SweepResult | None:
    """Many averages from one read of the checkpoints: one candidate per decay, half-life, sigma_rel (power EMA), K
    of ``lasts``, and shape (``shapes``: linear, cosine, 1-sqrt, uniform) and window (``windows`` in steps,
    ``token_windows`` in tokens), each written to ``OUTDIR/<candidate>.safetensors``. With ``score`` (a
    :class:`~ckpt_ema.sweeping.Scoring`, or a function from a weights file's path to named scores, ranked by the first,
    higher being better), each candidate and the final model are scored and the best copied to
    ``OUTDIR/best.safetensors`` if it beats the final model (:func:`ckpt_ema.sweeping.choose`).

    With ``keep_state`` (one process), the state of every candidate is kept in ``OUTDIR/ckpt-ema-state`` and a
    later call folds in only the new checkpoints, as :func:`average` does; ``watch`` follows the run as there, and
    scores once it stops. Files of an earlier sweep into ``OUTDIR`` that this one does not write are removed; a
    sweep that fails removes the folder if it made it."""
    base = resolve_options(options, dict(fields))
    report = report or Reporter(progress=progress)
    scoring = score if score is None or isinstance(score, Scoring) else Scoring(score)
    variants = sweep_variants(base, decays=decays, half_lives=half_lives, lasts=lasts, sigma_rels=sigma_rels,
                              shapes=shapes, windows=windows, token_windows=token_windows)
    folder = Path(outdir)
    if not folder.parent.is_dir():
        raise CkptEmaError("the output folder's parent does not exist", folder)
    if folder.exists() and not folder.is_dir():
        raise CkptEmaError("the output is a file, not a folder", folder)
    shared = world is not None and world.is_distributed
    _check_watch(watch, keep_state, shared, until_step, poll)
    state = StateFolder(folder / SWEEP_STATE_FOLDER) if keep_state and not shared else None
    targets = [Target(name, opts, folder / f"{name}.safetensors") for name, opts in variants]
    with _locked(folder, world), _made_folder(folder, world):
        done = _keep_current(_input_list(inputs), targets, state, world, report, watch, poll, until_step)
        if done is None:
            return None
        candidates = [Candidate(t.name, p, t.output) for t, p in zip(targets, done.plans)]
        said = [done.message] if state is not None else []  # what was reused, or why everything was redone
        result = SweepResult(candidates, done.seconds, done.passes,
                             notes=[*said, *identical_candidates(candidates), *done.notes], update=done)
        if world is not None and world.rank != 0:
            return result  # under torchrun: scores, the choice and pictures come from rank 0
        if not keep_state:
            StateFolder(folder / SWEEP_STATE_FOLDER).remove()
        remove_earlier_sweep(folder, [t.name for t in targets] + (["best", FINAL_MODEL] if scoring else []))
        result.scoring = scoring
        if scoring is not None:
            result.final_output = _final_model(candidates[0].plan, folder)
            choose(result, scoring, folder)
        if plot:
            draw(result, folder, scoring)
    if not watch:  # (a watch said each update as it went)
        _say_sweep(result, done, state is not None, targets, report)
    return result


def _final_model(newest: Plan, folder: Path) -> Path:
    """The newest checkpoint's weights, written as the candidates are (``final-model.safetensors``), to be scored
    by the same loader."""
    output = folder / f"{FINAL_MODEL}.safetensors"
    final = Target(FINAL_MODEL, newest.options.replaced(last=1), output)
    run_pipeline([newest.sources[-1].path], [final])
    return output


def _say_sweep(result: SweepResult, done: Outcome, state_kept: bool, targets: list[Target],
               report: Reporter) -> None:
    if state_kept:
        report.line(update_line(done, targets))
    if done.action == "up to date":
        return
    for text in result.candidates[0].plan.notes:
        report.note(text)
    for text in sweep_warnings(result.candidates):
        report.warning(text)
    reads = "once" if result.passes == 1 else f"{result.passes} times (the memory budget holds fewer candidates at once)"
    outdir = targets[0].output.parent if targets[0].output is not None else ""
    report.line(f"read {len(done.new)} checkpoints {reads} for {len(targets)} candidates in {done.seconds:.1f} s; "
                f"wrote {outdir}/<candidate>.safetensors")


@contextmanager
def _made_folder(folder: Path, world: World | None) -> Iterator[None]:
    """Make ``folder`` if missing for what runs inside; if that fails, remove it again with all that was written
    into it (a failed sweep leaves no folder it made)."""
    made = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        if made and (world is None or world.rank == 0):
            shutil.rmtree(folder, ignore_errors=True)
        raise
