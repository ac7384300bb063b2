"""Helpers shared by the tests: the independent references (timm's own ModelEmaV3, float64 brute-force EMAs over
every training step, the average of a run of the fixture table) and the fixtures (tiny real training runs, plain
checkpoints; the runs of every format are the table's, in checkpoints.py). Tests import from here and from
checkpoints.py only; they never import one another.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from checkpoints import DEEPSPEED_FIXTURES, RUNS, Run, dcp_model
from timm.utils import model_ema as timm_model_ema
from torch import nn

ModelEmaV3 = timm_model_ema.ModelEmaV3

STEPS = 24
TOLERANCE = 1e-5  # the contract: float32 rounding, <= 1e-5 absolute


# ------------------------------------------------------------------------------------------- real training runs


class TinyNet(nn.Module):
    """Conv + BatchNorm + Linear: parameters, float buffers (running stats) and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.flatten(1))


def train_and_checkpoint(
    folder: Path, ema_kwargs: dict, *, save_initial: bool, steps: int = STEPS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Train TinyNet for ``steps`` SGD steps, saving ``step_<s>.pt`` after each; return timm's online EMA.

    With ``save_initial`` the weights before training are saved too, as step 0 (``global_step`` metadata).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead, and spin for seconds when cores are busy
    try:
        return _train(folder, ema_kwargs, save_initial, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(folder: Path, ema_kwargs: dict, save_initial: bool, steps: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyNet()
    ema = ModelEmaV3(model, **ema_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    x = torch.randn(16, 3, 4, 4)
    y = torch.randint(0, 5, (16,))
    folder.mkdir(parents=True, exist_ok=True)
    if save_initial:
        torch.save({"state_dict": model.state_dict(), "global_step": 0}, folder / "step_0.pt")
    for step in range(1, steps + 1):
        model.train()
        noisy = x + 0.5 * torch.randn_like(x)  # a new batch each step: BN running stats keep moving
        loss = nn.functional.cross_entropy(model(noisy), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model, step=step)
        torch.save({"state_dict": model.state_dict(), "global_step": step}, folder / f"step_{step}.pt")
    return {k: v.detach().clone() for k, v in ema.module.state_dict().items()}


def assert_matches_timm(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(result) == sorted(expected)
    for name, want in expected.items():
        got = result[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if want.is_floating_point():
            diff = (got.double() - want.double()).abs().max().item()
            assert diff <= TOLERANCE, f"{name}: max abs difference {diff}"
        else:
            assert torch.equal(got, want), name


# ------------------------------------------------------------------------------------------- the references


def timm_ema(decay: float, min_decay: float = 0.0, update_after_step: int = 0, warmup: bool = False,
             warmup_gamma: float = 1.0, warmup_power: float = 2 / 3) -> timm_model_ema.ModelEmaV3:
    """A ModelEmaV3 whose only use is its get_decay (d(s) straight from timm)."""
    return timm_model_ema.ModelEmaV3(
        nn.Linear(1, 1), decay=decay, min_decay=min_decay, update_after_step=update_after_step, use_warmup=warmup,
        warmup_gamma=warmup_gamma, warmup_power=warmup_power,
    )


def reference_ema(checkpoints: dict[int, dict[str, torch.Tensor]], *, bias_correction: bool = False,
                  **schedule: float) -> dict[str, torch.Tensor]:
    """The EMA of a run whose weights sat at the next saved checkpoint between saves, every step, in float64.

    Without bias correction d(s) = timm's get_decay(s) (its first update copies the model). With it, the
    accumulator starts at zero, no update happens at s <= update_after_step, every later step decays by
    ``decay``, and the result is divided by 1 - prod d(s) over s = 1..last.
    """
    ema = timm_ema(**schedule)
    after = int(schedule.get("update_after_step", 0))
    steps = sorted(checkpoints)
    names = [n for n, t in checkpoints[steps[0]].items() if t.is_floating_point()]
    v = {n: torch.zeros_like(checkpoints[steps[0]][n], dtype=torch.float64) for n in names}
    survive = 1.0
    j = 0
    for s in range(1, steps[-1] + 1):
        while steps[j] < s:
            j += 1
        theta = checkpoints[steps[j]]
        if bias_correction:
            d = 1.0 if s <= after else ema.get_decay(None)  # get_decay(None) is the plain decay
        else:
            d = ema.get_decay(s)
        for n in names:
            v[n] = d * v[n] + (1 - d) * theta[n].double()
        survive *= d
    if bias_correction:
        v = {n: t / (1 - survive) for n, t in v.items()}
    return v


def implied_weights(steps: list[int], **kwargs: float) -> list[float]:
    """The reference is linear in the checkpoints: run it on one-hot vectors to read off each one's weight."""
    n = len(steps)
    onehots = {s: {"x": torch.eye(n, dtype=torch.float64)[i]} for i, s in enumerate(steps)}
    return reference_ema(onehots, **kwargs)["x"].tolist()


def seed_ema(thetas: list[torch.Tensor], beta: float, bias_correction: bool) -> torch.Tensor:
    """The seed's formula: v_t = beta v_{t-1} + (1 - beta) theta_t, v_0 = 0, optionally / (1 - beta^n).

    Without bias correction the first update copies (timm's d(1) = 0).
    """
    v = torch.zeros_like(thetas[0], dtype=torch.float64)
    for t, theta in enumerate(thetas, start=1):
        b = beta if (bias_correction or t > 1) else 0.0
        v = b * v + (1 - b) * theta.double()
    return v / (1 - beta ** len(thetas)) if bias_correction else v


def window_of(weights: list[float], share: float = 0.99) -> int:
    carried = 0.0
    for k, w in enumerate(reversed(weights), start=1):
        carried += w
        if carried >= share - 1e-12:
            return k
    return len(weights)


def theta_at(checkpoints: dict[int, dict[str, torch.Tensor]], s: int) -> dict[str, torch.Tensor]:
    """The weights at step s: the first checkpoint's before it, then a straight line between the two saves around s,
    theta(s) = (1 - l) theta_a + l theta_b with l = (s - a) / (b - a)."""
    steps = sorted(checkpoints)
    j = next(i for i, b in enumerate(steps) if b >= s)
    b = steps[j]
    names = [n for n, t in checkpoints[b].items() if t.is_floating_point()]
    if j == 0:
        return {n: checkpoints[b][n].double() for n in names}
    a = steps[j - 1]
    lam = (s - a) / (b - a)
    return {n: (1 - lam) * checkpoints[a][n].double() + lam * checkpoints[b][n].double() for n in names}


def corrected_decay(ema, s: int) -> float:  # noqa: ANN001 - a timm ModelEmaV3
    """d(s) with Adam's bias correction: no update up to update_after_step; the step timm copies the model at
    (t = 0) decays instead, by the plain decay, or under warmup by the warmup formula at t = 0 (1 - 1 = 0, clamped
    to [min_decay, decay]); every later step is timm's get_decay(s)."""
    if s <= ema.update_after_step:
        return 1.0
    if s > ema.update_after_step + 1:
        return ema.get_decay(s)
    return max(min(0.0, ema.decay), ema.min_decay) if ema.use_warmup else ema.decay


def interval_reference(ema, a: int, b: int, bias_correction: bool = False) -> tuple[float, float, float]:  # noqa: ANN001
    """(F, A, B) of the steps s = a+1..b by timm's recurrence run literally, one step at a time, on the
    coefficients of v_a, theta_a and theta_b (theta(s) on the line between them): the per-step brute force."""
    survive, older, newer = 1.0, 0.0, 0.0
    for s in range(a + 1, b + 1):
        d = corrected_decay(ema, s) if bias_correction else ema.get_decay(s)
        lam = (s - a) / (b - a)
        survive, older, newer = d * survive, d * older + (1 - d) * (1 - lam), d * newer + (1 - d) * lam
    return survive, older, newer


def linear_reference(checkpoints: dict[int, dict[str, torch.Tensor]], *, bias_correction: bool = False,
                     **schedule: float) -> dict[str, torch.Tensor]:
    """timm's EMA run at every step s = 1..last over weights moving linearly between saves, in float64.

    Without bias correction d(s) is timm's get_decay(s) (the first update copies); with it the accumulator
    starts at zero and the result is divided by 1 - prod d(s).
    """
    ema = timm_ema(**schedule)
    steps = sorted(checkpoints)
    v = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in theta_at(checkpoints, steps[0]).items()}
    survive = 1.0
    for s in range(1, steps[-1] + 1):
        theta = theta_at(checkpoints, s)
        d = corrected_decay(ema, s) if bias_correction else ema.get_decay(s)
        for n in v:
            v[n] = d * v[n] + (1 - d) * theta[n]
        survive *= d
    return {n: t / (1 - survive) for n, t in v.items()} if bias_correction else v


def linear_weights(steps: list[int], **kwargs: float) -> list[float]:
    """The reference is linear in the checkpoints: each one's weight is its result on one-hot checkpoints."""
    onehots = {s: {"x": torch.eye(len(steps), dtype=torch.float64)[i]} for i, s in enumerate(steps)}
    return linear_reference(onehots, **kwargs)["x"].tolist()


def reference_average(run: Run, *, decay: float | None = None, last: int | None = None) -> dict[str, torch.Tensor]:
    """The average of ``run`` in float64, by name: timm's EMA with ``decay`` (every step, linear between saves), or
    the mean of the newest ``last`` checkpoints; a tensor that is not floating point is the newest checkpoint's."""
    newest = run.weights[run.steps[-1]]
    floats = {s: {n: t for n, t in w.items() if t.is_floating_point()} for s, w in run.weights.items()}
    if last is not None:
        kept = run.steps[-last:]
        mean = {n: sum(floats[s][n].double() for s in kept) / len(kept) for n in floats[kept[0]]}
    else:
        assert decay is not None, "a decay or a count of checkpoints"
        mean = linear_reference(floats, decay=decay)
    return {n: mean.get(n, t) for n, t in newest.items()}


def assert_average(run: Run, got: dict[str, torch.Tensor], *, decay: float | None = None,
                   last: int | None = None) -> None:
    """``got`` (an output's tensors) holds the names of ``run``'s checkpoints, each in its input dtype and shape and
    equal to :func:`reference_average` to that dtype's rounding: TOLERANCE, plus one unit in the last place (float32:
    nothing to speak of; bfloat16: 1/128 of the value)."""
    want = reference_average(run, decay=decay, last=last)
    dtypes = {n: t.dtype for n, t in run.weights[run.steps[-1]].items()}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (dtypes[name], w.shape), name
        if g.is_floating_point():
            bound = TOLERANCE + torch.finfo(g.dtype).eps * w.abs()
            excess = ((g.double() - w).abs() - bound).max().item()
            assert excess <= 0, f"{run.name} {name}: off by {excess:.3g} beyond {g.dtype} rounding"
        else:
            assert torch.equal(g, w), name


# ------------------------------------------------------------------------------------------- checkpoints


def make_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 5, generator=g, dtype=torch.float64).to(dtype),
        "layer.bias": torch.randn(5, generator=g, dtype=torch.float64).to(dtype),
        "bn.running_var": (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        "bn.num_batches_tracked": torch.tensor(seed * 7, dtype=torch.int64),
    }


def write_run(folder: Path, steps: list[int], dtype: torch.dtype = torch.float32) -> dict[int, dict[str, torch.Tensor]]:
    """Plain state dicts named ckpt_<step>.pt; returns what was saved, by step."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for s in steps:
        saved[s] = make_state(s, dtype)
        torch.save(saved[s], folder / f"ckpt_{s}.pt")
    return saved


def max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


def run_cli(*args: object):  # noqa: ANN201 - a click Result
    """``ckpt-ema ARGS`` in this process, stdout and stderr apart."""
    from click.testing import CliRunner

    from ckpt_ema.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(args: list, *fragments: str, out: Path | str) -> str:
    """``ckpt-ema average ARGS -o OUT`` (a file, or a folder when OUT ends in /) fails as a user error: exit 2, one
    line ``ckpt-ema: error: ...`` holding every fragment (after the notes on the inputs, when the error shows while
    reading tensors), no traceback, and nothing new beside OUT. An exception the command ended with is raised here."""
    parent = Path(str(out).rstrip("/")).parent
    before = sorted(parent.iterdir())
    res = run_cli("average", *args, "-o", out)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    *notes, error = res.stderr.splitlines()
    assert error.startswith("ckpt-ema: error: ") and all(n.startswith(("note: ", "warning: ", "skipped ")) for n in notes), res.stderr
    assert all(f in error for f in fragments), (fragments, error)
    assert "Traceback" not in res.output
    assert sorted(parent.iterdir()) == before
    return error


def torchrun(*args: object) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 --standalone -m ckpt_ema ARGS`` with this interpreter, one thread per rank."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo), TORCH_CPP_LOG_LEVEL="ERROR")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "ckpt_ema", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------- real trainers' folders

LIGHTNING_SCRIPT = """
import sys, torch, lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

folder = sys.argv[1]
callbacks = [ModelCheckpoint(dirpath=folder, every_n_train_steps=8, save_top_k=-1),
             ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True)]
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(60, 4), torch.randn(60, 2))
trainer = L.Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=1))
"""


def lightning_run(folder: Path) -> Path:
    """A real Lightning run of 60 steps: a ModelCheckpoint every 8 steps (epoch=0-step=8.ckpt .. step=56), and a
    second ModelCheckpoint whose save_last writes last.ckpt at the end of training (step 60, newer than every
    periodic checkpoint). Made in a subprocess, so that this process never imports lightning."""
    subprocess.run([sys.executable, "-c", LIGHTNING_SCRIPT, str(folder)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return folder


def timm_run(folder: Path, *, epochs: int = 5, recovery_epoch: int | None = 4) -> dict[int, dict[str, torch.Tensor]]:
    """A real timm CheckpointSaver run: checkpoint-E.pth.tar for E = 0..epochs-1 (ranked by a metric), last and
    model_best as timm links them, recovery-E-B.pth.tar saved inside ``recovery_epoch`` at batches 1 and 2, and a
    milestone. Returns the weights of each epoch's checkpoint."""
    from timm.utils import CheckpointSaver

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, opt, args=argparse.Namespace(model="linear"), checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=10)
    metric = [0.1, 0.5, 0.3, 0.6, 0.4, 0.2, 0.7]
    states = {}
    for epoch in range(epochs):
        for batch in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            if epoch == recovery_epoch and batch in (1, 2):
                saver.save_recovery(epoch, batch_idx=batch)
        saver.save_checkpoint(epoch, metric=metric[epoch])
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    saver.save_milestone(epochs)
    return states


