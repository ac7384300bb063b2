"""Every checkpoint container, file format, prefix, ordering rule and the output's metadata (issue 2).

Containers are written by the real library where the test environment has it (timm's CheckpointSaver, torch.save,
safetensors) and otherwise in the library's documented layout (Lightning, the Hugging Face Trainer). Each test
checks the real outcome: the averaged tensors against an EMA computed here from the saved weights, the output
loading into the plain model with ``load_state_dict(strict=True)``, and what the plan reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ckpt_ema
from ckpt_ema import CkptEmaError
from ckpt_ema.cli import main


# These tests check the reading and the held-weights model of issue 2 ("the weights sat at the newer checkpoint"),
# so they pin --interpolate step; linear interpolation has its own reference in test_sweep.py.
def average_held(*args, **options):
    return ckpt_ema.average(*args, **{"interpolate": "step", **options})


def plan_held(*args, **options):
    return ckpt_ema.plan(*args, **{"interpolate": "step", **options})

DECAY = 0.9


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.out = nn.Linear(3, 2)


def weights(seed: int) -> dict[str, torch.Tensor]:
    """A TinyModel state dict, different for every seed (BatchNorm buffers included)."""
    torch.manual_seed(seed)
    sd = TinyModel().state_dict()
    sd["bn.running_mean"] = torch.randn(3)
    sd["bn.running_var"] = torch.rand(3) + 0.5
    sd["bn.num_batches_tracked"] = torch.tensor(10 * seed)
    return sd


def ema(states: dict[int, dict[str, torch.Tensor]], decay: float = DECAY) -> dict[str, torch.Tensor]:
    """The contract's EMA for a constant decay, in float64: copy the first, then lerp by 1 - decay^(b - a)."""
    steps = sorted(states)
    v = {n: t.double().clone() for n, t in states[steps[0]].items()}
    for a, b in zip(steps, steps[1:]):
        for n, t in states[b].items():
            v[n] = v[n] + (1 - decay ** (b - a)) * (t.double() - v[n]) if t.is_floating_point() else t.clone()
    return {n: v[n].to(states[steps[-1]][n].dtype) for n in v}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype, n
        assert torch.allclose(got[n].double(), w.double(), atol=atol, rtol=0), n


def assert_loads_into_plain_model(sd: dict[str, torch.Tensor]) -> None:
    TinyModel().load_state_dict(sd, strict=True)


def steps_of(inputs: list, **options) -> list[tuple[str, int, str]]:
    return [(s.path.name, s.step, s.step_from) for s in plan_held(inputs, **options).sources]


# ------------------------------------------------------------------------------------------- containers


