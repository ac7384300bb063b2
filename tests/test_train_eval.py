"""``ckpt-ema train`` and ``ckpt-ema eval`` on a slice of the real CIFAR-10 (2,000 training and 1,000 test images).

One short ``net`` run (with a validation split and an online EMA) is trained once through the CLI and shared by
the tests that read it; the resume and BatchNorm tests make their own, smaller runs.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from ckpt_ema.cifar.cli import eval_command, train_command
from ckpt_ema.cifar.data import augment, load_cifar10, read_batch_file, seeded_generator
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.cifar.evaluate import bn_recalibrate, load_model
from ckpt_ema.cifar.models import build_model
from ckpt_ema.weighting import DecaySchedule
from ckpt_ema.cifar.train import TrainConfig, train, update_ema

TRAIN_IMAGES, TEST_IMAGES, VAL_IMAGES = 2000, 1000, 200
EPOCHS, SAVE_EVERY = 5, 25
STEPS_PER_EPOCH = math.ceil((TRAIN_IMAGES - VAL_IMAGES) / 64)  # 29: the last, short batch of an epoch is kept
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def cli(*args: object) -> Result:
    """Run ``ckpt-ema ARGS`` in-process through the real group, so errors come out as the user sees them."""
    from ckpt_ema.cli import main

    for name, command in (("train", train_command), ("eval", eval_command)):
        if name not in main.commands:  # until cli.py registers them
            main.add_command(command, name)
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def eval_json(*args: object) -> list[dict]:
    return json.loads(ok(cli("eval", *args, "--json", "--test-subset", TEST_IMAGES)).stdout)


@pytest.fixture(scope="session")
def net_run(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "net"
    # fmt: off
    ok(cli("train", "-o", run, "--data", cifar_dir, "--train-subset", TRAIN_IMAGES, "--test-subset", TEST_IMAGES,
           "--epochs", EPOCHS, "--save-every", SAVE_EVERY, "--val-split", VAL_IMAGES,
           "--ema-decay", 0.99, "--ema-warmup", "--quiet"))
    # fmt: on
    return run


@pytest.fixture(autouse=True)
def data_env(cifar_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_EMA_DATA", str(cifar_dir))  # eval finds the data without --data, as in CI


# ---------------------------------------------------------------------------------------------------- train


@pytest.mark.slow
def test_train_writes_checkpoints_with_steps_and_metadata(net_run: Path) -> None:
    expected_steps = [*range(0, TOTAL_STEPS, SAVE_EVERY), TOTAL_STEPS]
    files = sorted(net_run.glob("*.pt"))
    assert [f.name for f in files] == [f"step_{s:08d}.pt" for s in expected_steps]
    for path, step in zip(files, expected_steps):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] == step and ckpt["epoch"] == step // STEPS_PER_EPOCH and ckpt["arch"] == "net"
        assert set(ckpt["state_dict"]) == set(build_model("net").state_dict())
        assert set(ckpt["state_dict_ema"]) == set(ckpt["state_dict"]) and "optimizer" in ckpt
        assert all(isinstance(v, str | int | float | bool) for v in ckpt["hparams"].values())
        assert ckpt["hparams"]["train_images"] == TRAIN_IMAGES and ckpt["hparams"]["total_steps"] == TOTAL_STEPS
    info = json.loads((net_run / "run.json").read_text())
    assert len(info["val_indices"]) == VAL_IMAGES == len(set(info["val_indices"]))
    assert info["data"]["train_images"] == TRAIN_IMAGES - VAL_IMAGES and info["data"]["images"] == TRAIN_IMAGES
    assert info["ema"]["decay"] == 0.99 and info["ema"]["warmup"] is True
    ema = torch.load(net_run / "online_ema" / "ema.pt", weights_only=True)
    assert ema["step"] == TOTAL_STEPS and ema["arch"] == "net"
    assert not list(net_run.glob(".*"))  # no temporary files left behind


def test_online_ema_update_is_timms_model_ema_v3() -> None:
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    model = build_model("resnet")
    schedule = DecaySchedule(decay=0.9, warmup=True)
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    theirs = timm_ema.ModelEmaV3(model, decay=0.9, use_warmup=True)
    for step in range(1, 6):
        with torch.no_grad():
            for t in model.state_dict().values():  # a "training step": floats move, the BN batch counters count
                if t.is_floating_point():
                    t.add_(torch.randn_like(t))
                else:
                    t.add_(1)
        update_ema(ours, model, schedule.decay_at(step))
        theirs.update(model, step=step)
    assert all(torch.equal(ours[k], v) for k, v in theirs.module.state_dict().items())


@pytest.mark.slow
def test_resume_continues_from_the_newest_checkpoint_and_matches_an_uninterrupted_run(
    cifar_dir: Path, tmp_path: Path
) -> None:
    # fmt: off
    args = ["--data", cifar_dir, "--train-subset", 1000, "--epochs", 2, "--save-every", 7, "--val-split", 50,
            "--ema-decay", 0.95, "--ema-warmup", "--no-eval"]
    # fmt: on
    ok(cli("train", "-o", tmp_path / "full", *args, "-q"))
    # An interruption after step 21: its checkpoint is the newest one the run left.
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "online_ema")
    for path in (tmp_path / "cut").glob("step_*.pt"):
        if int(path.stem.split("_")[1]) > 21:
            path.unlink()
    refused = cli("train", "-o", tmp_path / "cut", *args)
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    changed = cli("train", "-o", tmp_path / "cut", *args, "--resume", "--seed", 1)
    assert changed.exit_code == 2 and "seed was 0, now 1" in changed.stderr
    resumed = ok(cli("train", "-o", tmp_path / "cut", *args, "--resume"))
    assert "from step_00000021.pt (step 21 of 30)" in resumed.stderr
    assert sorted(p.name for p in (tmp_path / "cut").glob("*.pt")) == sorted(
        p.name for p in (tmp_path / "full").glob("*.pt")
    )
    for name in ("step_00000028.pt", "step_00000030.pt", "online_ema/ema.pt"):
        full = torch.load(tmp_path / "full" / name, weights_only=True)
        cut = torch.load(tmp_path / "cut" / name, weights_only=True)
        assert cut["step"] == full["step"]
        for key in ("state_dict", "state_dict_ema"):
            if key in full:
                assert all(torch.equal(full[key][k], cut[key][k]) for k in full[key]), (name, key)


# ---------------------------------------------------------------------------------------------------- eval


@pytest.mark.slow
def test_eval_of_the_trained_model_beats_chance_by_a_wide_margin(net_run: Path) -> None:
    last = net_run / f"step_{TOTAL_STEPS:08d}.pt"
    first = net_run / "step_00000000.pt"
    trained, untrained, online = eval_json(last, first, net_run / "online_ema" / "ema.pt", "--per-class")
    print(
        f"\ntest accuracy after {TOTAL_STEPS} steps on {TRAIN_IMAGES - VAL_IMAGES} images: "
        f"model {trained['accuracy']:.3f} (loss {trained['loss']:.3f}), online EMA {online['accuracy']:.3f}, "
        f"initial weights {untrained['accuracy']:.3f}"
    )
    assert trained["n"] == TEST_IMAGES and trained["arch"] == "net" and trained["step"] == TOTAL_STEPS
    assert trained["accuracy"] > 0.3 and untrained["accuracy"] < 0.2  # chance is 0.1
    assert trained["loss"] < math.log(10) - 0.4 < untrained["loss"]
    assert online["accuracy"] > 0.3
    assert set(trained["per_class"]) == {
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    }
    assert trained["val"]["n"] == VAL_IMAGES and trained["val"]["accuracy"] > 0.2  # the split redone from hparams
    table = ok(cli("eval", last, "--test-subset", TEST_IMAGES)).stdout
    assert (
        table.splitlines()[0].split()[:4] == ["file", "arch", "step", "test"] and f"{trained['accuracy']:.4f}" in table
    )


@pytest.mark.slow
def test_eval_reads_pt_average_safetensors_and_lightning_ckpt(net_run: Path, tmp_path: Path) -> None:
    last = net_run / f"step_{TOTAL_STEPS:08d}.pt"
    ckpt = torch.load(last, weights_only=True)
    # The .safetensors that `average` writes: the architecture comes from its metadata, no --model.
    from ckpt_ema.api import average

    average([net_run], tmp_path / "ema.safetensors", decay=0.99, warmup=True)
    # A Lightning checkpoint: the LightningModule holds the network as `self.model`.
    lightning = {
        "state_dict": {f"model.{k}": v for k, v in ckpt["state_dict"].items()},
        "global_step": TOTAL_STEPS,
        "epoch": EPOCHS - 1,
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"lr": 1e-3},  # no architecture: --model names it
        "optimizer_states": [],
        "lr_schedulers": [],
        "callbacks": {},
    }
    torch.save(lightning, tmp_path / "epoch=4-step=145.ckpt")
    pt, averaged = eval_json(last, tmp_path / "ema.safetensors")
    light = eval_json(tmp_path / "epoch=4-step=145.ckpt", "--model", "net")[0]
    ema_key = eval_json(last, "--key", "state_dict_ema")[0]  # timm's key for the EMA inside a checkpoint
    online = eval_json(net_run / "online_ema" / "ema.pt")[0]
    assert averaged["arch"] == "net" and averaged["accuracy"] > 0.3
    assert light["step"] == TOTAL_STEPS and (light["accuracy"], light["loss"]) == (pt["accuracy"], pt["loss"])
    assert (ema_key["accuracy"], ema_key["loss"]) == (online["accuracy"], online["loss"])


@pytest.mark.slow
def test_eval_errors_are_one_clear_line(net_run: Path, tmp_path: Path) -> None:
    weights = torch.load(net_run / "step_00000000.pt", weights_only=True)["state_dict"]
    save_file(weights, tmp_path / "bare.safetensors")  # no metadata: no architecture
    no_arch = cli("eval", tmp_path / "bare.safetensors", "--test-subset", 100)
    wrong_arch = cli("eval", net_run / "step_00000000.pt", "--model", "resnet", "--test-subset", 100)
    for result, expected in ((no_arch, "pass --model"), (wrong_arch, "do not fit the model")):
        assert result.exit_code == 2 and expected in result.stderr
        assert result.stderr.startswith("ckpt-ema: error: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_missing_data_is_a_clear_error(net_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
    ):  # a download must fail fast, even with a network
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("CKPT_EMA_DATA", str(tmp_path / "nowhere"))
    for result in (cli("eval", net_run / "step_00000000.pt"), cli("train", "-o", tmp_path / "run", "--epochs", 1)):
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in result.stderr and "CKPT_EMA_DATA" in result.stderr
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- BatchNorm


@pytest.mark.slow
def test_bn_recalibration_changes_running_stats_not_parameters(cifar_dir: Path, tmp_path: Path) -> None:
    result = train(
        TrainConfig(
            output=tmp_path / "resnet",
            arch="resnet",
            epochs=1,
            data=cifar_dir,
            train_subset=640,
            save_every=5,
            evaluate=False,
            quiet=True,
        )
    )
    path = result.checkpoints[-1]
    model, arch, _ = load_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters()}
    train_split = load_cifar10(cifar_dir, train_subset=640, splits=("train",))["train"]
    assert bn_recalibrate(model, train_split, n_batches=4) == 4
    after = model.state_dict()
    assert arch == "resnet" and not model.training
    assert all(torch.equal(before[n], after[n]) for n in params)
    stats = [n for n in after if n.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(before[n], after[n]) for n in stats)
    assert all(after[n].item() == 4 for n in after if n.endswith("num_batches_tracked"))

    scored = eval_json(path, "--bn-recalibrate", 4)[0]
    assert scored["bn_recalibrate"]["batches"] == 4
    assert scored["bn_recalibrate"]["after"]["accuracy"] == scored["accuracy"]
    assert scored["bn_recalibrate"]["before"] != scored["bn_recalibrate"]["after"]


# ---------------------------------------------------------------------------------------------------- data


def test_augmentation_is_a_padded_crop_and_flip_per_image(cifar_dir: Path) -> None:
    images = load_cifar10(cifar_dir, train_subset=64, test_subset=1)["train"].images
    out = augment(images, seeded_generator(0, "t"))
    g = seeded_generator(0, "t")  # the same draws, in the same order, replayed one image at a time
    dy, dx, flip = (
        torch.randint(0, 9, (64,), generator=g),
        torch.randint(0, 9, (64,), generator=g),
        torch.rand(64, generator=g) < 0.5,
    )
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(64):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(2) if flip[i] else crop)
    assert torch.equal(augment(images, seeded_generator(0, "t")), out)


def test_a_damaged_batch_file_is_rejected(tmp_path: Path) -> None:
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": torch.zeros(10, 3072, dtype=torch.uint8).numpy(), b"labels": [0] * 10}, f)
    with pytest.raises(CkptEmaError, match="expected 10000 uint8 images"):
        read_batch_file(tmp_path / "data_batch_1")
