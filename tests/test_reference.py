"""Sparse, irregular checkpoints and bias correction against an independent float64 reference (issue 2).

The reference below shares no code with ckpt_ema: it walks every training step s = 1..last, holds the weights at
the newest checkpoint saved at or after s (the contract's assumption between saves), takes d(s) from timm's own
``ModelEmaV3.get_decay`` and runs the EMA recurrence in float64. Its implied weights (the reference run on one-hot
"checkpoints") must match the weights ``plan`` reports, and ``average`` must match its result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema import CkptEmaError
from helpers import implied_weights, max_abs_diff, reference_ema, seed_ema, window_of, write_run


# These tests check the reading and the held-weights model of issue 2 ("the weights sat at the newer checkpoint"),
# so they pin --interpolate step; linear interpolation has its own reference in test_sweep.py.
def average_held(*args, **options):
    return ckpt_ema.average(*args, **{"interpolate": "step", **options})


def plan_held(*args, **options):
    return ckpt_ema.plan(*args, **{"interpolate": "step", **options})


SPARSE_STEPS = [3, 10, 11, 40, 100]


# ------------------------------------------------------------------------------------------- the reference


# ------------------------------------------------------------------------------------------- checkpoints


# ------------------------------------------------------------------------------------------- sparse checkpoints

SCHEDULES = {
    "plain": dict(decay=0.97),
    "fast": dict(decay=0.8),
    "after5": dict(decay=0.97, update_after_step=5),
    "after20": dict(decay=0.95, update_after_step=20),  # ckpts 3, 10, 11 fall before averaging starts
    "after50": dict(decay=0.95, update_after_step=50),  # only the newest counts
    "warmup": dict(decay=0.99, warmup=True),
    "warmup_min": dict(decay=0.99, warmup=True, min_decay=0.9, warmup_gamma=3.0, warmup_power=0.8),
    "warmup_after": dict(decay=0.99, warmup=True, update_after_step=7),
}
BIAS_CORRECTED = {
    "plain": dict(decay=0.97),
    "fast": dict(decay=0.8),
    "after5": dict(decay=0.97, update_after_step=5),
    "after20": dict(decay=0.95, update_after_step=20),
    "slow": dict(decay=0.999),  # correction matters most when 1 - decay^t is far from 1
}


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    folder = tmp_path_factory.mktemp("sparse")
    return folder, write_run(folder, SPARSE_STEPS)


def check_against_reference(folder: Path, saved: dict, bias_correction: bool, schedule: dict) -> None:
    ref = reference_ema(saved, bias_correction=bias_correction, **schedule)
    result = average_held([folder], bias_correction=bias_correction, accum_dtype="float64", **schedule)
    for name, want in ref.items():
        assert result.state_dict[name].dtype == torch.float32
        assert max_abs_diff(result.state_dict[name], want) <= 1e-6, name  # float32 output rounding
    assert torch.equal(result.state_dict["bn.num_batches_tracked"], saved[SPARSE_STEPS[-1]]["bn.num_batches_tracked"])

    weights = result.plan.weighting.weights
    want_weights = implied_weights(SPARSE_STEPS, bias_correction=bias_correction, **schedule)
    assert [s.step for s in result.plan.sources] == SPARSE_STEPS
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-12)
    assert math.isclose(sum(want_weights), 1.0, abs_tol=1e-12)
    for got_w, want_w in zip(weights, want_weights):
        assert got_w == pytest.approx(want_w, abs=1e-12)
    assert result.plan.weighting.effective_window() == window_of(want_weights)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sparse_checkpoints_match_reference(sparse_run, name: str) -> None:
    folder, saved = sparse_run
    check_against_reference(folder, saved, False, SCHEDULES[name])


@pytest.mark.parametrize("name", list(BIAS_CORRECTED))
def test_bias_correction_matches_reference(sparse_run, name: str) -> None:
    folder, saved = sparse_run
    check_against_reference(folder, saved, True, BIAS_CORRECTED[name])


def test_bias_correction_changes_the_result(sparse_run) -> None:
    """Not a no-op: with decay 0.999 over 100 steps, copying the first and starting from zero differ a lot."""
    folder, saved = sparse_run
    plain = average_held([folder], decay=0.999)
    corrected = average_held([folder], decay=0.999, bias_correction=True)
    assert max_abs_diff(plain.state_dict["layer.weight"], corrected.state_dict["layer.weight"]) > 0.1
    # Without correction the first checkpoint keeps prod_{s=4..100} d = 0.999**97 of the weight (timm's copy).
    assert plain.plan.weighting.weights[0] == pytest.approx(0.999 ** 97, rel=1e-12)
    # With it, it stands for steps 1..3: (1 - 0.999**3) * 0.999**97 / (1 - 0.999**100).
    assert corrected.plan.weighting.weights[0] == pytest.approx((1 - 0.999 ** 3) * 0.999 ** 97 / (1 - 0.999 ** 100),
                                                                rel=1e-9)


def test_nothing_to_average_with_bias_correction(sparse_run) -> None:
    folder, _ = sparse_run
    with pytest.raises(CkptEmaError, match="update.after.step"):
        plan_held([folder], decay=0.9, bias_correction=True, update_after_step=100)


def test_step_zero_checkpoint_counts_for_nothing_without_correction(tmp_path: Path) -> None:
    """timm's first update copies the model: initial weights saved at step 0 get weight 0 (and need no reading)."""
    saved = write_run(tmp_path, [0, 2, 5])
    result = average_held([tmp_path], decay=0.9)
    assert result.plan.weighting.weights[0] == 0.0
    ref = reference_ema(saved, decay=0.9)
    assert max_abs_diff(result.state_dict["layer.weight"], ref["layer.weight"]) <= 1e-6


