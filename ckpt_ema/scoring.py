"""Scoring a weights file with the user's own command (``sweep --eval-cmd``).

The command is a shell command line in which ``{weights}`` stands for the path of one ``.safetensors`` file (a
candidate, or the final model's weights written the same way). It runs once per file; the last non-empty line of
its standard output is the score:

* a number: ``0.8123`` (the score is called ``score``);
* or a JSON object of named numbers: ``{"val_accuracy": 0.6254, "test_accuracy": 0.6288}``. The entry called
  ``score`` chooses, or else the first one; every entry is a column of the sweep's table. Entries that are not
  numbers are left out.

A command that exits non-zero, prints no last line, or prints one that is neither stops the sweep with one line
naming the file and showing the command's last lines of standard error.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

from ckpt_ema.errors import CkptEmaError, OptionError

PLACEHOLDER = "{weights}"
STDERR_LINES = 3  # how many of the command's last stderr lines a failure shows


def command_scorer(command: str) -> Callable[[Path], dict[str, float]]:
    """A scorer for :func:`ckpt_ema.sweeping.run_sweep` that runs ``command`` (a shell command line with
    ``{weights}``) on each weights file and reads its last line of standard output."""
    if PLACEHOLDER not in command:
        raise OptionError("eval_cmd", f"must contain {PLACEHOLDER}, where the weights file's path goes: {command!r}")

    def score(path: Path) -> dict[str, float]:
        line = command.replace(PLACEHOLDER, shlex.quote(str(path)))
        done = subprocess.run(line, shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace")
        if done.returncode != 0:
            how = f"exited with {done.returncode}" if done.returncode > 0 else f"was killed by signal {-done.returncode}"
            raise CkptEmaError(f"--eval-cmd {how} on this file{_tail(done.stderr)}", path)
        lines = [x.strip() for x in done.stdout.splitlines() if x.strip()]
        if not lines:
            raise CkptEmaError(f"--eval-cmd printed nothing on stdout: its last line must be the score"
                               f"{_tail(done.stderr)}", path)
        return parse_score(lines[-1], path)

    return score


def parse_score(line: str, path: Path) -> dict[str, float]:
    """The scores in the last line of the command's output: a number, or a JSON object of named numbers."""
    try:
        value = float(line)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise CkptEmaError(f"--eval-cmd's score is {line!r}: not a finite number", path)
        return {"score": value}
    try:
        parsed = json.loads(line)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise CkptEmaError(f"--eval-cmd's last line is neither a number nor a JSON object of numbers: {line[:200]!r}",
                           path)
    scores = {str(k): float(v) for k, v in parsed.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if not scores or not all(math.isfinite(v) for v in scores.values()):
        raise CkptEmaError(f"--eval-cmd's last line has no finite numbers: {line[:200]!r}", path)
    if "score" in scores:  # the score first: it chooses
        scores = {"score": scores.pop("score"), **scores}
    return scores


def _tail(stderr: str) -> str:
    """The command's last lines of standard error, on one line."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()][-STDERR_LINES:]
    return (": " + " | ".join(x[:300] for x in lines)) if lines else " (nothing on stderr)"
