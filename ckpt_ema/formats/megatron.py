"""Megatron-core ``torch_dist`` checkpoints, in Megatron-LM's layout and NeMo 2's, read without megatron-core.

megatron-core's ``dist_checkpointing.save`` (backend ``torch_dist``) writes one folder holding, in this order:
``common.pt`` (``torch.save`` of every entry that is not sharded: Megatron-LM's ``args``, ``iteration``, ...), the
``__R_T.distcp`` files and ``.metadata`` of a PyTorch Distributed Checkpoint (read by
:mod:`ckpt_ema.formats.dcp_reader`; its metadata also pickles each rank's save plan, which that reader's allow-list
admits), and last ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``). The trainers put it in:

* Megatron-LM: ``RUN/iter_0000010/`` (the iteration, 7 digits), and ``RUN/latest_checkpointed_iteration.txt``
  naming the newest iteration once it is saved (``release`` for a ``release/`` folder);
* NeMo 2: ``RUN/checkpoints/{model_name}--{val_loss:.2f}-step=N-consumed_samples=M/`` holding the folder as
  ``weights/`` (and NeMo's own ``context/``); ``ModelCheckpoint(save_last=True)`` saves the newest one a second
  time as ``...-last/``.

The DCP entries are named by the model's own keys, the layers of a block stacked on a leading dimension
(``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[layers, ...]``); NeMo 2 puts ``module.`` before
them. Only the model's tensors are read: the entries under ``optimizer.`` (its state: ``optimizer.state.exp_avg.*``,
fp32 master copies), ``_extra_state`` entries and the pickled values (``rng_state``, Transformer Engine's extra
state) are left out, and the run says so. ``common.pt`` is not read: it pickles Megatron-LM's arguments with
megatron-core's own classes, and the step is in the folder's name (``iter_0000010``, ``step=N``), as the trainers
themselves find it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats import strict_json
from ckpt_ema.formats.base import Checkpoint, Format, strip_wrapper_prefixes
from ckpt_ema.formats.dcp import METADATA_FILE, dcp_files, dcp_is_complete

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

COMMON_FILE = "common.pt"  # written first: with .metadata, what makes a folder megatron-core's
CONFIG_FILE = "metadata.json"  # written last, once every rank has saved
BACKEND = "torch_dist"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's record of the newest iteration
RELEASE = "release"  # the tracker's word for a release/ folder (no iteration)
ITERATION_FOLDER = re.compile(r"iter_(\d+)")
NEMO_WEIGHTS = "weights"  # NeMo 2's subfolder of a checkpoint that holds the torch_dist folder
NEMO_STEP = re.compile(r"(?:^|-)step=(\d+)(?:-|$)")
NEMO_LAST = "-last"  # ModelCheckpoint(save_last=True)'s copy of the newest checkpoint
OPTIMIZER_PREFIX = "optimizer."
EXTRA_STATE = "_extra_state"


def is_torch_dist_folder(folder: Path) -> bool:
    """A folder megatron-core's ``torch_dist`` backend writes: DCP's ``.metadata`` beside ``common.pt``."""
    return (folder / METADATA_FILE).is_file() and (folder / COMMON_FILE).is_file()


def torch_dist_folder_of(path: Path) -> Path | None:
    """The torch_dist folder of the checkpoint at ``path``: itself, or NeMo 2's ``weights/`` inside it."""
    if is_torch_dist_folder(path):
        return path
    if is_torch_dist_folder(path / NEMO_WEIGHTS):
        return path / NEMO_WEIGHTS
    return None


def is_megatron_checkpoint(path: Path) -> bool:
    return torch_dist_folder_of(path) is not None


def megatron_is_complete(path: Path) -> bool:
    """Whether megatron-core is done saving: its ``metadata.json``, written after every rank's files and DCP's
    ``.metadata``, is there and whole."""
    folder = torch_dist_folder_of(path)
    if folder is None or not dcp_is_complete(folder):
        return False
    try:
        strict_json.parse((folder / CONFIG_FILE).read_bytes())
    except (OSError, strict_json.JsonRefused):
        return False
    return True


def _check_backend(folder: Path) -> None:
    """Refuse a folder whose ``metadata.json`` is missing (the save did not finish) or names another backend."""
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise CkptEmaError(f"no {CONFIG_FILE}: megatron-core writes it last, so this save did not finish", folder)
    config = strict_json.read_json(config_file, "megatron-core checkpoint config")
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != BACKEND:
        raise CkptEmaError(f"sharded_backend is {backend!r}: ckpt-ema reads megatron-core's {BACKEND!r} "
                           "checkpoints only", config_file)


