"""A plan: the run's checkpoints in training order and the final weight of each, from steps alone (no tensor read).

:func:`make_plan` is what ``--dry-run`` shows and what the engine then executes; :class:`Plan` carries the
discovery (which files, which steps, what was left out and why), the weighting (:mod:`ckpt_ema.weighting`) and the
options that produced them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ckpt_ema.discover import Discovery, Source, discover
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.formats.model_folder import HF_INDEX_FILES
from ckpt_ema.formats.registry import checkpoint_files
from ckpt_ema.options import AverageOptions
from ckpt_ema.weighting import (EmaState, Weighting, ema_continuation, ema_total, ema_unresolved,
                                ema_unresolved_continued, ema_weighting, power_continuation, power_weighting,
                                uniform_weighting)
from ckpt_ema.window_weights import token_window, window_start, window_weighting


# Warn when the first checkpoint carries more than this share of an EMA's weight. That share is what the EMA
# remembers of everything before it: prod of d(s) over the whole run, about exp(-span / tau) for a decay d and its
# time constant tau = 1 / (1 - d). Above 10% the run after the first checkpoint spans fewer than ln 10 = 2.3 time
# constants: the average has not forgotten its start, and a step-0 (untrained) or early checkpoint pulls it back
# (the run: 71% on step 0, 18.7% accuracy against 35.2% for the final model). A well-warmed EMA gives the
# first of many checkpoints about what it gives any other, far below 10%.
FIRST_SHARE_WARNING = 0.10


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
            files += checkpoint_files(source.path)
            if source.path.is_dir():
                files += [source.path / name for name in HF_INDEX_FILES]
            else:
                files.append(source.path)
        return files

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
        if self.options.weights is not None:
            return (f"a {self.options.weights} merge over {self.window_words()} weighs checkpoints: the decay it "
                    "stands for is averaged over each interval between them")
        return (f"unresolved {percent(self.weighting.unresolved)}: the share of the per-step weights asked for that "
                "lies in their shape between checkpoints, which the checkpoints cannot place")

    def warnings(self) -> list[str]:
        """The traps this plan falls into, one line each: a single checkpoint, checkpoints too far apart for the
        average asked for, and a first checkpoint that holds a large share of the weight
        (:meth:`first_checkpoint_warnings`)."""
        lines = self.first_checkpoint_warnings() + self.window_warnings() + self.tokens_per_step_warnings()
        if len(self.sources) == 1:  # no average at all, whatever the spacing would need
            lines.insert(0, f"only one checkpoint, {self.sources[0].path}: the result is its weights, not an average; "
                            "give the run's folder (or a glob) to average its checkpoints")
        elif self.weighting.too_sparse():
            lines.insert(0, f"the checkpoints are too far apart for this average: "
                            f"{percent(self.weighting.unresolved)} of its per-step weights are unresolved and the "
                            f"newest {self.weighting.effective_window()} checkpoints carry 99% of it; save checkpoints "
                            "more often or ask for a longer average")
        return lines

    def window_warnings(self) -> list[str]:
        """A line when the window asked for reaches before the first checkpoint (it then begins there)."""
        window = self.window
        if window is None or len(self.sources) < 2:
            return []
        steps = [s.step for s in self.sources]
        if steps[-1] - window >= steps[0] or window_start(steps, window) != 0:
            return []
        tokens = f" ({self.options.window_tokens} tokens)" if self.options.window_tokens is not None else ""
        return [f"the window of {window} steps{tokens} reaches before the first checkpoint (step {steps[0]}): it "
                f"begins there, {steps[-1] - steps[0]} steps before the newest"]

    def tokens_per_step_warnings(self) -> list[str]:
        """A line when --tokens-per-step places a window in tokens although the checkpoints record their tokens,
        and some interval between two of them trained on another number per step. The flag stands (it is what was
        asked, and a record may count another thing: a Trainer's non-padding tokens), but the window then is not
        the newest T tokens the run records."""
        n = self.options.tokens_per_step
        if n is None or self.options.window_tokens is None:
            return []
        for before, after in zip(self.sources, self.sources[1:]):
            if before.tokens is None or after.tokens is None:
                continue
            trained, steps = after.tokens - before.tokens, after.step - before.step
            if trained != n * steps:
                return [f"--tokens-per-step {n} is not what the checkpoints record: {trained} tokens over the "
                        f"{steps} steps from {before.path} to {after.path} ({trained / steps:.6g} per step); the "
                        f"window is taken at {n} per step as asked (leave --tokens-per-step out to use the records)"]
        return []

    @property
    def window(self) -> int | None:
        """The window of a window merge, in steps (:func:`window_of`); None for any other average."""
        return window_of(self.options, self.sources)

    def window_words(self) -> str:
        """The window of a window merge as asked and as placed on the run's steps, for people."""
        window, end = self.window, self.sources[-1].step
        assert window is not None, "a window merge has a window"
        steps = f"steps {end - window}..{end}"
        if self.options.window_tokens is None:
            return f"the newest {window} steps ({steps})"
        at = (f"at --tokens-per-step {self.options.tokens_per_step}" if self.options.tokens_per_step is not None
              else "by the token counts the checkpoints record")
        return f"the newest {self.options.window_tokens} tokens: {window} steps {at} ({steps})"

    @property
    def first_share(self) -> float:
        """The share of the weight on the first checkpoint."""
        return self.weighting.weights[0]

    def first_checkpoint_warnings(self) -> list[str]:
        """A line when timm's EMA (not a uniform mean, not the power EMA) puts more than FIRST_SHARE_WARNING of its
        weight on the first checkpoint, naming it, its share and the cures."""
        if (not keeps_mean(self.options) or self.options.sigma_rel is not None or len(self.sources) < 2
                or self.first_share <= FIRST_SHARE_WARNING):
            return []
        first = self.sources[0]
        return [f"the first checkpoint, {first.path} (step {first.step}), holds {self.first_share:.0%} of the weight: "
                "the EMA has not forgotten where it started. If that is an untrained or early network, use --warmup, "
                "--from-step to start later, --bias-correction, or a smaller --decay"]

    @property
    def notes(self) -> list[str]:
        """What the options combine into that the user should know."""
        schedule = self.options.schedule
        if self.options.bias_correction and schedule.warmup:
            change = "nothing" if schedule.min_decay == 0 else "little"
            return [f"--warmup and --bias-correction are two cures for the same start-up bias: with warmup the first "
                    f"averaged step has decay --min-decay ({schedule.min_decay:g}), so the correction changes "
                    f"{change}; use one"]
        return []


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
    weighting = weighting_for(options, found.sources)
    if not any(weighting.weights):
        raise nothing_to_average(options)
    return Plan(found, weighting, options)


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
    kept = [s for s in found.sources if low <= s.step <= high]
    if not kept:
        steps = f"{found.sources[0].step}..{found.sources[-1].step}"
        window = f"{'…' if from_step is None else from_step}..{'…' if to_step is None else to_step}"
        raise CkptEmaError(f"no checkpoint has a step in {window} (the run has steps {steps})")
    return replace(found, sources=kept)


def weighting_for(options: AverageOptions, sources: Sequence[Source]) -> Weighting:
    """The weights ``options`` ask for over a whole run (its checkpoints ``sources``, in training order): a uniform
    mean of the newest ``last``, a window merge, a power EMA, or timm's EMA. (Every weight may be zero: every step
    before ``update_after_step``; the caller says so.)"""
    steps = [s.step for s in sources]
    if options.last is not None:
        return uniform_weighting(steps, options.last)
    window = window_of(options, sources)
    if options.weights is not None and window is not None:
        return window_weighting(steps, options.weights, window)
    if options.sigma_rel is not None:
        return power_weighting(steps, options.sigma_rel, options.interpolate)
    return ema_weighting(steps, options.schedule, options.bias_correction, options.interpolate)


def window_of(options: AverageOptions, sources: Sequence[Source]) -> int | None:
    """The window of a window merge in steps (None: no window merge): ``--window-steps``; ``--window-tokens`` at
    ``--tokens-per-step``, rounded up to whole steps; or ``--window-tokens`` alone, the steps that trained the newest
    T tokens by the counts the checkpoints record (:func:`ckpt_ema.window_weights.token_window`)."""
    if options.weights is None or options.window_tokens is None or options.tokens_per_step is not None:
        return options.window
    return token_window([s.step for s in sources], recorded_tokens(sources), options.window_tokens)


def recorded_tokens(sources: Sequence[Source]) -> list[int]:
    """The tokens trained on that each checkpoint records, checked to grow with the step: a checkpoint without a
    count (the first is named, and the cure) or counts that do not grow are refused in one line."""
    missing = next((s for s in sources if s.tokens is None), None)
    if missing is not None:
        raise CkptEmaError("records no count of the tokens trained on (OLMo-core's global_train_tokens_seen, a "
                           "Hugging Face Trainer's num_input_tokens_seen), which --window-tokens reads without "
                           "--tokens-per-step: give --tokens-per-step", missing.path)
    tokens = [s.tokens for s in sources if s.tokens is not None]
    for (before, t0), (after, t1) in zip(zip(sources, tokens), zip(sources[1:], tokens[1:])):
        if t1 <= t0:
            raise CkptEmaError(f"records {t1} tokens trained on at step {after.step}, not more than the {t0} of "
                               f"{before.path} at step {before.step}: these counts cannot place a window in tokens "
                               "(give --tokens-per-step)", after.path)
    return tokens


def nothing_to_average(options: AverageOptions) -> OptionError:
    """The error for a run in which no checkpoint carries weight: every step is at or before update_after_step."""
    return OptionError("update_after_step", f"{options.schedule.update_after_step} is at or after every "
                                            "checkpoint's step: nothing to average")


class Kept(Protocol):
    """What a state kept of one candidate's earlier fold (:class:`ckpt_ema.follow.state.CandidateRecord`): each
    checkpoint's final weight, and for an EMA its total weight R and its unresolved share (see "Appending" in
    :mod:`ckpt_ema.weighting`)."""

    weights: list[float]
    total: float | None
    unresolved: float | None


@dataclass(frozen=True)
class Appending:
    """An append: the checkpoints folded before end at step ``newest``; ``new_steps`` are the new ones. ``read``
    says what the fold reads, in order: for each, its index among every checkpoint so far, or None for the newest
    folded before as the state keeps it (``theta``: the linear rule's copy, weighed again) or a stand-in weighed by
    none. Checkpoints read again (a uniform mean's or a window's, which keep no running mean) come first, the new
    ones last."""

    newest: int
    new_steps: list[int]
    read: list[int | None]
    theta: bool


@dataclass(frozen=True)
class CandidateFold:
    """One candidate's part of a fold: the final weight of every checkpoint so far, the lerp weight of each
    checkpoint the fold reads, its total weight R after it (timm's EMA; else None) and whether it goes on from its
    recorded running mean."""

    weighting: Weighting
    lerps: list[float]
    total: float | None
    continues: bool


def candidate_fold(options: AverageOptions, sources: Sequence[Source], record: Kept | None = None,
                   appending: Appending | None = None) -> CandidateFold:
    """The weights of one candidate: over every checkpoint from the start (no ``appending``), or appended to the
    state ``record`` kept (``sources``: every checkpoint so far, the new ones last). The one place an average's
    weights are chosen."""
    steps = [s.step for s in sources]
    if appending is None:
        weighting = weighting_for(options, sources)
        total = (ema_total(steps[-1], options.schedule, options.bias_correction)
                 if keeps_mean(options) and options.sigma_rel is None else None)
        return CandidateFold(weighting, list(weighting.lerps), total, False)
    read = appending.read
    if not keeps_mean(options):  # its weights follow from the steps alone: what it weighs is read again
        weighting = weighting_for(options, sources)
        at_read = tuple(0.0 if i is None else weighting.weights[i] for i in read)
        return CandidateFold(weighting, list(Weighting(tuple(range(len(read))), at_read).lerps), None, False)
    assert record is not None
    new_steps = appending.new_steps
    total = None
    if options.sigma_rel is not None:
        w = (power_continuation(new_steps, options.sigma_rel, options.interpolate, appending.newest,
                                record.unresolved)
             if new_steps else Weighting((appending.newest,), (0.0,), record.unresolved or 0.0, prior=1.0))
        unresolved = w.unresolved
    else:
        w, state = ema_continuation(new_steps, options.schedule, options.bias_correction, options.interpolate,
                                    EmaState(appending.newest, record.total or 0.0))
        unresolved = (ema_unresolved(steps, options.schedule, options.bias_correction) if record.unresolved is None
                      else ema_unresolved_continued(record.unresolved, appending.newest, new_steps,
                                                    options.schedule, options.bias_correction))
        total = state.total
    old = [x * w.prior for x in record.weights]
    old[-1] += w.weights[0]  # the newest folded before: its share of the next interval (linear rule)
    weighting = Weighting(tuple(steps), tuple(old) + w.weights[1:], unresolved)
    tail = list(w.lerps) if appending.theta else list(w.lerps[1:])  # no copy of the newest folded before: no slot
    return CandidateFold(weighting, [0.0] * (len(read) - len(tail)) + tail, total, w.prior > 0)


def keeps_mean(options: AverageOptions) -> bool:
    """timm's EMA and the power EMA go on from their running means; a uniform mean of the newest K and a window
    merge, whose weights follow from the steps alone, read what they weigh again."""
    return options.last is None and options.weights is None
