"""What an output records in its safetensors header: the tool, every option, each input with its step and weight,
and the training metadata of the newest checkpoint that ``eval`` needs (e.g. the architecture)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ckpt_ema import __version__

if TYPE_CHECKING:
    from ckpt_ema.planning import Plan

# Training metadata carried from the newest checkpoint into the output (``eval`` needs the architecture).
CARRIED_METADATA = ("arch", "epoch", "step", "global_step", "hparams", "hyper_parameters", "args", "version")


def output_metadata(plan: Plan) -> dict[str, str]:
    """The header's ``__metadata__`` for the average that ``plan`` describes (every value a string)."""
    newest = plan.sources[-1].metadata
    meta: dict[str, str] = {"format": "pt"}
    for key in CARRIED_METADATA:
        if key in newest:
            value = newest[key]
            meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    meta["ckpt_ema_version"] = __version__
    meta["ckpt_ema_options"] = json.dumps(plan.options.flat())
    meta["ckpt_ema_inputs"] = json.dumps(
        [{"path": str(s.path), "step": s.step, "step_from": s.step_from, "weight": w}
         for s, w in zip(plan.sources, plan.weighting.weights)]
    )
    meta["ckpt_ema_effective_window"] = str(plan.weighting.effective_window())
    meta["ckpt_ema_unresolved"] = f"{plan.weighting.unresolved:.6g}"
    return meta
