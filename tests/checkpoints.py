"""The fixture table: one small run per checkpoint format, written by the library that writes the format, with each
checkpoint's weights as that library's own loader returns them (the reference every test compares against).

    run = RUNS["dcp_fsdp"]          # made on first use, once per process (pytest: under its temporary folder)
    run.folder                      # what a user gives ckpt-ema
    run.weights[step]               # the checkpoint at ``step`` as torch.distributed.checkpoint loads it

Rows (:data:`FORMATS`): torch.save state dicts and Lightning-style containers, safetensors files, Hugging Face
Trainer ``checkpoint-N/`` folders of a tiny Llama (save_pretrained, whole and sharded with an index), a PEFT LoRA
adapter, torch DCP folders from two gloo ranks (FSDP2, and torchtitan's tensor-parallel layout), Lightning's sharded
checkpoints written by its own Trainer on two gloo ranks (ModelParallelStrategy, FSDPStrategy), and the committed
runs of OLMo-core (:func:`make_olmo_core_run`), DeepSpeed ZeRO (:func:`deepspeed_run`) and megatron-core in
Megatron-LM's and NeMo 2's layouts (:func:`megatron_lm_run`, :func:`nemo2_run`). Nothing is downloaded; nothing
imitates a layout by hand.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEEPSPEED_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "deepspeed"
MEGATRON_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron"
OLMO_ARCHIVE = Path(__file__).resolve().parent / "fixtures" / "olmo_core" / "olmo_core_run.tar.xz"
TORCH_STEPS = (10, 20, 30, 40)
LLAMA_STEPS = (2, 4, 6)
DCP_WORLD = 2
DCP_STEPS = (2, 4, 6)
TP_STEPS = (100, 200)


@dataclass(frozen=True)
class Run:
    """One run of one format as its library wrote it.

    ``entries[step]`` names what in ``folder`` makes up the checkpoint at ``step`` (files or folders, copied in
    that order by :func:`copy_checkpoints`); ``weights[step]`` is that checkpoint's weights as the format's own
    library loads them, under the names ckpt-ema writes; ``load_folder`` reads a model folder written from the run
    (``-o DIR/``) with that library too, or is None where the format has no loader of its own for one.
    """

    name: str
    folder: Path
    entries: Mapping[int, tuple[str, ...]]
    weights: Mapping[int, dict[str, torch.Tensor]]
    load_folder: Callable[[Path], dict[str, torch.Tensor]] | None = None
    weights_file: str = "model.safetensors"  # the weights of a model folder written from the run

    @property
    def steps(self) -> list[int]:
        return sorted(self.entries)


def copy_checkpoints(run: Run, steps: list[int], folder: Path) -> None:
    """Copy the checkpoints of ``run`` at ``steps`` into ``folder``, as the trainer added them (times kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        for name in run.entries[step]:
            source = run.folder / name
            if source.is_dir():
                shutil.copytree(source, folder / name)
            else:
                shutil.copy2(source, folder / name)


# ------------------------------------------------------------------------------------------- torch.save, safetensors


class SmallNet(nn.Module):
    """Embedding (37 rows: no multiple of 2), Linear, BatchNorm (float and int64 buffers), a bias-free Linear, a bare
    5x7 parameter and a bfloat16 Linear (5 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(37, 16)
        self.l1 = nn.Linear(16, 24)
        self.bn = nn.BatchNorm1d(24)
        self.l2 = nn.Linear(24, 8, bias=False)
        self.l2t = nn.Parameter(torch.randn(5, 7))
        self.gate = nn.Linear(8, 5, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l2(self.bn(self.l1(self.emb(x).mean(1))))
        return h.sum(1) + self.gate(h.bfloat16()).float().sum(1) + self.l2t.sum()


def train_small_net(steps: tuple[int, ...]) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
    """SmallNet trained with SGD + momentum (its BatchNorm statistics moving too): (state dict, optimizer state dict)
    at each of ``steps``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    try:
        torch.manual_seed(0)
        model = SmallNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        saved = {}
        for step in range(1, max(steps) + 1):
            x = torch.randint(0, 37, (8, 3))
            (model(x) - x[:, 0].float() / 37).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step in steps:
                saved[step] = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
        return saved
    finally:
        torch.set_num_threads(threads)


def make_torch_state_dicts(folder: Path) -> Run:
    """``torch.save(model.state_dict(), f"ckpt_{step}.pt")``, read back with ``torch.load(weights_only=True)``."""
    folder.mkdir(parents=True)
    for step, (state, _) in train_small_net(TORCH_STEPS).items():
        torch.save(state, folder / f"ckpt_{step}.pt")
    entries = {s: (f"ckpt_{s}.pt",) for s in TORCH_STEPS}
    weights = {s: torch.load(folder / names[0], weights_only=True) for s, names in entries.items()}
    return Run("torch_state_dict", folder, entries, weights)


def make_torch_containers(folder: Path) -> Run:
    """Lightning's container, written with torch.save under Lightning's names (``epoch=0-step=N.ckpt``): the weights
    under ``state_dict`` with the LightningModule's ``model.`` prefix, the step as ``global_step``, the optimizer's
    state beside them."""
    folder.mkdir(parents=True)
    entries = {}
    for step, (state, optim) in train_small_net(TORCH_STEPS).items():
        entries[step] = (f"epoch=0-step={step}.ckpt",)
        torch.save({"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.5.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()}, "optimizer_states": [optim],
                    "lr_schedulers": [], "hyper_parameters": {"lr": 0.01}}, folder / entries[step][0])
    weights = {s: torch.load(folder / names[0], weights_only=True)["state_dict"] for s, names in entries.items()}
    return Run("torch_container", folder, entries, weights)


def make_safetensors_files(folder: Path) -> Run:
    """``safetensors.torch.save_file(state, f"model_{step}.safetensors")``, read back with ``load_file``."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    for step, (state, _) in train_small_net(TORCH_STEPS).items():
        save_file(state, str(folder / f"model_{step}.safetensors"), metadata={"format": "pt"})
    entries = {s: (f"model_{s}.safetensors",) for s in TORCH_STEPS}
    weights = {s: load_file(folder / names[0]) for s, names in entries.items()}
    return Run("safetensors", folder, entries, weights)


# ------------------------------------------------------------------------------------------- transformers, PEFT


def tiny_llama_config() -> LlamaConfig:
    """A Llama of 2 layers, hidden size 16 and 64 tokens, its output layer tied to the embedding."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of 64 tokens, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1} | {f"w{i}": i for i in range(2, 64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _trainer_files(folder: Path, step: int) -> None:
    """What a Hugging Face Trainer saves beside the weights, which an output folder must never copy."""
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"python": step}, folder / "rng_state.pth")


