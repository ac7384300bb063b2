"""Benchmark ``ckpt-ema average`` on a DCP run against ``cat`` and the route users take today.

    python scripts/bench_dcp.py                        # 3 checkpoints of 64M float32 params (256 MB), --max-memory 64MB
    python scripts/bench_dcp.py --params 256e6 --max-memory 256MB --repeats 5
    python scripts/bench_dcp.py --params 64e6 --checkpoints 8 --repeats 5 --workdir /var/tmp   # a disk, not tmpfs

It writes, once, a run of ``--checkpoints`` DCP checkpoints with ``dcp.save`` under gloo with 2 ranks (each
tensor a DTensor sharded on its first dimension, beside AdamW-like optimizer state of twice the model's size, as
a training run saves them), flushes them to disk, warms the page cache, then runs, alternately and ``--repeats``
times each, in a fresh interpreter per run (start-up excluded):

* ``cat``: ``cat`` of every ``.distcp`` file of the run (optimizer bytes included), the rate this machine reads
  the files at;
* ``ckpt-ema``: ``ckpt_ema.average(folders, out, max_memory=...)``, the uniform mean of the checkpoints written
  as one safetensors file (the model entry only; the optimizer bytes are never read);
* ``dcp_to_torch_save``: today's route: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` of each
  checkpoint to a ``.pt`` file, then torch.load each file's model entry and average the state dicts in memory;
* ``cp -r newest``: a copy of the newest checkpoint, flushed: the least that writing a checkpoint like it costs;
* ``--like-input``: the same average written as a copy of the newest checkpoint (``like_input=True``).

It prints medians, ratios to ``cat``, and peak anonymous memory (RssAnon: memory the process owns, not the page
cache it maps) from one more run of each with a sampling thread, next to ``--max-memory`` plus the largest stored
piece (the bound the DCP reader promises).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_average import MEMORY_SAMPLER  # scripts/ is on the path when this script runs

SAVER = r"""
import sys, os, json, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp, torch.multiprocessing as mp

def worker(rank, world, out, rows, cols, n_layers, n_ckpt, init):
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{init}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(rank)
    local = rows // world
    def dt(t):
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)
    for c in range(1, n_ckpt + 1):
        model = {f"layers.{i}.weight": dt(torch.randn(local, cols, generator=g)) for i in range(n_layers)}
        optim = {f"state.layers.{i}.weight.{k}": dt(torch.randn(local, cols, generator=g))
                 for i in range(n_layers) for k in ("exp_avg", "exp_avg_sq")}
        dcp.save({"model": model, "optimizer": optim, "train_state": {"step": c * 1000}},
                 checkpoint_id=os.path.join(out, f"step-{c * 1000}"))
    dist.destroy_process_group()

if __name__ == "__main__":
    out, rows, cols, n_layers, n_ckpt, init = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
    mp.spawn(worker, args=(2, out, rows, cols, n_layers, n_ckpt, init), nprocs=2)
"""

WORKER = MEMORY_SAMPLER + r"""
method, folders, out, max_memory, measure = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
import torch
import ckpt_ema
import ckpt_ema.formats.dcp_reader, ckpt_ema.formats.registry, ckpt_ema.output.folder  # imported before the baseline
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
baseline = rss_anon_kib()
if measure:
    threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if method == "ckpt-ema":
    ckpt_ema.average(folders, out, last=len(folders), max_memory=max_memory)
elif method == "--like-input":
    ckpt_ema.average(folders, out + ".like", last=len(folders), max_memory=max_memory, like_input=True,
                     keep_state=False)
