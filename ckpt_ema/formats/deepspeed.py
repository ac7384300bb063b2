"""DeepSpeed ZeRO checkpoint folders (stages 1, 2 and 3), read without DeepSpeed, model code or a GPU.

``engine.save_checkpoint(run)`` writes a tag folder ``run/global_stepN/`` and a ``run/latest`` file naming the
newest tag. In the tag folder:

* ``mp_rank_00_model_states.pt`` (ZeRO 1 and 2) holds the module's full state dict in the training dtype (16-bit
  under bf16/fp16), the buffer names, the parameters' shapes per optimizer group (``param_shapes``), tied
  parameters (``shared_params``), frozen parameters, and ``global_steps``; ZeRO-3 writes one
  ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank with empty placeholders for the partitioned parameters;
* ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``, one per data-parallel rank, holds that rank's partition of
  the full-precision master weights: under ZeRO 1/2 ``single_partition_of_fp32_groups`` (each optimizer group's
  parameters flattened in ``param_shapes`` order, with ``param_alignment_paddings`` between them, padded to a
  multiple of 2 x world size and cut into equal partitions, one per rank, each saved without the padding it holds:
  the last ranks' partitions are shorter or empty); under ZeRO-3 ``fp32_flat_groups`` (each parameter padded to a
  multiple of the world size and cut into equal partitions, rank R holding partition R of every parameter in turn).

The reader reassembles each parameter from those partitions by this metadata, and gives every tensor as DeepSpeed's
own ``zero_to_fp32`` consolidates it: the fp32 masters, floating buffers in float32, frozen parameters in the
module's dtype, tied parameters as their targets. It also gives the frozen parameters of ZeRO-1, which records none
(zero_to_fp32 leaves them out), as the module holds them. Pieces are views of the memory-mapped files: a piece of a
parameter is a view of one rank's partition, or a copy of the few partitions it spans; nothing is loaded whole.
Without optimizer files (ZeRO 1/2) it reads the module's own weights, in their dtype, and says that. Every count is
checked before use: one optimizer file per rank, partitions that are equal but for the padding cut from the end,
parameters that use up exactly the partitioned elements (up to DeepSpeed's alignment padding), each name recorded
once.

The files pickle a few DeepSpeed types beside the tensors (the ZeRO stage enum, the loss scaler's record, the
fragment addresses of the ZeRO-1/2 optimizer). They are loaded weights-only through :data:`DEEPSPEED_SAFE_GLOBALS`,
stand-ins defined here under DeepSpeed's names: records that only receive attributes, never DeepSpeed's code.
"""

from __future__ import annotations

import bisect
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.base import Checkpoint, Format, PartedCheckpoint
from ckpt_ema.formats.torch_save import torch_file_is_complete, torch_load_safely
from ckpt_ema.formats.trainer_state import is_trainer_folder, trainer_step, with_trainer_state

LATEST_FILE = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 1 and 2
ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt")
OPTIM_STATES = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
# Model or pipeline parallel layouts: model state files of other model-parallel ranks, or per-layer files.
PARALLEL_STATES = re.compile(r"(?:zero_pp_rank_\d+_)?mp_rank_(?!00_)\d+_model_states\.pt|layer_\d+-model_states\.pt")


