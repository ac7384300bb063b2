"""Many averages from one read of the checkpoints, and choosing among them: a sweep over EMA decays, half-lives and
uniform means of the newest K.

Choosing the EMA length today costs a training run per value. From saved checkpoints it costs one read: every
candidate is a different set of weights over the same checkpoints (:mod:`ckpt_ema.weighting`), so the engine folds
each checkpoint chunk into all the candidates' accumulators at once (one ``torch._foreach_lerp_`` with a weight
per accumulator) and every checkpoint byte is read once, whatever the number of candidates. Memory is one
accumulator chunk per candidate, not one model per candidate.

With a :class:`Scoring` (the user's evaluation of one weights file), every candidate and the final model are scored
and the best is chosen by one named score; the final model is a possible answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_ema.engine.distributed import World
from ckpt_ema.engine.runner import chunk_elems, run_plans
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.options import AverageOptions
from ckpt_ema.output.atomic import check_not_an_input, copy_atomically, output_files
from ckpt_ema.output.metadata import output_metadata
from ckpt_ema.output.sinks import SafetensorsOutput
from ckpt_ema.planning import Plan, discover_window, weighting_for

# A scoring function: the path of a weights file -> named scores (e.g. {"val_accuracy": 0.63, "test_accuracy": ...}).
Scorer = Callable[[Path], Mapping[str, float]]


@dataclass(frozen=True)
class Scoring:
    """How to score and choose: ``score`` each weights file, rank by the score called ``key`` (``label`` names it
    for people: "validation")."""

    score: Scorer
    key: str
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
        if opts.last is not None:
            return None
        return opts.schedule.half_life_at(self.plan.sources[-1].step)

    def describe(self) -> str:
        opts = self.plan.options
        if opts.last is not None:
            return f"uniform mean of the newest {opts.last}"
        return f"EMA decay {opts.schedule.decay:.6g} ({opts.interpolate})"


def candidate_name(options: AverageOptions, half_life: float | None = None) -> str:
    if options.last is not None:
        return f"last-{options.last}"
    if half_life is not None:
        return f"ema-halflife-{half_life:g}"
    return f"ema-{options.schedule.decay:.6g}"


def plan_sweep(inputs: list[str | Path], options: AverageOptions | None = None, *, decays: list[float] = (),
               half_lives: list[float] = (), lasts: list[int] = (), **fields: Any) -> list[Candidate]:
    """One candidate per decay, half-life and K; the checkpoints are discovered once and shared by all.

    ``options`` (and ``fields``, as for :meth:`AverageOptions.build`) give what every candidate shares; a uniform
    mean takes none of the EMA's.
    """
    base = AverageOptions.build(**fields) if options is None else options.replaced(**fields)
    if not (decays or half_lives or lasts):
        raise OptionError("decays", "are empty, as are half_lives and lasts: give at least one candidate to sweep")
    found = discover_window(inputs, base)  # once, for every candidate
    steps = [s.step for s in found.sources]
    variants = [(base.replaced(decay=d), None) for d in decays]
    variants += [(base.replaced(half_life=h), h) for h in half_lives]
    variants += [(base.replaced(last=k), None) for k in lasts]
    candidates = [Candidate(candidate_name(opts, h), Plan(found, weighting_for(opts, steps), opts))  # type: ignore[arg-type]
                  for opts, h in variants]
    names = [c.name for c in candidates]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CkptEmaError(f"the sweep lists the same candidate twice: {twice[0]}")
    return candidates


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
    best: str | None = None  # the chosen candidate's name; None: nothing chosen (see notes)
    best_output: Path | None = None
    pictures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def candidates_per_pass(options: AverageOptions, wanted: int) -> int:
    """How many candidates' accumulator chunks fit the memory budget together (at least one, or an error)."""
    for count in range(wanted, 0, -1):
        try:
            chunk_elems(options, candidates=count)
            return count
        except OptionError:
            if count == 1:
                raise
    raise AssertionError("unreachable")


def run_sweep(candidates: list[Candidate], outdir: Path, *, score: Scoring | None = None, plot: bool = True,
              progress: bool = False, world: World | None = None) -> SweepResult:
    """Read every checkpoint once and write one ``OUTDIR/<name>.safetensors`` per candidate (the folder is made if
    missing); then, with ``score``, score them and the final model, choose, and draw the pictures.

    Once, that is, unless the memory budget cannot hold a chunk of every candidate at the same time: then the
    candidates are split into as few groups as fit, one pass over the checkpoints each (``passes``).
    """
    if not outdir.parent.is_dir():
        raise CkptEmaError("the output folder's parent does not exist", outdir)
    outputs = [outdir / f"{c.name}.safetensors" for c in candidates] + [outdir / "best.safetensors"]
    check_not_an_input([f for o in outputs for f in output_files(o)], candidates[0].plan.input_files())
    created = not outdir.exists()
    outdir.mkdir(exist_ok=True)
    try:
        return _sweep_into(candidates, outdir, score=score, plot=plot, progress=progress, world=world)
    except BaseException:
        if created and not any(outdir.iterdir()):
            outdir.rmdir()  # a failed sweep leaves no empty folder behind
        raise