# ------------------------------------------------------------------------------------------- power EMA, unresolved


def edm2_gamma(sigma_rel: float) -> float:
    """gamma as EDM2's phema.std_to_exp computes it: the largest real root of the cubic, by numpy."""
    import numpy as np

    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def theta_held(checkpoints: dict[int, dict[str, torch.Tensor]], s: int) -> dict[str, torch.Tensor]:
    """The weights at step s under ``step``: those of the first checkpoint at or after s."""
    b = min(step for step in checkpoints if step >= s)
    return {n: t.double() for n, t in checkpoints[b].items() if t.is_floating_point()}


def power_reference(checkpoints: dict[int, dict[str, torch.Tensor]], sigma_rel: float,
                    interpolate: str = "linear") -> dict[str, torch.Tensor]:
    """EDM2's power-function EMA run at every step t = 1..last, beta(t) = (1 - 1/t)^(gamma+1), over the weights
    guessed between saves, in float64."""
    gamma = edm2_gamma(sigma_rel)
    guess = theta_at if interpolate == "linear" else theta_held
    v: dict[str, torch.Tensor] = {}
    for t in range(1, max(checkpoints) + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        theta = guess(checkpoints, t)
        v = theta if t == 1 else {n: beta * v[n] + (1 - beta) * theta[n] for n in v}
    return v


def power_weights(steps: list[int], sigma_rel: float, interpolate: str = "linear") -> list[float]:
    onehots = {s: {"x": torch.eye(len(steps), dtype=torch.float64)[i]} for i, s in enumerate(steps)}
    return power_reference(onehots, sigma_rel, interpolate)["x"].tolist()


def per_step_profile(decays: list[float]) -> list[float]:
    """What each step 1..T weighs in the recurrence v_s = d(s) v_{s-1} + (1 - d(s)) theta_s (index 0 is step 1),
    divided by the total (bias correction: the accumulator starts at zero)."""
    weights, after = [0.0] * len(decays), 1.0
    for i in range(len(decays) - 1, -1, -1):
        weights[i] = (1 - decays[i]) * after
        after *= decays[i]
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else weights


def unresolved_reference(profile: list[float], steps: list[int]) -> float:
    """Half the L1 distance between a per-step profile and the same profile flattened within each interval
    (0, a_0], (a_0, a_1], ... of checkpoint steps, by a plain loop."""
    distance, start = 0.0, 0
    for end in steps:
        inside = profile[start:end]
        if inside:
            mean = sum(inside) / len(inside)
            distance += sum(abs(e - mean) for e in inside)
        start = end
    return distance / 2


# ------------------------------------------------------------------------------------------- fuzzing the readers
#
# The mutation harness: real checkpoints made by the libraries that write them, mutated byte by byte (fixed seeds),
# each mutant either refused in one line or read exactly as an independent reader (not ckpt-ema's code) reads it.
# A format joins by adding a FuzzFormat to FUZZ_FORMATS. tests/test_fuzz.py runs a fast subset, scripts/
# fuzz_readers.py the full run.


@dataclass(frozen=True)
class FuzzFormat:
    """One checkpoint format as the harness sees it.

    ``make(folder)`` writes a real checkpoint with the library that writes the format and returns the path a user
    gives ckpt-ema; ``files(path)`` are the files the mutations change; each of ``references`` reads the
    checkpoint's weights with an independent reader (not ckpt-ema's code), or returns None when it refuses.
    Independent readers can disagree on a corrupt file (torch.load without mmap reads a record its directory marks
    as a folder from elsewhere): ckpt-ema must read a mutant as at least one of them does.
    """

    name: str
    make: Callable[[Path], Path]
    files: Callable[[Path], list[Path]]
    references: tuple[Callable[[Path], dict[str, torch.Tensor] | None], ...]


def fuzz_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of several dtypes and shapes (a scalar, an empty tensor, an int buffer, bfloat16)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "block.0.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "block.0.attn.bias": torch.randn(8, generator=g).half(),
        "block.0.norm.weight": torch.rand(8, generator=g, dtype=torch.float64),
        "block.0.norm.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "head.scale": torch.tensor(0.5),
        "head.empty": torch.zeros(0, 4),
    }


