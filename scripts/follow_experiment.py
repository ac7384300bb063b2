"""The seed's recipe followed live: the quality of a checkpoint every 10 steps, with the disk of a few checkpoints.

    CKPT_EMA_DATA=../shared/data python scripts/follow_experiment.py --run out/follow

Two processes run side by side:

* ``ckpt-ema train`` with the recipe of scripts/seed_experiment.py (the seed's ``net``, 10 epochs, AdamW at a
  constant 1e-3, batch 64, no augmentation, 5,000 training images held out for validation, timm's EMA kept online
  with decay 0.9998 and warmup), saving a checkpoint every 10 steps but keeping only the newest ``--keep-last``;
* ``ckpt-ema sweep RUN --watch``, which folds each checkpoint into the averages as soon as it is written (the
  seed's decay 0.9998 with warmup, and 0.995 and 0.99), and stops at the run's last step.

Every 0.2 s the bytes of every file in the run folder and the sweep's folder are added up: the high-water mark of
the disk. "Keeping all" is what the run folder alone would have held with every checkpoint kept (the checkpoint's
size times the checkpoints saved). At the end the final model, the online EMA and each watched average are scored
on the test set and the validation images; "gain recovered" is (average - final) / (online EMA - final) in test
accuracy, as in the seed experiment, whose post-hoc averages read all 705 checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ckpt_ema
from ckpt_ema.cifar.data import split_validation, validation_indices
from ckpt_ema.cifar.evaluate import EvalData, score
from ckpt_ema.cifar.models import build_model

DECAYS = ("0.9998", "0.995", "0.99")


def bytes_on_disk(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass  # deleted meanwhile
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("out/follow"))
    parser.add_argument("--data", default=None, help="CIFAR-10 folder (default: $CKPT_EMA_DATA)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--keep-last", type=int, default=10)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--val-split", type=int, default=5000)
    parser.add_argument("--train-subset", type=int, default=None, help="(quick trials)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    data = ["--data", args.data] if args.data else []
    sweep_dir = args.run.with_name(args.run.name + "-sweep")
    images = (args.train_subset or 50_000) - args.val_split
    final_step = math.ceil(images / 64) * args.epochs
    cli = [sys.executable, "-m", "ckpt_ema"]

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], bytes_on_disk([args.run, sweep_dir]))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    # The watcher's lines go to a file (a pipe nobody reads until the end would fill and stall it), and training
    # starts once it is watching, so that it sees the first checkpoint.
    log_path = args.run.with_name(args.run.name + "-watch.log")
    args.run.mkdir(parents=True, exist_ok=True)  # the watcher waits for an empty folder; a missing one is a typo
    log = open(log_path, "w")
    watcher = subprocess.Popen(
        [*cli, "sweep", str(args.run), "--watch", "--until-step", str(final_step), "--poll", str(args.poll),
         "--warmup", "--decay", *DECAYS, "--no-plot", "-o", str(sweep_dir)],
        stderr=log, stdout=subprocess.DEVNULL, text=True)
    while not log_path.read_text().startswith("watching") and watcher.poll() is None:
        time.sleep(0.1)
    train = [*cli, "train", "-o", str(args.run), "--model", "net", "--epochs", str(args.epochs), "--save-every", "10",
             "--keep-last", str(args.keep_last), "--lr-schedule", "constant", "--no-augment", "--val-split",
             str(args.val_split), "--ema-decay", "0.9998", "--ema-warmup", "--no-eval", "--quiet", *data]
    if args.train_subset:
        train += ["--train-subset", str(args.train_subset)]
    trained = subprocess.run(train, capture_output=True, text=True)
    if trained.returncode:
        watcher.kill()
        sys.exit(f"train failed: {trained.stderr}")
    train_seconds = time.perf_counter() - started
    watcher.wait(timeout=600)
    log.close()
    stop.set()
    sampler.join()
    watch_log = log_path.read_text()
    if watcher.returncode:
        sys.exit(f"the watching sweep failed: {watch_log}")
    updates = [line for line in watch_log.splitlines() if line.startswith("step ")]
    missed = [line for line in watch_log.splitlines() if "deleted before it could be read" in line]
    saves = final_step // 10 + 1
    folded = len(json.loads((sweep_dir / "ckpt-ema-state" / "manifest.json").read_text())["inputs"])
    print(f"trained {final_step} steps in {train_seconds:.0f} s beside the watching sweep (polling every "
          f"{args.poll} s): {len(updates)} updates folded {folded} of the {saves} checkpoints saved "
          f"({len(missed)} seen but deleted before they could be read)")

    final = args.run / f"step_{final_step:08d}.pt"
    checkpoint_bytes = final.stat().st_size
    all_kept = checkpoint_bytes * saves + bytes_on_disk([args.run]) - checkpoint_bytes * args.keep_last
    eval_data = EvalData(args.data, None)
    hp = json.loads((args.run / "run.json").read_text())["hparams"]
    _, val = split_validation(eval_data.train(None), validation_indices(hp["train_images"], hp["val_split"], hp["seed"]))

    rows = []
    for name, path in [("final model", final), ("online EMA (every step)", args.run / "online_ema" / "ema.pt")] + [
            (f"watched EMA, decay {d} (linear, every 10 steps)", sweep_dir / f"ema-{d}.safetensors") for d in DECAYS]:
        model = build_model("net")
        model.load_state_dict(ckpt_ema.load_state_dict(path)[0])
        rows.append({"weights": name, "test": score(model, eval_data.test).accuracy, "val": score(model, val).accuracy})
    base, online = rows[0]["test"], rows[1]["test"]
    print("| weights | test acc | val acc | gain recovered |")
    print("|---|---:|---:|---:|")
    for row in rows:
        gain = f"{100 * (row['test'] - base) / (online - base):.0f}%" if row is not rows[0] and online != base else ""
        print(f"| {row['weights']} | {100 * row['test']:.2f}% | {100 * row['val']:.2f}% | {gain} |")
    print(f"disk high-water mark (run folder and sweep folder): {peak[0] / 1e6:.1f} MB; keeping every checkpoint: "
          f"{all_kept / 1e6:.1f} MB ({saves} checkpoints of {checkpoint_bytes / 1e6:.2f} MB), "
          f"{all_kept / peak[0]:.0f}x more")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "peak_bytes": peak[0], "all_kept_bytes": all_kept,
                                         "train_seconds": train_seconds, "updates": len(updates),
                                         "folded": folded, "saved": saves, "missed": len(missed)}, indent=2))


if __name__ == "__main__":
    main()
