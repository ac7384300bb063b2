"""ckpt-ema: the EMA of a model's weights, recovered after training from the checkpoints a run saved."""

__version__ = "0.1.0"

from ckpt_ema.api import AverageOptions, AverageResult, Plan, average, plan  # noqa: E402
from ckpt_ema.checkpoint import load_state_dict  # noqa: E402
from ckpt_ema.errors import CkptEmaError  # noqa: E402
from ckpt_ema.schedule import DecaySchedule  # noqa: E402

__all__ = [
    "AverageOptions",
    "AverageResult",
    "CkptEmaError",
    "DecaySchedule",
    "Plan",
    "__version__",
    "average",
    "load_state_dict",
    "plan",
]