def make_llama_run(folder: Path, steps: tuple[int, ...] = LLAMA_STEPS, *, adapter: bool = False,
                   max_shard_size: str | None = None) -> Path:
    """A Hugging Face Trainer-style run of a tiny Llama (tied embeddings) trained with AdamW: checkpoint-N folders
    saved with save_pretrained (sharded with an index at ``max_shard_size``), with the tokenizer and the trainer's
    files; with ``adapter``, a LoRA fine-tune (PEFT) whose folders hold only the adapter. Also saves the base model
    in ``folder/base``. Returns the run folder, ``folder/run``."""
    from transformers import LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config())
        base.save_pretrained(folder / "base")
        model: LlamaForCausalLM | PeftModel = base
        if adapter:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
        tokenizer = tiny_tokenizer()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = folder / "run"
        for step in range(1, max(steps) + 1):
            x = torch.randint(2, 64, (2, 8))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            if step in steps:
                out = run / f"checkpoint-{step}"
                if max_shard_size is None:
                    model.save_pretrained(str(out))
                else:
                    model.save_pretrained(str(out), max_shard_size=max_shard_size)
                tokenizer.save_pretrained(out)
                _trainer_files(out, step)
        return run
    finally:
        torch.set_num_threads(threads)


def load_pretrained(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder as ``LlamaForCausalLM.from_pretrained`` loads it: its state dict, each tensor once (the output
    layer tied to the embedding is the embedding's, and is not stored)."""
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = LlamaForCausalLM.from_pretrained(folder).state_dict()
    seen: set[int] = set()
    unique = {}
    for name, t in state.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            unique[name] = t.detach().clone()
    return unique


def load_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter folder as PEFT's own ``load_peft_weights`` reads it."""
    from peft.utils import load_peft_weights

    return load_peft_weights(str(folder), device="cpu")


def _llama_row(name: str, folder: Path, load: Callable[[Path], dict[str, torch.Tensor]], weights_file: str,
               **options: object) -> Run:
    run = make_llama_run(folder, **options)  # type: ignore[arg-type]
    entries = {s: (f"checkpoint-{s}",) for s in LLAMA_STEPS}
    weights = {s: load(run / f"checkpoint-{s}") for s in LLAMA_STEPS}
    return Run(name, run, entries, weights, load, weights_file)


def make_hf_trainer_run(folder: Path) -> Run:
    """checkpoint-N/ folders of a tiny Llama, one model.safetensors each, read with from_pretrained."""
    return _llama_row("hf_trainer", folder, load_pretrained, "model.safetensors")


def make_hf_sharded_run(folder: Path) -> Run:
    """checkpoint-N/ folders of a tiny Llama saved with save_pretrained(max_shard_size="10KB"): several shards and
    model.safetensors.index.json each, read with from_pretrained."""
    return _llama_row("hf_sharded", folder, load_pretrained, "model.safetensors", max_shard_size="10KB")


def make_peft_run(folder: Path) -> Run:
    """checkpoint-N/ folders of a LoRA fine-tune of a tiny Llama (PEFT), read with PEFT's load_peft_weights."""
    return _llama_row("peft_lora", folder, load_adapter, "adapter_model.safetensors", adapter=True)


# ------------------------------------------------------------------------------------------- torch DCP


def _dcp_worker(rank: int, out: str, init: str) -> None:
    """One of DCP_WORLD processes: an FSDP2 run of SmallNet (fully_shard, AdamW; the bfloat16 Linear its own group)
    saving {model, optim, train_state} at DCP_STEPS into out/fsdp/step-N; then a tensor-parallel SmallNet
    (dimension-0 shards, uneven dimension-0 bfloat16 and dimension-1 shards) saved torchtitan's way, the model's
    tensors at the top level, into out/tp/step-N."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=DCP_WORLD, init_method=f"file://{init}")
    try:
        torch.manual_seed(0)
        model = SmallNet()
        fully_shard(model.gate)
        fully_shard(model.l1)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(rank)
        for step in range(1, max(DCP_STEPS) + 1):
            model(torch.randint(0, 37, (4, 3), generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step in DCP_STEPS:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd, "train_state": {"step": step}},
                         checkpoint_id=f"{out}/fsdp/step-{step}")
        mesh = init_device_mesh("cpu", (DCP_WORLD,))
        for step in TP_STEPS:
            torch.manual_seed(step)
            tp = SmallNet()
            parallelize_module(tp, mesh, {"l1": ColwiseParallel(), "l2": RowwiseParallel(), "gate": ColwiseParallel()})
            state = tp.state_dict()
            state["l2t"] = distribute_tensor(tp.l2t.detach(), mesh, [Shard(1)])  # 7 columns: 4 and 3
            dcp.save({**state, "train_state": {"step": step}, "dataloader": {"position": step}},
                     checkpoint_id=f"{out}/tp/step-{step}")
        # Both ranks done before either tears gloo down: a rank whose peer closed the connections first died once in
        # the teardown ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_dcp_runs(folder: Path) -> tuple[Path, Path]:
    """Write the DCP runs of :func:`_dcp_worker` with DCP_WORLD processes; returns (fsdp run, tp run).

    The ranks write into a temporary folder of a fixed name length, moved to ``folder`` after: each .metadata
    records the path it was saved to, and the fuzzing harness's mutants (positions drawn from a file's size) must
    not depend on where pytest keeps its temporary files."""
    import torch.multiprocessing as mp

    written = Path(tempfile.mkdtemp(prefix="ckpt_ema_dcp_"))
    try:
        mp.spawn(_dcp_worker, args=(str(written), str(written / "init")), nprocs=DCP_WORLD)
        folder.mkdir(parents=True, exist_ok=True)
        for run in ("fsdp", "tp"):
            shutil.move(written / run, folder / run)
    finally:
        shutil.rmtree(written, ignore_errors=True)
    return folder / "fsdp", folder / "tp"


def dcp_model(folder: Path, key: str | None = "model") -> dict[str, torch.Tensor]:
    """The model of a DCP checkpoint as PyTorch consolidates it: dcp_to_torch_save, then the ``key`` entry (None:
    the top-level tensors)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.consolidated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(folder, out)
    state = torch.load(out, weights_only=False)
    out.unlink()
    if key is None:
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state[key]


def _dcp_row(name: str, run: Path, steps: tuple[int, ...], key: str | None) -> Run:
    entries = {s: (f"step-{s}",) for s in steps}
    return Run(name, run, entries, {s: dcp_model(run / f"step-{s}", key) for s in steps})


def make_dcp_fsdp_run(folder: Path) -> Run:
    """FSDP2 under two gloo ranks, saved with dcp.save: {model, optim, train_state} per step-N/ folder."""
    return _dcp_row("dcp_fsdp", _dcp_written(folder)[0], DCP_STEPS, "model")


def make_dcp_tp_run(folder: Path) -> Run:
    """Tensor-parallel DTensors saved torchtitan's way (the model's tensors at the top level)."""
    return _dcp_row("dcp_tp", _dcp_written(folder)[1], TP_STEPS, None)


def _dcp_written(folder: Path) -> tuple[Path, Path]:
    """Both DCP runs, written by one spawn of the ranks into the table's ``dcp`` folder beside ``folder``."""
    shared = folder.parent / "dcp"
    if not shared.exists():
        make_dcp_runs(shared)
    return shared / "fsdp", shared / "tp"


# ------------------------------------------------------------------------------------------- Lightning

# Lightning's sharded strategies: the DCP entry holding the LightningModule's state dict.
LIGHTNING_STRATEGIES = {"model_parallel": "state_dict", "fsdp": "model"}
LIGHTNING_STEPS = (2, 4, 6)


def make_lightning_runs(folder: Path) -> dict[str, Path]:
    """The runs of tests/lightning_sharded_run.py, one per strategy of LIGHTNING_STRATEGIES, each a Trainer on two CPU
    processes (started together, as independent commands): ``folder/STRATEGY``."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent / "lightning_sharded_run.py"
    started = {name: subprocess.Popen([sys.executable, str(script), name, str(folder / name)], cwd=folder.parent,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name in LIGHTNING_STRATEGIES}
    for name, proc in started.items():
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the Lightning run {name} failed ({proc.returncode}):\n{output[-4000:]}")
    return {name: folder / name for name in LIGHTNING_STRATEGIES}


def _lightning_row(folder: Path, strategy: str) -> Run:
    """The run of ``strategy`` (both made by one :func:`make_lightning_runs` into the table's ``lightning`` folder),
    each checkpoint's model as PyTorch consolidates the DCP folder: the entry Lightning saves it under."""
    shared = folder.parent / "lightning"
    if not shared.exists():
        make_lightning_runs(shared)
    run = shared / strategy
    entries = {s: (next(p.name for p in run.glob(f"epoch=*-step={s}.ckpt")),) for s in LIGHTNING_STEPS}
    return Run(f"dcp_lightning_{strategy}", run, entries,
               {s: dcp_model(run / names[0], LIGHTNING_STRATEGIES[strategy]) for s, names in entries.items()})


def make_lightning_model_parallel_run(folder: Path) -> Run:
    """Lightning's ModelParallelStrategy (FSDP2 in configure_model, a bfloat16 Linear), two gloo ranks: sharded
    ``epoch=E-step=N.ckpt/`` folders with meta.pt, the model under ``state_dict``."""
    return _lightning_row(folder, "model_parallel")


def make_lightning_fsdp_run(folder: Path) -> Run:
    """Lightning's FSDPStrategy(state_dict_type="sharded") in bf16-true precision (FSDP1), two gloo ranks: sharded
    ``epoch=E-step=N.ckpt/`` folders with meta.pt, the model under ``model``."""
    return _lightning_row(folder, "fsdp")


# ------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_run(name: str) -> Run:
    """The committed DeepSpeed run ``tests/fixtures/deepspeed/NAME/`` (global_stepN/ tag folders and ``latest``, as
    DeepSpeed's save_checkpoint lays them out), with what DeepSpeed's own zero_to_fp32 consolidated from each tag
    (``reference/NAME-global_stepN.safetensors``). A parameter zero_to_fp32 leaves out (ZeRO-1's frozen one, which
    its optimizer never holds) is the module's, as torch.load reads DeepSpeed's model-states file. With
    :func:`deepspeed_names`, the only code that knows this layout."""
    from safetensors.torch import load_file

    folder = DEEPSPEED_FIXTURES / name
    tags = sorted((p.name for p in folder.glob("global_step*") if p.is_dir()), key=lambda t: int(t[len("global_step"):]))
    entries = {int(t[len("global_step"):]): (t,) for t in tags}
    weights = {}
    for step, (tag,) in entries.items():
        weights[step] = load_file(DEEPSPEED_FIXTURES / "reference" / f"{name}-{tag}.safetensors")
        module_states = folder / tag / "mp_rank_00_model_states.pt"
        if module_states.is_file():
            module = torch.load(module_states, map_location="cpu", weights_only=True)["module"]
            weights[step] |= {n: t for n, t in module.items() if n not in weights[step]}
    return Run(f"deepspeed_{name}", folder, entries, weights)


def deepspeed_names() -> list[str]:
    """The committed DeepSpeed runs that zero_to_fp32 consolidates (those it refuses have no reference), by name."""
    return sorted({p.name.rpartition("-global_step")[0] for p in (DEEPSPEED_FIXTURES / "reference").glob("*.safetensors")})


# ------------------------------------------------------------------------------------------- megatron-core


def megatron_lm_run() -> Run:
    """The committed Megatron-LM run ``tests/fixtures/megatron/megatron/`` (iter_000000N/ torch_dist folders and
    latest_checkpointed_iteration.txt, written by megatron-core itself: scripts/make_megatron_fixtures.py), with the
    model's weights as megatron-core's own load_plain_tensors returned them (``reference/megatron-N.safetensors``)."""
    from safetensors.torch import load_file

    steps = (2, 4, 6)
    entries = {s: (f"iter_{s:07d}",) for s in steps}
    weights = {s: load_file(MEGATRON_FIXTURES / "reference" / f"megatron-{s}.safetensors") for s in steps}
    return Run("megatron_lm", MEGATRON_FIXTURES / "megatron", entries, weights)


def nemo2_run() -> Run:
    """The committed NeMo 2 run ``tests/fixtures/megatron/nemo/checkpoints/`` (megatron-core's torch_dist output in
    NeMo 2's ``...-step=N-consumed_samples=M/weights/`` layout, bfloat16, with the ``-last`` copy of the newest),
    with the weights megatron-core's own load_plain_tensors returned (``reference/nemo-N.safetensors``)."""
    from safetensors.torch import load_file

    steps = (2, 4)
    entries = {s: (f"default--val_loss=0.00-step={s}-consumed_samples={float(4 * s)}",) for s in steps}
    weights = {s: load_file(MEGATRON_FIXTURES / "reference" / f"nemo-{s}.safetensors") for s in steps}
    return Run("nemo2", MEGATRON_FIXTURES / "nemo" / "checkpoints", entries, weights)


def megatron_masters_run() -> Run:
    """The committed bfloat16 Megatron-LM run whose optimizer (megatron-core's Float16OptimizerWithFloat16Params)
    keeps an fp32 master per parameter (``tests/fixtures/megatron/masters/float16/``), with the masters as
    megatron-core's own load_plain_tensors returned them (``reference/masters-float16-N.safetensors``): the weights
    an average of the run is made from."""
    from safetensors.torch import load_file

    steps = (2, 4)
    entries = {s: (f"iter_{s:07d}",) for s in steps}
    weights = {s: load_file(MEGATRON_FIXTURES / "reference" / f"masters-float16-{s}.safetensors") for s in steps}
    return Run("megatron_fp32_masters", MEGATRON_FIXTURES / "masters" / "float16", entries, weights)


# ------------------------------------------------------------------------------------------- OLMo-core


def make_olmo_core_run(folder: Path) -> Run:
    """The committed OLMo-core run (``stepN/`` folders written by ai2-olmo-core 3.0.0's own Trainer, FSDP over two
    gloo ranks: scripts/make_olmo_fixtures.py), unpacked, with each checkpoint's model as OLMo-core's own
    load_model_and_optim_state loaded it (``reference/stepN.safetensors``)."""
    import tarfile

    from safetensors.torch import load_file

    with tarfile.open(OLMO_ARCHIVE) as tar:
        tar.extractall(folder, filter="data")
    steps = sorted(int(p.name[len("step"):]) for p in (folder / "run").glob("step*"))
    return Run("olmo_core", folder / "run", {s: (f"step{s}",) for s in steps},
               {s: load_file(folder / "reference" / f"step{s}.safetensors") for s in steps})


# ------------------------------------------------------------------------------------------- the table

MAKERS: dict[str, Callable[[Path], Run]] = {
    "torch_state_dict": make_torch_state_dicts,
    "torch_container": make_torch_containers,
    "safetensors": make_safetensors_files,
    "hf_trainer": make_hf_trainer_run,
    "hf_sharded": make_hf_sharded_run,
    "peft_lora": make_peft_run,
    "dcp_fsdp": make_dcp_fsdp_run,
    "dcp_tp": make_dcp_tp_run,
    "dcp_lightning_model_parallel": make_lightning_model_parallel_run,
    "dcp_lightning_fsdp": make_lightning_fsdp_run,
    "olmo_core": make_olmo_core_run,
}
# Runs committed under tests/fixtures/ (written by libraries that do not run in a test session).
COMMITTED: dict[str, Callable[[], Run]] = {"megatron_lm": megatron_lm_run, "nemo2": nemo2_run,
                                           "megatron_fp32_masters": megatron_masters_run}
FORMATS = [*MAKERS, *COMMITTED, *(f"deepspeed_{name}" for name in deepspeed_names())]


@dataclass
class RunTable:
    """Every row of the table, each made on first use into ``root`` and kept for the process.

    ``root`` is pytest's temporary folder under the tests (tests/conftest.py sets it); elsewhere a temporary folder
    removed at exit."""

    root: Path | None = None
    _made: dict[str, Run] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Run:
        if name not in self._made:
            if name.startswith("deepspeed_"):
                self._made[name] = deepspeed_run(name.removeprefix("deepspeed_"))
            elif name in COMMITTED:
                self._made[name] = COMMITTED[name]()
            else:
                self._made[name] = MAKERS[name](self._root() / name)
        return self._made[name]

    def _root(self) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="ckpt_ema_runs_"))
            atexit.register(shutil.rmtree, self.root, True)
        return self.root


RUNS = RunTable()