# ------------------------------------------------------------------------------------------- per checkpoint


@pytest.mark.parametrize("bias_correction", [False, True])
def test_per_checkpoint_is_the_seed_formula(tmp_path: Path, bias_correction: bool) -> None:
    """--per-checkpoint ignores the (irregular) steps: checkpoint i is update i; the seed's v_n (/ (1 - beta^n))."""
    steps = [5, 17, 18, 300, 1000, 1001]
    saved = write_run(tmp_path, steps)
    beta = 0.7
    result = average_held([tmp_path], decay=beta, per_checkpoint=True, bias_correction=bias_correction,
                              accum_dtype="float64")
    assert [s.step for s in result.plan.sources] == list(range(1, len(steps) + 1))
    for name in ("layer.weight", "layer.bias", "bn.running_var"):
        want = seed_ema([saved[s][name] for s in steps], beta, bias_correction)
        assert max_abs_diff(result.state_dict[name], want) <= 1e-6, name
    # and it is not what the steps would have given
    by_step = average_held([tmp_path], decay=beta, bias_correction=bias_correction)
    assert max_abs_diff(result.state_dict["layer.weight"], by_step.state_dict["layer.weight"]) > 1e-3


def test_effective_window_closed_form(tmp_path: Path) -> None:
    """Per checkpoint with decay beta, the newest k carry 1 - beta^k: the window is ceil(ln 0.01 / ln beta)."""
    n, beta = 60, 0.9
    steps = list(range(1, n + 1))
    for s in steps:
        torch.save({"x": torch.zeros(1)}, tmp_path / f"c{s}.pt")
    the_plan = plan_held([tmp_path], decay=beta, per_checkpoint=True)
    expected = math.ceil(math.log(0.01) / math.log(beta))
    assert expected == 44
    assert the_plan.weighting.effective_window() == expected
    assert the_plan.weighting.effective_window() == window_of(implied_weights(steps, decay=beta))
    assert f"the newest {expected} carry 99% of the weight" in the_plan.table()


# ------------------------------------------------------------------------------------------- dtypes


def test_float64_accumulation_is_used(tmp_path: Path) -> None:
    """float64 checkpoints: float64 accumulation matches the reference to 1e-12, float32 cannot (proves it's used)."""
    saved = write_run(tmp_path, SPARSE_STEPS, dtype=torch.float64)
    ref = reference_ema(saved, decay=0.9)["layer.weight"]
    f64 = average_held([tmp_path], decay=0.9, accum_dtype="float64").state_dict["layer.weight"]
    f32 = average_held([tmp_path], decay=0.9, accum_dtype="float32").state_dict["layer.weight"]
    assert f64.dtype == f32.dtype == torch.float64  # the output keeps the input dtype
    assert max_abs_diff(f64, ref) <= 1e-12
    assert 1e-10 < max_abs_diff(f32, ref) <= 1e-5


@pytest.mark.parametrize("out_dtype", ["float64", "float16", "bfloat16", "float32"])
def test_out_dtype(sparse_run, tmp_path: Path, out_dtype: str) -> None:
    folder, saved = sparse_run
    dtype = getattr(torch, out_dtype)
    out = tmp_path / "ema.safetensors"
    result = average_held([folder], out, decay=0.97, accum_dtype="float64", out_dtype=out_dtype)
    ref = reference_ema(saved, decay=0.97)
    on_disk = load_file(out)
    for name, want in ref.items():
        for got in (result.state_dict[name], on_disk[name]):
            assert got.dtype == dtype
            if dtype == torch.float64:
                assert max_abs_diff(got, want) <= 1e-12  # float32 inputs, exactly averaged in float64
            else:
                torch.testing.assert_close(got, want.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert on_disk["bn.num_batches_tracked"].dtype == torch.int64  # integers are never converted


def test_low_precision_inputs_keep_their_dtype(tmp_path: Path) -> None:
    """bf16 and fp16 tensors come out in bf16 and fp16, averaged in float32, within one rounding of the reference.

    Decay 0.99 over 60 checkpoints: each update moves the average by ~1% of its distance, below bf16 resolution,
    so an average kept in bf16 would be far off.
    """
    steps = list(range(1, 61))
    saved = {}
    for s in steps:
        g = torch.Generator().manual_seed(s)
        saved[s] = {
            "a.weight": (1 + torch.randn(64, generator=g)).to(torch.bfloat16),
            "b.weight": (1 + torch.randn(64, generator=g)).to(torch.float16),
            "c.weight": (1 + torch.randn(64, generator=g)),
        }
        torch.save(saved[s], tmp_path / f"ckpt_{s}.pt")
    result = average_held([tmp_path], decay=0.99, bias_correction=True)
    ref = reference_ema(saved, decay=0.99, bias_correction=True)
    for name, dtype in (("a.weight", torch.bfloat16), ("b.weight", torch.float16), ("c.weight", torch.float32)):
        got = result.state_dict[name]
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref[name], rtol=torch.finfo(dtype).eps, atol=1e-6)


