"""Write the OLMo-core fixture of tests/test_olmo_core.py: a run saved by OLMo-core's own Trainer and checkpointer.

A tiny OLMo-core transformer (``TransformerConfig.llama_like``: one block, a vocabulary of 37 and a width of 10, so
that FSDP's split over 2 ranks leaves shards of 19 and 18 rows) is trained for 4 steps by OLMo-core's ``Trainer``
with its ``TransformerTrainModule`` (FSDP over 2 processes, AdamW) on random tokens, and saved by its
``CheckpointerCallback`` before the first step and every 2 steps: ``step0`` (the untrained model), ``step2``,
``step4``. Each ``stepN/`` holds what OLMo-core writes: ``model_and_optim/`` (DCP, written by OLMo-core's own
``RemoteFileSystemWriter``: two ``__R_K.distcp`` files per rank and a ``.metadata`` that pickles OLMo-core's copy
of ``_StorageInfo``), ``train/rank0.pt`` and ``train/rank1.pt`` (the trainer state, ``global_step`` among it) and
``.metadata.json``.

The reference of each checkpoint, ``reference/stepN.safetensors``, is what OLMo-core's own loader
(``olmo_core.distributed.checkpoint.load_model_and_optim_state``) loads from it into a fresh, unsharded model of
the same config, in one process: the bare model's state dict.

Both are stored as one xz-compressed tar archive (``run/`` and ``reference/``, about 75 KB; the folders
themselves take 1.4 MB, mostly the optimizer's per-parameter hyperparameters, each item a small ``torch.save``
archive of its own); the tests unpack it.

Accommodations for CPU, none of which changes what is written: the process group is gloo
(``prepare_training_environment(backend="gloo")``); the two ranks are processes spawned here with the
environment torchrun would give them; checkpoints are saved synchronously (``save_async=False``) and with two
writer threads per rank (``save_thread_count=2``; OLMo-core's default is one per CPU core, which would make the
layout depend on the machine).

ai2-olmo-core 3.0.0 declares torch<2.14; it runs with torch 2.14.1 once installed with ``pip install --no-deps``
after its dependencies. Run from the repository root:

    python scripts/make_olmo_fixtures.py [ARCHIVE]      # default: tests/fixtures/olmo_core/olmo_core_run.tar.xz
"""

from __future__ import annotations

import lzma
import os
import shutil
import socket
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

WORLD_SIZE = 2
VOCAB = 37
D_MODEL = 10
SEQUENCE_LENGTH = 8
STEPS = 4
SAVE_INTERVAL = 2
SEED = 1234
ARCHIVE = "tests/fixtures/olmo_core/olmo_core_run.tar.xz"
SAVE_THREADS = 2  # writer threads per rank: its files per rank


def model_config():  # -> olmo_core.nn.transformer.TransformerConfig (imported late: spawned workers import it)
    """The tiny transformer: one block, odd sizes, float32."""
    from olmo_core.nn.transformer import TransformerConfig

    return TransformerConfig.llama_like(d_model=D_MODEL, vocab_size=VOCAB, n_layers=1, n_heads=1,
                                        hidden_size_multiple_of=1)


def write_tokens(path: Path) -> None:
    """Random token ids for the dataset: enough for every step's batch."""
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(1, VOCAB, size=SEQUENCE_LENGTH * 64, dtype=np.uint16)
    mm = np.memmap(path, dtype=np.uint16, mode="w+", shape=tokens.shape)
    mm[:] = tokens
    mm.flush()


def train(rank: int, run: str, work: str, port: int) -> None:
    """One rank of the run: OLMo-core's Trainer, saving with its own checkpointer."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD_SIZE), NUM_NODES="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OLMO_SHARED_FS="1")
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.data.types import NumpyDatasetDType
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.optim import AdamWConfig
    from olmo_core.train import (CheckpointerConfig, Duration, TrainerConfig, prepare_training_environment,
                                 teardown_training_environment)
    from olmo_core.train.callbacks import CheckpointerCallback
    from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig
    from olmo_core.utils import seed_all

    prepare_training_environment(seed=SEED, backend="gloo")
    seed_all(SEED)
    tokenizer = TokenizerConfig(vocab_size=VOCAB, eos_token_id=0, pad_token_id=0)
    dataset = NumpyFSLDatasetConfig(paths=[f"{work}/tokens.npy"], sequence_length=SEQUENCE_LENGTH,
                                    tokenizer=tokenizer, work_dir=work, dtype=NumpyDatasetDType.uint16).build()
    model = model_config().build(init_device="cpu")
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=2 * SEQUENCE_LENGTH,
        max_sequence_length=SEQUENCE_LENGTH,
        optim=AdamWConfig(lr=1e-2),
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp),
    ).build(model)
    loader = NumpyDataLoaderConfig(global_batch_size=WORLD_SIZE * 2 * SEQUENCE_LENGTH, seed=SEED,
                                   work_dir=work).build(dataset, dp_process_group=train_module.dp_process_group)
    trainer = TrainerConfig(
        save_folder=run, work_dir=work, save_overwrite=True, max_duration=Duration.steps(STEPS),
        metrics_collect_interval=1, cancel_check_interval=1,
        checkpointer=CheckpointerConfig(save_thread_count=SAVE_THREADS),
    ).with_callback("checkpointer", CheckpointerCallback(save_interval=SAVE_INTERVAL, save_async=False,
                                                          max_checkpoints=None)).build(train_module, loader)
    trainer.fit()
    teardown_training_environment()


def save_reference(checkpoint: Path, out: Path) -> None:
    """What OLMo-core's own loader loads from ``checkpoint`` into a fresh unsharded model, as safetensors."""
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from safetensors.torch import save_file

    model = model_config().build(init_device="cpu")
    for p in model.parameters():  # anything not loaded would show as NaN
        p.data.fill_(float("nan"))
    load_model_and_optim_state(checkpoint / "model_and_optim", model)
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    if any(t.isnan().any() for t in state.values()):
        raise SystemExit(f"{checkpoint}: the loader left entries unloaded")
    save_file(state, str(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_archive(folder: Path, archive: Path) -> None:
    """``folder``'s files as an xz-compressed tar archive of fixed order, owners and times: the same fixtures make
    the same bytes."""
    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(archive, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False, filter=plain)


def main() -> None:
    archive = Path(sys.argv[1] if len(sys.argv) > 1 else ARCHIVE)
    with tempfile.TemporaryDirectory() as tmp:
        work, run, out = Path(tmp) / "work", Path(tmp) / "run", Path(tmp) / "out"
        work.mkdir()
        write_tokens(work / "tokens.npy")
        mp.start_processes(train, args=(str(run), str(work), free_port()), nprocs=WORLD_SIZE,
                           start_method="spawn")
        (out / "reference").mkdir(parents=True)
        for step in range(0, STEPS + 1, SAVE_INTERVAL):
            name = f"step{step}"
            shutil.copytree(run / name, out / "run" / name)
            save_reference(out / "run" / name, out / "reference" / f"{name}.safetensors")
        archive.parent.mkdir(parents=True, exist_ok=True)
        write_archive(out, archive)
    print(f"wrote {archive} ({archive.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
