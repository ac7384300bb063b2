"""Write the DeepSpeed ZeRO fixtures in tests/fixtures/deepspeed/ with DeepSpeed itself, on CPU.

    python scripts/make_deepspeed_fixtures.py [OUT [RUN ...]]    # default tests/fixtures/deepspeed, every run

Each run in :data:`RUNS` trains :class:`TinyModel` with 2 data-parallel ranks (gloo, torch.multiprocessing spawn,
DeepSpeed's CPU accelerator) through one of DeepSpeed's ZeRO optimizer paths, and saves a checkpoint with
``engine.save_checkpoint`` every :data:`SAVE_EVERY` steps: ``RUN/global_stepN/`` and ``RUN/latest``, as DeepSpeed
lays them out. The model is what makes real runs awkward: 865 trainable elements (no multiple of the world size) in
three optimizer groups whose sizes do not divide by 2 x world size either (weight decay, no decay, its own lr), an
embedding tied to the output layer, a frozen parameter, a float32, a bfloat16 and an integer buffer.

For each tag it writes what DeepSpeed's own ``zero_to_fp32`` consolidates from it
(``reference/RUN-global_stepN.safetensors``): the reference the tests compare ckpt-ema's reader against. The tests
do not need DeepSpeed; this script does (``pip install deepspeed``; CPU only, a minute or two per run).

The fp16 runs tell DeepSpeed's CPU accelerator that it supports fp16: it offers fp16 only where oneDNN computes it
(``torch.ops.mkldnn._is_mkldnn_fp16_supported()``), though torch's CPU operators compute it everywhere. The rest of
the fp16 path (loss scaling, fp32 masters, the checkpoint) is DeepSpeed's own.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.multiprocessing as mp
from torch import nn

STEPS = 6
SAVE_EVERY = 2
WORLD = 2
VOCAB = 11

# name -> (ZeRO stage, DeepSpeed config entries beside zero_optimization). bf16 ZeRO-1 goes through ZeRO's own
# optimizer by default and through DeepSpeed's BF16_Optimizer when gradients accumulate in fp32; zero_to_fp32
# refuses the latter's files (they record no zero_stage), so that run has no reference.
RUNS: dict[str, tuple[int, dict[str, Any]]] = {
    "zero1-fp32": (1, {}),
    "zero1-bf16": (1, {"bf16": {"enabled": True}}),
    "zero1-bf16-fp32grads": (1, {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}),
    "zero2-fp32": (2, {}),
    "zero2-bf16": (2, {"bf16": {"enabled": True}}),
    "zero3-fp32": (3, {}),
    "zero3-bf16": (3, {"bf16": {"enabled": True}}),
}
FP16 = {"fp16": {"enabled": True, "initial_scale_power": 8}}
RUNS.update({f"zero{stage}-fp16": (stage, FP16) for stage in (1, 2, 3)})


class TinyModel(nn.Module):
    """865 trainable elements: emb 77, l1 192, ln 48, l2 375, gain 173; a frozen 3x5 parameter; the output layer
    tied to the embedding; a float buffer and an integer one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 7)
        self.l1 = nn.Linear(7, 24)
        self.ln = nn.LayerNorm(24)
        self.l2 = nn.Linear(24, 15)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 173))
        self.frozen = nn.Parameter(torch.randn(3, 5), requires_grad=False)
        self.head = nn.Linear(7, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied, as language models tie their output layer to the embedding
        self.register_buffer("scale", torch.tensor([1.5, 2.0]))
        self.register_buffer("window", torch.tensor([0.75, -1.25, 3.0], dtype=torch.bfloat16))
        self.register_buffer("seen", torch.tensor(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l2(self.ln(self.l1(self.emb(x).mean(1))))
        h = h * self.gain[:15] + self.gain[15:].mean() + self.frozen.sum() * 0
        return self.head(h[:, :7]) * self.scale[0] * self.window[0].float()


def param_groups(model: TinyModel, lr: float) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on vectors, and the gain in a group of its own with a lower lr."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return [
        {"params": [p for n, p in trainable.items() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for n, p in trainable.items() if p.dim() < 2 and n != "gain"], "weight_decay": 0.0},
        {"params": [trainable["gain"]], "weight_decay": 0.0, "lr": lr / 3},
    ]


def train(rank: int, out: str, stage: int, extra: dict[str, Any], port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "fp16" in extra:  # the CPU accelerator offers fp16 only where oneDNN computes it; torch's CPU ops do anyway
        get_accelerator().is_fp16_supported = lambda: True
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = TinyModel()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**6, **extra}
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(rank)
    for step in range(1, STEPS + 1):
        loss = engine(torch.randint(0, VOCAB, (4, 3), generator=g)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        if step % SAVE_EVERY == 0:
            engine.save_checkpoint(out)
    torch.distributed.barrier()


def consolidate(run: Path, reference: Path) -> None:
    """zero_to_fp32's state dict of each tag, as safetensors in ``reference`` (the tests' reference); none where
    zero_to_fp32 refuses the checkpoint (it says why)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    for tag in sorted(p.name for p in run.iterdir() if p.is_dir()):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(run), tag=tag)
        except ValueError as exc:
            print(f"zero_to_fp32 refuses {run.name}/{tag}: {exc}")
            continue
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(reference / f"{run.name}-{tag}.safetensors"))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/deepspeed")
    only = set(sys.argv[2:])
    (out / "reference").mkdir(parents=True, exist_ok=True)
    for name, (stage, extra) in RUNS.items():
        if only and name not in only:
            continue
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        for old in (out / "reference").glob(f"{name}-*.safetensors"):
            old.unlink()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(train, args=(str(run), stage, extra, port), nprocs=WORLD)
        for script in run.glob("*.py"):  # DeepSpeed copies its converters beside the checkpoints
            script.unlink()
        consolidate(run, out / "reference")
        print(f"wrote {run}")


if __name__ == "__main__":
    main()
