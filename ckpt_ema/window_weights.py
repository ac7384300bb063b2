"""Merge weights shaped like a learning-rate decay over a window of steps (WSM: Tian et al., "WSM: Decay-Free
Learning Rate Schedule via Checkpoint Merging for LLM Pre-training", arXiv 2507.17634).

A run at a constant learning rate saves checkpoints theta_0 .. theta_k at steps s_0 < ... < s_k = E inside a window
of W steps ending at E (s_0: the newest checkpoint at or before E - W). Had the run decayed its learning rate over
the window by a factor phi(s) = f((s - (E - W)) / W) (f falls from f(0) = 1 to f(1) = 0; phi = 1 before the window),
the update of step s would have counted phi(s) times. A merge ``sum_j c_j theta_j`` counts every update between
theta_{j-1} and theta_j with the same weight, ``sum_{i >= j} c_i``; the merge that stands for the decay gives each
interval the mean of phi over its steps::

    w_j = mean of phi(s) over s = s_{j-1}+1 .. s_j            (j = 1..k)
    c_0 = 1 - w_1,    c_j = w_j - w_{j+1},    c_k = w_k          (f falls, so every c_j >= 0; they sum to 1)

With a checkpoint every step this is the decayed run's update rule exactly (to first order in the learning rate,
the paper's Theorem 3.1); with sparser checkpoints, the decay averaged over each interval. The shapes:

* ``linear``: f(x) = 1 - x (its merge is nearly the uniform mean of the window: WSM's observation);
* ``cosine``: f(x) = (1 + cos(pi x)) / 2;
* ``1-sqrt``: f(x) = 1 - sqrt(x) (the decay of warmup-stable-decay runs; weighs the window's start most);
* ``uniform``: not a decay: the plain mean of the checkpoints inside the window, s >= E - W (LAWA).

A window longer than the run begins at the first checkpoint. The weights depend on steps alone, so an average of
this kind keeps no running mean: each update reads the checkpoints of the window again.

**A window in tokens** (``--window-tokens T``) is the window of steps that trained the newest T tokens, and the
decay runs over those steps, as a learning-rate scheduler steps per optimizer step. With ``--tokens-per-step N`` it
is ``ceil(T / N)`` steps. Without it, :func:`token_window` reads it from the token counts the checkpoints record
(OLMo-core's ``global_train_tokens_seen``, a Hugging Face Trainer's ``num_input_tokens_seen``): the window begins at
the step at which the run had seen T tokens fewer than at the newest checkpoint, the count taken to grow at a
constant rate between two checkpoints (a batch size that changes between checkpoints, a ramp, is followed; one that
changes between two saves is averaged over them), and before the first checkpoint at the first interval's rate.
That step is rounded down, so the window holds at least T tokens: at a constant N tokens per step both give
``ceil(T / N)`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckpt_ema.errors import OptionError
from ckpt_ema.weighting import Weighting

# The decay shapes, and "uniform": the plain mean of the window. (Names only: importing this module stays cheap.)
WINDOW_SHAPES = ("uniform", "linear", "cosine", "1-sqrt")


def decay_shape(name: str) -> Callable[[Any], Any]:
    """The decay shape f on [0, 1], element-wise on a numpy array: f(0) = 1 falling to f(1) = 0."""
    import numpy as np

    shapes: dict[str, Callable[[Any], Any]] = {
        "linear": lambda x: 1.0 - x,
        "cosine": lambda x: 0.5 * (1.0 + np.cos(np.pi * x)),
        "1-sqrt": lambda x: 1.0 - np.sqrt(x),
    }
    return shapes[name]
# Every step of an interval is summed, in blocks of this many (memory stays flat whatever the window).
BLOCK_STEPS = 1 << 16


def window_start(steps: list[int], window: int) -> int:
    """The index of the checkpoint the window begins at: the newest at or before ``steps[-1] - window`` (the
    first checkpoint when the window reaches before it)."""
    start = steps[-1] - window
    before = [i for i, s in enumerate(steps) if s <= start]
    return before[-1] if before else 0


def token_window(steps: list[int], tokens: list[int], window_tokens: int) -> int:
    """The window in steps that trained the newest ``window_tokens`` tokens of a run whose checkpoints at ``steps``
    record ``tokens`` seen (both strictly increasing; see the module docstring): ``steps[-1] - s``, s the whole step
    at or before the one at which ``tokens[-1] - window_tokens`` tokens had been seen, the count linear between
    checkpoints and extended before the first at the first interval's rate. A run of one checkpoint has no rate:
    its window is that checkpoint alone (1 step)."""
    if len(steps) == 1:
        return 1
    start = tokens[-1] - window_tokens
    i = max([0] + [j for j in range(len(steps) - 1) if tokens[j] <= start])  # the interval that holds it, or the first
    s0, s1, t0, t1 = steps[i], steps[i + 1], tokens[i], tokens[i + 1]
    return steps[-1] - (s0 + (start - t0) * (s1 - s0) // (t1 - t0))  # floor division: rounded down, also before s0


def window_weighting(steps: list[int], shape: str, window: int) -> Weighting:
    """The merge weights of ``shape`` (:data:`WINDOW_SHAPES`) over the newest ``window`` steps of checkpoints at
    ``steps`` (see the module docstring)."""
    if shape not in WINDOW_SHAPES:
        raise OptionError("weights", f"must be one of {', '.join(WINDOW_SHAPES)}, got {shape!r}")
    if not (isinstance(window, int) and window >= 1):
        raise OptionError("window_steps", f"must be a whole number of steps >= 1, got {window!r}")
    first = window_start(steps, window)
    weights = [0.0] * len(steps)
    if shape == "uniform":
        inside = [i for i in range(first, len(steps)) if steps[i] >= steps[-1] - window] or [len(steps) - 1]
        for i in inside:
            weights[i] = 1.0 / len(inside)
        return Weighting(tuple(steps), tuple(weights))
    f, begin = decay_shape(shape), steps[-1] - window
    w = [interval_mean(f, begin, window, steps[j - 1], steps[j]) for j in range(first + 1, len(steps))]
    if not w:  # the window holds the newest checkpoint alone
        weights[-1] = 1.0
        return Weighting(tuple(steps), tuple(weights))
    weights[first] = 1.0 - w[0]
    for j, (this, after) in enumerate(zip(w, [*w[1:], 0.0]), start=first + 1):
        weights[j] = this - after
    return Weighting(tuple(steps), tuple(weights))


def interval_mean(f: Callable[[Any], Any], begin: int, window: int, a: int, b: int) -> float:
    """The mean over steps s = a+1..b of phi(s) = f(clamp((s - begin) / window, 0, 1)), summed step by step."""
    import numpy as np

    total = 0.0
    for lo in range(a + 1, b + 1, BLOCK_STEPS):
        s = np.arange(lo, min(lo + BLOCK_STEPS, b + 1), dtype=np.float64)
        total += float(np.sum(f(np.clip((s - begin) / window, 0.0, 1.0))))
    return total / (b - a)
