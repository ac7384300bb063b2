"""Lightning's sharded checkpoints, written and read by Lightning's own Trainer (tests/checkpoints.py's Lightning
rows, tests/test_lightning_sharded.py).

    python tests/lightning_sharded_run.py STRATEGY OUT                   # train: OUT/epoch=E-step=N.ckpt/ every 2 steps
    python tests/lightning_sharded_run.py STRATEGY OUT.safetensors CKPT  # resume from CKPT of the last step: its model

Training runs SmallNet (tests/checkpoints.py) on two CPU processes (gloo; Lightning's own launcher starts the second
by running this script again) and saves a checkpoint every 2 steps: a torch DCP folder with Lightning's ``meta.pt``
(global_step, epoch, loops, ...) beside its ``.distcp`` files. Resuming runs one process: ``Trainer.fit(ckpt_path=
CKPT)`` restores the model, the optimizer and the loops from the sharded folder (resharding the two ranks' shards)
and stops at once when CKPT is of the run's last step; the model's full state dict is then saved, with the global step
the Trainer restored in the file's metadata.

STRATEGY is ``model_parallel`` (ModelParallelStrategy: FSDP2's fully_shard in ``configure_model``, a bfloat16 Linear
in a group of its own; the model under the DCP entry ``state_dict``) or ``fsdp`` (FSDPStrategy with
``state_dict_type="sharded"``, FSDP1 wrapped in ``configure_model``; the model under ``model``). Lightning's FSDP
casts the module to its precision's dtype, so that run is bf16-true: all bfloat16. Two accommodations of CPU, both
for FSDPStrategy: Lightning refuses it without a GPU (its accelerator connector tests ``type(strategy) is
FSDPStrategy``), so the run passes a subclass that adds nothing; and Lightning wraps with ``device_id=None`` on CPU,
which FSDP1 refuses without an accelerator, so the model is wrapped in ``configure_model`` with ``device_id=cpu``
(Lightning then wraps nothing more).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import SmallNet  # noqa: E402

EVERY = 2  # a checkpoint every EVERY steps
STEPS = 6
BATCHES = 4  # per epoch and rank: the checkpoints span two epochs


def make_trainer(strategy_name: str, devices: int, out: Path) -> tuple:
    """(Trainer, LightningModule, DataLoader) of a run of ``strategy_name`` on ``devices`` CPU processes, saving
    into ``out``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    class CpuFSDPStrategy(FSDPStrategy):
        """FSDPStrategy itself, past the accelerator connector's GPU check (see the module docstring)."""

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = SmallNet()

        def configure_model(self) -> None:
            """Shard the model, the bfloat16 Linear and l1 each a group of their own (one group holds one dtype)."""
            if strategy_name == "model_parallel":  # FSDP2 over the data-parallel mesh
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.model.gate, mesh=mesh)
                fully_shard(self.model.l1, mesh=mesh)
                fully_shard(self.model, mesh=mesh)
            else:  # FSDP1 on the CPU device (see the module docstring)
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                cpu = torch.device("cpu")
                self.model.gate = FSDP(self.model.gate, device_id=cpu)
                self.model.l1 = FSDP(self.model.l1, device_id=cpu)
                self.model = FSDP(self.model, device_id=cpu)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            x, y = batch
            return (self.model(x) - y).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if strategy_name == "model_parallel":
        strategy: object = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        precision = "32-true"
    else:
        strategy = CpuFSDPStrategy(state_dict_type="sharded")
        precision = "bf16-true"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 37, (2 * BATCHES * 4, 3), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0].float() / 37), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, precision=precision,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=EVERY, save_top_k=-1)])
    return trainer, Module(), data


def train(strategy_name: str, out: Path) -> None:
    trainer, module, data = make_trainer(strategy_name, 2, out)
    trainer.fit(module, data)


def resume(strategy_name: str, out: Path, checkpoint: Path) -> None:
    """Restore ``checkpoint`` with ``Trainer.fit(ckpt_path=...)`` in one process; save the model's full state dict
    (the LightningModule's names) and the restored global step to ``out``."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trainer, module, data = make_trainer(strategy_name, 1, out.parent / "resumed")
    trainer.fit(module, data, ckpt_path=checkpoint)
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    save_file({n: t.contiguous() for n, t in state.items()}, out, metadata={"global_step": str(trainer.global_step)})


if __name__ == "__main__":
    if len(sys.argv) == 3:
        train(sys.argv[1], Path(sys.argv[2]))
    else:
        resume(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
