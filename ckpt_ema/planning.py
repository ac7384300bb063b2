"""A plan: the run's checkpoints in training order and the final weight of each, from steps alone (no tensor read).

:func:`make_plan` is what ``--dry-run`` shows and what the engine then executes; :class:`Plan` carries the
discovery (which files, which steps, what was left out and why), the weighting (:mod:`ckpt_ema.weighting`) and the
options that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ckpt_ema.discover import Discovery, Source, discover
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.formats.hf import HF_INDEX_FILES, weight_files_of
from ckpt_ema.options import AverageOptions
from ckpt_ema.weighting import Weighting, ema_weighting, uniform_weighting


@dataclass
class Plan:
    """The checkpoints in training order and the final weight of each: everything but the tensors."""

    discovery: Discovery
    weighting: Weighting
    options: AverageOptions

    @property
    def sources(self) -> list[Source]:
        return self.discovery.sources

    def input_files(self) -> list[Path]:
        """Every file the planned checkpoints consist of: each weight file, each shard of a sharded set and its
        index, a folder's weights (what no output may replace)."""
        files: list[Path] = []
        for source in self.sources:
            files += weight_files_of(source.path)
            if source.path.is_dir():
                files += [source.path / name for name in HF_INDEX_FILES]
            else:
                files.append(source.path)
        return files

    def table(self) -> str:
        """One line per checkpoint (step, weight, path) and the effective window: what ``--dry-run`` prints."""
        lines = [f"{'#':>4}  {'step':>10}  {'weight':>10}  checkpoint"]
        for i, (source, w) in enumerate(zip(self.sources, self.weighting.weights)):
            lines.append(f"{i:>4}  {source.step:>10}  {w:>10.3e}  {source.path}")
        lines.append(self.window_line())
        return "\n".join(lines)

    def window_line(self) -> str:
        n = len(self.sources)
        k = self.weighting.effective_window()
        first, last = self.sources[0].step, self.sources[-1].step
        start = self.sources[n - k].step
        return (f"{n} checkpoints, steps {first}..{last}; the newest {k} carry 99% of the weight "
                f"(steps {start}..{last}, a window of {last - start} steps)")


def make_plan(inputs: list[str | Path], options: AverageOptions) -> Plan:
    """Resolve the checkpoints ``inputs`` name and their weights under ``options``, reading no tensor."""
    found = discover_window(inputs, options)
    return Plan(found, weighting_for(options, [s.step for s in found.sources]), options)  # type: ignore[misc]


def discover_window(inputs: list[str | Path], options: AverageOptions) -> Discovery:
    """The checkpoints ``inputs`` name, in training order, within the options' from_step/to_step window."""
    found = discover(list(inputs), options.key, options.per_checkpoint)
    return within_window(found, options.from_step, options.to_step)


def within_window(found: Discovery, from_step: int | None, to_step: int | None) -> Discovery:
    """Keep the checkpoints with from_step <= step <= to_step; an empty window is an error."""
    if from_step is None and to_step is None:
        return found
    low = -1 if from_step is None else from_step
    high = float("inf") if to_step is None else to_step
    kept = [s for s in found.sources if low <= s.step <= high]  # type: ignore[operator]
    if not kept:
        steps = f"{found.sources[0].step}..{found.sources[-1].step}"
        window = f"{'…' if from_step is None else from_step}..{'…' if to_step is None else to_step}"
        raise CkptEmaError(f"no checkpoint has a step in {window} (the run has steps {steps})")
    return replace(found, sources=kept)


def weighting_for(options: AverageOptions, steps: list[int]) -> Weighting:
    """The weights ``options`` ask for: a uniform mean of the newest ``last``, or the EMA."""
    if options.last is not None:
        return uniform_weighting(steps, options.last)
    weighting = ema_weighting(steps, options.schedule, options.bias_correction, options.interpolate)
    if not any(weighting.weights):
        raise OptionError("update_after_step", f"{options.schedule.update_after_step} is at or after every "
                                               "checkpoint's step: nothing to average")
    return weighting
