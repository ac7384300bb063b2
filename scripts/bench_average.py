"""Benchmark ``ckpt-ema average`` against ``cat`` and a naive averaging loop, on synthetic checkpoints.

    python scripts/bench_average.py                      # 10 checkpoints x 25M float32 params, .pt and .safetensors
    python scripts/bench_average.py --params 50e6 --checkpoints 10 --repeats 5
    python scripts/bench_average.py growth               # N = 2, 8, 32 checkpoints at 5M and 20M params
    python scripts/bench_average.py memory               # accumulator 4x --max-memory: peak RssAnon vs budget
    python scripts/bench_average.py gpu                  # on a CUDA machine: --device cuda vs cpu vs cat
    python scripts/bench_average.py readers              # issue 23: 24 x 64 MiB and 6 x 512 MiB, 256 tensors each,
                                                         # against the unchecked route; opening 2,000 tensors
    python scripts/bench_average.py readers --scale 0.05 # the same at a twentieth of the sizes: a quick check

For each input format it writes the checkpoints once, warms the page cache, then runs, alternately and
``--repeats`` times each, in a fresh interpreter per run (start-up excluded from the timing):

* ``cat``: ``cat FILES > /dev/null``, the rate at which this machine reads the files;
* ``dd``: ``dd if=/dev/zero of=OUT bs=4M conv=fsync`` of one model's size: what writing the output alone costs
  (its time is shown against the checkpoints' bytes, like the others, to be read as a share of a run);
* ``naive``: fairseq's average_checkpoints style: torch.load each whole checkpoint, a Python loop of mul_/add_;
* ``fold-only``: the engine alone (``ckpt_ema.plan`` and ``ckpt_ema.engine.fold.fold``), every folded chunk discarded:
  reading and folding with no output at all;
* ``in-memory``: ``ckpt_ema.average(files)``, the Python API returning the average in memory: the engine's read
  and fold without an output file (it allocates and fills the model-sized result instead);
* ``ckpt-ema``: ``ckpt_ema.average(files, out)`` end to end, the output file written and fsync'd.
* ``floor``: the I/O floor, ``cat`` plus ``dd`` of the same repeat: reading every input and writing an fsync'd
  output of the model's size, with nothing else. The ``x floor`` column is each method's speed against it (1 is
  as fast as the I/O alone; issue 12 asks ``ckpt-ema`` for at least 0.7).
* ``unchecked`` (``readers`` mode): the route a user writes without checks: each checkpoint loaded mapped
  (``torch.load(mmap=True, weights_only=True)`` or ``safetensors.torch.load_file``), ``lerp_`` into a float32
  running mean, ``save_file`` (not fsync'd; ckpt-ema's output is). The ``x unchecked`` column is each method's
  speed against it (issue 23 asks ``ckpt-ema`` for at least 1, and the ``.pt`` engine for at least 0.9 of the
  safetensors engine's GB/s).

``readers`` mode also times opening a ``.pt`` of 2,000 tensors (4 KiB each) in one interpreter, after a warm-up:
ckpt-ema's reader (``open_checkpoint``: every check, the tensors mapped) against
``torch.load(mmap=True, weights_only=True)``, medians of ``--repeats`` x 5 openings.

The checkpoints are flushed to disk before any run and each run starts from a quiet disk (``os.sync()`` outside
the timed window): otherwise the writeback of earlier files would land in the middle of later runs.

It prints medians, throughput in GB/s of checkpoint bytes, ratios to ``cat``, and peak anonymous memory
(RssAnon: memory the process owns, not page-cache pages it maps) next to the model's size, from one more run
of each with a thread sampling /proc/self/status (the timed runs go without it: it costs time). These machines are
noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The start of every timed worker: peak RssAnon (memory the process owns, not the page cache it maps), sampled by
# a thread that ``sample`` runs and ``stop`` ends. scripts/bench_dcp.py starts its workers with it too.
MEMORY_SAMPLER = r"""
import json, sys, threading, time
from pathlib import Path

