"""Benchmark ``ckpt-ema average`` against ``cat`` and a naive averaging loop, on synthetic checkpoints.

    python scripts/bench_average.py                      # 10 checkpoints x 25M float32 params, .pt and .safetensors
    python scripts/bench_average.py --params 50e6 --checkpoints 10 --repeats 5

For each input format it writes the checkpoints once, warms the page cache, then runs, alternately and
``--repeats`` times each, in a fresh interpreter per run (start-up excluded from the timing):

* ``cat``: ``cat FILES > /dev/null``, the rate at which this machine reads the files;
* ``naive``: fairseq's average_checkpoints style: torch.load each whole checkpoint, a Python loop of mul_/add_;
* ``ckpt-ema``: ``ckpt_ema.average(...)`` end to end, output file included.

It prints medians, throughput in GB/s of checkpoint bytes, ratios to ``cat``, and peak anonymous memory
(RssAnon: memory the process owns, not page-cache pages it maps) next to the model's size. These machines are
noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKER = r"""
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

method, files, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
import torch
import ckpt_ema
baseline = rss_anon_kib()
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
else:
    ckpt_ema.average(files, out, decay=0.999)
seconds = time.perf_counter() - t0
stop.set()
peak[0] = max(peak[0], rss_anon_kib())
print(json.dumps({"seconds": seconds, "peak_anon_bytes": (peak[0] - baseline) * 1024}))
"""


def make_checkpoints(folder: Path, fmt: str, n: int, params: int) -> list[Path]:
    """``n`` checkpoints of a model with ``params`` float32 parameters in tensors of 1M-4M elements."""
    from safetensors.torch import save_file

    sizes, left = [], params
    while left > 0:
        sizes.append(min(left, 1_000_000 * (1 + len(sizes) % 4)))
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
    return files


def run_cat(files: list[Path]) -> dict[str, float]:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return {"seconds": time.perf_counter() - t0, "peak_anon_bytes": 0}


def run_worker(method: str, files: list[Path], out: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, method, json.dumps([str(f) for f in files]), str(out)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--params", type=float, default=25e6, help="float32 parameters per checkpoint")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=["pt", "safetensors"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
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
            results: dict[str, list[dict[str, float]]] = {"cat": [], "naive": [], "ckpt-ema": []}
            for _ in range(args.repeats):
                results["cat"].append(run_cat(files))
                results["naive"].append(run_worker("naive", files, out))
                results["ckpt-ema"].append(run_worker("ckpt-ema", files, out))
            cat_s = statistics.median(r["seconds"] for r in results["cat"])
            print(f"\n.{fmt}: {total / 1e9:.2f} GB of checkpoints")
            print(f"  {'method':<10} {'median s':>9} {'GB/s':>7} {'x cat':>7} {'peak anon':>10} {'x model':>8}")
            for method, runs in results.items():
                s = statistics.median(r["seconds"] for r in runs)
                peak = statistics.median(r["peak_anon_bytes"] for r in runs)
                peak_text = f"{peak / 1e9:>9.2f}G {peak / model_bytes:>8.2f}" if method != "cat" else f"{'-':>10} {'-':>8}"
                print(f"  {method:<10} {s:>9.3f} {total / s / 1e9:>7.2f} {cat_s / s:>7.2f} {peak_text}")


if __name__ == "__main__":
    main()
