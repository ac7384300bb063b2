"""Write the Megatron-core and NeMo 2 fixtures of ``tests/test_megatron.py`` with megatron-core 0.16.1 itself.

    PYTHONPATH=$PWD /work/main/.venv/bin/python scripts/make_megatron_fixtures.py [OUT [LAYOUT...]]
    (OUT: tests/fixtures/megatron by default; LAYOUT: megatron, nemo, masters, all three by default; the layouts
    named are written again, the others left as they are)

Two processes (gloo, CPU) train megatron-core's own ``GPTModel`` with tensor parallel 2 for a few steps and save it
with megatron-core's own ``dist_checkpointing.save`` (its ``torch_dist`` backend) in two layouts:

* ``OUT/megatron/``: Megatron-LM's (``megatron/training/checkpointing.py``): ``iter_0000002/``, ``iter_0000004/``,
  ``iter_0000006/`` each holding ``.metadata``, ``__R_T.distcp`` (two writer threads per rank, megatron-core's
  default), ``common.pt`` and ``metadata.json``, and
  ``latest_checkpointed_iteration.txt`` written after each save. The saved dict is what Megatron-LM's
  ``generate_state_dict`` builds: ``args`` (an ``argparse.Namespace`` of this run's settings, with megatron-core's
  ``AttnBackend`` enum), ``checkpoint_version``, ``iteration``, ``model`` (the model's sharded state dict: keys
  without prefix, the layers stacked on a leading dimension), ``optimizer`` (megatron-core's ``FP32Optimizer``
  around Adam: ``optimizer.state.exp_avg.*``, ``optimizer.state.exp_avg_sq.*``), ``opt_param_scheduler`` and
  ``rng_state`` (a ``ShardedObject`` per rank). float32.
* ``OUT/nemo/checkpoints/``: NeMo 2's, which cannot run here, so megatron-core's output is placed where NeMo 2's
  source puts it (``nemo/lightning/io/pl.py``, ``MegatronCheckpointIO.save_checkpoint``; ``nemo/lightning/
  megatron_parallel.py``; ``nemo/collections/llm/recipes/log/default.py``): a folder per checkpoint named
  ``{model_name}--{val_loss:.2f}-{step}-{consumed_samples}`` (``default--val_loss=0.00-step=2-consumed_samples=8.0``,
  ``...-step=4-...``) with the ``torch_dist`` checkpoint in its ``weights/`` subfolder, saved through ``FullyParallelSaveStrategyWrapper``
  as NeMo's default does; the model's keys under NeMo's ``module.`` prefix, the optimizer's under ``optimizer``
  (a list of one), Lightning's plain entries beside; and the ``-last`` copy that ``ModelCheckpoint(save_last=True)``
  saves of the newest one. bfloat16 parameters (the model wrapped in megatron-core's ``Float16Module``; Adam
  steps them in bfloat16). NeMo's ``context/`` folder (its model config, written by NeMo's own IO) is not made.
* ``OUT/reference/{megatron,nemo}-STEP.safetensors``: each checkpoint's model weights, whole (tensor-parallel
  shards merged), as megatron-core's own loader returns them (``dist_checkpointing.load_plain_tensors``), under
  the model's own keys (those of ``GPTModel.sharded_state_dict()`` that are tensors: no optimizer entry, no
  ``_extra_state``).
* ``OUT/masters/``: bfloat16 runs whose optimizer keeps fp32 master copies of the parameters, in Megatron-LM's
  layout, one folder per way megatron-core names them in ``optimizer.sharded_state_dict``:

  - ``float16/iter_000000{2,4}/``: ``Float16OptimizerWithFloat16Params`` (tensor parallel 2), whose masters are
    ``optimizer.state.fp32_param.KEY`` (KEY: the model entry's key), sharded as the model entry is;
  - ``fully_reshardable/iter_000000{2,4}/``: the ``DistributedOptimizer`` (data parallel 2, tensor parallel 1:
    each rank steps half of the flat buffer) saved with ``distrib_optim_sharding_type="fully_reshardable"``:
    masters gathered into ``optimizer.state.param.KEY`` of the model entry's shape (gathered on data-parallel
    rank 0 through gloo: ``distrib_optim_fully_reshardable_mem_efficient``);
  - ``dp_reshardable/iter_0000002/``: the same run's step 2 saved with ``"dp_reshardable"`` (Megatron-LM's default
    for the distributed optimizer): masters in the optimizer's flat buckets,
    ``optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32).bucket_idx_0.param``,
    which name no parameter.

  megatron-core 0.16.1 cannot save its default ``fully_sharded_model_space`` (per-parameter
  ``optimizer.state.fp32_param.KEY`` pieces with a ``flattened_range``: "ShardedTensor.flattened_range is not
  supported"), and ``dp_zero_gather_scatter`` (one pickled ``optimizer.distributed.dp_group_idx_N.param_state``)
  gathers on the GPU: neither is made.
* ``OUT/reference/masters-{float16,fully_reshardable}-STEP.safetensors``: each of those checkpoints' masters, whole,
  as ``dist_checkpointing.load_plain_tensors`` returns them, under the model's keys (float32);
  ``OUT/reference/masters-dp_reshardable-2.safetensors``: that checkpoint's model weights (bfloat16).

The model: 2 layers (stacked on a leading dimension in the checkpoint), RMSNorm, rotary positions, no biases (few
tensors: every stored piece costs a zip archive's headers, and the fixtures stay small). Sizes that do not divide
evenly where megatron-core allows it: a vocabulary of 46 (23 rows per rank; megatron-core requires it to divide by
the tensor-parallel size), hidden size 13 (not a multiple of the 2 heads: kv_channels 4), FFN 22 (11 columns per
rank).

CPU accommodations (megatron-core assumes a GPU in a few places of its writer and optimizer):

* ``torch.cuda.synchronize`` is a no-op (the writer calls it after moving tensors to the CPU, where they are);
* ``torch.cuda.current_device`` returns ``"cpu"`` (the writer broadcasts its failure flag on that device);
* ``FP32Optimizer.__init__`` is replaced by one that puts its constant loss scale of 1 on the CPU (the original
  makes it with ``device='cuda'``); its ``sharded_state_dict`` (what is saved) is megatron-core's own;
* the CUDA random-state tracker's ``fork`` (which switches to the GPU's model-parallel random state around
  dropout) does nothing: dropout is 0, so nothing random is drawn inside it;
* the weights are initialised on the CPU (``use_cpu_initialization``), with no fused kernels, and gradients are
  not clipped (``clip_grad=0``: megatron-core's gradient norm allocates on the GPU);
* for the masters' runs: ``MixedPrecisionOptimizer.__init__`` is replaced by one that sets what the original
  does for bfloat16 with no gradient scaler, its unit loss scale on the CPU (the original makes it with
  ``device='cuda'``); while the optimizers are built, a parameter's ``type()`` names its CUDA type
  (``torch.cuda.BFloat16Tensor``: megatron-core sorts parameters into bfloat16 and fp32 by that name); and the
  ``ChainedOptimizer`` around the distributed optimizer reports a gradient norm of 0 (it computes one on the GPU
  at every step, to log it; nothing is clipped).

It takes about a minute on two cores, and the masters' runs about as long again. The fixtures are ~1.3 MB on disk
(each stored piece of a tensor is a ``torch.save`` zip archive with ~1.3 KB of headers), ~300 KB compressed, and
the masters' another ~1.3 MB.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
VOCAB, HIDDEN, HEADS, KV_CHANNELS, FFN, LAYERS, SEQ = 46, 13, 2, 4, 22, 2, 8
BATCH = 4
SAVE_EVERY = 2
STEPS = {"megatron": 6, "nemo": 4}  # Megatron-LM: iterations 2, 4, 6; NeMo 2: steps 2, 4 and the -last copy of 4
LAYOUTS = ("megatron", "nemo", "masters")
FLOAT16_STEPS, DISTRIBUTED_STEPS, BUCKETS_STEP = 4, 4, 2  # masters/float16 and fully_reshardable: 2, 4
FLOAT16_MASTERS = "optimizer.state.fp32_param."  # Float16OptimizerWithFloat16Params's name before the model's key
RESHARDABLE_MASTERS = "optimizer.state.param."  # the DistributedOptimizer's, in its fully_reshardable format
NEMO_PREFIX = "module."  # NeMo 2's MegatronParallel saves the megatron-core model under this prefix
TRACKER = "latest_checkpointed_iteration.txt"


def accommodate_cpu() -> None:
    """The CPU accommodations of the module docstring."""
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]

    def init_on_cpu(self, optimizer, config, init_state_fn):  # type: ignore[no-untyped-def]
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self._scale = torch.tensor([1.0])
        self.is_stub_optimizer = optimizer is None

    FP32Optimizer.__init__ = init_on_cpu  # type: ignore[method-assign]
    CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()  # type: ignore[method-assign]


def accommodate_mixed_precision() -> None:
    """The CPU accommodations of the masters' runs (module docstring), but for the parameters' type names."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer, MegatronOptimizer, MixedPrecisionOptimizer

    def init_on_cpu(self, optimizer, config, grad_scaler, init_state_fn):  # type: ignore[no-untyped-def]
        assert config.bf16 and grad_scaler is None  # the case these runs make, and the only one set up here
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self.grad_scaler = None
        self._dummy_overflow_buf = None
        self._scale_one = torch.tensor([1.0])

    MixedPrecisionOptimizer.__init__ = init_on_cpu  # type: ignore[method-assign]
    ChainedOptimizer.get_grad_norm = lambda self: 0.0  # type: ignore[method-assign]


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """While megatron-core's mixed-precision optimizers sort the parameters by ``param.type()``, a CPU parameter
    answers with its CUDA type's name (``torch.BFloat16Tensor`` -> ``torch.cuda.BFloat16Tensor``)."""
    own = torch.nn.Parameter.type

    def cuda_name(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return own(self, *args, **kwargs) if args or kwargs else own(self).replace("torch.", "torch.cuda.", 1)

    torch.nn.Parameter.type = cuda_name  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Parameter.type = own  # type: ignore[method-assign]


def build_model(dtype: torch.dtype, tensor_parallel: int = WORLD):  # type: ignore[no-untyped-def]
    """megatron-core's GPTModel with the tiny configuration of the module docstring, on this rank's shard; in
    bfloat16 wrapped in megatron-core's ``Float16Module``, as Megatron-LM and NeMo 2 train it."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, kv_channels=KV_CHANNELS,
        ffn_hidden_size=FFN, tensor_model_parallel_size=tensor_parallel, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        bias_dropout_fusion=False,
    )
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return Float16Module(config, model) if dtype == torch.bfloat16 else model


def build_optimizer(model):  # type: ignore[no-untyped-def]
    """megatron-core's FP32Optimizer around torch's Adam (no distributed optimizer: one data-parallel rank)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    return FP32Optimizer(adam, OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0), lambda *args: None)


