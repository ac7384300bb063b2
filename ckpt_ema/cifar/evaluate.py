"""Score weights on CIFAR-10: test accuracy, mean loss, per-class accuracy; optionally recalibrate BatchNorm first.

Weights come from anything :func:`ckpt_ema.formats.registry.load_state_dict` reads (``train``'s .pt files, the
.safetensors that ``average`` writes, Lightning .ckpt files, ...). The architecture is the ``--model`` option, else
the checkpoint's ``arch`` metadata. When the metadata also records the run's validation split (``hparams`` with
``val_split``, ``seed`` and ``train_images``, as ``train`` writes them), the same held-out images are scored too.

Averaged weights come with averaged BatchNorm running statistics, which are not the statistics of the averaged
network's activations; :func:`bn_recalibrate` recomputes them from training batches (what SWA's ``update_bn`` does).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckpt_ema.formats.base import step_from_metadata
from ckpt_ema.formats.registry import load_state_dict
from ckpt_ema.cifar.data import (
    CLASSES,
    Split,
    load_cifar10,
    normalize,
    seeded_generator,
    split_validation,
    training_batch,
    validation_indices,
)
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.cifar.models import ARCHS, build_model

EVAL_BATCH_SIZE = 1000  # no gradients: large batches are faster and use little memory for these models


@dataclass
class Score:
    """How a model does on one split: accuracy in [0, 1], mean cross-entropy, accuracy per class (nan if absent)."""

    accuracy: float
    loss: float
    n: int
    per_class: list[float] = field(default_factory=list)

    def as_dict(self, per_class: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy, "loss": self.loss, "n": self.n}
        if per_class:
            out["per_class"] = {name: (None if math.isnan(a) else a) for name, a in zip(CLASSES, self.per_class)}
        return out


@torch.no_grad()
def score(
    model: nn.Module, split: Split, device: torch.device | str = "cpu", batch_size: int = EVAL_BATCH_SIZE
) -> Score:
    """Accuracy, mean loss and per-class accuracy of ``model`` (put in eval mode) on the un-augmented ``split``."""
    model.eval()
    n_classes = len(CLASSES)
    correct = torch.zeros(n_classes, dtype=torch.long)
    total = torch.zeros(n_classes, dtype=torch.long)
    loss_sum = 0.0
    for start in range(0, len(split), batch_size):
        images = normalize(split.images[start : start + batch_size].to(device))
        labels = split.labels[start : start + batch_size].to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        hits = (logits.argmax(1) == labels).cpu()
        labels = labels.cpu()
        total += torch.bincount(labels, minlength=n_classes)
        correct += torch.bincount(labels[hits], minlength=n_classes)
    n = int(total.sum())
    per_class = [c / t if t else float("nan") for c, t in zip(correct.tolist(), total.tolist())]
    return Score(accuracy=int(correct.sum()) / n, loss=loss_sum / n, n=n, per_class=per_class)


# ---------------------------------------------------------------------------------------------------- loading


def arch_of(metadata: Mapping[str, Any], model_option: str | None, path: Path) -> str:
    """``--model`` when given, else the checkpoint's ``arch`` (top level, or inside its hparams)."""
    if model_option is not None:
        if model_option not in ARCHS:
            raise CkptEmaError(f"--model must be one of {', '.join(ARCHS)}, got {model_option!r}")
        return model_option
    for where in (metadata, metadata.get("hparams"), metadata.get("hyper_parameters")):
        if isinstance(where, Mapping) and isinstance(where.get("arch"), str):
            if where["arch"] not in ARCHS:
                raise CkptEmaError(
                    f"its metadata names architecture {where['arch']!r}, which eval does not know ({', '.join(ARCHS)})",
                    path,
                )
            return where["arch"]
    raise CkptEmaError(f"no architecture in its metadata; pass --model ({' or '.join(ARCHS)})", path)


def fit_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """``state`` with its names made to match ``model``'s, or CkptEmaError naming the mismatched keys.

    A Lightning checkpoint stores the LightningModule's state, so the network's tensors carry the attribute it is
    held in (``model.conv1.weight``), and other attributes may hold tensors too (a second copy, a loss weight).
    The prefix is found from the model's first tensor name; it is used when it yields every tensor the model has.
    """
    wanted = list(model.state_dict())
    if set(state) == set(wanted):
        return dict(state)
    anchor = wanted[0]
    prefixes = [name[: -len(anchor)] for name in state if name.endswith("." + anchor)]
    for prefix in prefixes:
        stripped = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
        if set(wanted) <= set(stripped):
            return {name: stripped[name] for name in wanted}
    missing = [n for n in wanted if n not in state]
    unexpected = [n for n in state if n not in set(wanted)]
    detail = []
    if missing:
        detail.append(
            f"missing {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        )
    if unexpected:
        detail.append(
            f"unexpected {', '.join(unexpected[:4])}"
            + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else "")
        )
    raise CkptEmaError(f"its tensors do not fit the model ({'; '.join(detail)}); is --model right?", path)


