"""OLMo-core's Trainer checkpoints (ai2-olmo-core): ``stepN/`` folders of DCP model and optimizer state, read
without OLMo-core.

OLMo-core's ``Checkpointer`` saves a run's checkpoints as ``save_folder/stepN/`` (its ``find_checkpoints`` takes
exactly the folders named ``step`` and a number), each holding

* ``model_and_optim/``: a DCP folder (``.metadata`` and ``__R_K.distcp`` files) of the train module's state,
  the model under ``model.*`` and the optimizer under ``optim.*``; written by OLMo-core's own DCP writer, whose
  ``.metadata`` pickles its own copy of DCP's ``_StorageInfo`` (read as torch's, in
  :mod:`ckpt_ema.formats.dcp_reader`);
* ``train/rankR.pt``: each rank's trainer state (``torch.save``): ``global_step``, ``global_train_tokens_seen``,
  ``epoch``, the data loader's position, and the RNG states, the numpy generator's among them as a numpy array;
* ``.metadata.json``: OLMo-core's version and whether the checkpoint is ephemeral.

The checkpointer writes everything into ``stepN-tmp/``, renames it ``stepN/`` once every rank is done, and then
writes ``.metadata.json``: a folder is complete once that is there (OLMo-core's own ``dir_is_checkpoint`` asks for
it too). A pre-train checkpoint of the untrained model, ``step0/``, is saved by default and read like any other
(the first-checkpoint warning of :mod:`ckpt_ema.planning` says when an average leans on it).

The model is read with :class:`~ckpt_ema.formats.dcp_reader.DcpCheckpoint` (bounded memory, every byte range of the
folder checked, optimizer items included) from the entry ``model``, under the bare model's names (``model.``
cut); the optimizer state is left out. The step and the trainer's counters come from ``train/rank0.pt``, loaded
weights-only with stand-ins for the numpy arrays of its RNG state (:data:`TRAIN_STATE_SAFE_GLOBALS`: records that
keep nothing, never numpy's code); without that file, from the folder's name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import Checkpoint, Format
from ckpt_ema.formats.dcp import METADATA_FILE, dcp_files, dcp_is_complete
from ckpt_ema.formats.torch_save import plain_metadata, torch_file_is_complete, torch_load_safely

STEP_FOLDER = re.compile(r"step\d+")  # OLMo-core's Checkpointer.CHECKPOINT_DIR, "step{step}"
MODEL_FOLDER = "model_and_optim"
MODEL_KEY = "model"
TRAIN_STATE = Path("train") / "rank0.pt"
CHECKPOINT_METADATA = ".metadata.json"  # written last


class NumpyArrayRecord:
    """Stand-in for a numpy array in OLMo-core's trainer state (the numpy generator's state): takes the arguments
    and state pickled for it and keeps none of them. Only the trainer's counters are read from that file."""

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


TRAIN_STATE_SAFE_GLOBALS: list[Any] = [
    (NumpyArrayRecord, "numpy.ndarray"),
    (NumpyArrayRecord, "numpy._core.multiarray._reconstruct"),
    (NumpyArrayRecord, "numpy.core.multiarray._reconstruct"),
    type(np.dtype("uint32")),  # the generator state's dtype, rebuilt by numpy.dtype (already allowed)
]


def is_olmo_checkpoint(path: Path) -> bool:
    """A checkpoint folder of OLMo-core's Trainer: its DCP folder ``model_and_optim/`` with its metadata, and the
    trainer's own files beside it (``.metadata.json`` or ``train/``)."""
    return ((path / MODEL_FOLDER / METADATA_FILE).is_file()
            and ((path / CHECKPOINT_METADATA).is_file() or (path / TRAIN_STATE.parent).is_dir()))


def is_run_checkpoint(path: Path) -> bool:
    """Whether a checkpoint folder met in a run's folder is one of its checkpoints: named ``stepN`` as OLMo-core
    names them (not the ``stepN-tmp`` of a save under way)."""
    return STEP_FOLDER.fullmatch(path.name) is not None


def olmo_is_complete(path: Path) -> bool:
    """Whether OLMo-core is done with the checkpoint: ``.metadata.json`` written (after the folder got its name),
    the DCP metadata whole, and ``train/rank0.pt`` whole."""
    return ((path / CHECKPOINT_METADATA).is_file() and dcp_is_complete(path / MODEL_FOLDER)
            and torch_file_is_complete(path / TRAIN_STATE))


def open_olmo(path: Path, key: str | None) -> Checkpoint:
    """The model of the checkpoint (the DCP entry ``model``, or ``key``), with the trainer's counters as metadata."""
    from ckpt_ema.formats.dcp_reader import DcpCheckpoint  # torch.distributed.checkpoint: only for DCP runs

    ckpt = DcpCheckpoint(path, path / MODEL_FOLDER / METADATA_FILE, key or MODEL_KEY)
    if key is None:
        ckpt.weights_from = f"the entry {MODEL_KEY!r} of {MODEL_FOLDER}/ (the optimizer state, optim.*, left out)"
    ckpt.metadata = {**ckpt.metadata, **train_state(path)}
    return ckpt


def train_state(path: Path) -> dict[str, Any]:
    """The plain values of the trainer state ``train/rank0.pt`` (global_step, global_train_tokens_seen, epoch,
    ...); empty without that file."""
    file = path / TRAIN_STATE
    if not file.is_file():
        return {}
    state = torch_load_safely(file, TRAIN_STATE_SAFE_GLOBALS)
    if not isinstance(state, dict):
        raise CkptEmaError(f"holds a {type(state).__name__}, not OLMo-core's trainer state", file)
    return plain_metadata(state)


FORMAT = Format(
    name=f"an OLMo-core checkpoint folder (stepN/ with {MODEL_FOLDER}/)",
    suffixes=(),
    recognises=is_olmo_checkpoint,
    files=dcp_files,
    open=open_olmo,
    is_complete=olmo_is_complete,
    in_run=is_run_checkpoint,
)