def _make_safetensors(folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "ckpt_3.safetensors"
    save_file(fuzz_state(), str(path), metadata={"format": "pt", "step": "3"})
    return path


def _torch_maker(**save_options: Any) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "ckpt_3.pt"
        obj = {"state_dict": fuzz_state(), "global_step": 3, "args": argparse.Namespace(lr=0.1, arch="tiny"),
               "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}}
        torch.save(obj, path, **save_options)
        return path
    return make


def make_hf_sharded(folder: Path) -> Path:
    """A sharded set as Hugging Face writes it (huggingface_hub's split and index logic, used by transformers)."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(fuzz_state(), folder, max_shard_size=600)
    return folder / "model.safetensors.index.json"


def reference_safetensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The safetensors package's own reader."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any refusal of the reference counts as a refusal
        return None


class _AllowListPickle:
    """A pickle module for ``torch.load``: the standard library's (C) unpickler, resolving only the globals torch's
    weights-only loader and ckpt-ema's allow-list name. Independent of ckpt-ema's unpickling, and never runs code."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            from torch._weights_only_unpickler import _get_allowed_globals

            from ckpt_ema.formats.torch_save import SAFE_GLOBALS

            allowed = dict(_get_allowed_globals())
            for entry in SAFE_GLOBALS:
                target, qualified = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
                allowed[qualified] = target
            if f"{module}.{name}" not in allowed:
                raise pickle.UnpicklingError(f"not allowed: {module}.{name}")
            return allowed[f"{module}.{name}"]

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _AllowListPickle.Unpickler(file, **kwargs).load()


def reference_torch(path: Path, mmap: bool = False) -> dict[str, torch.Tensor] | None:
    """``torch.load`` itself (its own zip reader) with the standard library's unpickler, allow-listed."""
    from ckpt_ema.formats.torch_save import find_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_AllowListPickle,
                             mmap=mmap)
        state, _ = find_state_dict(obj, path)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - any refusal of the reference counts as a refusal
        return None


def reference_hf_sharded(index: Path) -> dict[str, torch.Tensor] | None:
    """Each tensor from the shard the index names, as the safetensors package reads it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {shard: reference_safetensors(index.parent / shard) for shard in set(weight_map.values())}
        return {name: shards[shard][name] for name, shard in weight_map.items()}
    except Exception:  # noqa: BLE001
        return None


def _hf_files(index: Path) -> list[Path]:
    return [index] + sorted(index.parent.glob("*.safetensors"))


def reference_torch_mmap(path: Path) -> dict[str, torch.Tensor] | None:
    """``torch.load(mmap=True)``: storages at the offsets of the records' local headers."""
    return reference_torch(path, mmap=True)


TORCH_REFERENCES = (reference_torch, reference_torch_mmap)
FUZZ_FORMATS: dict[str, FuzzFormat] = {f.name: f for f in [
    FuzzFormat("safetensors", _make_safetensors, lambda p: [p], (reference_safetensors,)),
    FuzzFormat("torch_zip", _torch_maker(), lambda p: [p], TORCH_REFERENCES),
    FuzzFormat("torch_zip_protocol4", _torch_maker(pickle_protocol=4), lambda p: [p], TORCH_REFERENCES),
    FuzzFormat("torch_legacy", _torch_maker(_use_new_zipfile_serialization=False), lambda p: [p], (reference_torch,)),
    FuzzFormat("hf_sharded", make_hf_sharded, _hf_files, (reference_hf_sharded,)),
]}


def _make_dcp(folder: Path) -> Path:
    """A DCP checkpoint written by dcp.save under gloo with two ranks (FSDP2): a copy of the table's."""
    shutil.copytree(RUNS["dcp_fsdp"].folder / "step-2", folder / "step-2")
    return folder / "step-2"


def reference_dcp(folder: Path) -> dict[str, torch.Tensor] | None:
    """PyTorch's own DCP reader (dcp_to_torch_save, no process group): the ``model`` entry's tensors."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: v for k, v in dcp_model(folder).items() if isinstance(v, torch.Tensor)}
    except (Exception, CheckpointException):  # noqa: BLE001 - any refusal of the reference counts as a refusal
        return None


def _deepspeed_maker(run: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        shutil.copytree(DEEPSPEED_FIXTURES / run / "global_step4", folder / "global_step4")
        return folder / "global_step4"
    return make


def reference_zero_to_fp32(tag: Path, mmap: bool = False) -> dict[str, torch.Tensor] | None:
    """DeepSpeed's own zero_to_fp32 consolidation (it unpickles fully: these are the harness's own mutants). It
    loads the model states with torch.load's own zip reader; with ``mmap``, every file through torch.load's
    mapped reader (the two read some damaged zip directories differently, the first from memory it never wrote)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    load = torch.load
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), \
                mock.patch("torch.load", lambda *a, **k: load(*a, **{**k, "mmap": True}) if mmap else load(*a, **k)):
            warnings.simplefilter("ignore")
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
            return {k: v.contiguous() for k, v in state.items()}
    except Exception:  # noqa: BLE001 - any refusal of the reference counts as a refusal
        return None