def build_float16_optimizer(model):  # type: ignore[no-untyped-def]
    """megatron-core's Float16OptimizerWithFloat16Params around torch's Adam: fp32 masters of the bfloat16
    parameters, stepped by Adam and copied back into the model, rounded, after each step."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, bf16=True)
    with cuda_type_names():
        return Float16OptimizerWithFloat16Params(adam, config, None, lambda *args: None)


def build_distributed(model):  # type: ignore[no-untyped-def]
    """The model in megatron-core's DistributedDataParallel, and megatron-core's DistributedOptimizer (Adam) over
    its buffers, as Megatron-LM builds them (``get_megatron_optimizer``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    wrapped = DistributedDataParallel(model.config, ddp_config, model)
    config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, bf16=True, use_distributed_optimizer=True)
    with cuda_type_names():
        return wrapped, get_megatron_optimizer(config, [wrapped])


def train_step(model, optimizer, step: int) -> None:  # type: ignore[no-untyped-def]
    """One step on random tokens, the same on both ranks (tensor parallel: every rank sees the whole batch); a model
    in megatron-core's DistributedDataParallel has its gradient buffer zeroed and reduced, as Megatron-LM does."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).expand(BATCH, 1, SEQ, SEQ)
    loss = model(tokens[:, :-1], positions, causal, labels=tokens[:, 1:]).float().mean()
    data_parallel = hasattr(model, "finish_grad_sync")
    if data_parallel:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    loss.backward()
    if data_parallel:
        model.finish_grad_sync()
    optimizer.step()


def run_args(dtype: torch.dtype, tensor_parallel: int = WORLD) -> argparse.Namespace:
    """The ``args`` Megatron-LM saves in ``common.pt``: this run's settings under Megatron-LM's argument names."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                              kv_channels=KV_CHANNELS, ffn_hidden_size=FFN, padded_vocab_size=VOCAB,
                              seq_length=SEQ, max_position_embeddings=SEQ, tensor_model_parallel_size=tensor_parallel,
                              pipeline_model_parallel_size=1, params_dtype=dtype, ckpt_format="torch_dist",
                              attention_backend=AttnBackend.auto, micro_batch_size=BATCH, lr=1e-2)


