"""Benchmark appending to an average (``ckpt_ema.average`` with its state) against a full rerun, as the run grows.

    python scripts/bench_append.py                       # N = 10, 100, 1000 checkpoints of 1M float32 params
    python scripts/bench_append.py --params 4e6 --sizes 10 100 --repeats 5

For each N the run holds N + 1 checkpoints (.safetensors, ``--params`` float32 parameters each, made once and
hard-linked into one folder per N). Two ways to get the average of all N + 1 with the newest just added:

* ``full rerun``: ``ckpt_ema.average(run, out, keep_state=False)``, every checkpoint read;
* ``append``: the state of the first N already beside the output (from an earlier ``average``), then
  ``ckpt_ema.average(run, out)``, which recognises the N from their listing and reads only the new one (plus the
  state: the running mean, which is the float32 output itself, and the link to the newest checkpoint).

Before every timed run every file involved (checkpoints, state, output) is dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``os.sync()``), so that what is read comes from the disk; each
run is in this process, after the imports (start-up excluded), and the runs of the two methods alternate,
``--repeats`` times each, the append's state and output restored before each. It prints medians of wall time,
CPU time (user + system, ``getrusage``) and bytes read from storage (``read_bytes`` of /proc/self/io), and the
append's share of the full rerun's.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import ckpt_ema
from ckpt_ema.follow.state import state_folder_of


def make_checkpoints(folder: Path, n: int, params: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    g = torch.Generator().manual_seed(0)
    for step in range(n):
        path = folder / f"step_{step:06d}.safetensors"
        if not path.exists():
            save_file({"w": torch.randn(params, generator=g)}, str(path))
        files.append(path)
    return files


def drop_cache(paths: list[Path]) -> None:
    """Write dirty pages out, then ask the kernel to forget the files' cached pages."""
    os.sync()
    for path in paths:
        for file in (path.rglob("*") if path.is_dir() else [path]):
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(action) -> dict[str, float]:  # noqa: ANN001
    wall, cpu, io = time.perf_counter(), cpu_seconds(), read_bytes()
    action()
    return {"wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu, "read": read_bytes() - io}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e6)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_append_"))
    pool = make_checkpoints(work / "pool", max(args.sizes) + 1, int(args.params))
    options = dict(decay=0.999, warmup=True)
    print(f"{int(args.params):,} float32 params a checkpoint ({pool[0].stat().st_size / 1e6:.1f} MB); medians of "
          f"{args.repeats}; cold page cache; {work}")
    print("| N | method | wall s | CPU s | MB read | append / full (wall, CPU, bytes) |")
    print("|---:|---|---:|---:|---:|---|")
    for n in args.sizes:
        run, out_dir = work / f"run{n}", work / f"out{n}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        run.mkdir()
        out_dir.mkdir()
        for f in pool[:n]:
            os.link(f, run / f.name)
        out = out_dir / "ema.safetensors"
        ckpt_ema.average(run, out, **options)  # the state of the first N
        saved = work / f"saved{n}"
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(out_dir, saved)
        os.link(pool[n], run / pool[n].name)  # the new checkpoint
        full_out = work / f"full{n}.safetensors"
        results: dict[str, list[dict[str, float]]] = {"full rerun": [], "append": []}
        for _ in range(args.repeats):
            drop_cache([run, saved, out_dir, full_out])
            results["full rerun"].append(measure(lambda: ckpt_ema.average(run, full_out, keep_state=False, **options)))
            shutil.rmtree(out_dir)
            shutil.copytree(saved, out_dir)
            drop_cache([run, saved, out_dir, full_out])
            done: list = []
            results["append"].append(measure(lambda: done.append(ckpt_ema.average(run, out, **options))))
            assert done[0].note.startswith("appended 1 new checkpoint"), done[0].note
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "read")} for m, rs in results.items()}
        for method, m in med.items():
            ratio = ""
            if method == "append":
                f = med["full rerun"]
                ratio = (f"{m['wall'] / f['wall']:.3f}, {m['cpu'] / f['cpu']:.3f}, "
                         f"{m['read'] / max(f['read'], 1):.3f}")
            print(f"| {n} | {method} | {m['wall']:.3f} | {m['cpu']:.3f} | {m['read'] / 1e6:.1f} | {ratio} |", flush=True)
        full = ckpt_ema.average(run, None, **options).state_dict["w"]
        got = ckpt_ema.load_state_dict(out)[0]["w"]
        assert (full - got).abs().max().item() < 1e-5  # the append gave the full result
        shutil.rmtree(saved)
        assert state_folder_of(out).is_dir()


if __name__ == "__main__":
    main()