def reference_zero_to_fp32_mmap(tag: Path) -> dict[str, torch.Tensor] | None:
    """zero_to_fp32 with every file loaded through torch.load's mapped reader."""
    return reference_zero_to_fp32(tag, mmap=True)


FUZZ_FORMATS["dcp"] = FuzzFormat("dcp", _make_dcp, lambda p: sorted(p.iterdir()), (reference_dcp,))
if importlib.util.find_spec("deepspeed") is not None:  # its zero_to_fp32 is the reference
    for _run in ("zero2-bf16", "zero3-bf16"):  # ZeRO-1's frozen parameter is one zero_to_fp32 leaves out
        FUZZ_FORMATS[f"deepspeed_{_run}"] = FuzzFormat(f"deepspeed_{_run}", _deepspeed_maker(_run),
                                                       lambda p: sorted(p.iterdir()),
                                                       (reference_zero_to_fp32, reference_zero_to_fp32_mmap))


# The mutations: each returns the new bytes of one file, drawn with ``rng``. Most aim at the bytes that decide
# where data is (the first and last KB: headers, pickles, zip directories); some at anywhere.
def _hot_position(data: bytes, rng: random.Random) -> int:
    if not data:
        return 0
    if rng.random() < 0.3:
        return rng.randrange(len(data))
    edge = min(len(data), 1024)
    return rng.randrange(edge) if rng.random() < 0.5 else len(data) - 1 - rng.randrange(edge)


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    """Bits flipped in one byte (one place per mutant: two at once could mix a change the independent reader
    refuses with one that changes the weights, and the mutant's correct reading would be unknown)."""
    out = bytearray(data)
    pos = _hot_position(data, rng)
    out[pos] ^= rng.randrange(1, 256)
    return bytes(out)