else:
    avg = None
    for i, folder in enumerate(folders):
        pt = f"{out}.{i}.pt"
        dcp_to_torch_save(folder, pt)
        sd = torch.load(pt, map_location="cpu", weights_only=True, mmap=False)["model"]
        if avg is None:
            avg = {k: v.clone().float() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                avg[k].lerp_(v, 1 / (i + 1))
        del sd
    save_file(avg, out)
seconds = time.perf_counter() - t0
stop.set()
peak[0] = max(peak[0], rss_anon_kib())
print(json.dumps({"seconds": seconds, "peak_anon_bytes": (peak[0] - baseline) * 1024}))
"""


def make_run(folder: Path, params: int, checkpoints: int) -> list[Path]:
    cols = 1024
    rows = 4096
    layers = max(1, round(params / (rows * cols)))
    script = folder.parent / "save_run.py"  # a file: torch.multiprocessing.spawn re-imports the main module
    script.write_text(SAVER)
    subprocess.run([sys.executable, str(script), str(folder), str(rows), str(cols), str(layers), str(checkpoints),
                    str(folder.parent / "init")], check=True)
    os.sync()
    return sorted(p for p in folder.iterdir() if p.is_dir())


def largest_piece(folders: list[Path]) -> int:
    """Bytes of the largest stored piece (one rank's chunk of one tensor) of the model in any checkpoint."""
    from ckpt_ema.formats.registry import open_checkpoint

    return max(open_checkpoint(f).largest_piece for f in folders)  # type: ignore[attr-defined]


def run_cat(folders: list[Path]) -> dict:
    files = [str(p) for f in folders for p in sorted(f.glob("*.distcp"))]
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return {"seconds": time.perf_counter() - t0, "peak_anon_bytes": 0}


def run_cp(folders: list[Path], out: Path) -> dict:
    """``cp -r`` of the newest checkpoint: what writing a checkpoint like it costs at the least."""
    target = out.with_name(out.name + ".copy")
    shutil.rmtree(target, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(folders[-1]), str(target)], check=True)
    subprocess.run(["sync", "-f", str(target)], check=True)  # as the outputs are flushed before their rename
    return {"seconds": time.perf_counter() - t0, "peak_anon_bytes": 0}


def run_worker(method: str, folders: list[Path], out: Path, max_memory: int, measure: bool) -> dict:
    for earlier in out.parent.glob(f"{out.name}*"):
        shutil.rmtree(earlier) if earlier.is_dir() else earlier.unlink()
    os.sync()
    done = subprocess.run([sys.executable, "-c", WORKER, method, json.dumps([str(f) for f in folders]), str(out),
                           str(max_memory), "1" if measure else "0"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=64e6, help="model parameters (float32)")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--max-memory", default="64MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from ckpt_ema.options import parse_size

    max_memory = parse_size(args.max_memory)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        run.mkdir()
        folders = make_run(run, int(args.params), args.checkpoints)
        model_bytes = int(args.params) * 4
        distcp_bytes = sum(p.stat().st_size for f in folders for p in f.glob("*.distcp"))
        piece = largest_piece(folders)
        out = tmp / "avg.safetensors"
        run_cat(folders)  # warm the page cache
        workers = ("ckpt-ema", "dcp_to_torch_save", "--like-input")
        times: dict[str, list[float]] = {"cat": [], "ckpt-ema": [], "dcp_to_torch_save": [], "cp -r newest": [],
                                         "--like-input": []}
        for _ in range(args.repeats):
            times["cat"].append(run_cat(folders)["seconds"])
            times["cp -r newest"].append(run_cp(folders, out)["seconds"])
            for method in workers:
                times[method].append(run_worker(method, folders, out, max_memory, False)["seconds"])
        peaks = {m: run_worker(m, folders, out, max_memory, True)["peak_anon_bytes"] for m in workers}
    cat = statistics.median(times["cat"])
    mb = 1e6
    print(f"{args.checkpoints} DCP checkpoints (2 ranks), model {model_bytes / mb:.0f} MB each, "
          f".distcp files {distcp_bytes / mb:.0f} MB in all; --max-memory {max_memory / mb:.0f} MB, "
          f"largest stored piece {piece / mb:.1f} MB; median of {args.repeats}")
    print(f"{'method':<20}{'seconds':>9}{'x cat':>8}{'peak anon MB':>14}")
    for method, values in times.items():
        med = statistics.median(values)
        peak = peaks.get(method, 0)
        print(f"{method:<20}{med:>9.2f}{med / cat:>8.2f}{peak / mb:>14.0f}")
    print(f"bound for ckpt-ema: --max-memory + largest piece = {(max_memory + piece) / mb:.0f} MB")


if __name__ == "__main__":
    main()
