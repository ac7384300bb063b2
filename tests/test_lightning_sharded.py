"""Lightning's sharded checkpoints (the table's ``dcp_lightning_*`` rows, written by Lightning's Trainer on two gloo
processes: tests/lightning_sharded_run.py) read back by Lightning itself: ``Trainer.fit(ckpt_path=...)`` restores a
checkpoint of the run to the weights the table's reference holds (torch's dcp_to_torch_save of the folder), and
restores the merge ``--like-input`` wrote to ckpt-ema's average, at the newest checkpoint's step. The matrix
(tests/test_matrix.py) takes these rows through every other path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import LIGHTNING_STRATEGIES, RUNS
from helpers import assert_average
from safetensors import safe_open

import ckpt_ema

SCRIPT = Path(__file__).resolve().parent / "lightning_sharded_run.py"
DECAY = 0.8


def restored_by_lightning(strategy: str, checkpoint: Path, tmp_path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The LightningModule's full state dict and global step after ``Trainer.fit(ckpt_path=checkpoint)`` (one
    process, in a subprocess so that this one never imports lightning)."""
    out = tmp_path / "restored.safetensors"
    done = subprocess.run([sys.executable, str(SCRIPT), strategy, str(out), str(checkpoint)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with safe_open(out, "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, int(f.metadata()["global_step"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(LIGHTNING_STRATEGIES))
def test_lightning_restores_the_reference(strategy: str, tmp_path: Path) -> None:
    """The table's reference is what Lightning itself restores from the newest checkpoint (the run's last step: the
    Trainer stops at once), bit for bit."""
    run = RUNS[f"dcp_lightning_{strategy}"]
    step = run.steps[-1]
    got, global_step = restored_by_lightning(strategy, run.folder / run.entries[step][0], tmp_path)
    assert global_step == step
    assert sorted(got) == sorted(run.weights[step])
    for name, t in run.weights[step].items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(LIGHTNING_STRATEGIES))
def test_lightning_resumes_from_the_merge(strategy: str, tmp_path: Path) -> None:
    """``-o DIR --like-input`` over the run: Lightning resumes from DIR with ckpt-ema's average as its model (bit
    for bit), at the newest checkpoint's step."""
    run = RUNS[f"dcp_lightning_{strategy}"]
    merged = tmp_path / "merged"
    ckpt_ema.average(run.folder, merged, like_input=True, decay=DECAY)
    got, global_step = restored_by_lightning(strategy, merged, tmp_path)
    assert global_step == run.steps[-1]
    assert_average(run, got, decay=DECAY)
    mine = ckpt_ema.average(run.folder, decay=DECAY).state_dict
    assert sorted(got) == sorted(mine)
    for name, t in mine.items():
        assert torch.equal(got[name], t), name
