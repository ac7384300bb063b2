"""Write the DeepSpeed ZeRO fixtures in tests/fixtures/deepspeed/ with DeepSpeed itself, on CPU.

    DS_ACCELERATOR=cpu python scripts/make_deepspeed_fixtures.py [OUT]     # default tests/fixtures/deepspeed

For each ZeRO stage 1, 2 and 3 it trains a tiny model (an embedding tied to the output layer, a LayerNorm, a
buffer) for 4 steps with 2 data-parallel ranks (gloo, torch.multiprocessing spawn), bf16 module weights and fp32
masters, and saves checkpoints with ``engine.save_checkpoint`` at steps 2 and 4: ``zeroN/global_step2/``,
``zeroN/global_step4/`` and ``zeroN/latest``, as DeepSpeed lays them out. For each tag it writes what DeepSpeed's
own ``zero_to_fp32`` consolidates from it (``reference/zeroN-global_stepK.safetensors``), the reference the tests
compare ckpt-ema's reader against. The tests do not need DeepSpeed; this script does (``pip install
deepspeed``; it runs on CPU with ``DS_ACCELERATOR=cpu``, no GPU, about a minute).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

STEPS = 4
SAVE_EVERY = 2
WORLD = 2


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(37, 16)
        self.l1 = nn.Linear(16, 24)
        self.ln = nn.LayerNorm(24)
        self.l3 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 37, bias=False)
        self.head.weight = self.emb.weight  # tied, as language models tie their output layer to the embedding
        self.register_buffer("scale", torch.tensor([1.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.l3(self.ln(self.l1(self.emb(x).mean(1))))) * self.scale[0]


def train(rank: int, out: str, stage: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = TinyModel()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                           config=config)
    g = torch.Generator().manual_seed(rank)
    for step in range(1, STEPS + 1):
        loss = engine(torch.randint(0, 37, (4, 3), generator=g)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        if step % SAVE_EVERY == 0:
            engine.save_checkpoint(out)


def consolidate(run: Path, reference: Path) -> None:
    """zero_to_fp32's state dict of each tag, as safetensors in ``reference`` (the tests' reference)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    for tag in sorted(p.name for p in run.iterdir() if p.is_dir()):
        with contextlib.redirect_stdout(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(run), tag=tag)
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(reference / f"{run.name}-{tag}.safetensors"))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/deepspeed")
    for stage in (1, 2, 3):
        run = out / f"zero{stage}"
        shutil.rmtree(run, ignore_errors=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(train, args=(str(run), stage, port), nprocs=WORLD)
        for script in run.glob("*.py"):  # DeepSpeed copies its converters beside the checkpoints
            script.unlink()
        (out / "reference").mkdir(exist_ok=True)
        consolidate(run, out / "reference")
        print(f"wrote {run}")


if __name__ == "__main__":
    main()
