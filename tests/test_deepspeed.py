"""DeepSpeed ZeRO 1, 2 and 3 checkpoints as inputs: the fixtures were written by DeepSpeed itself on CPU
(scripts/make_deepspeed_fixtures.py), with what DeepSpeed's own zero_to_fp32 consolidates from each as the
reference. Reading them needs no DeepSpeed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEEPSPEED_FIXTURES, assert_refused, max_abs_diff, run_cli
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.formats.deepspeed import DeepSpeedCheckpoint

STAGES = (1, 2, 3)
TAGS = ("global_step2", "global_step4")


def reference(stage: int, tag: str) -> dict[str, torch.Tensor]:
    return load_file(DEEPSPEED_FIXTURES / "reference" / f"zero{stage}-{tag}.safetensors")


@pytest.mark.parametrize("stage", STAGES)
def test_each_checkpoint_reads_as_zero_to_fp32_consolidates_it(stage: int) -> None:
    for tag in TAGS:
        ckpt = DeepSpeedCheckpoint(DEEPSPEED_FIXTURES / f"zero{stage}" / tag)
        want = reference(stage, tag)
        assert sorted(ckpt.names) == sorted(want)
        for name, t in want.items():
            assert torch.equal(ckpt.tensor(name), t), name
        assert ckpt.metadata == {"global_step": int(tag.removeprefix("global_step"))}
        assert f"fp32 master weights of ZeRO-{stage}" in ckpt.weights_from


@pytest.mark.parametrize("stage", STAGES)
def test_ema_of_a_run_equals_the_consolidated_checkpoints(stage: int, tmp_path: Path) -> None:
    res = run_cli("average", DEEPSPEED_FIXTURES / f"zero{stage}", "--decay", "0.5", "-o", tmp_path / "ema.safetensors")
    assert res.exit_code == 0, res.output
    assert f"note: weights: the fp32 master weights of ZeRO-{stage}" in res.stderr
    got = load_file(tmp_path / "ema.safetensors")
    plan = ckpt_ema.plan(DEEPSPEED_FIXTURES / f"zero{stage}", decay=0.5)
    assert [s.path.name for s in plan.sources] == list(TAGS)
    refs = [reference(stage, tag) for tag in TAGS]
    assert sorted(got) == sorted(refs[0])
    for name, t in got.items():
        want = sum(w * r[name].double() for w, r in zip(plan.weighting.weights, refs))
        assert t.dtype == torch.float32  # the masters' dtype, not the module's bf16
        assert max_abs_diff(t, want) < 1e-6, name


def test_pieces_across_partitions_equal_the_consolidated_tensor() -> None:
    ckpt = DeepSpeedCheckpoint(DEEPSPEED_FIXTURES / "zero3" / "global_step4")
    want = reference(3, "global_step4")
    for name, t in want.items():
        flat = t.reshape(-1)
        n = flat.numel()
        for a, b in ((0, n), (1, n - 1), (max(n // 2 - 3, 0), min(n // 2 + 3, n)), (n - 1, n)):
            assert torch.equal(ckpt.piece(name, a, b), flat[a:b]), (name, a, b)


def test_reading_never_imports_deepspeed() -> None:
    code = ("import sys, ckpt_ema; ckpt_ema.average(sys.argv[1], None, last=2); "
            "print(any(m == 'deepspeed' or m.startswith('deepspeed.') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(DEEPSPEED_FIXTURES / "zero3")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def copy_stage(stage: int, tmp_path: Path) -> Path:
    run = tmp_path / f"zero{stage}"
    shutil.copytree(DEEPSPEED_FIXTURES / f"zero{stage}", run)
    return run


def test_without_optimizer_files_the_module_weights_are_read_and_said(tmp_path: Path) -> None:
    run = copy_stage(2, tmp_path)
    for f in run.glob("*/*optim_states.pt"):
        f.unlink()
    ckpt = DeepSpeedCheckpoint(run / "global_step4")
    assert "module's own weights" in ckpt.weights_from
    module = torch.load(run / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert sorted(ckpt.names) == sorted(module)
    for name in ckpt.names:
        assert torch.equal(ckpt.tensor(name), module[name]), name
        assert ckpt.tensor(name).dtype == module[name].dtype


def test_latest_naming_a_missing_tag_is_refused(tmp_path: Path) -> None:
    run = copy_stage(1, tmp_path)
    (run / "latest").write_text("global_step6")
    assert_refused([run], "latest", "global_step6", out=tmp_path / "ema.safetensors")


def test_zero3_without_a_rank_is_refused(tmp_path: Path) -> None:
    run = copy_stage(3, tmp_path)
    (run / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert_refused([run], "global_step2", "partitioned over 2 ranks", out=tmp_path / "ema.safetensors")


def test_zero3_without_optimizer_files_is_refused(tmp_path: Path) -> None:
    run = copy_stage(3, tmp_path)
    for f in (run / "global_step4").glob("*optim_states.pt"):
        f.unlink()
    assert_refused([run], "global_step4", "no optimizer files", out=tmp_path / "ema.safetensors")


def test_a_trainer_checkpoint_folder_reads_the_tag_its_latest_names(tmp_path: Path) -> None:
    """A Hugging Face Trainer under DeepSpeed saves checkpoint-N/ holding latest, the tag folder and its own files."""
    run = tmp_path / "run"
    for step, tag in ((2, "global_step2"), (4, "global_step4")):
        folder = run / f"checkpoint-{step}"
        shutil.copytree(DEEPSPEED_FIXTURES / "zero2" / tag, folder / tag)
        (folder / "latest").write_text(tag)
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    plan = ckpt_ema.plan(run, last=2)
    assert [(s.path.name, s.step, s.step_from) for s in plan.sources] == [
        ("checkpoint-2", 2, "trainer_state.json"), ("checkpoint-4", 4, "trainer_state.json")]
    got = ckpt_ema.average(run, None, last=2).state_dict
    refs = [reference(2, tag) for tag in TAGS]
    for name, t in got.items():
        assert max_abs_diff(t, (refs[0][name].double() + refs[1][name].double()) / 2) < 1e-6, name


def test_key_is_refused_for_deepspeed(tmp_path: Path) -> None:
    assert_refused([DEEPSPEED_FIXTURES / "zero1", "--key", "module"], "--key module does not apply",
                   out=tmp_path / "ema.safetensors")