def load_model(
    path: str | Path, arch: str | None = None, key: str | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model whose weights are in ``path``, in eval mode on ``device``; also its architecture and metadata."""
    path = Path(path)
    state, metadata = load_state_dict(path, key)
    arch = arch_of(metadata, arch, path)
    model = build_model(arch)
    state = fit_state_dict(state, model, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # right names, wrong shapes
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        raise CkptEmaError(f"its tensors do not fit the model {arch!r}: {'; '.join(lines[:3])}", path) from None
    return model.to(device).eval(), arch, metadata


# ---------------------------------------------------------------------------------------------------- BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def bn_recalibrate(
    model: nn.Module,
    train: Split,
    n_batches: int,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> int:
    """Recompute every BatchNorm's running mean and variance over ``n_batches`` training batches; returns how many.

    The statistics are reset and then accumulated as a plain average over the batches (momentum None), in train
    mode and without gradients, so parameters are untouched. Batches are augmented as in training: the
    statistics should describe the inputs the weights were trained on (as SWA's ``update_bn`` does with the
    training loader). Which images: a seeded draw, so a recalibration can be repeated.
    """
    layers = batchnorm_layers(model)
    if not layers or n_batches <= 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over all batches seen since the reset
    was_training = model.training
    model.train()
    order = torch.randperm(len(train), generator=seeded_generator(seed, "bn"))
    order = order.repeat(-(-n_batches * batch_size // len(train)))  # wrap around when asked for more than an epoch
    for i in range(n_batches):
        indices = order[i * batch_size : (i + 1) * batch_size]
        images, _ = training_batch(train, indices, seeded_generator(seed, "bn-aug", i))
        model(images.to(device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)
    return n_batches


# ---------------------------------------------------------------------------------------------------- eval


class EvalData:
    """The test split, and training images read only when something needs them (a val split, BN recalibration)."""

    def __init__(self, data: str | Path | None, test_subset: int | None, device: torch.device | str = "cpu") -> None:
        self.data = data
        self.test = load_cifar10(data, test_subset=test_subset, splits=("test",))["test"].to(device)
        self._train: dict[int | None, Split] = {}

    def train(self, n_images: int | None = None) -> Split:
        """The first ``n_images`` training images (all when None), read once and then kept."""
        if n_images not in self._train:
            self._train[n_images] = load_cifar10(self.data, train_subset=n_images, splits=("train",))["train"]
        return self._train[n_images]


def run_splits(metadata: Mapping[str, Any], data: EvalData) -> tuple[Split, Split | None]:
    """(the images training used, the held-out val images or None), redone from the run's recorded hparams."""
    hp = metadata.get("hparams")
    if not isinstance(hp, Mapping) or not isinstance(hp.get("train_images"), int):
        return data.train(None), None
    train = data.train(hp["train_images"] if hp["train_images"] < 50_000 else None)
    val_split, seed = hp.get("val_split", 0), hp.get("seed", 0)
    if not isinstance(val_split, int) or val_split <= 0 or not isinstance(seed, int):
        return train, None
    return split_validation(train, validation_indices(len(train), val_split, seed))


def evaluate_file(
    path: str | Path,
    data: EvalData,
    arch: str | None = None,
    key: str | None = None,
    bn_batches: int = 0,
    per_class: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Everything ``eval`` reports for one file, as a JSON-ready dict.

    Keys: file, arch, step (when recorded), accuracy, loss, n (test images), per_class (when asked), val (when the
    run held out a validation split) and, with ``bn_batches``, bn_recalibrate = {batches, before, after}; the
    top-level accuracy and loss are then the scores after recalibration.
    """
    model, arch, metadata = load_model(path, arch, key, device)
    found = step_from_metadata(metadata)
    result: dict[str, Any] = {"file": str(path), "arch": arch, "step": found[0] if found else None}
    hparams = metadata.get("hparams")
    needs_train = bn_batches > 0 or (isinstance(hparams, Mapping) and bool(hparams.get("val_split")))
    train, val = run_splits(metadata, data) if needs_train else (None, None)
    if bn_batches > 0:
        if not batchnorm_layers(model):
            print(
                f"ckpt-ema: note: {path}: {arch} has no BatchNorm layers; --bn-recalibrate does nothing",
                file=sys.stderr,
            )
        else:
            before = score(model, data.test, device)
            bn_recalibrate(model, train, bn_batches, device=device)  # type: ignore[arg-type]
            result["bn_recalibrate"] = {"batches": bn_batches, "before": before.as_dict(), "after": None}
    test = score(model, data.test, device)
    result.update(test.as_dict(per_class))
    if "bn_recalibrate" in result:
        result["bn_recalibrate"]["after"] = test.as_dict()
    if val is not None:
        result["val"] = score(model, val.to(device), device).as_dict()
    return result