def choose_model_entries(metadata: Metadata, paths: dict[str, tuple[str, ...]], key: str | None,
                         folder: Path) -> tuple[str, dict[str, str]]:
    """The model's tensors (a :data:`~ckpt_ema.formats.dcp_reader.ModelChoice`): every tensor entry outside
    ``optimizer.`` that is no ``_extra_state``, named without NeMo 2's ``module.`` (removed when every name has
    it); the description says what was left out."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    tensors = [k for k, e in entries.items() if isinstance(e, TensorStorageMetadata)]
    optimizer = [k for k in tensors if k.startswith(OPTIMIZER_PREFIX)]
    extra = [k for k in tensors if EXTRA_STATE in k.split(".")]
    model = [k for k in tensors if k not in set(optimizer) | set(extra)]
    if not model:
        raise CkptEmaError(f"no model tensors: every tensor entry is under {OPTIMIZER_PREFIX!r} or an "
                           f"{EXTRA_STATE}", folder)
    left_out = [f"{len(optimizer)} optimizer tensors ({OPTIMIZER_PREFIX}*)"] if optimizer else []
    if extra:
        left_out.append(f"{len(extra)} {EXTRA_STATE} tensors")
    values = len(entries) - len(tensors)
    if values:
        left_out.append(f"{values} pickled values (rng_state, {EXTRA_STATE}, ...)")
    said = f"; left out: {', '.join(left_out)}" if left_out else ""
    return f"the model's entries of the megatron-core checkpoint{said}", strip_wrapper_prefixes(model)


def open_megatron(path: Path, key: str | None) -> Checkpoint:
    """The model of the megatron-core checkpoint at ``path`` (a torch_dist folder, or NeMo 2's checkpoint)."""
    from ckpt_ema.formats.dcp_reader import DcpCheckpoint  # torch.distributed.checkpoint: only for DCP runs

    if key is not None:
        raise CkptEmaError(f"--key {key} does not apply to a megatron-core checkpoint: its model is every tensor "
                           f"outside {OPTIMIZER_PREFIX}*", path)
    folder = torch_dist_folder_of(path)
    if folder is None:
        raise CkptEmaError(f"not a megatron-core checkpoint: no {METADATA_FILE} beside a {COMMON_FILE}", path)
    _check_backend(folder)
    return DcpCheckpoint(path, folder / METADATA_FILE, choose=choose_model_entries)


def megatron_step(path: Path, metadata: Mapping[str, Any]) -> tuple[int, str] | None:
    """The step in the checkpoint's folder name: Megatron-LM's ``iter_0000010``, NeMo 2's ``...-step=N-...`` (of
    the checkpoint, or of the folder above ``weights/``)."""
    match = ITERATION_FOLDER.fullmatch(path.name)
    if match:
        return int(match[1]), "name"
    for name in (path.name, path.parent.name) if path.name == NEMO_WEIGHTS else (path.name,):
        match = NEMO_STEP.search(name)
        if match:
            return int(match[1]), "name"
    return None


def megatron_in_run(path: Path) -> bool:
    """A checkpoint of a run's folder once megatron-core has finished saving it (an asynchronous save writes
    ``metadata.json`` minutes after the tensors; given alone, an unfinished one is refused)."""
    return megatron_is_complete(path)


def nemo_last_copy(path: Path) -> str | None:
    """Why NeMo 2's ``-last`` copy of a checkpoint that is in the run's folder too is left out of the run (the
    same weights at the same step, saved twice); None for any other checkpoint."""
    twin = path.with_name(path.name.removesuffix(NEMO_LAST))
    if twin == path or not is_megatron_checkpoint(twin):
        return None
    return f"NeMo 2's {NEMO_LAST} copy of {twin.name} (the same checkpoint saved twice), not averaged a second time"


def check_tracker(folder: Path) -> None:
    """Refuse, in one line, a Megatron-LM run whose ``latest_checkpointed_iteration.txt`` names a checkpoint that
    is not here (its newest checkpoint lost or partial) or no iteration at all."""
    tracker = folder / TRACKER_FILE
    if not tracker.is_file():
        return
    try:
        text = tracker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CkptEmaError(f"unreadable: {exc}", tracker) from None
    if text == RELEASE:
        name = RELEASE
    elif text.isascii() and text.isdigit() and len(text) <= 12:
        name = f"iter_{int(text):07d}"
    else:
        raise CkptEmaError(f"holds {text[:40]!r}, not an iteration", tracker)
    if not is_torch_dist_folder(folder / name):
        raise CkptEmaError(f"names the checkpoint {name}, which is not in {folder} (missing, or not a megatron-core "
                           f"{BACKEND} folder)", tracker)


FORMAT = Format(
    name=f"a megatron-core {BACKEND} checkpoint folder ({METADATA_FILE} and {COMMON_FILE}; NeMo 2's "
         f"{NEMO_WEIGHTS}/)",
    suffixes=(),
    recognises=is_megatron_checkpoint,
    files=dcp_files,
    open=open_megatron,
    is_complete=megatron_is_complete,
    step=megatron_step,
    in_run=megatron_in_run,
    left_out=nemo_last_copy,
    check_run=check_tracker,
)