def _set_integer(data: bytes, rng: random.Random) -> bytes:
    """An integer field set to an edge value: what a corrupt size, offset or count looks like."""
    width = rng.choice([2, 4, 8])
    pos = min(_hot_position(data, rng), max(0, len(data) - width))
    old = int.from_bytes(data[pos : pos + width], "little")
    value = rng.choice([0, 1, old + 1, old - 1, old + 8, old - 8, old * 2, len(data), len(data) + 64, 2**31, 2**32 - 1,
                        2**63, 2 ** (8 * width) - 1]) % 2 ** (8 * width)
    return data[:pos] + value.to_bytes(width, "little") + data[pos + width :]


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: _hot_position(data, rng)]


def _insert(data: bytes, rng: random.Random) -> bytes:
    pos = _hot_position(data, rng)
    return data[:pos] + rng.randbytes(rng.choice([1, 4, 8, 64])) + data[pos:]


def _delete(data: bytes, rng: random.Random) -> bytes:
    pos = _hot_position(data, rng)
    return data[:pos] + data[pos + rng.choice([1, 4, 8, 64]) :]


def _copy_span(data: bytes, rng: random.Random) -> bytes:
    """A span of the file written over another: a duplicated header entry, record or opcode run."""
    n = rng.choice([4, 16, 64, 256])
    src, dst = _hot_position(data, rng), _hot_position(data, rng)
    piece = data[src : src + n]
    return data[:dst] + piece + data[dst + len(piece) :]


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    """A JSON document (an index) or a safetensors header changed in its meaning, kept well-formed: a number moved,
    a key renamed to another key's name, a value copied from elsewhere, an entry dropped or a path made hostile."""
    is_header = not data.lstrip().startswith(b"{")
    if is_header:
        n = int.from_bytes(data[:8], "little")
        doc, rest = json.loads(data[8 : 8 + n]), data[8 + n :]
    else:
        doc, rest = json.loads(data), b""
    entries = doc["weight_map"] if "weight_map" in doc else doc
    names = [k for k in entries if k != "__metadata__"]
    name = rng.choice(names)
    choice = rng.randrange(6)
    if choice == 0 and isinstance(entries[name], dict):  # an offset or a dimension moved
        field = rng.choice(["data_offsets", "shape"])
        if entries[name][field]:
            i = rng.randrange(len(entries[name][field]))
            entries[name][field][i] = max(0, entries[name][field][i] + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]))
    elif choice == 1:  # two entries swap values
        other = rng.choice(names)
        entries[name], entries[other] = entries[other], entries[name]
    elif choice == 2:  # a value copied over another's
        entries[name] = copy.deepcopy(entries[rng.choice(names)])
    elif choice == 3:
        del entries[name]
    elif choice == 4 and isinstance(entries[name], dict):
        entries[name]["dtype"] = rng.choice(["F32", "F16", "BF16", "I64", "U8", "F64", "BOOL"])
    else:  # a hostile or unexpected name
        entries[name] = rng.choice(["../" + str(entries[name]), "/etc/passwd", "x" * 300, "\ud800",
                                    entries[rng.choice(names)]]) if not is_header else entries[name]
        if is_header:
            entries[rng.choice(["\ud800", name + "\u0000", "__metadata__"])] = entries.pop(name)
    text = json.dumps(doc).encode("utf-8", "surrogatepass")
    if is_header:
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + rest
    return text


