"""ckpt-ema: the EMA of a model's weights, recovered after training from the checkpoints a run saved.

The public API (``ckpt_ema.average``, ``plan``, ``sweep``, ``AverageOptions`` ...) is imported on first use, so
that ``import ckpt_ema`` (and ``ckpt-ema --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AverageOptions": "ckpt_ema.options",
    "parse_size": "ckpt_ema.options",
    "DecaySchedule": "ckpt_ema.weighting",
    "CkptEmaError": "ckpt_ema.errors",
    "OptionError": "ckpt_ema.errors",
    "Plan": "ckpt_ema.planning",
    "AverageResult": "ckpt_ema.api",
    "Reporter": "ckpt_ema.api",
    "average": "ckpt_ema.api",
    "plan": "ckpt_ema.api",
    "run": "ckpt_ema.api",
    "sweep": "ckpt_ema.api",
    "Scoring": "ckpt_ema.sweeping",
    "command_scorer": "ckpt_ema.scoring",
    "SweepResult": "ckpt_ema.sweeping",
    "World": "ckpt_ema.engine.distributed",
    "load_state_dict": "ckpt_ema.formats.registry",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from ckpt_ema.api import AverageResult, Reporter, average, plan, run, sweep
    from ckpt_ema.engine.distributed import World
    from ckpt_ema.errors import CkptEmaError, OptionError
    from ckpt_ema.formats.registry import load_state_dict
    from ckpt_ema.options import AverageOptions, parse_size
    from ckpt_ema.planning import Plan
    from ckpt_ema.scoring import command_scorer
    from ckpt_ema.sweeping import Scoring, SweepResult
    from ckpt_ema.weighting import DecaySchedule


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckpt_ema' has no attribute {name!r}")
