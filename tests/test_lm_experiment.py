"""scripts/lm_experiment.py end to end at toy size (``--tiny``): it trains, merges, scores and reports, and what it
reports holds together — its share is computed from the losses it printed, and the merge it names is the mean of
the checkpoints it names (checked against float64 math on the checkpoints as torch loads them)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "lm_experiment.py"


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows of ``text`` whose first cell is ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def check_share(last: str, merge: str, annealed: str, printed: str) -> None:
    """The share printed beside three losses printed to 4 decimals: (last - merge) / (last - annealed), within
    what the rounding of those losses and of the percentage allows; "n/a" exactly when (b) did not improve."""
    a, m, b = float(last), float(merge), float(annealed)
    assert all(math.isfinite(v) and v > 0 for v in (a, m, b))
    if a <= b:
        assert printed.startswith("n/a"), printed
        return
    share = 100 * (a - m) / (a - b)
    tolerance = 0.5 + 100 * 1e-4 * (1 + abs(share) / 100) / (a - b)
    assert abs(float(printed.rstrip("%")) - share) <= tolerance, (printed, share)


def test_tiny_run_reports_consistent_losses_and_real_merges(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--seeds", "0", "1", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout

    # one row per seed and the mean, each share computed from the losses beside it
    for seed in ("0", "1", "mean"):
        (row,) = table_rows(text, seed)
        check_share(row[1], row[2], row[3], row[4])
    mean_row = table_rows(text, "mean")[0]
    seed_rows = [table_rows(text, s)[0] for s in ("0", "1")]
    for column in (1, 2, 3):  # the mean row is the seeds' mean
        mean = sum(float(r[column]) for r in seed_rows) / 2
        assert float(mean_row[column]) == pytest.approx(mean, abs=1.5e-4)  # (rounding to 4 decimals)

    # every rule's best, the references and the earlier window, with finite losses and consistent shares
    (last_row,) = table_rows(text, "(a) last checkpoint")
    (annealed_row,) = table_rows(text, "(b) annealed")
    assert last_row[2] == mean_row[1] and annealed_row[2] == mean_row[3]
    for label in ("best uniform mean", "best EMA", "best power EMA"):
        (row,) = table_rows(text, label)
        assert len(row[1].split(", ")) == 2  # one choice per seed
        check_share(last_row[2], row[2], annealed_row[2], row[3])
    earlier = [line for line in text.splitlines()
               if line.startswith(("| (a) checkpoint at step ", "| chosen merge, window ending at step "))]
    assert len(earlier) == 2 and math.isfinite(float(earlier[0].split("|")[3]))
    merge_cell = earlier[1].split("|")[3].strip()  # n/a when a chosen uniform mean is longer than the run then
    assert merge_cell.startswith("n/a (a chosen window is longer") or math.isfinite(float(merge_cell))

    # the uniform means the sweep wrote are the float64 means of the newest K checkpoints' weights
    run = out / "seed-0" / "constant"
    checkpoints = sorted(run.glob("step_*.pt"))
    merges = sorted((out / "seed-0" / "merges").glob("last-*.safetensors"))
    assert len(merges) >= 2
    for merge in merges:
        named = re.fullmatch(r"last-(\d+)\.safetensors", merge.name)
        assert named is not None
        k = int(named.group(1))
        states = [torch.load(p, weights_only=True)["model"] for p in checkpoints[-k:]]
        written = load_file(str(merge))
        assert written.keys() == states[0].keys()
        for name, tensor in written.items():
            want = sum(s[name].double() for s in states) / k
            assert (tensor.double() - want).abs().max().item() <= 1e-6, (merge.name, name)

    assert (out / "lm_merging.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