def rng_state(key: str):  # type: ignore[no-untyped-def]
    """This rank's random states as Megatron-LM saves them: one ShardedObject per tensor-parallel rank, saved by
    data-parallel rank 0."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, ranks = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    state = [{"random_rng_state": None, "torch_rng_state": torch.get_rng_state()}]
    return ShardedObject(key, state, (1, ranks), (0, rank), replica_id=parallel_state.get_data_parallel_rank())


def save_megatron(root: Path, model, optimizer, iteration: int, dtype: torch.dtype,  # type: ignore[no-untyped-def]
                  tensor_parallel: int = WORLD, sharding: dict | None = None) -> None:
    """Megatron-LM's save: ``root/iter_NNNNNNN/`` by ``dist_checkpointing.save``, then the tracker file
    (``sharding``: the distributed optimizer's checkpoint format, the metadata Megatron-LM passes it)."""
    from megatron.core import dist_checkpointing

    folder = root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {"args": run_args(dtype, tensor_parallel), "checkpoint_version": 3.0, "iteration": iteration,
             "model": model.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=sharding)
    state["opt_param_scheduler"] = {"num_steps": iteration * BATCH, "max_lr": 1e-2}
    state["rng_state"] = rng_state("rng_state")
    state["num_floating_point_operations_so_far"] = 0
    dist_checkpointing.save(state, str(folder))
    if dist.get_rank() == 0:
        (root / TRACKER).write_text(str(iteration))
    dist.barrier()


def save_nemo(root: Path, model, optimizer, step: int, last: bool) -> None:  # type: ignore[no-untyped-def]
    """NeMo 2's save, as its MegatronStrategy and MegatronCheckpointIO make it (see the module docstring)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    name = f"default--val_loss=0.00-step={step}-consumed_samples={float(step * BATCH)}" + ("-last" if last else "")
    weights = root / "checkpoints" / name / "weights"
    if dist.get_rank() == 0:
        weights.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_state = model.sharded_state_dict(prefix=NEMO_PREFIX)
    checkpoint = {"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.5.0", "state_dict": {},
                  "sharded_state_dict": model_state, "optimizer": [optimizer.sharded_state_dict(model_state)]}
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist", 1), None, False)
    dist_checkpointing.save(checkpoint, str(weights), sharded_strategy=strategy)
    dist.barrier()


def save_reference(folder: Path, model, prefix: str, out: Path) -> None:  # type: ignore[no-untyped-def]
    """The model's weights in ``folder`` as megatron-core's own loader returns them (shards merged), under the
    model's own keys, as safetensors (rank 0); ``prefix``: what the checkpoint puts before those keys (NeMo 2's
    ``module.``, or an optimizer's name for its masters, to save the masters)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors.torch import save_file

    loaded = dist_checkpointing.load_plain_tensors(str(folder))
    if dist.get_rank() == 0:
        keys = sorted({v.key for v in model.sharded_state_dict().values() if isinstance(v, ShardedTensor)})
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: loaded[prefix + k].contiguous() for k in keys}, str(out))
    dist.barrier()


