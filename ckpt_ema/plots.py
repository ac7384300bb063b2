"""Pictures of a sweep, where a person would rather look than read (matplotlib: ``pip install ckpt-ema[plot]``).

* ``weights.png``: the weight each checkpoint gets under each candidate, against its step;
* ``scores.png``: each score of the EMA and power-EMA candidates against their half-life at the newest checkpoint
  (log scale), with the final model and the uniform means as reference lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpt_ema.output.atomic import write_atomically


def matplotlib_or_none() -> Any:
    """pyplot on the Agg backend (files only, no display), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def plot_weights(candidates: list[Any], path: Path) -> bool:
    """Draw the weight of each checkpoint under each candidate; False when matplotlib is missing."""
    plt = matplotlib_or_none()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in candidates:
        steps, weights = c.plan.weighting.steps, c.plan.weighting.weights
        ax.plot(steps, weights, marker="." if len(steps) <= 60 else None, linewidth=1.2, label=c.name)
    # Show where the weight is: from the oldest checkpoint any candidate needs for 99.9% of its weight.
    first = min(c.plan.weighting.steps[-c.plan.weighting.effective_window(0.999)] for c in candidates)
    last = candidates[0].plan.weighting.steps[-1]
    ax.set_xlim(first - 0.02 * (last - first + 1), last + 0.02 * (last - first + 1))
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("weight in the average")
    ax.set_title("The weight each checkpoint gets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_scores(candidates: list[Any], scores: Mapping[str, Mapping[str, float]],
                final: Mapping[str, float] | None, path: Path, ranked_by: str | None = None) -> bool:
    """Each score against half-life (log scale), a line per family and score; uniform means and the final model as
    horizontal lines, every score of each. A score keeps its dash pattern everywhere, a line its own colour."""
    plt = matplotlib_or_none()
    if plt is None:
        return False
    reported = list(dict.fromkeys(k for s in scores.values() for k in s))
    keys = sorted(reported, key=lambda k: k != ranked_by)  # the ranking score first, then as the scorer reports
    percent = all(k.endswith("accuracy") for k in keys)
    scale = 100 if percent else 1
    fig, ax = plt.subplots(figsize=(8, 4.5))
    emas = sorted((c for c in candidates if c.half_life is not None and math.isfinite(c.half_life)),
                  key=lambda c: c.half_life)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ["-", "--", "-.", ":"]  # one per score, the same for every line: the legend reads as a table
    lines = 0  # each line its own colour
    for family, marker in zip(dict.fromkeys(c.family for c in emas), "os^v"):  # EMA, power EMA: a line per score
        for key in keys:
            points = [(c.half_life, scale * scores[c.name][key]) for c in emas
                      if c.family == family and scores.get(c.name, {}).get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=marker, linestyle=dashes[keys.index(key) % 4],
                        color=palette[lines % len(palette)], label=f"{family}, {key}")
                lines += 1
    for c in candidates:  # uniform means: a horizontal line per score, one colour per candidate
        if c.half_life is not None:
            continue
        drawn = False
        for key in keys:
            if scores.get(c.name, {}).get(key) is not None:
                ax.axhline(scale * scores[c.name][key], linestyle=dashes[keys.index(key) % 4], linewidth=1.2,
                           color=palette[lines % len(palette)], label=f"{c.name}, {key}")
                drawn = True
        lines += int(drawn)
    for key in keys:
        if final and final.get(key) is not None:
            ax.axhline(scale * final[key], color="black", linewidth=1, linestyle=dashes[keys.index(key) % 4],
                       label=f"final model, {key}")
    ax.set_xscale("log")
    ax.set_xlabel("half-life at the newest checkpoint (training steps, log scale)")
    ax.set_ylabel("accuracy (%)" if percent else "score")
    ax.set_title("Post-hoc averages of the saved checkpoints")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True
