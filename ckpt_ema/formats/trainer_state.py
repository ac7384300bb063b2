"""A Hugging Face Trainer's ``checkpoint-N/`` folder: where its global step (and the tokens it counted) are recorded
(``trainer_state.json``).

The Trainer saves the weights (a model folder, or DeepSpeed's tag folder under ``latest``) and beside them its own
state, whose ``global_step`` is the step of the checkpoint. Formats whose checkpoints can be such a folder take
their step from here (:func:`trainer_step`) before the weights' own metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpt_ema.formats import strict_json
from ckpt_ema.formats.base import step_in_metadata

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint-N folders
TOKENS_SEEN = "num_input_tokens_seen"  # TrainerState's count of input tokens (with include_num_input_tokens_seen)


def is_trainer_folder(folder: Path) -> bool:
    """A Hugging Face Trainer's checkpoint folder (``checkpoint-N/``, or one with its ``trainer_state.json``)."""
    return folder.name.startswith(CHECKPOINT_PREFIX) or (folder / TRAINER_STATE).is_file()


def with_trainer_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus the global step of a Trainer folder's trainer_state.json, if it has one, and the tokens it
    counted (``num_input_tokens_seen``). The Trainer writes that count always, 0 unless
    ``include_num_input_tokens_seen`` is on: a 0 after step 0 is no count, and is left out."""
    state_file = path / TRAINER_STATE
    if not path.is_dir() or not state_file.is_file():
        return meta
    state = strict_json.read_json(state_file, "trainer state", floats=True)
    if not isinstance(state, dict):
        return meta
    step, tokens = state.get("global_step"), state.get(TOKENS_SEEN)
    if isinstance(step, int) and not isinstance(step, bool):
        meta["global_step"] = step
    if isinstance(tokens, int) and not isinstance(tokens, bool) and (tokens > 0 or step == 0):
        meta[TOKENS_SEEN] = tokens
    return meta


def trainer_step(path: Path, meta: Mapping[str, Any]) -> tuple[int, str] | None:
    """A :attr:`~ckpt_ema.formats.base.Format.step` for folders a Trainer may have saved: the ``global_step`` that
    :func:`with_trainer_state` put into the metadata, said to come from ``trainer_state.json`` when the folder has
    one; else the step in the weights' own metadata."""
    found = step_in_metadata(path, meta)
    if found is not None and found[1] == "metadata:global_step" and (path / TRAINER_STATE).is_file():
        return found[0], TRAINER_STATE
    return found