def write_masters(out: Path) -> None:
    """The ``masters/`` runs and their references (module docstring)."""
    from megatron.core import parallel_state

    torch.manual_seed(1234)
    model = build_model(torch.bfloat16)
    optimizer = build_float16_optimizer(model)
    for step in range(1, FLOAT16_STEPS + 1):
        train_step(model, optimizer, step)
        if step % SAVE_EVERY == 0:
            save_megatron(out / "masters" / "float16", model, optimizer, step, torch.bfloat16)
            save_reference(out / "masters" / "float16" / f"iter_{step:07d}", model, FLOAT16_MASTERS,
                           out / "reference" / f"masters-float16-{step}.safetensors")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)  # data parallel 2
    torch.manual_seed(1234)
    model = build_model(torch.bfloat16, tensor_parallel=1)
    wrapped, optimizer = build_distributed(model)
    reshardable = {"distrib_optim_sharding_type": "fully_reshardable",
                   "distrib_optim_fully_reshardable_mem_efficient": True}
    for step in range(1, DISTRIBUTED_STEPS + 1):
        train_step(wrapped, optimizer, step)
        if step % SAVE_EVERY:
            continue
        root = out / "masters" / "fully_reshardable"
        save_megatron(root, model, optimizer, step, torch.bfloat16, 1, reshardable)
        save_reference(root / f"iter_{step:07d}", model, RESHARDABLE_MASTERS,
                       out / "reference" / f"masters-fully_reshardable-{step}.safetensors")
        if step == BUCKETS_STEP:
            root = out / "masters" / "dp_reshardable"
            save_megatron(root, model, optimizer, step, torch.bfloat16, 1, {"distrib_optim_sharding_type": "dp_reshardable"})
            save_reference(root / f"iter_{step:07d}", model, "",
                           out / "reference" / f"masters-dp_reshardable-{step}.safetensors")