def _mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    """A torch.save archive whose pickle is mutated and whose CRC-32 is made to match again (as a crafted file's
    would): the unpickler, not the checksum, has to deal with it."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    header = info.header_offset
    start = header + 30 + int.from_bytes(data[header + 26 : header + 28], "little") + int.from_bytes(
        data[header + 28 : header + 30], "little")
    pickled = data[start : start + info.file_size]
    mutated = rng.choice([_flip_bits, _set_integer, _copy_span])(pickled, rng)[: len(pickled)]
    mutated += pickled[len(mutated) :]
    out = bytearray(data[:start] + mutated + data[start + len(pickled) :])
    entry = out.find(b"PK\x01\x02", start + len(pickled))
    while out[entry + 46 : entry + 46 + len(info.filename)] != info.filename.encode():
        entry = out.find(b"PK\x01\x02", entry + 1)
    struct.pack_into("<I", out, entry + 16, zlib.crc32(mutated))  # the directory entry's CRC-32
    return bytes(out)


BYTE_MUTATIONS = {"flip_bits": _flip_bits, "set_integer": _set_integer, "truncate": _truncate, "insert": _insert,
                  "delete": _delete, "copy_span": _copy_span}


def mutations_for(data: bytes) -> dict[str, Callable[[bytes, random.Random], bytes]]:
    """The mutations that apply to a file: every byte mutation; the pickle one for zip archives; the JSON one for
    JSON and safetensors headers."""
    kinds = dict(BYTE_MUTATIONS)
    if data.startswith(b"PK"):
        kinds["pickle"] = _mutate_pickle
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if data.lstrip().startswith(b"{") or (8 + n <= len(data) and data[8:9] == b"{"):
        kinds["json"] = _mutate_json
    return kinds


def mutate_checkpoint(fmt: FuzzFormat, original: Path, folder: Path, rng: random.Random) -> tuple[Path, str]:
    """A copy of the checkpoint at ``original`` in ``folder`` with one of its files mutated; and what was done."""
    shutil.copytree(original.parent, folder)
    path = folder / original.name
    target = rng.choice(fmt.files(path))
    data = target.read_bytes()
    kinds = mutations_for(data)
    kind = rng.choice(sorted(kinds))
    try:
        mutated = kinds[kind](data, rng)
    except (ValueError, KeyError, IndexError, TypeError):  # not applicable to this file: flip bits instead
        kind, mutated = "flip_bits", _flip_bits(data, rng)
    target.write_bytes(mutated)
    return path, f"{kind} of {target.name}"


def read_with_ckpt_ema(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as ckpt-ema's readers give it (copies), by stored name."""
    from ckpt_ema.formats.registry import open_checkpoint

    ckpt = open_checkpoint(path)
    return {name: t.clone() for name, t in ckpt.items()}


