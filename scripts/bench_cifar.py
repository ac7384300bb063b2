"""How fast ``train`` and ``eval`` run on this machine, and how much of an epoch goes to data handling.

    PYTHONPATH=. python scripts/bench_cifar.py --data ../shared/data [--model net] [--repeats 5] [--batches 100]

Measures, each ``--repeats`` times (medians printed, with the spread):

* data handling per training batch: index the in-memory uint8 tensor, augment (crop + flip), normalise;
* model compute per training batch: forward, loss, backward, AdamW step, on a fixed batch;
* a training step as ``train`` does it (both of the above), in images/s;
* eval: normalise + forward over the test set in batches of 1000, in images/s (and the normalising share);
* one real epoch of ``ckpt_ema.train.train`` (checkpoint at its end, no scoring), end to end, once.

Run it on an otherwise idle machine: on 2 cores another busy process slows torch's threads several-fold (the
measurements take turns, so their ratios survive some load better than the absolute figures; compare "best").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ckpt_ema.cifar.data import load_cifar10, normalize, seeded_generator, training_batch
from ckpt_ema.cifar.evaluate import EVAL_BATCH_SIZE
from ckpt_ema.cifar.models import ARCHS, build_model
from ckpt_ema.cifar.train import TrainConfig, train


def timed(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, over ``repeats`` rounds after one untimed warm-up round.

    The functions take turns within each round, so that a burst of load from another process slows all of them
    alike instead of one measurement: the ratios stay meaningful on a shared machine.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def spread(times: list[float], per: int) -> str:
    """median rate, and the best and worst, of ``per`` items per call."""
    rates = sorted(per / t for t in times)
    return f"{statistics.median(rates):8.0f} /s  (best {rates[-1]:.0f}, worst {rates[0]:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="folder holding cifar-10-batches-py/ [default: $CKPT_EMA_DATA]")
    parser.add_argument("--model", default="net", choices=list(ARCHS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100, help="training batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-epoch", action="store_true", help="skip the end-to-end epoch of train()")
    args = parser.parse_args()

    data = load_cifar10(args.data)
    train_split, test = data["train"], data["test"]
    bs, n_batches = args.batch_size, args.batches
    torch.manual_seed(0)
    model = build_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.randperm(len(train_split), generator=seeded_generator(0, "bench"))
    print(
        f"{args.model} on {torch.get_num_threads()} threads, torch {torch.__version__}, batch {bs}, "
        f"{n_batches} batches x {args.repeats} repeats (median rate; best, worst)"
    )

    def data_only() -> None:
        for i in range(n_batches):
            training_batch(train_split, order[i * bs : (i + 1) * bs], seeded_generator(0, "augment", i))

    images, labels = training_batch(train_split, order[:bs], seeded_generator(0, "augment", 0))

    def compute_only() -> None:
        model.train()
        for _ in range(n_batches):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def train_steps() -> None:
        model.train()
        for i in range(n_batches):
            x, y = training_batch(train_split, order[i * bs : (i + 1) * bs], seeded_generator(0, "augment", i))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def eval_normalize() -> None:
        for start in range(0, len(test), EVAL_BATCH_SIZE):
            normalize(test.images[start : start + EVAL_BATCH_SIZE])

    @torch.no_grad()
    def eval_all() -> None:
        model.eval()
        for start in range(0, len(test), EVAL_BATCH_SIZE):
            model(normalize(test.images[start : start + EVAL_BATCH_SIZE])).argmax(1)

    t = timed(
        {
            "data": data_only,
            "compute": compute_only,
            "step": train_steps,
            "eval_norm": eval_normalize,
            "eval": eval_all,
        },
        args.repeats,
    )
    t_data, t_compute, t_step, t_eval_norm, t_eval = (t[k] for k in ("data", "compute", "step", "eval_norm", "eval"))
    images_per_repeat = n_batches * bs
    data_s, compute_s = statistics.median(t_data), statistics.median(t_compute)
    ms = {name: 1e3 * statistics.median(times) / n_batches for name, times in t.items()}
    norm_share = 100 * statistics.median(t_eval_norm) / statistics.median(t_eval)
    print(f"train data handling  {spread(t_data, images_per_repeat)} images  ({ms['data']:.2f} ms/batch)")
    print(f"train model compute  {spread(t_compute, images_per_repeat)} images  ({ms['compute']:.2f} ms/batch)")
    print(f"train step (both)    {spread(t_step, images_per_repeat)} images  ({ms['step']:.2f} ms/batch)")
    print(f"eval (10k test)      {spread(t_eval, len(test))} images  (normalising {norm_share:.1f}% of it)")
    best_data, best_compute = min(t_data), min(t_compute)
    print(
        f"data share of a training step: {100 * data_s / (data_s + compute_s):.1f}% of medians, "
        f"{100 * best_data / (best_data + best_compute):.1f}% of bests (compute / data = {compute_s / data_s:.1f}x)"
    )

    if not args.no_epoch:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(
                TrainConfig(
                    output=Path(tmp) / "run",
                    arch=args.model,
                    epochs=1,
                    batch_size=bs,
                    data=args.data,
                    evaluate=False,
                    quiet=True,
                )
            )
        print(
            f"one epoch of train(): {result.final_step} steps in {result.seconds:.1f} s = "
            f"{len(train_split) / result.seconds:.0f} images/s (checkpoints at steps 0 and {result.final_step})"
        )


if __name__ == "__main__":
    main()
