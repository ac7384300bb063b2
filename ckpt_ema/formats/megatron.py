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
them. Only the model's tensors are read: the entries under ``optimizer.`` (its state: ``optimizer.state.exp_avg.*``),
``_extra_state`` entries and the pickled values (``rng_state``, Transformer Engine's extra state) are left out, and
the run says so. ``common.pt`` is not read: it pickles Megatron-LM's arguments with megatron-core's own classes,
and the step is in the folder's name (``iter_0000010``, ``step=N``), as the trainers themselves find it.

A run in bfloat16 or float16 whose optimizer keeps fp32 master copies of the parameters (megatron-core's
mixed-precision optimizers) steps the masters and copies them, rounded, into the model; a resume loads the masters
over the model's weights. The average is then made from the masters, as :mod:`ckpt_ema.formats.deepspeed` does
from DeepSpeed's fp32 partitions. ``optimizer.sharded_state_dict`` names them (megatron-core 0.16.1):

* per parameter, as the model entry's key after the optimizer's name, with the model entry's shape and sharding:
  ``optimizer.state.fp32_param.KEY`` (``Float16OptimizerWithFloat16Params``; the ``DistributedOptimizer`` in its
  ``fully_sharded_model_space`` format, which 0.16.1 cannot save, and which megatron-core before 0.14 saved
  flattened, ``[fragments..., local elements]``) and ``optimizer.state.param.KEY`` (the ``DistributedOptimizer``
  in its ``fully_reshardable`` format, Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``). A master of
  float32 and the model entry's shape is read in place of the model entry (:data:`PARAMETER_MASTERS`); one of
  another dtype or shape (the flattened masters) is not mapped, as below;
* in the ``DistributedOptimizer``'s flat buckets, which name no parameter: ``optimizer.distributed.dp_group_idx_N.
  gbuf_idx_G.dtype_D.bucket_idx_B.param`` (its ``dp_reshardable`` format, Megatron-LM's default, and the
  ``fully_sharded_bucket_space`` it replaced), or pickled whole in ``optimizer.distributed.dp_group_idx_N.
  param_state`` (``dp_zero_gather_scatter``). Where the parameters sit in a bucket follows from the trainer's
  bucketing and padding, which the checkpoint does not record.

Masters that are not mapped are not read: the model's entries are, and the run says so, naming the flag that saves
mappable masters. Refusing these runs would refuse most of Megatron-LM's (its default format keeps them in
buckets); the model entries are the masters rounded once, so their average is within a rounding of the masters'
average, and the run says which it averaged.

:attr:`DcpCheckpoint.entries <ckpt_ema.formats.dcp_reader.DcpCheckpoint.entries>` lists, for each tensor, the
master read and the model entry beside it (a writer of the run's own format writes the merge into both);
:func:`unmapped_masters` the masters that are not read.
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
# The names megatron-core's optimizers put before a model entry's key for its fp32 master (module docstring).
PARAMETER_MASTERS = (
    ("optimizer.state.fp32_param.", "Float16OptimizerWithFloat16Params, or the DistributedOptimizer's "
                                    "fully_sharded_model_space format"),
    ("optimizer.state.param.", "the DistributedOptimizer's fully_reshardable format"),
)
MASTER_DTYPE = "float32"
# The DistributedOptimizer's masters that name no parameter: in its flat buckets (dp_reshardable,
# fully_sharded_bucket_space), or pickled with its whole state (dp_zero_gather_scatter: a ShardedObject's key).
BUCKET_MASTERS = re.compile(r"optimizer\.distributed\.dp_group_idx_\d+\.(gbuf_idx_\d+\.dtype_.*\.bucket_idx_\d+\.param"
                            r"|param_state(/shard_.*)?)")
MAPPABLE_MASTERS_FLAG = "--dist-ckpt-optim-fully-reshardable"  # Megatron-LM's: the fully_reshardable format


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
    it), each read from its fp32 master where the optimizer keeps one per parameter (:func:`find_masters`); the
    description says where the weights come from and what was left out."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    tensors = [k for k, e in entries.items() if isinstance(e, TensorStorageMetadata)]
    model = model_entries(metadata)
    if not model:
        raise CkptEmaError(f"no model tensors: every tensor entry is under {OPTIMIZER_PREFIX!r} or an "
                           f"{EXTRA_STATE}", folder)
    masters, optimizers, unmapped = find_masters(metadata, model, folder)
    chosen = {masters.get(fqn, fqn): name for fqn, name in strip_wrapper_prefixes(model).items()}
    optimizer = sum(k.startswith(OPTIMIZER_PREFIX) for k in tensors) - len(masters)
    left_out = [f"{optimizer} optimizer tensors ({OPTIMIZER_PREFIX}*)"] if optimizer else []
    extra = len(tensors) - len(model) - optimizer - len(masters)
    if extra:
        left_out.append(f"{extra} {EXTRA_STATE} tensors")
    values = len(entries) - len(tensors)
    if values:
        left_out.append(f"{values} pickled values (rng_state, {EXTRA_STATE}, ...)")
    said = f"; left out: {', '.join(left_out)}" if left_out else ""
    taken = "the model's entries of the megatron-core checkpoint"
    if masters:
        where = "; ".join(optimizers)
        rest = f" (the other {len(model) - len(masters)}: the model's entries)" if len(masters) < len(model) else ""
        taken = (f"the fp32 master weights in the optimizer state of the megatron-core checkpoint ({where}) for "
                 f"{len(masters)} of the model's {len(model)} tensors{rest}")
    if unmapped:
        taken += (f"; fp32 masters not read, in a layout ckpt-ema does not map to the parameters: {len(unmapped)} "
                  f"entries ({unmapped[0]}, ...; save with Megatron-LM's {MAPPABLE_MASTERS_FLAG} to average the "
                  "masters)")
    return f"{taken}{said}", chosen


