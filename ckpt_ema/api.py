"""The Python API: plan an average, run it, write it; or many averages at once (a sweep). The CLI is a thin layer
over these functions.

    import ckpt_ema
    result = ckpt_ema.average(["runs/cifar"], "ema.safetensors", decay=0.999, warmup=True)
    model.load_state_dict(result.state_dict)

Every function takes an :class:`~ckpt_ema.options.AverageOptions`, or the keyword arguments that build one
(:meth:`AverageOptions.build`: ``decay`` or ``half_life``, the warmup's, and every other field), or both (the
keywords then replace the options' fields). Everything runs in this process unless ``world`` (a
:class:`~ckpt_ema.engine.distributed.World` of several processes, as under torchrun) asks for the multi-process path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ema.engine.distributed import World
from ckpt_ema.engine.runner import bytes_read_by, check_device, run_plans
from ckpt_ema.formats.registry import load_state_dict
from ckpt_ema.options import AverageOptions
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.output.atomic import check_not_an_input, check_output_path, output_files
from ckpt_ema.output.folder import FolderOutput, check_folder_output, is_folder_output, model_files_of
from ckpt_ema.output.metadata import output_metadata
from ckpt_ema.output.sinks import MemoryOutput, SafetensorsOutput, index_path_of
from ckpt_ema.planning import Plan, make_plan, percent

if TYPE_CHECKING:
    import torch
    from typing_extensions import Unpack

    from ckpt_ema.options import OptionFields
    from ckpt_ema.sweeping import Scorer, Scoring, SweepResult

Inputs = "list[str | Path] | str | Path"


def resolve_options(options: AverageOptions | None, fields: dict[str, Any]) -> AverageOptions:
    """``options`` (default: all defaults) with the keyword ``fields`` applied on top."""
    if options is None:
        return AverageOptions.build(**fields)
    return options.replaced(**fields) if fields else options


def _input_list(inputs: list[str | Path] | str | Path) -> list[str | Path]:
    return [inputs] if isinstance(inputs, str | Path) else list(inputs)


@dataclass
class AverageResult:
    """What ``average`` did: the plan, the output files written, the time taken; the weights on request."""

    _state_dict: dict[str, torch.Tensor] | None
    plan: Plan
    metadata: dict[str, str]
    output: Path | None
    seconds: float
    bytes_read: int = 0
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. stale temporary files of killed runs, removed
    note: str | None = None  # with a state: what was appended, or why it averaged from the start

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
        sources = self.plan.sources
        warned = (f"; warning: {self.plan.first_share:.0%} of the weight is on the first checkpoint"
                  if self.plan.first_checkpoint_warnings() else "")
        return (f"averaged {len(sources)} checkpoints (steps {sources[0].step}..{sources[-1].step}, effective window "
                f"{self.plan.weighting.effective_window()} checkpoints, unresolved {percent(self.plan.weighting.unresolved)})"
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


def average(inputs: list[str | Path] | str | Path, output: str | Path | None = None,
            options: AverageOptions | None = None, *, progress: bool = False, world: World | None = None,
            keep_state: bool = True, **fields: Unpack[OptionFields]) -> AverageResult:
    """Average checkpoints with timm's EMA recurrence (or a uniform mean of the newest ``last``); write the result
    to ``output`` (.safetensors) if given, else keep it in memory (``result.state_dict``).

    With an output and ``keep_state``, what the average needs to go on is kept beside it (``OUT.ckpt-ema-state``;
    beside a model folder too),
    and a later call folds in only the checkpoints that are new since (:mod:`ckpt_ema.follow`); ``result.note``
    says what was reused. Several processes (``world``) keep no state.

    Raises :class:`~ckpt_ema.errors.CkptEmaError` on bad input, before anything is written.
    """
    if output is None:
        return run(plan(inputs, options, **fields), progress=progress, world=world)
    out = check_output(output)  # before reading anything: a typo in -o should not cost a whole run
    if world is not None and world.is_distributed:
        return run(plan(inputs, options, **fields), output, progress=progress, world=world)  # (no state kept)
    from ckpt_ema.follow.state import StateFolder, state_folder_of

    folder = StateFolder(state_folder_of(out))
    if not keep_state:
        result = run(plan(inputs, options, **fields), output, progress=progress, world=world)
        folder.remove()  # it no longer describes the output
        return result
    from ckpt_ema.follow.update import Target, update

    target = Target("average", resolve_options(options, dict(fields)), out, folder=is_folder_output(output))
    done = update(_input_list(inputs), [target], folder, progress=progress)
    files = done.files[0] if done.files else output_files(target.weights)
    return AverageResult(None, done.plans[0], {}, target.weights if target.folder else out, done.seconds,
                         done.bytes_read, files, note=done.message)


def check_output(output: str | Path) -> Path:
    """Fail before any work is done when ``output`` (a .safetensors file, or a folder: ``DIR/`` or an existing
    one) cannot be written."""
    return check_folder_output(output) if is_folder_output(output) else check_output_path(output)


def run(the_plan: Plan, output: str | Path | None = None, *, progress: bool = False,
        world: World | None = None) -> AverageResult:
    """Read the planned checkpoints once and write their average to ``output`` (or keep it in memory): a
    .safetensors file, or a model folder (``DIR/``: the weights plus the newest checkpoint's model files)."""
    check_device(the_plan.options.device)
    started = time.perf_counter()
    metadata = output_metadata(the_plan)
    sink: SafetensorsOutput | MemoryOutput = MemoryOutput()
    if output is not None:
        out_path = check_output(output)
        if is_folder_output(output):
            sink = FolderOutput(out_path, model_files_of(the_plan.sources[-1].path), metadata,
                                the_plan.options.max_shard_size)
        else:
            sink = SafetensorsOutput(out_path, metadata, the_plan.options.max_shard_size)
        replaced = output_files(sink.path)
        if isinstance(sink, FolderOutput):
            replaced += [sink.folder / f.name for f in sink.model_files]
        check_not_an_input(replaced, the_plan.input_files())
        check_not_inside_an_input(sink.path, the_plan)
    written = run_plans([the_plan], [sink], progress=progress, desc="averaging", world=world)
    state = sink.tensors if isinstance(sink, MemoryOutput) else None
    return AverageResult(state, the_plan, metadata, getattr(sink, "path", None), time.perf_counter() - started,
                         bytes_read_by([the_plan]), written[0], getattr(sink, "notes", []))


def check_not_inside_an_input(path: Path, the_plan: Plan) -> None:
    """Refuse an output written into an input checkpoint's folder (a DCP or DeepSpeed folder, a checkpoint-N/):
    it would change what that checkpoint is."""
    target = path.resolve()
    for source in the_plan.sources:
        if source.path.is_dir() and source.path.resolve() in target.parents:
            raise CkptEmaError(f"the output would be written into the input checkpoint {source.path}", path)


def sweep(inputs: list[str | Path] | str | Path, outdir: str | Path, *, decays: list[float] = (),
          half_lives: list[float] = (), lasts: list[int] = (), sigma_rels: list[float] = (),
          options: AverageOptions | None = None, score: Scoring | Scorer | None = None, plot: bool = True,
          progress: bool = False, world: World | None = None, keep_state: bool = True,
          **fields: Unpack[OptionFields]) -> SweepResult:
    """Many averages from one read of the checkpoints: one candidate per decay, half-life, sigma_rel (power EMA) and
    K of ``lasts``, each written to ``OUTDIR/<candidate>.safetensors``. With ``score`` (a
    :class:`~ckpt_ema.sweeping.Scoring`, or a function from a weights file's path to named scores, ranked by the first,
    higher being better), each candidate and the final model are scored and the best copied to
    ``OUTDIR/best.safetensors`` if it beats the final model (see :func:`ckpt_ema.sweeping.run_sweep`).

    With ``keep_state`` (one process), the state of every candidate is kept in ``OUTDIR/ckpt-ema-state`` and a
    later call folds in only the new checkpoints, as :func:`average` does; the first of ``result.notes`` says so."""
    from ckpt_ema.sweeping import (Scoring, finish_sweep, output_folder, plan_sweep, run_sweep, sweep_result_of,
                                   sweep_targets)

    base = resolve_options(options, dict(fields))
    scoring = score if score is None or isinstance(score, Scoring) else Scoring(score)
    if keep_state and (world is None or not world.is_distributed):
        from ckpt_ema.follow.update import update

        targets, folder = sweep_targets(Path(outdir), base, decays=list(decays), half_lives=list(half_lives),
                                        lasts=list(lasts), sigma_rels=list(sigma_rels))
        with output_folder(Path(outdir)):
            done = update(_input_list(inputs), targets, folder, progress=progress,
                          desc=f"sweeping {len(targets)} candidates")
        result = sweep_result_of(targets, done)
        finish_sweep(result, Path(outdir), score=scoring, plot=plot)
        return result
    candidates = plan_sweep(_input_list(inputs), base, decays=list(decays), half_lives=list(half_lives),
                            lasts=list(lasts), sigma_rels=list(sigma_rels))
    return run_sweep(candidates, Path(outdir), score=scoring, plot=plot, progress=progress, world=world)
