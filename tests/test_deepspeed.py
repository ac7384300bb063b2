"""DeepSpeed ZeRO 1, 2 and 3 checkpoints as inputs, in fp32, bf16 and fp16: the fixtures were written by real
DeepSpeed runs on CPU with 2 ranks (scripts/make_deepspeed_fixtures.py), of a model whose 865 trained elements and
three optimizer groups divide by no alignment, with what DeepSpeed's own zero_to_fp32 consolidates from each
checkpoint as the reference. Reading them needs no DeepSpeed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEEPSPEED_FIXTURES, assert_refused, run_cli
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.formats.deepspeed import DeepSpeedCheckpoint, load_deepspeed_file

RUNS = [f"zero{stage}-{dtype}" for stage in (1, 2, 3) for dtype in ("fp32", "bf16", "fp16")]
TAGS = ("global_step2", "global_step4", "global_step6")
FROZEN = "frozen"  # the model's frozen parameter: ZeRO-1 records none, and zero_to_fp32 leaves it out


def reference(run: str, tag: str) -> dict[str, torch.Tensor]:
    return load_file(DEEPSPEED_FIXTURES / "reference" / f"{run}-{tag}.safetensors")


def stage_of(run: str) -> int:
    return int(run[len("zero")])


def module_states(run: str, tag: str) -> dict:
    return load_deepspeed_file(DEEPSPEED_FIXTURES / run / tag / "mp_rank_00_model_states.pt")


def test_the_fixtures_are_the_awkward_cases_of_real_runs() -> None:
    """What made real runs fail must stay in the fixtures: under ZeRO 1/2 the ranks' partitions of every group
    differ in size (the padding cut from the last), three groups, 865 trained elements over 2 ranks."""
    for run in RUNS:
        if stage_of(run) == 3:
            continue
        shapes = module_states(run, "global_step6")["param_shapes"]
        assert len(shapes) == 3 and sum(s.numel() for g in shapes for s in g.values()) == 865
        files = sorted((DEEPSPEED_FIXTURES / run / "global_step6").glob("*optim_states.pt"))
        assert len(files) == 2 and files[0].name.startswith("bf16_" if "bf16" in run else "zero_pp")
        sizes = [[t.numel() for t in load_deepspeed_file(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"]]
                 for f in files]
        assert sizes == [[304, 44, 88], [301, 43, 85]], run


@pytest.mark.parametrize("run", RUNS)
def test_each_checkpoint_reads_as_zero_to_fp32_consolidates_it(run: str) -> None:
    stage = stage_of(run)
    for tag in TAGS:
        ckpt = DeepSpeedCheckpoint(DEEPSPEED_FIXTURES / run / tag)
        want = reference(run, tag)
        extra = {FROZEN} if stage == 1 else set()
        assert set(ckpt.names) == set(want) | extra and not set(want) & extra
        for name, t in want.items():
            got = ckpt.tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), (run, tag, name)
        if stage == 1:  # the frozen parameter, whole in the module
            assert torch.equal(ckpt.tensor(FROZEN), module_states(run, tag)["module"][FROZEN])
            assert "1 parameter(s) outside the optimizer (frozen) as the module holds them" in ckpt.weights_from
        assert ckpt.metadata == {"global_step": int(tag.removeprefix("global_step"))}
        assert f"fp32 master weights of ZeRO-{stage}" in ckpt.weights_from


@pytest.mark.parametrize("run", RUNS)
def test_ema_of_a_run_equals_the_float64_ema_of_the_consolidated_checkpoints(run: str, tmp_path: Path) -> None:
    """Accumulated in float64, the output is the float64 EMA of zero_to_fp32's tensors rounded once to their
    dtype: the fp32 masters' float32, the frozen parameter's 16-bit dtype, the integer buffer's int64."""
    res = run_cli("average", DEEPSPEED_FIXTURES / run, "--decay", "0.5", "--accum-dtype", "float64",
                  "-o", tmp_path / "ema.safetensors")
    assert res.exit_code == 0, res.output
    assert f"note: weights: the fp32 master weights of ZeRO-{stage_of(run)}" in res.stderr
    got = load_file(tmp_path / "ema.safetensors")
    plan = ckpt_ema.plan(DEEPSPEED_FIXTURES / run, decay=0.5)
    assert [s.path.name for s in plan.sources] == list(TAGS)
    refs = [reference(run, tag) for tag in TAGS]
    if stage_of(run) == 1:
        refs = [{**r, FROZEN: module_states(run, tag)["module"][FROZEN]} for r, tag in zip(refs, TAGS)]
    assert sorted(got) == sorted(refs[0])
    for name, t in got.items():
        want = sum(w * r[name].double() for w, r in zip(plan.weighting.weights, refs))
        assert t.dtype == refs[0][name].dtype and torch.equal(t, want.to(t.dtype)), name


def within_float32_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to two float32 rounding steps of the tensor's largest magnitude (float32 accumulation)."""
    return (got.double() - want).abs().max().item() <= 2**-22 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("run", ["zero1-fp32", "zero2-bf16", "zero3-fp16"])
def test_pieces_across_partitions_equal_the_consolidated_tensor(run: str) -> None:
    ckpt = DeepSpeedCheckpoint(DEEPSPEED_FIXTURES / run / "global_step4")
    for name, t in reference(run, "global_step4").items():
        flat = t.reshape(-1)
        n = flat.numel()
        for a in range(0, n, 7):  # every start, across the partition and group boundaries
            b = min(a + 13, n)
            assert torch.equal(ckpt.piece(name, a, b), flat[a:b]), (name, a, b)