def rss_anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0

peak = [rss_anon_kib()]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon_kib())
        time.sleep(0.002)
"""

WORKER = MEMORY_SAMPLER + r"""
method, files, out, options = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
measure_memory = options.pop("measure_memory", True)
import torch
import ckpt_ema
# Start-up is not timed: the modules the methods import when first used are imported before the clock starts.
import ckpt_ema.api, ckpt_ema.engine.fold, ckpt_ema.follow.state, ckpt_ema.pipeline, safetensors.torch
baseline = rss_anon_kib()
if measure_memory:  # a sampling thread costs time: timed runs go without it
    threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if method == "naive":
    avg = None
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(f)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
        if avg is None:
            avg = {k: v.clone().float() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                avg[k].mul_(0.5).add_(v, alpha=0.5)
elif method == "fold-only":  # the engine reading and folding, every result discarded: no output at all
    from ckpt_ema.engine.fold import fold
    plan = ckpt_ema.plan(files, decay=0.999, **options)
    discard = type("Discard", (), {"write": lambda self, name, piece: None})()
    fold([s.opened or s.path for s in plan.sources], [plan.weighting.lerps], [discard], device=plan.options.device)
elif method == "unchecked":  # issue 23's route without checks: mapped loads, lerp_ in float32, save_file
    from safetensors.torch import load_file, save_file
    avg = None
    for i, f in enumerate(files):
        sd = load_file(f) if f.endswith(".safetensors") else torch.load(f, mmap=True, weights_only=True)
        sd = sd.get("state_dict", sd)
        if avg is None:
            avg = {k: v.to(torch.float32, copy=True) for k, v in sd.items()}
        else:
            for k, v in sd.items():
                avg[k].lerp_(v.float(), 1 / (i + 1))
    save_file(avg, out)
elif method == "in-memory":
    ckpt_ema.average(files, None, decay=0.999, **options)  # the Python API without an output file
else:
    ckpt_ema.average(files, out, decay=0.999, **options)
seconds = time.perf_counter() - t0
stop.set()
peak[0] = max(peak[0], rss_anon_kib())
print(json.dumps({"seconds": seconds, "peak_anon_bytes": (peak[0] - baseline) * 1024, "baseline_anon_bytes": baseline * 1024}))
"""


def make_checkpoints(folder: Path, fmt: str, n: int, params: int, tensors: int | None = None) -> list[Path]:
    """``n`` checkpoints of a model with ``params`` float32 parameters: in ``tensors`` tensors of equal size, or
    (None) in tensors of 1M-4M elements."""
    from safetensors.torch import save_file

    sizes, left = [], params
    while left > 0:
        sizes.append(min(left, -(-params // tensors) if tensors else 1_000_000 * (1 + len(sizes) % 4)))
        left -= sizes[-1]
    files = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        state = {f"layer{j}.weight": torch.randn(s, generator=g) for j, s in enumerate(sizes)}
        path = folder / f"ckpt_{(i + 1) * 100}.{fmt}"
        if fmt == "pt":
            torch.save({"state_dict": state, "step": (i + 1) * 100}, path)
        else:
            save_file(state, str(path), metadata={"step": str((i + 1) * 100)})
        files.append(path)
    os.sync()  # measure from a quiet disk, not while the new files are written back
    return files


def run_cat(files: list[Path]) -> dict[str, float]:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return {"seconds": time.perf_counter() - t0, "peak_anon_bytes": 0}


def run_dd(out: Path, nbytes: int) -> dict[str, float]:
    """Write ``nbytes`` to a new file and fsync it: what writing the output alone costs on this disk."""
    out.unlink(missing_ok=True)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={out}", "bs=4M", f"count={-(-nbytes // (4 << 20))}", "conv=fsync"],
                   stderr=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - t0
    out.unlink()
    return {"seconds": seconds, "peak_anon_bytes": 0}


def run_worker(method: str, files: list[Path], out: Path, **options: object) -> dict[str, float]:
    # Each run writes a new output, from a quiet disk: replacing the previous run's output, or starting while the
    # disk still writes or discards it, would add costs of the benchmark's repetition rather than of averaging.
    for earlier in out.parent.glob(f"{out.stem}*"):  # the output, its shards, the state kept beside it
        shutil.rmtree(earlier) if earlier.is_dir() else earlier.unlink()
    os.sync()
    done = subprocess.run(
        [sys.executable, "-c", WORKER, method, json.dumps([str(f) for f in files]), str(out), json.dumps(options)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(args: argparse.Namespace) -> None:
    """cat, naive and ckpt-ema alternately on the same files, for each format: medians and ratios."""
    params = int(args.params)
    model_bytes = params * 4
    print(f"{args.checkpoints} checkpoints x {params / 1e6:.0f}M float32 params ({model_bytes / 1e9:.2f} GB each), "
          f"{args.repeats} runs per method, medians; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for fmt in args.formats:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            folder = Path(tmp)
            files = make_checkpoints(folder, fmt, args.checkpoints, params)
            total = sum(f.stat().st_size for f in files)
            out = folder / "out.safetensors"
            run_cat(files)  # warm the page cache
            workers = ("naive", "fold-only", "in-memory", "ckpt-ema")
            results: dict[str, list[dict[str, float]]] = {m: [] for m in ("cat", "dd", *workers)}
            for _ in range(args.repeats):  # timed runs, without the memory sampler
                results["cat"].append(run_cat(files))
                results["dd"].append(run_dd(out, model_bytes))
                for method in workers:
                    results[method].append(run_worker(method, files, out, measure_memory=False))
            peaks = {m: run_worker(m, files, out)["peak_anon_bytes"] for m in workers}
            results["floor"] = [{"seconds": c["seconds"] + d["seconds"]} for c, d in zip(results["cat"], results["dd"])]
            cat_s = statistics.median(r["seconds"] for r in results["cat"])
            floor_s = statistics.median(r["seconds"] for r in results["floor"])
            print(f"\n.{fmt}: {total / 1e9:.2f} GB of checkpoints")
            print(f"  {'method':<10} {'median s':>9} {'GB/s':>7} {'x cat':>7} {'x floor':>8} {'peak anon':>10} {'x model':>8}")
            for method, runs in results.items():
                s = statistics.median(r["seconds"] for r in runs)
                peak = peaks.get(method, 0)
                no_peak = method in ("cat", "dd", "floor")
                peak_text = f"{'-':>10} {'-':>8}" if no_peak else f"{peak / 1e9:>9.2f}G {peak / model_bytes:>8.2f}"
                print(f"  {method:<10} {s:>9.3f} {total / s / 1e9:>7.2f} {cat_s / s:>7.2f} {floor_s / s:>8.2f} {peak_text}")


def growth(args: argparse.Namespace) -> None:
    """Time and peak memory of ckpt-ema for N = 2, 8, 32 checkpoints at two model sizes (.safetensors)."""
    print(f"cost growth, .safetensors, {args.repeats} runs each, medians; time should grow with bytes, memory stay flat")
    print(f"  {'params':>7} {'N':>4} {'GB':>6} {'median s':>9} {'s/GB':>6} {'x cat':>6} {'peak anon MB':>13}")
    for params in (int(5e6), int(20e6)):
        for n in (2, 8, 32):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                files = make_checkpoints(Path(tmp), "safetensors", n, params)
                total = sum(f.stat().st_size for f in files)
                run_cat(files)
                cats, runs = [], []
                for _ in range(args.repeats):
                    cats.append(run_cat(files)["seconds"])
                    runs.append(run_worker("ckpt-ema", files, Path(tmp) / "out.safetensors", measure_memory=False))
                s = statistics.median(r["seconds"] for r in runs)
                peak = run_worker("ckpt-ema", files, Path(tmp) / "out.safetensors")["peak_anon_bytes"]
                print(f"  {params / 1e6:>6.0f}M {n:>4} {total / 1e9:>6.2f} {s:>9.3f} {s / (total / 1e9):>6.2f} "
                      f"{statistics.median(cats) / s:>6.2f} {peak / 1e6:>13.1f}")


def memory(args: argparse.Namespace) -> None:
    """Average checkpoints whose float32 accumulator is 4x --max-memory; report peak RssAnon against the budget."""
    budget = 64 * 2**20
    params = budget  # float32: the accumulator is 4 bytes a parameter, 4x the budget
    print(f"bounded memory: {args.checkpoints} checkpoints of {params / 1e6:.0f}M float32 params "
          f"(accumulator {params * 4 / 2**20:.0f} MiB) with --max-memory {budget / 2**20:.0f}MiB")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fmt in args.formats:
            files = make_checkpoints(Path(tmp), fmt, args.checkpoints, params)
            run_cat(files)
            runs = [run_worker("ckpt-ema", files, Path(tmp) / "out.safetensors", max_memory=budget)
                    for _ in range(args.repeats)]
            peak = max(r["peak_anon_bytes"] for r in runs)
            base = statistics.median(r["baseline_anon_bytes"] for r in runs)
            print(f"  .{fmt}: peak RssAnon above the interpreter's {base / 2**20:.0f} MiB after imports: "
                  f"{peak / 2**20:.1f} MiB (max of {args.repeats} runs) = {peak / budget:.2f} x budget, "
                  f"{peak / (params * 4):.2f} x accumulator")
            for f in files:
                f.unlink()


def gpu(args: argparse.Namespace) -> None:
    """--device cuda (pinned staging, overlapped) against --device cpu and the host's read rate (cat): the engine
    alone (fold-only, the comparison of goal 3) and end to end (output written, fsync'd)."""
    if not torch.cuda.is_available():
        raise SystemExit("gpu mode needs a CUDA device")
    params = int(args.params)
    print(f"GPU: {torch.cuda.get_device_name(0)}; {args.checkpoints} x {params / 1e6:.0f}M float32, medians of "
          f"{args.repeats}; torch {torch.__version__}")
    kinds = {"fold cpu": ("fold-only", "cpu"), "fold cuda": ("fold-only", "cuda"),
             "end-to-end cpu": ("ckpt-ema", "cpu"), "end-to-end cuda": ("ckpt-ema", "cuda")}
    for fmt in args.formats:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            files = make_checkpoints(Path(tmp), fmt, args.checkpoints, params)
            total = sum(f.stat().st_size for f in files)
            out = Path(tmp) / "out.safetensors"
            run_cat(files)
            runs: dict[str, list[float]] = {"cat": [], **{k: [] for k in kinds}}
            for _ in range(args.repeats):
                runs["cat"].append(run_cat(files)["seconds"])
                for kind, (method, device) in kinds.items():
                    runs[kind].append(run_worker(method, files, out, device=device, measure_memory=False)["seconds"])
            median = {k: statistics.median(v) for k, v in runs.items()}
            print(f"  .{fmt}: {total / 1e9:.2f} GB; " + ", ".join(f"{k} {total / s / 1e9:.2f} GB/s" for k, s in median.items()))
            for stage in ("fold", "end-to-end"):
                cpu_s, cuda_s = median[f"{stage} cpu"], median[f"{stage} cuda"]
                print(f"    {stage}: cuda/cat {median['cat'] / cuda_s:.2f}, cuda/cpu {cpu_s / cuda_s:.2f}")


def readers(args: argparse.Namespace) -> None:
    """Issue 23's set, for .pt and .safetensors: the engine alone and ``average`` end to end against ``cat``, the
    I/O floor and the unchecked route of the same run, at 24 x 64 MiB and 6 x 512 MiB (256 float32 tensors each,
    sizes times ``--scale``); then opening a .pt of 2,000 tensors against torch.load."""
    print(f"medians of {args.repeats}, warm cache; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    methods = ("unchecked", "fold-only", "ckpt-ema")
    for n, mib in ((24, 64), (6, 512)):
        params = int(mib * args.scale * 2**20) // 4
        for fmt in args.formats:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                files = make_checkpoints(Path(tmp), fmt, n, params, tensors=256)
                total = sum(f.stat().st_size for f in files)
                out = Path(tmp) / "out.safetensors"
                run_cat(files)
                times: dict[str, list[float]] = {m: [] for m in ("cat", "dd", *methods)}
                for _ in range(args.repeats):
                    times["cat"].append(run_cat(files)["seconds"])
                    times["dd"].append(run_dd(out, params * 4)["seconds"])
                    for method in methods:
                        times[method].append(run_worker(method, files, out, measure_memory=False)["seconds"])
                times["floor"] = [c + d for c, d in zip(times["cat"], times["dd"])]
                median = {m: statistics.median(v) for m, v in times.items()}
                print(f"\n{n} x {params * 4 / 2**20:.0f} MiB .{fmt} (256 float32 tensors each, {total / 1e9:.2f} GB)")
                print(f"  {'method':<10} {'median s':>9} {'GB/s':>7} {'x cat':>7} {'x floor':>8} {'x unchecked':>12}")
                for method in ("cat", "dd", "floor", *methods):
                    s = median[method]
                    print(f"  {method:<10} {s:>9.3f} {total / s / 1e9:>7.2f} {median['cat'] / s:>7.2f} "
                          f"{median['floor'] / s:>8.2f} {median['unchecked'] / s:>12.2f}")
    opening(args)


OPENING = r"""
import json, statistics, sys, time
from pathlib import Path
import torch
from ckpt_ema.formats.registry import open_checkpoint
path, repeats = Path(sys.argv[1]), int(sys.argv[2])
ways = {"ckpt-ema": lambda: open_checkpoint(path),
        "torch.load": lambda: torch.load(path, mmap=True, weights_only=True)}
for way in ways.values():
    way()
times = {name: [] for name in ways}
for _ in range(repeats):
    for name, way in ways.items():
        t0 = time.perf_counter()
        way()
        times[name].append(time.perf_counter() - t0)
print(json.dumps({name: statistics.median(t) for name, t in times.items()}))
"""


def opening(args: argparse.Namespace) -> None:
    """Opening a .pt of 2,000 float32 tensors of 1,024 elements: ckpt-ema's checked reader against torch.load."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "ckpt_2000.pt"
        g = torch.Generator().manual_seed(0)
        torch.save({f"layers.{i}.weight": torch.randn(1024, generator=g) for i in range(2000)}, path)
        run_cat([path])
        done = subprocess.run([sys.executable, "-c", OPENING, str(path), str(args.repeats * 5)], capture_output=True,
                              text=True, check=True)
        median = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nopening a .pt of 2,000 tensors, medians of {args.repeats * 5}: ckpt-ema {median['ckpt-ema'] * 1e3:.1f} ms, "
          f"torch.load(mmap=True, weights_only=True) {median['torch.load'] * 1e3:.1f} ms "
          f"(ckpt-ema {median['torch.load'] / median['ckpt-ema']:.2f}x as fast)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("throughput", "growth", "memory", "gpu", "readers"),
                        default="throughput")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--params", type=float, default=25e6, help="float32 parameters per checkpoint")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=["pt", "safetensors"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--scale", type=float, default=1.0, help="readers mode: checkpoint sizes times this")
    args = parser.parse_args()
    {"throughput": throughput, "growth": growth, "memory": memory, "gpu": gpu, "readers": readers}[args.mode](args)


if __name__ == "__main__":
    main()
