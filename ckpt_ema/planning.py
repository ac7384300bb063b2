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
from ckpt_ema.options import AverageOptions
from ckpt_ema.weighting import Weighting, ema_weighting, power_weighting, uniform_weighting


@dataclass
class Plan:
    """The checkpoints in training order and the final weight of each: everything but the tensors."""

    discovery: Discovery
    weighting: Weighting
    options: AverageOptions

    @property
    def sources(self) -> list[Source]:
        return self.discovery.sources

    def table(self) -> str:
        """One line per checkpoint (step, weight, path), the effective window and the unresolved share: what
        ``--dry-run`` prints."""
        lines = [f"{'#':>4}  {'step':>10}  {'weight':>10}  checkpoint"]
        for i, (source, w) in enumerate(zip(self.sources, self.weighting.weights)):
            lines.append(f"{i:>4}  {source.step:>10}  {w:>10.3e}  {source.path}")
        lines.append(self.window_line())
        lines.append(self.resolution_line())
        return "\n".join(lines)

    def resolution_line(self) -> str:
        """How much of the per-step weights asked for the checkpoints' spacing cannot place (the unresolved share U
        of :mod:`ckpt_ema.weighting`)."""
        if self.options.last is not None:
            return "a uniform mean of checkpoints: nothing between them is asked for (unresolved 0%)"
        return (f"unresolved {percent(self.weighting.unresolved)}: the share of the per-step weights asked for that "
                "lies in their shape between checkpoints, which the checkpoints cannot place")

    def warnings(self) -> list[str]:
        """One line when the checkpoints are too far apart for the average asked for."""
        if not self.weighting.too_sparse():
            return []
        return [f"the checkpoints are too far apart for this average: {percent(self.weighting.unresolved)} of its "
                f"per-step weights are unresolved and the newest {self.weighting.effective_window()} checkpoints carry "
                "99% of it; save checkpoints more often or ask for a longer average"]


    def window_line(self) -> str:
        n = len(self.sources)
        k = self.weighting.effective_window()
        first, last = self.sources[0].step, self.sources[-1].step
        start = self.sources[n - k].step
        return (f"{n} checkpoints, steps {first}..{last}; the newest {k} carry 99% of the weight "
                f"(steps {start}..{last}, a window of {last - start} steps)")


def percent(share: float) -> str:
    """A share as a short percentage: 0.0341 -> '3.4%'; rounding noise -> '0%'."""
    return f"{100 * share:.2g}%" if share >= 5e-5 else "0%"


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
    """The weights ``options`` ask for: a uniform mean of the newest ``last``, a power EMA, or timm's EMA."""
    if options.last is not None:
        return uniform_weighting(steps, options.last)
    if options.sigma_rel is not None:
        return power_weighting(steps, options.sigma_rel, options.interpolate)
    weighting = ema_weighting(steps, options.schedule, options.bias_correction, options.interpolate)
    if not any(weighting.weights):
        raise OptionError("update_after_step", f"{options.schedule.update_after_step} is at or after every "
                                               "checkpoint's step: nothing to average")
    return weighting
