"""Benchmark ``ckpt-ema average`` in 1 process against 2 processes under torchrun, on synthetic checkpoints.

    python scripts/bench_distributed.py                          # 8 checkpoints x 25M float32 params, safetensors
    python scripts/bench_distributed.py --params 10e6 --checkpoints 4 --repeats 5 --procs 1 2

It writes the checkpoints once, warms the page cache (``cat``), then runs each process count alternately
``--repeats`` times: ``python worker.py`` for 1 process, ``python -m torch.distributed.run --nproc-per-node P
--standalone worker.py`` for P > 1, every process with OMP_NUM_THREADS=1 unless --threads says otherwise (so that
P processes use P cores, as torchrun sets by default; 1 process gets --threads too). Two times per run:

* ``average``: rank 0's ``ckpt_ema.average(...)`` call, the agreed commit included; interpreter start-up, torch
  import and joining the process group (``init``, shown apart) excluded;
* ``wall``: the whole command, torchrun's start-up and rendezvous included.

It prints medians, throughput of checkpoint bytes and the ratio of each count to 1 process. Shared machines are
noisy: read the ratios, not the absolute times.
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

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
WORKER = r"""
import json, os, sys, time
import torch.distributed as dist
import ckpt_ema
folder, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    dist.init_process_group("gloo")  # ckpt_ema uses a group that is already there
    dist.barrier()
t1 = time.perf_counter()
ckpt_ema.average(folder, out, decay=0.9)
if int(os.environ.get("RANK", 0)) == 0:
    print(json.dumps({"init_s": t1 - t0, "average_s": time.perf_counter() - t1}))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def write_checkpoints(folder: Path, params: int, checkpoints: int, tensors: int) -> int:
    """``checkpoints`` safetensors files of ``tensors`` float32 tensors of uneven sizes adding up to ``params``."""
    sizes = [int(params * (k + 1) / (tensors * (tensors + 1) / 2)) for k in range(tensors)]  # 1, 2, 3, ... parts
    total = 0
    for step in range(1, checkpoints + 1):
        state = {f"layer{k}.weight": torch.full((n,), float(step)) + torch.arange(n) * 1e-6
                 for k, n in enumerate(sizes)}
        path = folder / f"ckpt_{step}.safetensors"
        save_file(state, str(path))
        total += path.stat().st_size
    return total


def run_once(procs: int, worker: Path, folder: Path, out: Path, threads: int) -> tuple[float, float, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    if procs == 1:
        command = [sys.executable, str(worker), str(folder), str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--standalone",
                   str(worker), str(folder), str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("{"))
    times = json.loads(line)
    return times["average_s"], wall, times["init_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="float32 parameters per checkpoint")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--tensors", type=int, default=12, help="tensors per checkpoint (of uneven sizes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        folder = root / "run"
        folder.mkdir()
        nbytes = write_checkpoints(folder, int(args.params), args.checkpoints, args.tensors)
        worker = root / "worker.py"
        worker.write_text(WORKER)
        subprocess.run(f"cat {folder}/* > /dev/null", shell=True, check=True)  # warm the page cache
        times: dict[int, list[tuple[float, float, float]]] = {p: [] for p in args.procs}
        for _ in range(args.repeats):
            for procs in args.procs:
                out_dir = root / f"out{procs}"
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir()
                times[procs].append(run_once(procs, worker, folder, out_dir / "ema.safetensors", args.threads))

        print(f"{args.checkpoints} checkpoints x {args.params / 1e6:g}M float32 params "
              f"({nbytes / 1e9:.2f} GB), {args.tensors} tensors, OMP_NUM_THREADS={args.threads}, "
              f"{os.cpu_count()} cores, medians of {args.repeats}")
        base = statistics.median(a for a, _, _ in times[args.procs[0]])
        base_wall = statistics.median(w for _, w, _ in times[args.procs[0]])
        print(f"{'processes':>9}  {'average s':>9}  {'GB/s':>6}  {'vs ' + str(args.procs[0]):>6}  {'init s':>6}  "
              f"{'wall s':>7}  {'vs ' + str(args.procs[0]):>6}")
        for procs, runs in times.items():
            avg = statistics.median(a for a, _, _ in runs)
            wall = statistics.median(w for _, w, _ in runs)
            init = statistics.median(i for _, _, i in runs)
            print(f"{procs:>9}  {avg:>9.2f}  {nbytes / avg / 1e9:>6.2f}  {base / avg:>5.2f}x  {init:>6.2f}  "
                  f"{wall:>7.2f}  {base_wall / wall:>5.2f}x")


if __name__ == "__main__":
    main()