def _sweep_into(candidates: list[Candidate], outdir: Path, *, score: Scoring | None, plot: bool, progress: bool,
                world: World | None) -> SweepResult:
    started = time.perf_counter()
    sinks = []
    for c in candidates:
        c.output = outdir / f"{c.name}.safetensors"
        sinks.append(SafetensorsOutput(c.output, output_metadata(c.plan), c.plan.options.max_shard_size))
    plans = [c.plan for c in candidates]
    per_pass = candidates_per_pass(plans[0].options, len(plans))
    for start in range(0, len(plans), per_pass):
        group = slice(start, start + per_pass)
        run_plans(plans[group], sinks[group], progress=progress, desc=f"sweeping {len(plans[group])} candidates",
                   world=world)
    result = SweepResult(candidates, time.perf_counter() - started, -(-len(plans) // per_pass))
    result.notes += identical_candidates(candidates) + [note for sink in sinks for note in sink.notes]
    if world is not None and world.rank != 0:
        return result  # under torchrun: scores, the choice and pictures come from rank 0
    if score is not None:
        choose(result, score, outdir)
    if plot:
        draw(result, outdir, score)
    return result


def choose(result: SweepResult, scoring: Scoring, outdir: Path) -> None:
    """Score every candidate and the final model; copy the best candidate to ``OUTDIR/best.safetensors``, unless
    the final model scores best (then nothing is copied) or no candidate has the ranking score."""
    newest = result.candidates[0].plan.sources[-1].path
    result.scores = {c.name: scoring.score(c.output) for c in result.candidates if c.output is not None}
    result.final_scores = scoring.score(newest)
    ranked = {name: s[scoring.key] for name, s in result.scores.items() if s.get(scoring.key) is not None}
    if len(ranked) < len(result.scores):
        result.notes.append(f"no {scoring.key} score for every candidate: no candidate is chosen")
        return
    pick = max if scoring.maximize else min
    best = pick(ranked, key=lambda n: ranked[n])
    final = (result.final_scores or {}).get(scoring.key)
    if final is not None and pick(final, ranked[best]) == final and final != ranked[best]:
        result.notes.append(f"the final model is best on {scoring.key} ({final:.6g} against {ranked[best]:.6g} for "
                            f"{best}): no average is copied")
        return
    result.best = best
    result.best_output = outdir / "best.safetensors"
    copy_atomically(next(c.output for c in result.candidates if c.name == best), result.best_output)


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
    if plot_scores(result.candidates, result.scores, result.final_scores, picture):
        result.pictures.append(picture)


def sweep_table(result: SweepResult, scoring: Scoring | None = None) -> str:
    """One row per candidate: name, half-life, effective window, its scores (when scored; the ranking score first,
    shown even where missing), what it is; the final model as a last row when scored; the chosen candidate marked."""
    choose_by = scoring.key if scoring else None
    keys = {k for s in result.scores.values() for k in s} | ({choose_by} if result.scores and choose_by else set())
    columns = sorted(keys, key=lambda k: (k != choose_by, k))
    header = f"{'candidate':<16} {'half-life':>10} {'window':>7}  " + "".join(f"{_short(k):>10} " for k in columns)
    lines = [header + " what"]
    for c in result.candidates:
        hl = c.half_life
        row = f"{c.name:<16} {('-' if hl is None else f'{hl:.4g}'):>10} {c.plan.weighting.effective_window():>7}  "
        row += "".join(f"{_value(k, result.scores.get(c.name, {}).get(k)):>10} " for k in columns)
        mark = f"   <- best on {scoring.label or scoring.key}" if scoring and c.name == result.best else ""
        lines.append(row + " " + c.describe() + mark)
    if result.final_scores is not None:
        row = f"{'final model':<16} {'':>10} {'':>7}  "
        row += "".join(f"{_value(k, result.final_scores.get(k)):>10} " for k in columns)
        lines.append(row + " " + str(result.candidates[0].plan.sources[-1].path))
    return "\n".join(lines)


def _short(key: str) -> str:
    return key.replace("_accuracy", " acc")


def _value(key: str, x: float | None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if key.endswith("accuracy") else f"{x:.6g}"
