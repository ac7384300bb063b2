"""Many averages from one read of the checkpoints: a sweep over EMA decays and uniform means of the newest k.

Choosing the EMA length today costs a training run per value. From saved checkpoints it costs one read: every
candidate is a different set of weights over the same checkpoints (:mod:`ckpt_ema.plan`), so the engine folds
each checkpoint chunk into all the candidates' accumulators at once (one ``torch._foreach_lerp_`` with a weight
per accumulator) and every checkpoint byte is read once, whatever the number of candidates. Memory is one
accumulator chunk per candidate, not one model per candidate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckpt_ema.api import AverageOptions, Plan, discover_window, fold_plans, output_metadata, weighting_for
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.output import SafetensorsOutput


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
        if self.plan.options.last is not None:
            return None
        decay = self.plan.options.schedule().decay_at(self.plan.sources[-1].step)
        return math.inf if decay >= 1 else (0.0 if decay <= 0 else math.log(0.5) / math.log(decay))

    def describe(self) -> str:
        opts = self.plan.options
        if opts.last is not None:
            return f"uniform mean of the newest {opts.last}"
        return f"EMA decay {opts.schedule().decay:.6g} ({opts.interpolate})"


def candidate_name(opts: AverageOptions) -> str:
    if opts.last is not None:
        return f"last-{opts.last}"
    if opts.half_life is not None:
        return f"ema-halflife-{opts.half_life:g}"
    return f"ema-{opts.schedule().decay:.6g}"


def plan_sweep(
    inputs: list[str | Path], decays: list[float] = (), half_lives: list[float] = (), lasts: list[int] = (),
    **options: Any,
) -> list[Candidate]:
    """One candidate per decay, half-life and k; checkpoints are discovered once and shared by all."""
    if not (decays or half_lives or lasts):
        raise CkptEmaError("give at least one --decay, --half-life or --last to sweep")
    base = AverageOptions(**{k: v for k, v in options.items() if k not in ("decay", "half_life", "last")})
    base.validate()  # the options all candidates share, before any file is read
    found = discover_window(inputs, base)  # once, for every candidate
    # A uniform mean has no decay: the EMA-only options of the sweep do not apply to it (and would be refused).
    uniform = {"decay": None, "half_life": None, "warmup": False, "bias_correction": False}
    variants = [{"decay": d} for d in decays] + [{"half_life": h} for h in half_lives]
    variants += [{"last": k, **uniform} for k in lasts]
    candidates: list[Candidate] = []
    for variant in variants:
        opts = replace(base, **variant)
        opts.validate()
        weighting = weighting_for(opts, [s.step for s in found.sources])  # type: ignore[misc]
        candidates.append(Candidate(candidate_name(opts), Plan(found, weighting, opts)))
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise CkptEmaError(f"the sweep lists the same candidate twice: {sorted(n for n in names if names.count(n) > 1)[0]}")
    return candidates


@dataclass
class SweepResult:
    candidates: list[Candidate]
    seconds: float
    passes: int = 1  # more than one when the memory budget does not hold every candidate's chunk at once


def candidates_per_pass(options: AverageOptions, wanted: int) -> int:
    """How many candidates' accumulator chunks fit the memory budget together (at least one, or an error)."""
    for count in range(wanted, 0, -1):
        try:
            options.chunk_elems(candidates=count)
            return count
        except CkptEmaError:
            if count == 1:
                raise
    raise AssertionError("unreachable")


def run_sweep(candidates: list[Candidate], outdir: Path, *, progress: bool = False) -> SweepResult:
    """Read every checkpoint once and write one ``OUTDIR/<name>.safetensors`` per candidate.

    Once, that is, unless ``--max-memory`` cannot hold a chunk of every candidate at the same time: then the
    candidates are split into as few groups as fit, one pass over the checkpoints each (``SweepResult.passes``).
    """
    if not outdir.is_dir():
        raise CkptEmaError("the output folder does not exist", outdir)
    started = time.perf_counter()
    sinks = []
    for c in candidates:
        c.output = outdir / f"{c.name}.safetensors"
        sinks.append(SafetensorsOutput(c.output, output_metadata(c.plan), c.plan.options.max_shard_bytes()))
    plans = [c.plan for c in candidates]
    per_pass = candidates_per_pass(plans[0].options, len(plans))
    for start in range(0, len(plans), per_pass):
        group = slice(start, start + per_pass)
        fold_plans(plans[group], sinks[group], progress=progress, desc=f"sweeping {len(plans[group])} candidates")
    passes = -(-len(plans) // per_pass)
    return SweepResult(candidates, time.perf_counter() - started, passes)


def sweep_table(candidates: list[Candidate], scores: dict[str, dict[str, float]] | None = None,
                best: str | None = None, final: dict[str, float] | None = None) -> str:
    """One row per candidate: name, what it is, half-life, effective window; with scores, val and test accuracy,
    and, given ``final`` (the newest checkpoint's scores), a last row for the final model to compare with."""
    header = f"{'candidate':<16} {'half-life':>10} {'window':>7}  "
    if scores:
        header += f"{'val acc':>8} {'test acc':>8}  "
    lines = [header + "what"]
    for c in candidates:
        hl = c.half_life
        row = f"{c.name:<16} {('-' if hl is None else f'{hl:.4g}'):>10} {c.plan.weighting.effective_window():>7}  "
        if scores:
            s = scores.get(c.name, {})
            row += f"{_pct(s.get('val_accuracy')):>8} {_pct(s.get('test_accuracy')):>8}  "
        lines.append(row + c.describe() + ("   <- best on validation" if c.name == best else ""))
    if final is not None:
        lines.append(f"{'final model':<16} {'':>10} {'':>7}  {_pct(final.get('val_accuracy')):>8} "
                     f"{_pct(final.get('test_accuracy')):>8}  {candidates[0].plan.sources[-1].path}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


@dataclass
class SweepScores:
    """Validation and test accuracy of every candidate and of the newest checkpoint; the best by validation."""

    by_candidate: dict[str, dict[str, float]]
    final_model: dict[str, float]
    best: str | None  # None when the run kept no validation images: never choose on test


def score_candidates(candidates: list[Candidate], data: str | Path | None = None, device: str = "cpu",
                     test_subset: int | None = None) -> SweepScores:
    """Score each candidate's output (and the newest checkpoint) on the run's validation images and the test set.

    The validation images are the ones ``train --val-split`` kept out of training, recomputed from the run's
    recorded hyperparameters. Choosing on the test set would inflate the result, so without them nothing is chosen.
    """
    from ckpt_ema.evaluate import EvalData, load_model, run_splits, score

    eval_data = EvalData(data, test_subset, device)
    newest = candidates[0].plan.sources[-1].path

    def scores_of(path: Path) -> dict[str, float]:
        model, _, metadata = load_model(path, None, candidates[0].plan.options.key if path == newest else None, device)
        out = {"test_accuracy": score(model, eval_data.test, device).accuracy}
        _, val = run_splits(metadata, eval_data)
        if val is not None:
            out["val_accuracy"] = score(model, val.to(device), device).accuracy
        return out

    by_candidate = {c.name: scores_of(c.output) for c in candidates if c.output is not None}
    final = scores_of(newest)
    has_val = all("val_accuracy" in s for s in by_candidate.values())
    best = max(by_candidate, key=lambda n: by_candidate[n]["val_accuracy"]) if has_val and by_candidate else None
    return SweepScores(by_candidate, final, best)