def test_reading_never_imports_deepspeed() -> None:
    code = ("import sys, ckpt_ema; ckpt_ema.average(sys.argv[1], None, last=2); "
            "print(any(m == 'deepspeed' or m.startswith('deepspeed.') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(DEEPSPEED_FIXTURES / "zero2-bf16")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def copy_run(run: str, tmp_path: Path) -> Path:
    copy = tmp_path / run
    shutil.copytree(DEEPSPEED_FIXTURES / run, copy)
    return copy


def test_bf16_optimizer_state_is_refused_as_zero_to_fp32_refuses_it(tmp_path: Path) -> None:
    """bf16 ZeRO-1 with fp32 gradient accumulation goes through DeepSpeed's BF16_Optimizer, whose files record no
    ZeRO stage; zero_to_fp32 says "is not a zero checkpoint" (the script wrote no reference for this run)."""
    run = DEEPSPEED_FIXTURES / "zero1-bf16-fp32grads"
    assert not list((DEEPSPEED_FIXTURES / "reference").glob(f"{run.name}-*"))
    assert_refused([run], "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "BF16_Optimizer",
                   "neither ckpt-ema nor DeepSpeed's zero_to_fp32 reads it", out=tmp_path / "ema.safetensors")


def test_ranks_files_swapped_are_refused(tmp_path: Path) -> None:
    """Rank 1's shorter partitions first: zero_to_fp32 would join them in that order and read every parameter
    shifted; the partitions are no longer full ones followed by the one cut short, and that is refused."""
    run = copy_run("zero2-bf16", tmp_path)
    tag = run / "global_step4"
    first, second = (tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))
    first.rename(tag / "swap")
    second.rename(first)
    (tag / "swap").rename(second)
    assert_refused([run], "global_step4", "partitions of group 0 hold [301, 304] elements",
                   out=tmp_path / "ema.safetensors")


def test_a_zero1_tie_shared_params_does_not_record_is_refused(tmp_path: Path) -> None:
    """ZeRO-1 records no frozen parameters, so the module's unrecorded tensors are read as the module holds them;
    but the tied output layer is a view of the optimizer's flat parameters: with its tie unrecorded it is refused,
    not read as a frozen parameter in 16 bits."""
    run = copy_run("zero1-bf16", tmp_path)
    states_file = run / "global_step6" / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=True)
    assert states["shared_params"] == {"head.weight": "emb.weight"}
    states["shared_params"] = {}
    torch.save(states, states_file)
    assert_refused([run], "mp_rank_00_model_states.pt", "head.weight lies in the optimizer's flattened parameters",
                   out=tmp_path / "ema.safetensors")


@pytest.mark.parametrize("run", ["zero1-bf16", "zero2-fp16"])
def test_without_optimizer_files_the_module_weights_are_read_and_said(run: str, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path)
    for f in copy.glob("*/*optim_states.pt"):
        f.unlink()
    ckpt = DeepSpeedCheckpoint(copy / "global_step4")
    assert "module's own weights" in ckpt.weights_from
    module = module_states(run, "global_step4")["module"]
    assert sorted(ckpt.names) == sorted(module)
    for name in ckpt.names:
        assert ckpt.tensor(name).dtype == module[name].dtype and torch.equal(ckpt.tensor(name), module[name]), name


def test_latest_naming_a_missing_tag_is_refused(tmp_path: Path) -> None:
    run = copy_run("zero1-fp32", tmp_path)
    (run / "latest").write_text("global_step8")
    assert_refused([run], "latest", "global_step8", out=tmp_path / "ema.safetensors")


def test_zero3_without_a_rank_is_refused(tmp_path: Path) -> None:
    run = copy_run("zero3-bf16", tmp_path)
    (run / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert_refused([run], "global_step2", "partitioned over 2 ranks", out=tmp_path / "ema.safetensors")


def test_zero2_without_a_rank_is_refused(tmp_path: Path) -> None:
    run = copy_run("zero2-fp32", tmp_path)
    (run / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert_refused([run], "global_step6", "partitioned over 2 ranks", out=tmp_path / "ema.safetensors")


def test_zero3_without_optimizer_files_is_refused(tmp_path: Path) -> None:
    run = copy_run("zero3-fp32", tmp_path)
    for f in (run / "global_step4").glob("*optim_states.pt"):
        f.unlink()
    assert_refused([run], "global_step4", "no optimizer files", out=tmp_path / "ema.safetensors")


def test_a_trainer_checkpoint_folder_reads_the_tag_its_latest_names(tmp_path: Path) -> None:
    """A Hugging Face Trainer under DeepSpeed saves checkpoint-N/ holding latest, the tag folder and its own files."""
    run = tmp_path / "run"
    for tag in ("global_step2", "global_step4"):
        folder = run / f"checkpoint-{tag.removeprefix('global_step')}"
        shutil.copytree(DEEPSPEED_FIXTURES / "zero2-bf16" / tag, folder / tag)
        (folder / "latest").write_text(tag)
        (folder / "trainer_state.json").write_text(f'{{"global_step": {tag.removeprefix("global_step")}}}')
    plan = ckpt_ema.plan(run, last=2)
    assert [(s.path.name, s.step, s.step_from) for s in plan.sources] == [
        ("checkpoint-2", 2, "trainer_state.json"), ("checkpoint-4", 4, "trainer_state.json")]
    got = ckpt_ema.average(run, None, last=2).state_dict
    refs = [reference("zero2-bf16", tag) for tag in ("global_step2", "global_step4")]
    assert sorted(got) == sorted(refs[0])
    for name, t in got.items():
        assert within_float32_rounding(t, (refs[0][name].double() + refs[1][name].double()) / 2), name


def test_key_is_refused_for_deepspeed(tmp_path: Path) -> None:
    assert_refused([DEEPSPEED_FIXTURES / "zero1-fp32", "--key", "module"], "--key module does not apply",
                   out=tmp_path / "ema.safetensors")
