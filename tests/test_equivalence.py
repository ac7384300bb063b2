"""``average`` over checkpoints saved every step equals timm's ModelEmaV3 updated online (issue 2).

A tiny real training loop (SGD on random data, a model with BatchNorm so that float buffers and the integer
``num_batches_tracked`` are exercised) saves a checkpoint after every optimizer step and updates a
``timm.utils.model_ema.ModelEmaV3`` online with ``update(model, step=s)``, exactly as timm's train script does.
The post hoc average of those checkpoints must equal the EMA module's state dict to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckpt_ema
from ckpt_ema.cli import main
from helpers import STEPS, TOLERANCE, ModelEmaV3, assert_matches_timm, train_and_checkpoint


# Each case is (ModelEmaV3 keyword arguments, the same options for ckpt_ema.average).
CASES = {
    "plain": (dict(decay=0.8), dict(decay=0.8)),
    "update_after_step": (dict(decay=0.8, update_after_step=5), dict(decay=0.8, update_after_step=5)),
    "warmup": (dict(decay=0.9, use_warmup=True), dict(decay=0.9, warmup=True)),
    "warmup_min_decay": (
        dict(decay=0.95, use_warmup=True, min_decay=0.6, warmup_gamma=2.0, warmup_power=0.75),
        dict(decay=0.95, warmup=True, min_decay=0.6, warmup_gamma=2.0, warmup_power=0.75),
    ),
    "warmup_update_after_step": (
        dict(decay=0.9, use_warmup=True, update_after_step=3),
        dict(decay=0.9, warmup=True, update_after_step=3),
    ),
}


@pytest.mark.parametrize("save_initial", [False, True], ids=["from_step_1", "from_step_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_average_equals_timm_online_ema(tmp_path: Path, case: str, save_initial: bool) -> None:
    timm_kwargs, our_kwargs = CASES[case]
    expected = train_and_checkpoint(tmp_path / "run", timm_kwargs, save_initial=save_initial)
    result = ckpt_ema.average([tmp_path / "run"], **our_kwargs)
    steps = [s.step for s in result.plan.sources]
    assert steps == list(range(0 if save_initial else 1, STEPS + 1))
    assert_matches_timm(result.state_dict, expected)
    if save_initial:
        # timm's first update (step 1) copies the model: the weights before training count for nothing.
        assert result.plan.weighting.weights[0] == 0.0


def test_checkpoints_differ_from_the_ema(tmp_path: Path) -> None:
    """Guard against a vacuous equivalence: the EMA is far from both the last and the first checkpoint."""
    expected = train_and_checkpoint(tmp_path / "run", dict(decay=0.8), save_initial=False)
    last = torch.load(tmp_path / "run" / f"step_{STEPS}.pt", weights_only=True)["state_dict"]
    first = torch.load(tmp_path / "run" / "step_1.pt", weights_only=True)["state_dict"]
    for other in (last, first):
        gap = max((expected[n] - other[n]).abs().max().item() for n in expected if expected[n].is_floating_point())
        assert gap > 100 * TOLERANCE
    # and the BatchNorm buffers are really averaged, not copied
    assert not torch.allclose(expected["bn.running_mean"], last["bn.running_mean"], atol=1e-4)
    assert int(expected["bn.num_batches_tracked"]) == STEPS


def test_cli_output_equals_timm_online_ema(tmp_path: Path) -> None:
    """The same through the command line and the written safetensors file, shuffled on disk by name."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    expected = train_and_checkpoint(tmp_path / "run", dict(decay=0.9, use_warmup=True, update_after_step=2),
                                    save_initial=True)
    out = tmp_path / "ema.safetensors"
    res = CliRunner().invoke(
        main,
        ["average", str(tmp_path / "run" / "step_*.pt"), "--decay", "0.9", "--warmup", "--update-after-step", "2",
         "-o", str(out), "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert_matches_timm(load_file(out), expected)



def test_float64_accumulation_also_matches(tmp_path: Path) -> None:
    """--accum-dtype float64 changes the rounding, not the result: still timm's EMA, output dtype float32."""
    expected = train_and_checkpoint(tmp_path / "run", dict(decay=0.85), save_initial=False)
    result = ckpt_ema.average([tmp_path / "run"], decay=0.85, accum_dtype="float64")
    assert_matches_timm(result.state_dict, expected)


SCHEDULES = [
    dict(decay=0.999),
    dict(decay=0.9, update_after_step=7),
    dict(decay=0.9999, use_warmup=True),
    dict(decay=0.99, use_warmup=True, min_decay=0.5, update_after_step=3),
    dict(decay=0.999, use_warmup=True, warmup_gamma=10.0, warmup_power=0.75, min_decay=0.2),
]


@pytest.mark.parametrize("kwargs", SCHEDULES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_schedule_is_timm_get_decay(kwargs: dict) -> None:
    """d(s) of ckpt_ema.DecaySchedule is ModelEmaV3.get_decay(s): exactly for one step, to 1e-15 vectorised."""
    timm_ema = ModelEmaV3(nn.Linear(1, 1), **kwargs)
    ours = ckpt_ema.DecaySchedule(**{("warmup" if k == "use_warmup" else k): v for k, v in kwargs.items()})
    steps = list(range(0, 60)) + [100, 1_000, 31_623, 10**6]
    for s in steps:
        assert ours.decay_at(s) == timm_ema.get_decay(s), s
    vector = ours.decays(0, 2_000).tolist()
    assert vector == pytest.approx([timm_ema.get_decay(s) for s in range(0, 2_001)], abs=1e-15)
    # the product over an interval, closed form or not, is the product of the per-step decays
    for a, b in ((0, 5), (3, 40), (40, 41), (100, 1_000)):
        want = 1.0
        for s in range(a + 1, b + 1):
            want *= timm_ema.get_decay(s)
        assert ours.product(a, b) == pytest.approx(want, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("update_after_step", [0, 4])
def test_bias_corrected_schedule(update_after_step: int) -> None:
    """With bias correction no step copies: d(s) = 1 (no update) up to update_after_step, then the decay."""
    ours = ckpt_ema.DecaySchedule(decay=0.9, update_after_step=update_after_step)
    want = [1.0 if s <= update_after_step else 0.9 for s in range(1, 30)]
    assert [ours.decay_at(s, bias_corrected=True) for s in range(1, 30)] == want
    assert ours.decays(1, 29, bias_corrected=True).tolist() == want