# ------------------------------------------------------------------------------------------- tied tensors


def test_tied_tensors(tmp_path: Path) -> None:
    """Weight tying (two names, one tensor) and views into one storage, saved by torch.save with sharing intact."""
    saved = {}
    for s in (2, 9, 30):
        g = torch.Generator().manual_seed(s)
        embed = torch.randn(10, 4, generator=g)
        flat = torch.randn(12, generator=g)
        saved[s] = {"embed.weight": embed, "head.weight": embed, "q.weight": flat[:6].view(2, 3),
                    "k.weight": flat[6:].view(3, 2)}
        torch.save(saved[s], tmp_path / f"step_{s}.pt")
    loaded = torch.load(tmp_path / "step_9.pt", weights_only=True)
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["head.weight"].untyped_storage().data_ptr()

    out = tmp_path / "ema.safetensors"
    result = average_held([tmp_path / "step_*.pt"], out, decay=0.9)
    ref = reference_ema(saved, decay=0.9)
    on_disk = load_file(out)
    for name, want in ref.items():
        assert max_abs_diff(result.state_dict[name], want) <= 1e-6, name
        assert max_abs_diff(on_disk[name], want) <= 1e-6, name
    assert torch.equal(on_disk["embed.weight"], on_disk["head.weight"])


# ------------------------------------------------------------------------------------------- the output file


def test_output_records_the_reference_weights(sparse_run, tmp_path: Path) -> None:
    folder, saved = sparse_run
    out = tmp_path / "ema.safetensors"
    schedule = dict(decay=0.97, update_after_step=5)
    average_held([folder], out, **schedule)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    inputs = json.loads(meta["ckpt_ema_inputs"])
    want = implied_weights(SPARSE_STEPS, **schedule)
    assert [i["step"] for i in inputs] == SPARSE_STEPS
    assert [Path(i["path"]).name for i in inputs] == [f"ckpt_{s}.pt" for s in SPARSE_STEPS]
    for entry, w in zip(inputs, want):
        assert entry["weight"] == pytest.approx(w, abs=1e-12)
    assert int(meta["ckpt_ema_effective_window"]) == window_of(want)


def test_large_tensors_streamed_in_small_chunks(tmp_path: Path) -> None:
    """Tensors larger than the engine's chunk (split across chunks), non-contiguous and tied ones, and a NaN far
    into a big tensor: the same answer and the same error as when everything fits in one piece."""
    saved = {}
    for s in (2, 5, 9, 30):
        g = torch.Generator().manual_seed(s)
        big = torch.randn(10_000, generator=g)
        saved[s] = {
            "big": big,
            "transposed": torch.randn(40, 300, generator=g).t(),  # stored with its strides by torch.save
            "tied": big,
            "tiny": torch.randn(1, generator=g),
            "count": torch.tensor(s),
        }
        torch.save(saved[s], tmp_path / f"ckpt_{s}.pt")
    assert not torch.load(tmp_path / "ckpt_2.pt", weights_only=True)["transposed"].is_contiguous()
    ref = reference_ema(saved, decay=0.8)
    out = tmp_path / "out.safetensors"
    # 48 KiB of working memory: chunks of 4096 float32 elements
    average_held([tmp_path / "ckpt_*.pt"], out, decay=0.8, max_memory="48KiB")
    on_disk = load_file(out)
    for name, want in ref.items():
        assert on_disk[name].shape == want.shape
        assert max_abs_diff(on_disk[name], want) <= 1e-6, name
    assert int(on_disk["count"]) == 30

    saved[9]["big"][9_999] = float("nan")  # in the last chunk of the big tensor
    torch.save(saved[9], tmp_path / "ckpt_9.pt")
    with pytest.raises(CkptEmaError, match=r"ckpt_9\.pt.*'(big|tied)'.*NaN"):
        average_held([tmp_path / "ckpt_*.pt"], decay=0.8, max_memory="48KiB")