def check_mutant(fmt: FuzzFormat, path: Path, original: dict[str, torch.Tensor]) -> str:
    """'refused' (one line), 'read' (as one of the independent readers reads it) or 'unchanged' (they all refuse
    it, and ckpt-ema reads the original weights: the mutation changed nothing that matters). Anything else (a
    traceback, a warning, other values) fails with an AssertionError or the exception itself."""
    from ckpt_ema.errors import CkptEmaError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ours = read_with_ckpt_ema(path)
        except CkptEmaError as exc:
            assert "\n" not in str(exc), f"a refusal of more than one line: {exc}"
            assert not caught, f"warnings escaped: {[str(w.message) for w in caught]}"
            return "refused"
    assert not caught, f"warnings escaped: {[str(w.message) for w in caught]}"
    readings = [r for r in (reference(path) for reference in fmt.references) if r is not None]
    if not readings:
        assert_same_tensors(ours, original)
        return "unchanged"
    failures = []
    for reading in readings:
        try:
            assert_same_tensors(ours, reading)
            return "read"
        except AssertionError as exc:
            failures.append(str(exc))
    raise AssertionError(f"read otherwise than every independent reader: {failures}")


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    from ckpt_ema.formats.base import strip_wrapper_prefixes

    plain = strip_wrapper_prefixes(list(want))
    want = {plain[name]: t for name, t in want.items()}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name


