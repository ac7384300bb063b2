"""Train a CIFAR-10 model and save checkpoints along the way: the runs that ``average`` and ``eval`` work on.

The recipe is the seed's: AdamW (lr 1e-3, torch's default weight decay 0.01), batch 64, cross-entropy, the seed's
normalisation; plus augmentation (random crop with padding 4, horizontal flip), on by default. The learning rate
follows a cosine from ``lr`` down to ``min_lr`` over the whole run, set before every optimizer step
(``lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * s / total_steps)) / 2`` for the update that makes step s + 1),
i.e. ``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)`` stepped per batch. (The seed builds
``CosineAnnealingLR(opt, 2 * len(loader), 1e-4)`` but steps it once per epoch, so its rate barely moves from 1e-3
in 10 epochs; ``lr_schedule="constant"`` reproduces that.)

A run folder holds::

    run.json                  hparams, architecture, data slice, validation indices, and the summary at the end
    step_00000000.pt          the initial weights (the EMA's starting point), then every ``save_every`` steps
    step_00000782.pt          ... and the last step; name order is step order
    online_ema/ema.pt         the online EMA at the end (a subfolder, so averaging RUN/*.pt does not pick it up)

Each checkpoint is ``{"state_dict", "step", "epoch", "arch", "hparams", "optimizer"}`` plus ``"state_dict_ema"``
when an online EMA is kept, written atomically. ``epoch`` counts the epochs completed at ``step``.

Every random draw is a function of (seed, what it is for, epoch or step): the model's initialisation, each epoch's
order of images, each step's augmentation. Nothing else has state but the weights, AdamW's moments and the EMA,
which the checkpoints hold, so a resumed run does exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ckpt_ema.engine.runner import check_device
from ckpt_ema.formats.torch_save import torch_load_safely
from ckpt_ema.cifar.data import (
    Split,
    load_cifar10,
    resolve_data_dir,
    seeded_generator,
    split_validation,
    training_batch,
    validation_indices,
)
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.cifar.evaluate import Score, score
from ckpt_ema.cifar.models import ARCHS, build_model
from ckpt_ema.output.atomic import write_atomically
from ckpt_ema.weighting import DecaySchedule

CHECKPOINT_PATTERN = "step_*.pt"
ONLINE_EMA_PATH = Path("online_ema") / "ema.pt"
LOG_EVERY = 20  # steps between progress-bar updates: reading the loss waits for the device


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; the fields that shape the weights are recorded as its ``hparams``."""

    output: Path
    arch: str = "net"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4  # the seed's eta_min
    lr_schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.01  # AdamW's default, which the seed uses
    seed: int = 0
    save_every: int | None = None  # steps; None: once per epoch
    keep_last: int | None = None  # keep only the newest K checkpoints on disk; None: all (not an hparam)
    val_split: int = 0
    augment: bool = True
    ema: DecaySchedule | None = None  # keep an online EMA with this schedule
    device: str = "cpu"
    data: str | Path | None = None
    train_subset: int | None = None  # first N training images (tests)
    test_subset: int | None = None  # first M test images, for the summary's scores
    resume: bool = False
    quiet: bool = False
    evaluate: bool = True  # score the final model (and EMA) on the test set for the summary

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise CkptEmaError(f"--model must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CkptEmaError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.save_every is not None and self.save_every < 1:
            raise CkptEmaError(f"--save-every must be >= 1 step, got {self.save_every}")
        if self.keep_last is not None and self.keep_last < 1:
            raise CkptEmaError(f"--keep-last must be >= 1 checkpoint, got {self.keep_last}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise CkptEmaError(f"need lr > 0 and 0 <= min_lr <= lr, got lr {self.lr}, min_lr {self.min_lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise CkptEmaError(f"--lr-schedule must be cosine or constant, got {self.lr_schedule!r}")
        check_device(self.device)


@dataclass
class TrainResult:
    """What a run did: steps, time, checkpoints written, the last epoch's mean loss and the final scores."""

    run_dir: Path
    start_step: int
    final_step: int
    total_steps: int
    seconds: float
    images_per_second: float
    last_loss: float
    checkpoints: list[Path] = field(default_factory=list)
    online_ema: Path | None = None
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)  # "model"/"online_ema" -> "test"/"val" -> Score

    def summary(self) -> str:
        """A few lines for the terminal: what ran, how fast, where it went, and how well it scores."""
        ran = self.final_step - self.start_step
        lines = [
            f"trained steps {self.start_step}..{self.final_step} of {self.total_steps} in {self.seconds:.1f} s "
            f"({self.images_per_second:.0f} images/s), mean loss of the last epoch {self.last_loss:.4f}"
            if ran
            else f"nothing to do: the run is complete at step {self.final_step}",
            f"{len(self.checkpoints)} checkpoints written to {self.run_dir}",
        ]
        if self.online_ema is not None:
            lines.append(f"online EMA: {self.online_ema}")
        for who, by_split in self.scores.items():
            for split, s in by_split.items():
                lines.append(f"{who:>10} {split:>4}: accuracy {s.accuracy:.4f}, loss {s.loss:.4f} ({s.n} images)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- pieces


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The rate for the optimizer step that takes the model from ``step`` to ``step + 1``."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * step / total_steps)) / 2


def hparams_of(config: TrainConfig, train_images: int, steps_per_epoch: int) -> dict[str, Any]:
    """The settings that shape the weights, as plain values: stored in every checkpoint and checked on resume."""
    hp: dict[str, Any] = {
        "arch": config.arch,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "min_lr": config.min_lr,
        "lr_schedule": config.lr_schedule,
        "weight_decay": config.weight_decay,
        "optimizer": "AdamW",
        "seed": config.seed,
        "save_every": config.save_every or steps_per_epoch,
        "val_split": config.val_split,
        "augment": config.augment,
        "train_images": train_images,  # before the validation split: eval redoes the split from this and the seed
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * config.epochs,
    }
    if config.ema is not None:
        hp.update(
            ema_decay=config.ema.decay,
            ema_min_decay=config.ema.min_decay,
            ema_update_after_step=config.ema.update_after_step,
            ema_warmup=config.ema.warmup,
            ema_warmup_gamma=config.ema.warmup_gamma,
            ema_warmup_power=config.ema.warmup_power,
        )
    return hp


def hparams_ema(hparams: dict[str, Any]) -> dict[str, Any]:
    """The online EMA's settings under the names ``average`` uses (decay, min_decay, warmup, ...)."""
    return {k[len("ema_") :]: v for k, v in hparams.items() if k.startswith("ema_")}


@torch.no_grad()
def update_ema(ema_state: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """One step of timm's ModelEmaV3 (``apply_update_``): lerp floating tensors by 1 - decay, copy the others."""
    model_state = model.state_dict()
    ema_floats, model_floats = [], []
    for name, ema_value in ema_state.items():
        if ema_value.is_floating_point():
            ema_floats.append(ema_value)
            model_floats.append(model_state[name])
        else:
            ema_value.copy_(model_state[name])
    torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)


def on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in state.items()}


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` (or JSON for .json) to a hidden temporary file beside ``path``, then rename it into place.

    A crash leaves either the old file or the new one, never half of one; the temporary name does not end in
    .pt, so a folder scan never mistakes it for a checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))
    else:
        write_atomically(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: dict[str, torch.Tensor] | None,
    step: int,
    epoch: int,
    arch: str,
    hparams: dict[str, Any],
) -> None:
    """One checkpoint in the format ``average`` and ``eval`` read; optimizer and EMA state are there for resuming."""
    obj: dict[str, Any] = {
        "state_dict": on_cpu(model.state_dict()),
        "step": step,
        "epoch": epoch,
        "arch": arch,
        "hparams": hparams,
        "optimizer": optimizer.state_dict(),
    }
    if ema_state is not None:
        obj["state_dict_ema"] = on_cpu(ema_state)  # timm's key for the EMA inside a checkpoint
    atomic_save(obj, path)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"step_{step:08d}.pt"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step (names are zero-padded, so the last name)."""
    found = sorted(run_dir.glob(CHECKPOINT_PATTERN))
    return found[-1] if found else None


def check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """On resume: every hparam must be what the run was started with, or the result would be neither run."""
    changed = [
        f"{k} was {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if changed:
        raise CkptEmaError(f"--resume with different settings: {'; '.join(changed[:4])}", path)


# ---------------------------------------------------------------------------------------------------- the run


def prepare_data(config: TrainConfig, device: torch.device) -> tuple[Split, Split | None, Split | None, list[int]]:
    """(training images, validation images or None, test images or None, validation indices), on ``device``."""
    splits = ("train", "test") if config.evaluate else ("train",)
    data = load_cifar10(config.data, config.train_subset, config.test_subset, splits=splits)
    val_indices = validation_indices(len(data["train"]), config.val_split, config.seed)
    train, val = split_validation(data["train"], val_indices)
    test = data.get("test")
    return (
        train.to(device),
        val.to(device) if config.val_split else None,
        test.to(device) if test is not None else None,
        val_indices,
    )


@dataclass
class RunState:
    """What training changes and a checkpoint restores: the model, its optimizer, the online EMA, the step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema_state: dict[str, torch.Tensor] | None
    step: int = 0


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as ``config`` says; checkpoints, run.json and the online EMA go to ``config.output``."""
    config.validate()
    device = check_device(config.device)
    run_dir = Path(config.output)
    log = (lambda msg: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr))

    resume_from = newest_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume_from is not None and not config.resume:
        raise CkptEmaError(
            f"already holds checkpoints (newest {resume_from.name}); "
            "pass --resume to continue the run, or choose another --output",
            run_dir,
        )
    train_split, val, test, val_indices = prepare_data(config, device)
    # The last, smaller batch of an epoch is kept, as the seed's DataLoader does: 782 steps per epoch on 50,000.
    steps_per_epoch = -(-len(train_split) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    hparams = hparams_of(config, len(train_split) + len(val_indices), steps_per_epoch)
    state = new_run_state(config, device)
    if resume_from is not None:
        resume(state, resume_from, hparams, device)
        log(f"resuming {run_dir} from {resume_from.name} (step {state.step} of {total_steps})")
    elif config.resume:
        log(f"no checkpoint in {run_dir} to resume from: starting at step 0")
    run_info = run_info_of(config, hparams, len(train_split) + len(val_indices), val_indices,
                           state.step if resume_from is not None else None)
    atomic_save(run_info, run_dir / "run.json")

    def save(at_step: int) -> Path:
        path = checkpoint_path(run_dir, at_step)
        save_checkpoint(path, state.model, state.optimizer, state.ema_state, at_step, at_step // steps_per_epoch,
                        config.arch, hparams)
        if config.keep_last is not None:
            for older in sorted(run_dir.glob(CHECKPOINT_PATTERN))[: -config.keep_last]:
                older.unlink(missing_ok=True)  # names are zero-padded: name order is step order
        return path

    result = TrainResult(run_dir=run_dir, start_step=state.step, final_step=state.step, total_steps=total_steps,
                         seconds=0.0, images_per_second=0.0, last_loss=float("nan"),
                         checkpoints=[] if resume_from is not None else [save(0)])
    train_steps(config, state, train_split, steps_per_epoch, save, result)
    if state.ema_state is not None:
        result.online_ema = run_dir / ONLINE_EMA_PATH
        atomic_save({"state_dict": on_cpu(state.ema_state), "step": state.step,
                     "epoch": state.step // steps_per_epoch, "arch": config.arch, "hparams": hparams},
                    result.online_ema)
    if config.evaluate:
        result.scores = score_run(state.model, state.ema_state, config.arch, test, val, device)
    run_info["summary"] = {
        "final_step": state.step,
        "seconds": round(result.seconds, 2),
        "last_loss": result.last_loss,
        "scores": {who: {split: s.as_dict() for split, s in by.items()} for who, by in result.scores.items()},
    }
    atomic_save(run_info, run_dir / "run.json")
    return result


def new_run_state(config: TrainConfig, device: torch.device) -> RunState:
    """The model initialised from ``config.seed``, its AdamW, and the online EMA (a copy of the model) if asked."""
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's global RNG
        torch.manual_seed(config.seed)
        model = build_model(config.arch)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema_state = {name: t.detach().clone() for name, t in model.state_dict().items()} if config.ema else None
    return RunState(model, optimizer, ema_state)


def resume(state: RunState, checkpoint: Path, hparams: dict[str, Any], device: torch.device) -> None:
    """Restore ``state`` from a checkpoint of the same run (its hparams must match)."""
    saved = torch_load_safely(checkpoint)
    check_same_run(saved.get("hparams", {}), hparams, checkpoint)
    state.model.load_state_dict(saved["state_dict"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.ema_state is not None:
        state.ema_state = {name: t.to(device).clone() for name, t in saved["state_dict_ema"].items()}
    state.step = int(saved["step"])


def run_info_of(config: TrainConfig, hparams: dict[str, Any], n_train: int, val_indices: list[int],
                resumed_at_step: int | None) -> dict[str, Any]:
    """What run.json records: the run's hyperparameters, its data and validation split, when it started."""
    return {
        "arch": config.arch,
        "hparams": hparams,
        "ema": None if config.ema is None else hparams_ema(hparams),
        "data": {
            "dir": str(resolve_data_dir(config.data)),
            "train_subset": config.train_subset,
            "test_subset": config.test_subset,
            "images": n_train,  # loaded, before the validation split
            "train_images": n_train - len(val_indices),  # trained on
            "val_split": config.val_split,
        },
        "val_indices": val_indices,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "resumed_at_step": resumed_at_step,
    }


def train_steps(config: TrainConfig, state: RunState, train_split: Split, steps_per_epoch: int,
                save: Callable[[int], Path], result: TrainResult) -> None:
    """Train from ``state.step`` to the end of the run, saving every ``save_every`` steps and at the end; record the
    time, rate, last epoch's loss and checkpoints written in ``result``."""
    total_steps = steps_per_epoch * config.epochs
    save_every = config.save_every or steps_per_epoch
    started, images_seen = time.perf_counter(), 0
    losses: list[torch.Tensor] = []  # this epoch's per-step losses, kept on the device until they are read
    bar = tqdm(total=total_steps, initial=state.step, unit="step", desc=f"train {config.arch}", dynamic_ncols=True,
               disable=config.quiet or not sys.stderr.isatty())
    state.model.train()
    device = next(state.model.parameters()).device
    for epoch in range(state.step // steps_per_epoch, config.epochs):
        order = torch.randperm(len(train_split), generator=seeded_generator(config.seed, "order", epoch)).to(device)
        losses = []
        for batch in range(state.step - epoch * steps_per_epoch, steps_per_epoch):
            indices = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            generator = seeded_generator(config.seed, "augment", state.step) if config.augment else None
            losses.append(train_step(config, state, *training_batch(train_split, indices, generator), total_steps))
            images_seen += len(indices)
            if state.step % save_every == 0 or state.step == total_steps:
                result.checkpoints.append(save(state.step))
            if state.step % LOG_EVERY == 0 or state.step == total_steps:
                bar.set_postfix(loss=f"{torch.stack(losses[-LOG_EVERY:]).mean().item():.4f}", epoch=epoch + 1)
                bar.update(state.step - bar.n)
    bar.close()
    result.seconds = time.perf_counter() - started
    result.final_step = state.step
    result.images_per_second = images_seen / result.seconds if result.seconds > 0 else 0.0
    result.last_loss = torch.stack(losses).mean().item() if losses else float("nan")


def train_step(config: TrainConfig, state: RunState, images: torch.Tensor, labels: torch.Tensor,
               total_steps: int) -> torch.Tensor:
    """One optimizer step (and the online EMA's update); returns the batch's loss, still on the device."""
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.step, total_steps)
    loss = F.cross_entropy(state.model(images), labels)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    if state.ema_state is not None:
        update_ema(state.ema_state, state.model, config.ema.decay_at(state.step))  # type: ignore[union-attr]
    return loss.detach()


def score_run(
    model: nn.Module,
    ema_state: dict[str, torch.Tensor] | None,
    arch: str,
    test: Split | None,
    val: Split | None,
    device: torch.device,
) -> dict[str, dict[str, Score]]:
    """Test (and val) scores of the final model and, when kept, of the online EMA."""
    models = {"model": model}
    if ema_state is not None:
        ema_model = build_model(arch).to(device)
        ema_model.load_state_dict(ema_state)
        models["online_ema"] = ema_model
    out: dict[str, dict[str, Score]] = {}
    for who, m in models.items():
        out[who] = {}
        if test is not None:
            out[who]["test"] = score(m, test, device)
        if val is not None:
            out[who]["val"] = score(m, val, device)
    return out