@pytest.mark.parametrize("container", [None, "state_dict", "model", "model_state_dict", "module"])
def test_containers(tmp_path: Path, container: str | None) -> None:
    states = {s: weights(s) for s in (10, 20, 35)}
    for s, sd in states.items():
        obj = sd if container is None else {container: sd, "epoch": s // 10, "optimizer": {"lr": 0.1}, "note": "x"}
        torch.save(obj, tmp_path / f"ckpt_{s}.pt")
    result = average_held([tmp_path], decay=DECAY)
    assert [s.step for s in result.plan.sources] == [10, 20, 35]
    assert_same(result.state_dict, ema(states))
    assert_loads_into_plain_model(result.state_dict)


def test_explicit_key_picks_a_container(tmp_path: Path) -> None:
    """--key chooses between two containers that both hold tensors (including a dotted path)."""
    a = {s: weights(s) for s in (1, 2, 3)}
    b = {s: weights(100 + s) for s in (1, 2, 3)}
    for s in a:
        torch.save({"model": a[s], "extra": {"teacher": b[s]}}, tmp_path / f"ckpt_{s}.pt")
    assert_same(average_held([tmp_path], decay=DECAY).state_dict, ema(a))
    assert_same(average_held([tmp_path], decay=DECAY, key="extra.teacher").state_dict, ema(b))
    with pytest.raises(CkptEmaError, match="no key 'nope'"):
        plan_held([tmp_path], key="nope")


@contextmanager
def fake_module(qualified: str, cls_name: str) -> Iterator[type]:
    """Make ``qualified.cls_name`` importable for pickling (a documented class of a library not installed here)."""
    parts = qualified.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    cls = type(cls_name, (dict,), {"__module__": qualified, "__qualname__": cls_name})
    setattr(sys.modules[qualified], cls_name, cls)
    try:
        yield cls
    finally:
        for name in reversed(added):
            del sys.modules[name]


def lightning_checkpoint(sd: dict[str, torch.Tensor], step: int, hparams: dict) -> dict:
    """The layout Lightning's CheckpointConnector.dump_checkpoint writes (Lightning is not installed here)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"] = torch.ones(2)
    return {
        "epoch": step // 100,
        "global_step": step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": step},
                               "epoch_progress": {"total": {"ready": 1, "completed": 1}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {
            "best_model_score": None, "best_model_path": f"/runs/epoch=0-step={step}.ckpt",
            "kth_value": torch.tensor(float("inf")),  # a non-weight tensor that must not be averaged nor checked
            "best_k_models": {}, "dirpath": "/runs"}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"base_lrs": [0.1], "last_epoch": step, "_step_count": step + 1}],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }


def test_lightning_layout_with_attribute_dict_and_last_ckpt(tmp_path: Path) -> None:
    """Lightning: `state_dict`, `global_step`, AttributeDict hyperparameters, and a last.ckpt alias left out."""
    states = {s: weights(s) for s in (100, 200, 300)}
    with fake_module("lightning.fabric.utilities.data", "AttributeDict") as AttributeDict:
        for s, sd in states.items():
            ckpt = lightning_checkpoint(sd, s, AttributeDict(lr=0.1, arch="tiny", layers=3))
            assert type(ckpt["hyper_parameters"]).__module__ == "lightning.fabric.utilities.data"
            torch.save(ckpt, tmp_path / f"epoch={s // 100 - 1}-step={s}.ckpt")
        torch.save(lightning_checkpoint(states[300], 300, AttributeDict(lr=0.1)), tmp_path / "last.ckpt")
    assert "lightning" not in sys.modules  # the class is now unknown: only the allow-list can load it

    out = tmp_path / "ema.safetensors"
    result = average_held([tmp_path], out, decay=DECAY)
    assert [(s.path.name, s.step, s.step_from) for s in result.plan.sources] == [
        (f"epoch={s // 100 - 1}-step={s}.ckpt", s, "metadata:global_step") for s in (100, 200, 300)
    ]
    assert any("last.ckpt" in line and "alias" in line for line in result.plan.discovery.skipped)
    assert_same(result.state_dict, {f"model.{k}": v for k, v in ema(states).items()})
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["hyper_parameters"]) == {"lr": 0.1, "arch": "tiny", "layers": 3}


def test_timm_checkpoint_saver(tmp_path: Path) -> None:
    """timm's real CheckpointSaver: checkpoint-N.pth.tar, last/model_best aliases, an argparse.Namespace in args."""
    timm_utils = pytest.importorskip("timm.utils")
    model = TinyModel()
    model_ema = timm_utils.ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model="tiny_model", lr=0.1, epochs=4, sched=None, betas=(0.9, 0.99), layers=[1, 2])
    saver = timm_utils.CheckpointSaver(model, opt, args=args, model_ema=model_ema, checkpoint_dir=str(tmp_path),
                                       recovery_dir=str(tmp_path), max_history=10)
    states, ema_states = {}, {}
    for epoch in range(1, 5):
        model.load_state_dict(weights(epoch))
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
        opt.step()  # a real optimizer state (momentum buffers) in the checkpoint
        model_ema.update(model, step=epoch)
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        ema_states[epoch] = {k: v.clone() for k, v in model_ema.module.state_dict().items()}
        saver.save_checkpoint(epoch, metric=[0.5, 0.9, 0.7, 0.8][epoch - 1])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"checkpoint-{e}.pth.tar" for e in range(1, 5)] + ["last.pth.tar", "model_best.pth.tar"]
    assert isinstance(torch.load(tmp_path / "last.pth.tar", weights_only=False)["args"], argparse.Namespace)

    out = tmp_path.parent / f"{tmp_path.name}-ema.safetensors"
    result = average_held([tmp_path], out, decay=DECAY)
    assert [s.path.name for s in result.plan.sources] == [f"checkpoint-{e}.pth.tar" for e in range(1, 5)]
    skipped = "\n".join(result.plan.discovery.skipped)
    assert "last.pth.tar" in skipped and "model_best.pth.tar" in skipped
    assert_same(result.state_dict, ema(states))
    assert_loads_into_plain_model(result.state_dict)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["arch"] == "tiny_model"  # what eval needs, carried from the newest checkpoint

    # state_dict_ema only when asked for
    from_ema = average_held([tmp_path], decay=DECAY, key="state_dict_ema")
    assert_same(from_ema.state_dict, ema(ema_states))
    assert not torch.allclose(from_ema.state_dict["fc.weight"], result.state_dict["fc.weight"])

    # the CLI says what it skipped, and why (timm hard-links its aliases: "the same file as checkpoint-N")
    res = CliRunner().invoke(main, ["average", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    for alias in ("last.pth.tar", "model_best.pth.tar"):
        line = next(ln for ln in res.stderr.splitlines() if alias in ln)
        assert line.startswith("skipped") and ("alias" in line or "the same file as" in line), line


def test_timm_aliases_as_copies_and_milestones(tmp_path: Path) -> None:
    """Where hard links fail timm copies its aliases; milestone-N files (timm >= 1.0.2x) hard-link `last`."""
    timm_utils = pytest.importorskip("timm.utils")
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = timm_utils.CheckpointSaver(model, opt, args=argparse.Namespace(model="tiny"), checkpoint_dir=str(tmp_path),
                                       recovery_dir=str(tmp_path))
    states = {}
    for epoch in range(1, 5):
        model.load_state_dict(weights(epoch))
        states[epoch] = weights(epoch)
        saver.save_checkpoint(epoch, metric=float(epoch % 3))
        if epoch % 2 == 0 and hasattr(saver, "save_milestone"):
            saver.save_milestone(epoch + 1)
    if hasattr(saver, "save_milestone"):
        same = os.stat(tmp_path / "milestone-5.pth.tar").st_ino == os.stat(tmp_path / "checkpoint-4.pth.tar").st_ino
        if not same:
            pytest.skip("no hard links on this filesystem: timm copied its milestones")
    # a copied alias (a filesystem without hard links) is still left out, by its name
    (tmp_path / "model_best.pth.tar").unlink()
    (tmp_path / "model_best.pth.tar").write_bytes((tmp_path / "checkpoint-2.pth.tar").read_bytes())
    result = average_held([tmp_path], decay=DECAY)
    assert [s.path.name for s in result.plan.sources] == [f"checkpoint-{e}.pth.tar" for e in range(1, 5)]
    skipped = "\n".join(result.plan.discovery.skipped)
    assert "model_best.pth.tar: an alias" in skipped and "last.pth.tar" in skipped
    if hasattr(saver, "save_milestone"):
        assert "milestone-3.pth.tar: the same file as" in skipped and "milestone-5.pth.tar" in skipped
    assert_same(result.state_dict, ema(states))


def test_state_dict_ema_is_not_picked_by_default(tmp_path: Path) -> None:
    states = {s: weights(s) for s in (1, 2)}
    for s in states:
        torch.save({"state_dict_ema": states[s], "epoch": s}, tmp_path / f"checkpoint-{s}.pth.tar")
    with pytest.raises(CkptEmaError, match="--key"):
        plan_held([tmp_path])
    assert_same(average_held([tmp_path], decay=DECAY, key="state_dict_ema").state_dict, ema(states))


# ------------------------------------------------------------------------------------------- safetensors


def test_safetensors_files_with_step_metadata(tmp_path: Path) -> None:
    states = {s: weights(s) for s in (7, 8, 30)}
    for i, (s, sd) in enumerate(states.items()):
        # names say nothing about the order: only the metadata does
        save_file(sd, str(tmp_path / f"model_{'cab'[i]}.safetensors"), metadata={"format": "pt", "step": str(s)})
    result = average_held([tmp_path], decay=DECAY)
    assert [(s.path.name, s.step, s.step_from) for s in result.plan.sources] == [
        ("model_c.safetensors", 7, "metadata:step"), ("model_a.safetensors", 8, "metadata:step"),
        ("model_b.safetensors", 30, "metadata:step")]
    assert_same(result.state_dict, ema(states))


def test_low_precision_safetensors_keep_dtype(tmp_path: Path) -> None:
    states = {s: {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in weights(s).items()}
              for s in (1, 2, 3)}
    for s, sd in states.items():
        save_file(sd, str(tmp_path / f"ckpt_{s}.safetensors"))
    result = average_held([tmp_path], decay=DECAY)
    assert_same(result.state_dict, ema(states), atol=2e-2)


# ------------------------------------------------------------------------------------------- Hugging Face


class TrainingArguments:
    """Stands for transformers.TrainingArguments, which the Trainer pickles whole into training_args.bin."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.learning_rate = 5e-5


def hf_folder(folder: Path, sd: dict[str, torch.Tensor], step: int, kind: str) -> None:
    """A Hugging Face Trainer checkpoint-N/ folder: weights + training state that is not weights."""
    folder.mkdir(parents=True)
    if kind == "safetensors":
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif kind == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif kind in ("sharded", "sharded_bin"):
        names = list(sd)
        halves = {1: names[: len(names) // 2], 2: names[len(names) // 2 :]}
        weight_map = {}
        for k, part in halves.items():
            if kind == "sharded":
                fname = f"model-0000{k}-of-00002.safetensors"
                save_file({n: sd[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
            else:
                fname = f"pytorch_model-0000{k}-of-00002.bin"
                torch.save({n: sd[n] for n in part}, folder / fname)
            weight_map.update({n: fname for n in part})
        index = "model.safetensors.index.json" if kind == "sharded" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["TinyModel"], "model_type": "tiny"}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 10,
                                                           "log_history": [{"loss": 1.0, "step": step}]}))
    # Training state. Each would break the run if read as weights: optimizer state holds other tensors, and the
    # rng state and TrainingArguments pickle objects that a weights-only load refuses.
    torch.save({"state": {0: {"exp_avg": torch.full((3,), float("nan"))}}, "param_groups": [{"lr": 0.1}]},
               folder / "optimizer.pt")
    torch.save({"last_epoch": step, "_step_count": step}, folder / "scheduler.pt")
    torch.save({"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state()},
               folder / "rng_state.pth")
    torch.save(TrainingArguments(output_dir=str(folder.parent)), folder / "training_args.bin")


def test_hugging_face_checkpoint_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kinds = {10: "safetensors", 20: "bin", 30: "sharded", 40: "sharded_bin"}
    states = {s: weights(s) for s in kinds}
    for s, kind in kinds.items():
        hf_folder(run / f"checkpoint-{s}", states[s], s, kind)
    (run / "runs").mkdir()  # tensorboard logs and the like are not checkpoints
    result = average_held([run], decay=DECAY)
    assert [(s.path.name, s.step, s.step_from) for s in result.plan.sources] == [
        (f"checkpoint-{s}", s, "trainer_state.json") for s in kinds]
    assert_same(result.state_dict, ema(states))
    assert_loads_into_plain_model(result.state_dict)

    # the folders given one by one (shell glob order is not step order)
    single = average_held([run / "checkpoint-40", run / "checkpoint-10", run / "checkpoint-30",
                               run / "checkpoint-20"], decay=DECAY)
    assert_same(single.state_dict, ema(states))


def test_hugging_face_output_folder_with_the_final_model(tmp_path: Path) -> None:
    """Trainer.save_model() writes the final model beside the checkpoint-N folders: the folder is still a run."""
    run = tmp_path / "run"
    states = {s: weights(s) for s in (10, 20, 30)}
    for s in states:
        hf_folder(run / f"checkpoint-{s}", states[s], s, "safetensors")
    save_file(states[30], str(run / "model.safetensors"), metadata={"format": "pt"})
    (run / "config.json").write_text("{}")
    torch.save(TrainingArguments(str(run)), run / "training_args.bin")
    result = average_held([run], decay=DECAY)
    assert [s.path.name for s in result.plan.sources] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert any("model.safetensors" in line and "final model" in line for line in result.plan.discovery.skipped)
    assert_same(result.state_dict, ema(states))


def test_hugging_face_step_comes_from_trainer_state(tmp_path: Path) -> None:
    """trainer_state.json's global_step wins over the folder name."""
    states = {s: weights(s) for s in (5, 50)}
    hf_folder(tmp_path / "checkpoint-2", states[50], 50, "safetensors")
    hf_folder(tmp_path / "checkpoint-1", states[5], 5, "safetensors")
    result = average_held([tmp_path], decay=DECAY)
    assert [(s.path.name, s.step) for s in result.plan.sources] == [("checkpoint-1", 5), ("checkpoint-2", 50)]
    assert_same(result.state_dict, ema(states))


def test_training_state_files_given_explicitly_are_skipped(tmp_path: Path) -> None:
    hf_folder(tmp_path / "checkpoint-3", weights(3), 3, "safetensors")
    hf_folder(tmp_path / "checkpoint-4", weights(4), 4, "safetensors")
    the_plan = plan_held([tmp_path / "checkpoint-*" / "*"])
    assert sorted(s.path.name for s in the_plan.sources) == ["model.safetensors", "model.safetensors"]
    skipped = "\n".join(the_plan.discovery.skipped)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert name in skipped


# ------------------------------------------------------------------------------------------- prefixes


WRAPPERS = {
    "plain": "{}",
    "ddp": "module.{}",
    "compile": "_orig_mod.{}",
    "ddp_of_compiled": "module._orig_mod.{}",
    "compiled_ddp": "_orig_mod.module.{}",
}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_wrapper_prefixes_average_together(tmp_path: Path, fmt: str) -> None:
    """One run whose checkpoints differ only in DDP / torch.compile prefixes: one average, loadable strictly."""
    states = {}
    for i, pattern in enumerate(WRAPPERS.values(), start=1):
        states[i] = weights(i)
        stored = {pattern.format(k): v for k, v in states[i].items()}
        if fmt == "pt":
            torch.save({"state_dict": stored, "step": i}, tmp_path / f"ckpt_{i}.pt")
        else:
            save_file(stored, str(tmp_path / f"ckpt_{i}.safetensors"))
    out = tmp_path / "ema.safetensors"
    result = average_held([tmp_path / f"ckpt_*.{fmt}"], out, decay=DECAY)
    assert len(result.plan.sources) == len(WRAPPERS)
    assert_same(result.state_dict, ema(states))
    assert_loads_into_plain_model(load_file(out))


def test_real_ddp_prefix_from_a_wrapped_model(tmp_path: Path) -> None:
    """A state dict from a model wrapped the way DDP wraps it (attribute `module`) loads into the plain model."""
    wrapper = nn.Module()
    wrapper.module = TinyModel()
    states = {}
    for s in (1, 3):
        wrapper.module.load_state_dict(weights(s))
        states[s] = weights(s)
        torch.save(wrapper.state_dict(), tmp_path / f"ckpt_{s}.pt")
    assert all(k.startswith("module.") for k in torch.load(tmp_path / "ckpt_1.pt", weights_only=True))
    result = average_held([tmp_path], decay=DECAY)
    assert_loads_into_plain_model(result.state_dict)
    assert_same(result.state_dict, ema(states))


def test_a_submodule_called_module_is_kept(tmp_path: Path) -> None:
    """`module.` is stripped only when every name has it: a real submodule named `module` keeps its name."""
    class WithModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    states = {}
    for s in (1, 2):
        torch.manual_seed(s)
        states[s] = WithModule().state_dict()
        torch.save(states[s], tmp_path / f"ckpt_{s}.pt")
    result = average_held([tmp_path], decay=DECAY)
    WithModule().load_state_dict(result.state_dict, strict=True)
    assert_same(result.state_dict, ema(states))


# ------------------------------------------------------------------------------------------- steps and order


@pytest.mark.parametrize("key", ["global_step", "step", "num_updates", "iteration"])
def test_step_from_metadata_beats_the_name(tmp_path: Path, key: str) -> None:
    name_and_step = {"ckpt_1.pt": 30, "ckpt_2.pt": 10, "ckpt_3.pt": 20}
    states = {}
    for name, s in name_and_step.items():
        states[s] = weights(s)
        torch.save({"model": states[s], key: s}, tmp_path / name)
    result = average_held([tmp_path], decay=DECAY)
    assert [(s.path.name, s.step, s.step_from) for s in result.plan.sources] == [
        ("ckpt_2.pt", 10, f"metadata:{key}"), ("ckpt_3.pt", 20, f"metadata:{key}"),
        ("ckpt_1.pt", 30, f"metadata:{key}")]
    assert_same(result.state_dict, ema(states))


def test_global_step_is_preferred_over_epoch_and_step(tmp_path: Path) -> None:
    for i, (gs, other) in enumerate([(100, 9), (200, 1)]):
        torch.save({"state_dict": weights(i), "global_step": gs, "step": other, "epoch": other},
                   tmp_path / f"c{i}.pt")
    assert steps_of([tmp_path]) == [("c0.pt", 100, "metadata:global_step"), ("c1.pt", 200, "metadata:global_step")]


def test_step_from_the_last_number_in_the_name(tmp_path: Path) -> None:
    states = {}
    for epoch, s in enumerate((400, 1200, 90)):
        states[s] = weights(s)
        torch.save(states[s], tmp_path / f"run3-epoch={epoch}-step={s}.pt")
    assert steps_of([tmp_path]) == [("run3-epoch=2-step=90.pt", 90, "name"),
                                    ("run3-epoch=0-step=400.pt", 400, "name"),
                                    ("run3-epoch=1-step=1200.pt", 1200, "name")]
    assert_same(average_held([tmp_path], decay=DECAY).state_dict, ema(states))


def test_natural_order(tmp_path: Path) -> None:
    """ckpt_2 before ckpt_10: by step, and in name order too when every checkpoint counts as one update."""
    for s in (1, 2, 10, 11, 100):
        torch.save(weights(s), tmp_path / f"ckpt_{s}.pt")
    want = ["ckpt_1.pt", "ckpt_2.pt", "ckpt_10.pt", "ckpt_11.pt", "ckpt_100.pt"]
    assert [n for n, _, _ in steps_of([tmp_path])] == want
    assert [n for n, _, _ in steps_of([tmp_path / "ckpt_*.pt"])] == want
    assert steps_of([tmp_path], per_checkpoint=True) == [(n, i, "order") for i, n in enumerate(want, start=1)]
    by_position = {i: weights(s) for i, s in enumerate((1, 2, 10, 11, 100), start=1)}
    assert_same(average_held([tmp_path], decay=DECAY, per_checkpoint=True).state_dict, ema(by_position))


def test_globs_and_mixed_inputs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2, 3, 4):
        torch.save(weights(s), run / f"ckpt_{s}.pt")
    torch.save(weights(99), run / "other_5.pt")
    (run / "notes.txt").write_text("not a checkpoint")
    assert [n for n, _, _ in steps_of([str(run / "ckpt_*.pt")])] == [f"ckpt_{s}.pt" for s in (1, 2, 3, 4)]
    assert [n for n, _, _ in steps_of([str(run / "ckpt_[12].pt"), run / "ckpt_4.pt"])] == [
        "ckpt_1.pt", "ckpt_2.pt", "ckpt_4.pt"]
    # a file named twice (folder + file) is averaged once
    assert [n for n, _, _ in steps_of([run / "ckpt_4.pt", str(run / "ckpt_*.pt")])] == [
        f"ckpt_{s}.pt" for s in (1, 2, 3, 4)]
    # the folder: every weight file, the text file ignored
    assert [n for n, _, _ in steps_of([run])] == ["ckpt_1.pt", "ckpt_2.pt", "ckpt_3.pt", "ckpt_4.pt", "other_5.pt"]


def test_duplicate_steps_are_an_error(tmp_path: Path) -> None:
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        torch.save(weights(ord(run)), tmp_path / run / "ckpt_5.pt")
    with pytest.raises(CkptEmaError, match="two different checkpoints have step 5"):
        plan_held([tmp_path / "a", tmp_path / "b"])
    res = CliRunner().invoke(main, ["average", str(tmp_path / "a"), str(tmp_path / "b"), "--dry-run"])
    assert res.exit_code == 2
    assert "two different checkpoints have step 5" in res.stderr and "ckpt_5.pt" in res.stderr


def test_unknown_steps_fall_back_to_one_update_per_checkpoint(tmp_path: Path) -> None:
    names = ["alpha.pt", "beta.pt", "gamma.pt"]
    states = {}
    for i, name in enumerate(names, start=1):
        states[i] = weights(i)
        torch.save(states[i], tmp_path / name)
    result = average_held([tmp_path], decay=DECAY)
    assert [(s.path.name, s.step, s.step_from) for s in result.plan.sources] == [
        (n, i, "order") for i, n in enumerate(names, start=1)]
    assert len(result.plan.discovery.notes) == 1 and "alpha.pt" in result.plan.discovery.notes[0]
    assert "one update per checkpoint" in result.plan.discovery.notes[0]
    assert_same(result.state_dict, ema(states))
    res = CliRunner().invoke(main, ["average", str(tmp_path), "--dry-run"])
    assert res.exit_code == 0 and "note:" in res.stderr and "one update per checkpoint" in res.stderr


# ------------------------------------------------------------------------------------------- output metadata


def test_output_metadata(tmp_path: Path) -> None:
    states = {s: weights(s) for s in (10, 20, 40)}
    for s, sd in states.items():
        torch.save({"state_dict": sd, "arch": "tinymodel", "epoch": s // 10, "global_step": s},
                   tmp_path / f"ckpt_{s}.pt")
    out = tmp_path.parent / f"{tmp_path.name}-ema.safetensors"
    res = CliRunner().invoke(main, ["average", str(tmp_path), "--decay", "0.95", "--update-after-step", "3",
                                    "--warmup", "--min-decay", "0.1", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ckpt_ema_version"] == ckpt_ema.__version__
    options = json.loads(meta["ckpt_ema_options"])
    assert options["decay"] == 0.95 and options["update_after_step"] == 3 and options["warmup"] is True
    assert options["min_decay"] == 0.1 and options["bias_correction"] is False and options["accum_dtype"] == "float32"
    # every option of AverageOptions is recorded, so the file can be reproduced
    assert ckpt_ema.AverageOptions.build(**options) == ckpt_ema.plan(tmp_path, decay=0.95, update_after_step=3,
                                                                      warmup=True, min_decay=0.1).options
    inputs = json.loads(meta["ckpt_ema_inputs"])
    assert [(Path(i["path"]).name, i["step"]) for i in inputs] == [(f"ckpt_{s}.pt", s) for s in (10, 20, 40)]
    the_plan = plan_held([tmp_path], **{k: options[k] for k in ("decay", "update_after_step", "warmup", "interpolate",
                                                                      "min_decay")})
    assert [i["weight"] for i in inputs] == pytest.approx(list(the_plan.weighting.weights), abs=1e-15)
    assert sum(i["weight"] for i in inputs) == pytest.approx(1.0)
    assert meta["arch"] == "tinymodel"
    # reproducible: the recorded options give the same tensors again
    again = average_held([i["path"] for i in inputs], **{k: v for k, v in options.items()})
    assert_same(on_disk, again.state_dict, atol=0)


# ------------------------------------------------------------------------------------------- the registry


def registry_case(folder: Path, case: str) -> tuple[Path, str, list[Path]]:
    """A checkpoint of one format, written by its library: its path, the module declaring its format, and the
    files it consists of."""
    from checkpoints import RUNS
    from helpers import make_hf_sharded

    folder.mkdir()
    if case in ("pt", "legacy-pt"):
        path = folder / "ckpt_3.pt"
        torch.save({"state_dict": weights(3), "step": 3}, path, _use_new_zipfile_serialization=case == "pt")
        return path, "torch_save", [path]
    if case == "safetensors":
        path = folder / "ckpt_3.safetensors"
        save_file(weights(3), str(path), metadata={"step": "3"})
        return path, "safetensors", [path]
    if case == "sharded":
        index = make_hf_sharded(folder)
        return index, "sharded", sorted(folder.iterdir())
    if case == "model-folder":
        hf_folder(folder / "checkpoint-3", weights(3), 3, "sharded")
        path = folder / "checkpoint-3"
        return path, "model_folder", sorted(path.glob("model*"))
    run = shutil.copytree(RUNS["deepspeed_zero2-bf16"].folder, folder / "run")
    path = run / (run / "latest").read_text().strip()  # the tag `latest` names: complete whatever the files' times
    return path, "deepspeed", sorted(path.iterdir())


@pytest.mark.parametrize("case", ["pt", "legacy-pt", "safetensors", "sharded", "model-folder", "deepspeed"])
def test_each_format_recognises_lists_and_completes_its_checkpoints(tmp_path: Path, case: str) -> None:
    """The registry's answers for each format (DCP's: tests/test_dcp.py): which format reads it, its files, and
    whether its writer is done: a weight file cut to half its size is not complete (but for an old-style pickle,
    which has no end mark)."""
    import importlib

    from ckpt_ema.formats import registry

    path, module, files = registry_case(tmp_path / "case", case)
    assert registry.format_of(path) is importlib.import_module(f"ckpt_ema.formats.{module}").FORMAT
    assert sorted(registry.checkpoint_files(path)) == files
    assert registry.is_complete(path)
    weight = max((f for f in files if not f.name.endswith(".json")), key=lambda f: f.stat().st_size)
    with open(weight, "r+b") as f:
        f.truncate(weight.stat().st_size // 2)
    assert registry.is_complete(path) == (case == "legacy-pt")


def test_the_format_in_the_docs_reads_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/adding-a-format.md's example, built from the page's own code and added to FORMATS by one line: a run
    saved by numpy.savez averages to the reference EMA of its weights, at the steps it records; a half-written
    archive is not complete, and reading one is refused in one line."""
    import re

    import numpy as np

    from ckpt_ema.formats import registry

    page = (Path(__file__).resolve().parent.parent / "docs" / "adding-a-format.md").read_text()
    npz = types.ModuleType("npz")
    exec(compile(re.findall(r"```python\n(.*?)```", page, re.S)[0], "docs/adding-a-format.md", "exec"), npz.__dict__)
    run = tmp_path / "run"
    run.mkdir()
    saved = {s: weights(s) for s in (10, 20, 40)}
    for s, sd in saved.items():
        np.savez(run / f"step_{s}.npz", step=np.int64(s), **{f"module.{n}": t.numpy() for n, t in sd.items()})
    with pytest.raises(CkptEmaError, match="no checkpoint found in this folder"):
        average_held(run, None, decay=DECAY)  # not a format yet
    monkeypatch.setattr(registry, "FORMATS", (*registry.FORMATS, npz.FORMAT))
    result = average_held(run, None, decay=DECAY)
    assert [(s.path.name, s.step, s.step_from) for s in result.plan.sources] == [
        (f"step_{s}.npz", s, "metadata:step") for s in saved]
    assert_same(result.state_dict, ema(saved))
    assert_loads_into_plain_model(result.state_dict)
    half = tmp_path / "half.npz"
    data = (run / "step_10.npz").read_bytes()
    half.write_bytes(data[: len(data) // 2])
    assert registry.is_complete(run / "step_10.npz") and not registry.is_complete(half)
    with pytest.raises(CkptEmaError, match=r"half\.npz: not a readable \.npz archive"):
        registry.open_checkpoint(half)