def fuzz(fmt: FuzzFormat, workdir: Path, seed: int, count: int) -> Counter:
    """Run ``count`` mutants of ``fmt`` (seeded): the outcomes, counted by outcome and by mutation kind."""
    rng = random.Random(seed)
    original_path = fmt.make(_fresh(workdir / "original"))
    original = fmt.references[0](original_path)
    assert original is not None, "the independent reader refuses the unmutated checkpoint"
    outcomes: Counter = Counter()
    for i in range(count):
        folder = workdir / f"mutant_{i}"
        path, kind = mutate_checkpoint(fmt, original_path, folder, rng)
        try:
            outcome = check_mutant(fmt, path, original)
        except Exception as exc:
            raise AssertionError(f"{fmt.name} mutant {i} (seed {seed}, {kind}): {type(exc).__name__}: {exc}") from exc
        outcomes[outcome] += 1
        outcomes[f"{outcome}: {kind.split(' of ')[0]}"] += 1
        shutil.rmtree(folder)
    return outcomes


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def cli_refusal(*args: str | Path) -> str:
    """Run ``ckpt-ema average ARGS`` and return its one line of refusal, after checking the contract: exit code 2,
    one error line, last on stderr (after the notes of discovery, if any), no traceback, nothing on stdout."""
    from click.testing import CliRunner

    from ckpt_ema.cli import main

    result = CliRunner().invoke(main, ["average", *map(str, args)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("ckpt-ema: error: "), result.stderr
    assert all(line.startswith(("note:", "skipped")) for line in lines[:-1]), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    return lines[-1]