def worker(rank: int, out: Path, layouts: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    accommodate_cpu()
    accommodate_mixed_precision()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
    for layout, dtype in (("megatron", torch.float32), ("nemo", torch.bfloat16)):
        if layout not in layouts:
            continue
        torch.manual_seed(1234)  # use_cpu_initialization: the full weights from one seed, then each rank's shard
        model = build_model(dtype)
        optimizer = build_optimizer(model)
        root = out / layout
        for step in range(1, STEPS[layout] + 1):
            train_step(model, optimizer, step)
            if step % SAVE_EVERY:
                continue
            if layout == "megatron":
                save_megatron(root, model, optimizer, step, dtype)
                saved = root / f"iter_{step:07d}"
                save_reference(saved, model, "", out / "reference" / f"megatron-{step}.safetensors")
            else:
                save_nemo(root, model, optimizer, step, last=False)
                if step == STEPS[layout]:
                    save_nemo(root, model, optimizer, step, last=True)
                saved = next((root / "checkpoints").glob(f"*-step={step}-*[0-9]")) / "weights"
                save_reference(saved, model, NEMO_PREFIX, out / "reference" / f"nemo-{step}.safetensors")
    if "masters" in layouts:
        write_masters(out)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/megatron")
    layouts = tuple(sys.argv[2:]) or LAYOUTS
    if not set(layouts) <= set(LAYOUTS):
        sys.exit(f"layouts: {', '.join(LAYOUTS)}")
    for layout in layouts:
        shutil.rmtree(out / layout, ignore_errors=True)
        for reference in (out / "reference").glob(f"{layout}-*.safetensors"):
            reference.unlink()
    mp.spawn(worker, args=(out, layouts), nprocs=WORLD)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:8d} {path}")


if __name__ == "__main__":
    main()