def model_entries(metadata: Metadata) -> list[str]:
    """The model's entries: every tensor entry outside ``optimizer.`` that is no ``_extra_state``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return [k for k, e in metadata.state_dict_metadata.items() if isinstance(e, TensorStorageMetadata)
            and not k.startswith(OPTIMIZER_PREFIX) and EXTRA_STATE not in k.split(".")]


def find_masters(metadata: Metadata, model: list[str], folder: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """The fp32 master of each model entry that has one, mappable (model key -> master key: an entry of
    :data:`PARAMETER_MASTERS` ``+ key``, a float32 tensor of the model entry's shape), the optimizers that named
    them, and the entries of masters that cannot be mapped: per parameter but of another dtype or shape
    (megatron-core before 0.14 saved the ``fully_sharded_model_space`` masters flattened), or
    :data:`BUCKET_MASTERS`. Two masters of one model entry are refused in one line."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    masters: dict[str, str] = {}
    optimizers: list[str] = []
    unmapped = sorted(k for k in entries if BUCKET_MASTERS.fullmatch(k))
    found: dict[str, str] = {}
    for prefix, optimizer in PARAMETER_MASTERS:
        for fqn in model:
            master = entries.get(prefix + fqn)
            if master is None:
                continue
            if fqn in found:
                raise CkptEmaError(f"two fp32 masters of {fqn!r} ({found[fqn]!r} and {prefix + fqn!r})", folder)
            found[fqn] = prefix + fqn
            shape, dtype = getattr(master, "size", None), getattr(getattr(master, "properties", None), "dtype", None)
            if (not isinstance(master, TensorStorageMetadata) or shape != getattr(entries[fqn], "size", None)
                    or str(dtype) != f"torch.{MASTER_DTYPE}"):
                unmapped.append(prefix + fqn)
                continue
            masters[fqn] = prefix + fqn
            if f"{prefix}*: {optimizer}" not in optimizers:
                optimizers.append(f"{prefix}*: {optimizer}")
    return masters, optimizers, unmapped


def unmapped_masters(metadata: Metadata, folder: Path) -> list[str]:
    """The entries of the checkpoint (``metadata``, of ``folder``) that hold fp32 masters which are not read
    (:func:`find_masters`): a resume loads them over the model's entries."""
    return find_masters(metadata, model_entries(metadata), folder)[2]


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
    ckpt = DcpCheckpoint(path, folder / METADATA_FILE, choose=choose_model_entries)
    ckpt.entries = {name: [fqn, model_entry_of(fqn)] if model_entry_of(fqn) != fqn else [fqn]
                    for name, (fqn,) in ckpt.entries.items()}
    ckpt.unwritable_copies = unmapped_masters(ckpt.dcp_metadata, folder)
    return ckpt


def model_entry_of(fqn: str) -> str:
    """The model entry whose fp32 master is the entry ``fqn`` (itself when ``fqn`` is no master)."""
    for prefix, _ in PARAMETER_MASTERS:
        if fqn.startswith(prefix):
            return fqn.removeprefix(prefix)
    return fqn


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
