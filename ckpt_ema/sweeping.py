"""Many averages from one read of the checkpoints, and choosing among them: a sweep over EMA decays, half-lives,
power-EMA widths (sigma_rel) and uniform means of the newest K.

Choosing the EMA length today costs a training run per value. From saved checkpoints it costs one read: every
candidate is a different set of weights over the same checkpoints (:mod:`ckpt_ema.weighting`), so the engine folds
each checkpoint chunk into all the candidates' accumulators at once (one ``torch._foreach_lerp_`` with a weight
per accumulator) and every checkpoint byte is read once, whatever the number of candidates. Memory is one
accumulator chunk per candidate, not one model per candidate.

With a :class:`Scoring` (the user's evaluation of one weights file, e.g. a command: :mod:`ckpt_ema.scoring`),
every candidate and the final model are scored and the best is chosen by one named score. The final model is
scored as the same kind of file as the candidates (its weights written by the same read, ``final-model.safetensors``,
so one loader serves all), and it is a possible answer: an average is chosen only when it beats it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_ema.formats.base import OWN_OUTPUT_KEY
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.formats.safetensors import SafetensorsFile
from ckpt_ema.options import AverageOptions
from ckpt_ema.output.atomic import SHARD_NAME, copy_atomically, index_path_of
from ckpt_ema.planning import Plan, percent
from ckpt_ema.weighting import gamma_of

# A scoring function: the path of a weights file -> named scores (e.g. {"val_accuracy": 0.63, "test_accuracy": ...}).
Scorer = Callable[[Path], Mapping[str, float]]
FINAL_MODEL = "final-model"  # the file stem of the final model's weights, written beside the candidates to be scored


@dataclass(frozen=True)
class Scoring:
    """How to score and choose: ``score`` each weights file, rank by the score called ``key`` (None: the first
    score the scorer reports; ``label`` names it for people: "validation")."""

    score: Scorer
    key: str | None = None
    maximize: bool = True
    label: str | None = None


@dataclass
class Candidate:
    """One average of the sweep: its name (the output's file stem) and its plan."""

    name: str
    plan: Plan
    output: Path | None = None

    @property
    def half_life(self) -> float | None:
        """Steps over which a weight halves at the decay in force at the newest checkpoint (None: uniform mean).

        That is the decay, or less under warmup: with warmup a large decay may never be reached in the run.
        """
        opts = self.plan.options
        if opts.last is not None or opts.weights is not None:
            return None
        if opts.sigma_rel is not None:  # beta(T) = (1 - 1/T)^(gamma+1)
            final = self.plan.sources[-1].step
            exponent = gamma_of(opts.sigma_rel) + 1
            return math.inf if final <= 1 else math.log(0.5) / (exponent * math.log1p(-1 / final))
        return opts.schedule.half_life_at(self.plan.sources[-1].step)

    @property
    def family(self) -> str:
        """What kind of average: "EMA", "power EMA", "uniform mean" or "window merge" (the pictures draw one line
        per family)."""
        opts = self.plan.options
        if opts.weights is not None:
            return "window merge"
        return "uniform mean" if opts.last is not None else "power EMA" if opts.sigma_rel is not None else "EMA"

    def describe(self) -> str:
        opts = self.plan.options
        if opts.last is not None:
            return f"uniform mean of the newest {opts.last}"
        if opts.weights is not None:
            return f"{opts.weights} merge over {self.plan.window_words()}"
        if opts.sigma_rel is not None:
            return f"power EMA sigma_rel {opts.sigma_rel:g} (gamma {gamma_of(opts.sigma_rel):.4g}, {opts.interpolate})"
        return f"EMA decay {opts.schedule.decay:.6g} ({opts.interpolate})"


def candidate_name(options: AverageOptions, half_life: float | None = None) -> str:
    if options.last is not None:
        return f"last-{options.last}"
    if options.weights is not None:
        if options.window_tokens is not None:
            return f"{options.weights}-{options.window_tokens}tokens"
        return f"{options.weights}-{options.window_steps}steps"
    if options.sigma_rel is not None:
        return f"power-{options.sigma_rel:g}"
    if half_life is not None:
        return f"ema-halflife-{half_life:g}"
    return f"ema-{options.schedule.decay:.6g}"


def sweep_variants(base: AverageOptions, *, decays: Sequence[float] = (), half_lives: Sequence[float] = (),
                   lasts: Sequence[int] = (), sigma_rels: Sequence[float] = (), shapes: Sequence[str] = (),
                   windows: Sequence[int] = (), token_windows: Sequence[int] = ()) -> list[tuple[str, AverageOptions]]:
    """(name, options) of each candidate: one per decay, half-life, sigma_rel and K, and one per shape and window
    (in steps, or in tokens: at the options' tokens_per_step, or by the checkpoints' own token counts; no shape:
    the uniform mean of each window); every other option is ``base``'s (a uniform mean or a window merge takes none
    of the EMA's)."""
    if not (decays or half_lives or lasts or sigma_rels or windows or token_windows):
        raise OptionError("decays", "are empty, as are half_lives, sigma_rels, lasts and windows: give at least one "
                                    "candidate to sweep")
    if shapes and not (windows or token_windows):
        raise OptionError("weights", f"{', '.join(shapes)} merge a window: give windows (--window-steps or "
                                     "--window-tokens)")
    variants: list[tuple[AverageOptions, float | None]] = [(base.replaced(decay=d), None) for d in decays]
    variants += [(base.replaced(half_life=h), h) for h in half_lives]
    variants += [(base.replaced(sigma_rel=r), None) for r in sigma_rels]
    variants += [(base.replaced(last=k), None) for k in lasts]
    variants += [(base.replaced(weights=shape, window_steps=w), None) for shape in shapes or ["uniform"] for w in windows]
    variants += [(base.replaced(weights=shape, window_tokens=t), None)
                 for shape in shapes or ["uniform"] for t in token_windows]
    named = [(candidate_name(opts, h), opts) for opts, h in variants]
    names = [name for name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CkptEmaError(f"the sweep lists the same candidate twice: {twice[0]}")
    return named


def identical_candidates(candidates: list[Candidate]) -> list[str]:
    """A note for each candidate whose weights equal an earlier one's (to 1e-12): with warmup, decays that never
    bind within the run give the same average, so the sweep compares the same thing twice."""
    def same(c: Candidate, d: Candidate) -> bool:
        return max(abs(a - b) for a, b in zip(c.plan.weighting.weights, d.plan.weighting.weights)) <= 1e-12

    notes = []
    for i, c in enumerate(candidates):
        twin = next((d for d in candidates[:i] if same(c, d)), None)
        if twin is not None:
            notes.append(f"{c.name} gives the same weights as {twin.name}: the same average")
    return notes


@dataclass
class SweepResult:
    """What a sweep wrote and, when scored, how each candidate and the final model did and which is best."""

    candidates: list[Candidate]
    seconds: float
    passes: int = 1  # more than one when the memory budget does not hold every candidate's chunk at once
    scores: dict[str, Mapping[str, float]] = field(default_factory=dict)  # by candidate name
    final_scores: Mapping[str, float] | None = None  # the newest checkpoint's
    final_output: Path | None = None  # its weights as scored, when scored
    ranked_by: str | None = None  # the score that chooses
    best: str | None = None  # the chosen candidate's name; None: nothing chosen (see notes)
    best_output: Path | None = None
    pictures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    update: Any = None  # the ckpt_ema.pipeline.Outcome (what was read, appended or redone)
    scoring: Scoring | None = None  # how the candidates were scored and chosen

    def table(self) -> str:
        """One row per candidate (and the final model when scored): see :func:`sweep_table`."""
        return sweep_table(self, self.scoring)


def remove_earlier_sweep(outdir: Path, keep: Sequence[str]) -> None:
    """Remove the outputs of an earlier sweep into ``outdir`` that this one does not write (candidates it had and
    this one has not, its final model and choice when this one scores nothing), so that the folder holds one
    sweep: only weights files that ckpt-ema wrote (their metadata says so) are removed, with their shards."""
    for path in sorted(outdir.glob("*.safetensors")) + sorted(outdir.glob("*.safetensors.index.json")):
        stem = SHARD_NAME.sub("", path.name).removesuffix(".index.json").removesuffix(".safetensors")
        if stem not in keep and _written_by_us(path):
            path.unlink(missing_ok=True)


def _written_by_us(path: Path) -> bool:
    try:
        if path.name.endswith(".index.json"):
            return OWN_OUTPUT_KEY in json.loads(path.read_text()).get("metadata", {})
        return OWN_OUTPUT_KEY in SafetensorsFile(path).metadata
    except (OSError, ValueError, AttributeError, CkptEmaError):
        return False


def choose(result: SweepResult, scoring: Scoring, outdir: Path) -> None:
    """Score every candidate and the final model; copy the best candidate to ``OUTDIR/best.safetensors`` when it
    beats the final model. When the final model is at least as good, or some candidate lacks the ranking score,
    nothing is copied, and a ``best.safetensors`` of an earlier sweep is removed: it cannot pass for this one's
    choice."""
    best_path = outdir / "best.safetensors"
    result.scores = {c.name: scoring.score(written_file(c.output)) for c in result.candidates if c.output is not None}
    assert result.final_output is not None
    result.final_scores = scoring.score(written_file(result.final_output))
    key = result.ranked_by = scoring.key or next(iter(next(iter(result.scores.values()), {})), None)
    ranked = {name: s[key] for name, s in result.scores.items() if key is not None and s.get(key) is not None}
    if key is None or len(ranked) < len(result.scores):
        best_path.unlink(missing_ok=True)
        result.notes.append(f"no {key or 'score'} for every candidate: no candidate is chosen")
        return
    pick = max if scoring.maximize else min
    best = pick(ranked, key=lambda n: ranked[n])
    final = (result.final_scores or {}).get(key)
    if final is not None and pick(final, ranked[best]) == final:
        stale = " (the best.safetensors of an earlier sweep is removed)" if best_path.exists() else ""
        best_path.unlink(missing_ok=True)
        result.notes.append(f"the final model is best on {scoring.label or key} ({final:.6g}; the best average, "
                            f"{best}, has {ranked[best]:.6g}): no average is copied{stale}")
        return
    result.best = best
    chosen = written_file(next(c.output for c in result.candidates if c.output is not None and c.name == best))
    if chosen.name.endswith(".index.json"):  # shards are not copied: the choice is named
        best_path.unlink(missing_ok=True)
        result.best_output = chosen
        result.notes.append(f"{best} is sharded: it stays {chosen} (no best.safetensors copy)")
        return
    result.best_output = best_path
    copy_atomically(chosen, best_path)


def written_file(output: Path) -> Path:
    """The file that holds an output: itself, or the index json of its shards (a large output, or any under
    torchrun), which is what a scorer is then given."""
    return output if output.exists() or not index_path_of(output).exists() else index_path_of(output)


def draw(result: SweepResult, outdir: Path, scoring: Scoring | None) -> None:
    """weights.png, and when scored the scores against half-life (accuracy.png for accuracies, else scores.png); a
    note when matplotlib is missing."""
    from ckpt_ema.plots import plot_scores, plot_weights

    if plot_weights(result.candidates, outdir / "weights.png"):
        result.pictures.append(outdir / "weights.png")
    else:
        result.notes.append("no pictures: matplotlib is not installed (pip install 'ckpt-ema[plot]')")
        return
    if scoring is None or not result.scores:
        return
    keys = {k for s in result.scores.values() for k in s}
    picture = outdir / ("accuracy.png" if all(k.endswith("accuracy") for k in keys) else "scores.png")
    if plot_scores(result.candidates, result.scores, result.final_scores, picture, result.ranked_by):
        result.pictures.append(picture)


def sweep_table(result: SweepResult, scoring: Scoring | None = None) -> str:
    """One row per candidate: name, half-life, effective window, unresolved share, its scores (when scored; the
    ranking score first, shown even where missing, the others in the order the scorer reports them), what it is;
    the final model as a last row when scored; the chosen candidate marked."""
    reported = list(dict.fromkeys(k for s in [*result.scores.values(), result.final_scores or {}] for k in s))
    choose_by = result.ranked_by
    columns = ([choose_by] if result.scores and choose_by else []) + [k for k in reported if k != choose_by]
    width = max(16, *(len(c.name) + 1 for c in result.candidates))
    header = f"{'candidate':<{width}} {'half-life':>10} {'window':>7} {'unresolved':>10}  "
    lines = [header + "".join(f"{_short(k):>10} " for k in columns) + " what"]
    for c in result.candidates:
        hl = c.half_life
        row = (f"{c.name:<{width}} {('-' if hl is None else f'{hl:.4g}'):>10} {c.plan.weighting.effective_window():>7} "
               f"{percent(c.plan.weighting.unresolved):>10}  ")
        row += "".join(f"{_value(k, result.scores.get(c.name, {}).get(k)):>10} " for k in columns)
        mark = f"   <- best on {scoring.label or choose_by}" if scoring and c.name == result.best else ""
        lines.append(row + " " + c.describe() + mark)
    if result.final_scores is not None:
        row = f"{'final model':<{width}} {'':>10} {'':>7} {'':>10}  "
        row += "".join(f"{_value(k, result.final_scores.get(k)):>10} " for k in columns)
        lines.append(row + " " + str(result.candidates[0].plan.sources[-1].path))
    return "\n".join(lines)


def sweep_warnings(candidates: list[Candidate]) -> list[str]:
    """One line naming the candidates whose checkpoints are too far apart for what they ask (see
    :meth:`ckpt_ema.weighting.Weighting.too_sparse`), or saying that there is only one checkpoint; and one when
    --tokens-per-step disagrees with the token counts the checkpoints record (every window in tokens takes it)."""
    if candidates and len(candidates[0].plan.sources) == 1:
        return [f"only one checkpoint, {candidates[0].plan.sources[0].path}: every candidate is its weights, not an "
                "average; give the run's folder (or a glob) to average its checkpoints"]
    lines = next((w for c in candidates if (w := c.plan.tokens_per_step_warnings())), [])
    poor = [c for c in candidates if c.plan.weighting.too_sparse()]
    if not poor:
        return lines
    named = ", ".join(f"{c.name} ({percent(c.plan.weighting.unresolved)} unresolved)" for c in poor)
    return [f"the checkpoints are too far apart for {named}: those averages are mostly the newest checkpoint or two",
            *lines]


def _short(key: str) -> str:
    return key.replace("_accuracy", " acc")


def _value(key: str, x: float | None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if key.endswith("accuracy") else f"{x:.6g}"