class ZeroStageEnum(enum.IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum``, an IntEnum of the ZeRO stage."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScalerRecord:
    """Stand-in for DeepSpeed's loss scalers: a record of the attributes pickled with it, never used."""


class FragmentAddressRecord:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (numel, start): a record, never used."""


DEEPSPEED_SAFE_GLOBALS: list[Any] = [
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (LossScalerRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScalerRecord, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (FragmentAddressRecord, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def is_tag_folder(folder: Path) -> bool:
    """A DeepSpeed tag folder: it holds the model states of ZeRO 1/2 or of ZeRO-3's rank 0."""
    return (folder / MODEL_STATES).is_file() or (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()


def is_deepspeed_checkpoint(folder: Path) -> bool:
    """A tag folder, or a Hugging Face Trainer's checkpoint folder whose ``latest`` names the tag folder inside it."""
    return is_tag_folder(folder) or ((folder / LATEST_FILE).is_file() and is_trainer_folder(folder))


def latest_tag(folder: Path) -> Path | None:
    """The tag folder that ``folder/latest`` names (None without a ``latest`` file); an error when it names
    nothing here, even if other tag folders are intact: the run's newest checkpoint is then lost or partial."""
    latest = folder / LATEST_FILE
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CkptEmaError(f"unreadable: {exc}", latest) from None
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise CkptEmaError(f"holds {tag[:40]!r}, not the name of a checkpoint tag", latest)
    if not is_tag_folder(folder / tag):
        raise CkptEmaError(f"names the checkpoint {tag}, which is not in {folder} (missing or without its model "
                           "states)", latest)
    return folder / tag


def load_deepspeed_file(path: Path) -> Any:
    """One DeepSpeed ``.pt`` file, weights-only and mapped, with the DeepSpeed stand-ins allowed."""
    return torch_load_safely(path, DEEPSPEED_SAFE_GLOBALS)


@dataclass(frozen=True)
class _Segment:
    """A run of a parameter's elements held in one place: elements [start, start + len(source)) of the flat
    parameter are ``source`` (a 1-d view of a mapped file)."""

    start: int
    source: torch.Tensor


class DeepSpeedCheckpoint(PartedCheckpoint):
    """The weights of one DeepSpeed checkpoint: a tag folder, or a folder whose ``latest`` names one (a Hugging
    Face Trainer's ``checkpoint-N/`` under DeepSpeed)."""

    def __init__(self, path: Path) -> None:
        tag = path if is_tag_folder(path) else latest_tag(path)
        if tag is None:
            raise CkptEmaError(f"not a DeepSpeed checkpoint: no {MODEL_STATES} and no {LATEST_FILE} file", path)
        files = {p.name: p for p in tag.iterdir() if p.is_file()}
        parallel = sorted(n for n in files if PARALLEL_STATES.fullmatch(n))
        if parallel:
            raise CkptEmaError(f"a model- or pipeline-parallel DeepSpeed checkpoint ({parallel[0]}): only data-parallel "
                               "ZeRO checkpoints are read", tag)
        zero3 = _by_rank(files, ZERO3_MODEL_STATES, tag, "model states")
        model_file = zero3[0] if zero3 else files[MODEL_STATES]
        states = load_deepspeed_file(model_file)
        module, groups, buffer_names, shared = _model_states(states, model_file)
        for other in zero3[1:]:  # every rank's model states: a partial checkpoint is refused, not half read
            if _model_states(load_deepspeed_file(other), other)[1] != groups:
                raise CkptEmaError(f"its param_shapes differ from {model_file.name}'s", other)
        meta = {"global_step": states["global_steps"]} if _is_count(states.get("global_steps")) else {}
        super().__init__(path=path, names=[], metadata=meta)
        self.tag = tag
        self._shape: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._segments: dict[str, list[_Segment]] = {}
        optim = _by_rank(files, OPTIM_STATES, tag, "optimizer states")
        stage = None
        if not zero3:  # ZeRO 1/2 modules hold every trained parameter whole, in the training dtype
            for name, shape in (item for group in groups for item in group):
                _module_tensor(module, name, shape, model_file)
        if optim:
            parts = [_optimizer_part(load_deepspeed_file(f), f) for f in optim]
            stage, world = _stage_and_world(parts, len(optim), tag)
            if zero3 and (stage != 3 or len(zero3) != world):
                raise CkptEmaError(f"{len(zero3)} ZeRO-3 model state files for {world} optimizer files of stage {stage}", tag)
            if stage <= 2:
                self._read_zero12(parts, groups, world, tag)
            else:
                self._read_zero3(parts, groups, world, tag)
            self.weights_from = f"the fp32 master weights of ZeRO-{stage}'s optimizer partitions ({world} ranks)"
        elif zero3:
            raise CkptEmaError("no optimizer files (*_optim_states.pt): under ZeRO-3 the weights are partitioned "
                               "there", tag)
        else:
            for name, shape in (item for group in groups for item in group):
                self._whole(name, _module_tensor(module, name, shape, model_file))
            self.weights_from = "the module's own weights (no optimizer files, so no fp32 masters)"
        self._read_frozen(states, zero3, model_file)
        for name in buffer_names:  # as zero_to_fp32 gives them beside the masters: floating ones in float32
            if name in self._segments:
                raise CkptEmaError(f"{name} is recorded both as a buffer and as a parameter", model_file)
            buffer = _module_tensor(module, name, None, model_file)
            self._whole(name, buffer.float() if optim and buffer.is_floating_point() else buffer)
        for alias, target in shared.items():
            if alias in self._segments:
                raise CkptEmaError(f"shared_params ties {alias}, which is recorded as a tensor of its own", model_file)
            if target in self._segments:
                self._segments[alias] = self._segments[target]
                self._shape[alias] = self._shape[target]
        unrecorded = [n for n in module if n not in self._segments]
        if unrecorded and stage in (None, 1) and not zero3 and states.get("frozen_param_shapes") is None:
            # ZeRO-1 records no frozen parameters (zero_to_fp32 leaves them out): the module holds them whole
            self._read_unrecorded(module, unrecorded, groups, model_file)
            self.weights_from += (f"; {len(unrecorded)} parameter(s) outside the optimizer ({', '.join(unrecorded[:3])})"
                                  " as the module holds them")
            unrecorded = []
        if unrecorded:
            raise CkptEmaError(f"the module holds {', '.join(unrecorded[:3])}, which neither param_shapes, "
                               "buffer_names, shared_params nor the frozen parameters account for", model_file)
        in_order = [n for n in module if n in self._segments]  # the module's own order, then anything else
        self.names = in_order + [n for n in self._segments if n not in in_order]
        self.nbytes = sum(s.source.numel() * s.source.element_size()
                          for n in self._segments for s in self._segments[n])

    def piece(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flat parameter: a view of one partition, or a copy joining the few it
        spans."""
        segments = self._segments[name]
        i = max(bisect.bisect_right([s.start for s in segments], start) - 1, 0)
        parts = []
        while start < stop:
            segment = segments[i]
            local = start - segment.start
            take = min(segment.source.numel() - local, stop - start)
            parts.append(segment.source[local : local + take])
            start += take
            i += 1
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=self._shape[name][1])

    def _whole(self, name: str, t: torch.Tensor) -> None:
        self._segments[name] = [_Segment(0, t.reshape(-1))]
        self._shape[name] = (tuple(t.shape), t.dtype)

    def _read_zero12(self, parts: list[dict], groups: list[list[tuple[str, tuple[int, ...]]]], world: int,
                     tag: Path) -> None:
        """ZeRO 1/2: group g's flat vector is the ranks' partitions end to end; its parameters follow one another
        in it, in ``param_shapes`` order, with their alignment paddings between them. DeepSpeed pads the group to a
        multiple of 2 x world size, cuts it into equal partitions and saves each without the padding it holds, so
        the last ranks' partitions may be shorter, or empty."""
        flats = [_tensor_list(p, "single_partition_of_fp32_groups", tag) for p in parts]
        for r, f in enumerate(flats):
            if len(f) != len(groups):
                raise CkptEmaError(f"rank {r}'s optimizer file holds {len(f)} partitioned groups for the {len(groups)} "
                                   "groups of param_shapes", tag)
        paddings = _alignment_paddings(parts, groups, tag)
        for g, params in enumerate(groups):
            partitions = [f[g] for f in flats]
            bounds = _partition_bounds(partitions, g, tag)
            offset = 0
            for (name, shape), gap in zip(params, paddings[g]):
                numel = math.prod(shape)
                if offset + numel > bounds[-1]:
                    raise CkptEmaError(f"{name} lies beyond the {bounds[-1]} elements of group {g}'s partitions", tag)
                self._segments[name] = _span(partitions, bounds, offset, numel)
                self._shape[name] = (shape, partitions[0].dtype)
                offset += numel + gap
            align = 2 * world  # what is left after the parameters is padding: less than one alignment step
            if -(-offset // align) != -(-bounds[-1] // align):
                raise CkptEmaError(f"group {g}'s parameters fill {offset} of its {bounds[-1]} partitioned elements", tag)

    def _read_zero3(self, parts: list[dict], groups: list[list[tuple[str, tuple[int, ...]]]], world: int,
                    tag: Path) -> None:
        """ZeRO-3: each parameter is padded to ceil(numel / world) x world elements and rank R holds partition R;
        a rank's groups, end to end, hold its partition of every parameter in ``param_shapes`` order."""
        flats = [_tensor_list(p, "fp32_flat_groups", tag) for p in parts]
        group_sizes = [t.numel() for t in flats[0]]
        for r, f in enumerate(flats):
            if [t.numel() for t in f] != group_sizes:
                raise CkptEmaError(f"rank {r}'s ZeRO-3 partitions differ in size from rank 0's", tag)
        bounds = [0]
        for n in group_sizes:
            bounds.append(bounds[-1] + n)
        offset = 0
        for name, shape in (item for group in groups for item in group):
            numel = math.prod(shape)
            part = -(-numel // world)
            if offset + part > bounds[-1]:
                raise CkptEmaError(f"{name} lies beyond the {bounds[-1]} elements of each rank's partition", tag)
            segments = []
            for r in range(world):
                lo, hi = r * part, min((r + 1) * part, numel)
                segments += [_Segment(lo + s.start, s.source) for s in _span(flats[r], bounds, offset, hi - lo)]
            self._segments[name] = segments
            self._shape[name] = (shape, flats[0][0].dtype)
            offset += part
        if offset != bounds[-1]:
            raise CkptEmaError(f"the parameters use {offset} of the {bounds[-1]} elements of each rank's partition", tag)

    def _read_unrecorded(self, module: Mapping, names: list[str], groups: list[list[tuple[str, tuple[int, ...]]]],
                         model_file: Path) -> None:
        """The module's tensors that no record names, under ZeRO-1: parameters outside the optimizer, as the module
        holds them. The module's trained parameters are views of the optimizer's flattened groups; a tensor in one
        of those is a trained parameter (or a tie) that param_shapes and shared_params should have named."""
        flat = {_module_tensor(module, n, None, model_file).untyped_storage().data_ptr() for g in groups for n, _ in g}
        for name in names:
            t = _module_tensor(module, name, None, model_file)
            if t.untyped_storage().data_ptr() in flat:
                raise CkptEmaError(f"the module's {name} lies in the optimizer's flattened parameters, but neither "
                                   "param_shapes nor shared_params names it", model_file)
            self._whole(name, t)

    def _read_frozen(self, states: Mapping, zero3: list[Path], model_file: Path) -> None:
        """Frozen parameters (not in the optimizer), in the module's dtype as zero_to_fp32 gives them: under ZeRO-2
        whole in the model states; under ZeRO-3 partitioned like the others, one fragment per rank's model states,
        the last padded."""
        shapes = states.get("frozen_param_shapes") or {}
        if not shapes:
            return
        fragments = [load_deepspeed_file(f).get("frozen_param_fragments") or {} for f in zero3] if zero3 \
            else [states.get("frozen_param_fragments") or {}]
        for name, shape in shapes.items():
            shape = _shape_of(shape, name, model_file)
            if name in self._segments:
                raise CkptEmaError(f"{name} is recorded both as a frozen parameter and as a trained one", model_file)
            found = [f.get(name) for f in fragments]
            pieces = [p for p in found if isinstance(p, torch.Tensor)]
            if len(pieces) != len(found) or any(p.dtype != pieces[0].dtype for p in pieces):
                raise CkptEmaError(f"no stored fragment of the frozen parameter {name} (or fragments of different "
                                   "dtypes)", model_file)
            if not zero3 and tuple(pieces[0].shape) != shape:
                raise CkptEmaError(f"the frozen parameter {name} is stored with shape {list(pieces[0].shape)}, not its "
                                   f"recorded {list(shape)}", model_file)
            numel, segments, at = math.prod(shape), [], 0
            for p in pieces:
                take = min(p.numel(), numel - at)
                if take > 0:
                    segments.append(_Segment(at, p.reshape(-1)[:take]))
                    at += take
            if at != numel:
                raise CkptEmaError(f"the fragments of the frozen parameter {name} hold {at} of its {numel} elements",
                                   model_file)
            self._segments[name] = segments
            self._shape[name] = (shape, pieces[0].dtype)


# ---------------------------------------------------------------------------------------------------- checks


def _by_rank(files: dict[str, Path], pattern: re.Pattern, tag: Path, what: str) -> list[Path]:
    """The files matching ``pattern`` ordered by their rank number, which must run 0, 1, ... without a gap."""
    found = sorted((int(m.group(1)), p) for n, p in files.items() if (m := pattern.fullmatch(n)))
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CkptEmaError(f"the {what} of rank {missing[0] if missing else ranks} are missing (found ranks "
                           f"{', '.join(map(str, ranks))})", tag)
    return [p for _, p in found]


def _model_states(states: Any, path: Path) -> tuple[Mapping, list[list[tuple[str, tuple[int, ...]]]], list[str], dict[str, str]]:
    """The module state dict, parameter shapes per group, buffer names and tied parameters of a model states file."""
    if not isinstance(states, Mapping) or not isinstance(states.get("module"), Mapping) \
            or not isinstance(states.get("param_shapes"), list):
        raise CkptEmaError("not DeepSpeed model states (no module and param_shapes)", path)
    groups = []
    for group in states["param_shapes"]:
        if not isinstance(group, Mapping):
            raise CkptEmaError("param_shapes holds something other than a name -> shape mapping", path)
        groups.append([(str(n), _shape_of(s, n, path)) for n, s in group.items()])
    names = [n for g in groups for n, _ in g]
    if len(set(names)) != len(names):
        raise CkptEmaError("a parameter appears twice in param_shapes", path)
    buffers, shared = states.get("buffer_names"), states.get("shared_params")
    if not isinstance(buffers, list) or not isinstance(shared, Mapping):
        raise CkptEmaError("no buffer_names list or shared_params mapping in the model states", path)
    return states["module"], groups, [str(b) for b in buffers], {str(k): str(v) for k, v in shared.items()}


def _optimizer_part(obj: Any, path: Path) -> dict:
    """The ZeRO optimizer's state in one rank's optimizer file. DeepSpeed's BF16_Optimizer (bf16 ZeRO-1 with fp32
    gradient accumulation) writes its state without a ZeRO stage; zero_to_fp32 refuses it, and so does this."""
    part = obj.get("optimizer_state_dict") if isinstance(obj, Mapping) else None
    if isinstance(part, Mapping) and "zero_stage" not in part and "single_partition_of_fp32_groups" in part:
        raise CkptEmaError("DeepSpeed's BF16_Optimizer state (bf16 ZeRO-1 with fp32 gradient accumulation), which "
                           "records no ZeRO stage: neither ckpt-ema nor DeepSpeed's zero_to_fp32 reads it", path)
    if not isinstance(part, Mapping) or "zero_stage" not in part:
        raise CkptEmaError("not a DeepSpeed ZeRO optimizer file (no optimizer_state_dict with a zero_stage)", path)
    return dict(part)


def _stage_and_world(parts: list[dict], files: int, tag: Path) -> tuple[int, int]:
    """The ZeRO stage and data-parallel world size the optimizer files record; the world size must be the number
    of files (one per rank)."""
    stage = parts[0]["zero_stage"]
    count = parts[0].get("partition_count")
    world = max(count) if isinstance(count, list) and count else count
    if not isinstance(stage, int) or stage not in (1, 2, 3) or not _is_count(world):
        raise CkptEmaError(f"unknown ZeRO stage {stage!r} or partition count {count!r}", tag)
    if isinstance(count, list) and len(set(count)) > 1:  # MoE: expert groups partitioned over fewer ranks
        raise CkptEmaError(f"optimizer groups partitioned over different numbers of ranks ({count}): mixture-of-"
                           "experts partitions are not read", tag)
    if world != files:
        raise CkptEmaError(f"the optimizer state was partitioned over {world} ranks, but {files} optimizer files "
                           "are here", tag)
    if any(p.get("zero_stage") != stage for p in parts):
        raise CkptEmaError("the optimizer files record different ZeRO stages", tag)
    return int(stage), int(world)


def _tensor_list(part: dict, key: str, tag: Path) -> list[torch.Tensor]:
    found = part.get(key)
    if not isinstance(found, list) or not found or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                          for t in found):
        raise CkptEmaError(f"the optimizer files hold no {key}", tag)
    return [t.reshape(-1) for t in found]


def _alignment_paddings(parts: list[dict], groups: list[list[tuple[str, tuple[int, ...]]]],
                        tag: Path) -> list[list[int]]:
    """The padding after each parameter of each ZeRO 1/2 group (``param_alignment_paddings``, the same in every
    rank's file; where it is absent the parameters follow one another directly, as zero_to_fp32 takes it)."""
    recorded = parts[0].get("param_alignment_paddings")
    if any(p.get("param_alignment_paddings") != recorded for p in parts):
        raise CkptEmaError("the optimizer files record different parameter alignment paddings", tag)
    if recorded is None:
        return [[0] * len(params) for params in groups]
    if not isinstance(recorded, list) or len(recorded) != len(groups) or not all(
            isinstance(gaps, list) and len(gaps) == len(params) and all(_is_count(x) for x in gaps)
            for gaps, params in zip(recorded, groups)):
        raise CkptEmaError("param_alignment_paddings does not give one padding per parameter of each group", tag)
    return recorded


def _partition_bounds(partitions: list[torch.Tensor], g: int, tag: Path) -> list[int]:
    """Where each rank's partition of ZeRO 1/2 group ``g`` starts in the group's flat vector, and where the last
    ends. The partitions must be what DeepSpeed saves: equal ones, of one dtype, but for the padding cut from the
    end of the group (full partitions, then at most one shorter, then empty ones)."""
    sizes = [p.numel() for p in partitions]
    full = sizes[0]
    short = [i for i, n in enumerate(sizes) if n < full]
    if any(n > full for n in sizes) or any(sizes[i] for i in short[1:]):
        raise CkptEmaError(f"the ranks' partitions of group {g} hold {sizes} elements: not equal partitions less "
                           "the padding at the group's end", tag)
    if any(p.dtype != partitions[0].dtype for p in partitions):
        raise CkptEmaError(f"the ranks' partitions of group {g} differ in dtype", tag)
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return bounds


def _span(groups: list[torch.Tensor], bounds: list[int], start: int, length: int) -> list[_Segment]:
    """Elements [start, start + length) of a rank's groups laid end to end, as segments (relative starts)."""
    out, at = [], start
    g = bisect.bisect_right(bounds, start) - 1
    while at < start + length:
        local = at - bounds[g]
        take = min(bounds[g + 1] - at, start + length - at)
        if take:  # an empty partition holds nothing of it
            out.append(_Segment(at - start, groups[g][local : local + take]))
        at += take
        g += 1
    return out


def _module_tensor(module: Mapping, name: str, shape: tuple[int, ...] | None, path: Path) -> torch.Tensor:
    t = module.get(name)
    if not isinstance(t, torch.Tensor) or (shape is not None and tuple(t.shape) != shape):
        raise CkptEmaError(f"the module holds no tensor {name!r}" + (f" of shape {list(shape)}" if shape else ""), path)
    return t


def _shape_of(value: Any, name: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(_is_count(x) for x in value):
        raise CkptEmaError(f"the shape recorded for {name!r} is not a shape", path)
    return tuple(value)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ---------------------------------------------------------------------------------------------------- the format


def deepspeed_files(path: Path) -> list[Path]:
    """Every file of the checkpoint's folder (each rank's files; a Trainer's files beside the tag folder)."""
    return sorted(p for p in path.rglob("*") if p.is_file())


def deepspeed_is_complete(path: Path) -> bool:
    """Whether DeepSpeed is done saving the checkpoint at ``path``: every ``.pt`` file of its tag folder is a whole
    zip archive and, where the tag folder has a ``latest`` beside it (written by DeepSpeed once every rank has
    saved), ``latest`` names this tag or was written after every file of it (a later save's)."""
    try:
        tag = path if is_tag_folder(path) else latest_tag(path)
        if tag is None:
            return False
        files = [p for p in tag.iterdir() if p.is_file()]
        if not all(torch_file_is_complete(p) for p in files if p.suffix == ".pt"):
            return False
        latest = tag.parent / LATEST_FILE
        if not latest.is_file():
            return True
        return (latest.read_text().strip() == tag.name
                or latest.stat().st_mtime_ns >= max((p.stat().st_mtime_ns for p in files), default=0))
    except (OSError, UnicodeDecodeError, CkptEmaError):
        return False


def open_deepspeed(path: Path, key: str | None) -> Checkpoint:
    if key is not None:
        raise CkptEmaError(f"--key {key} does not apply to a DeepSpeed checkpoint: its weights are the model's "
                           "parameters and buffers, taken from the partitions", path)
    ckpt = DeepSpeedCheckpoint(path)
    ckpt.metadata = with_trainer_state(path, ckpt.metadata)
    return ckpt


def _check_run(folder: Path) -> None:
    latest_tag(folder)  # a run's `latest` must name a checkpoint that is here


FORMAT = Format(
    name=f"a DeepSpeed checkpoint folder ({MODEL_STATES}, or a {LATEST_FILE} file naming one)",
    suffixes=(),
    recognises=is_deepspeed_checkpoint,
    files=deepspeed_files,
    open=open_deepspeed,
    is_complete=deepspeed_is_complete,
    step=trainer_step,
    check_run=_check_run,
)
