"""The smallest end-to-end use of ckpt-ema, offline and in seconds (``scripts/demo.sh`` runs it).

    python examples/quickstart.py train out/demo        # noisy SGD, a checkpoint every 10 steps
    ckpt-ema average out/demo --decay 0.98 -o out/demo-ema.safetensors
    python examples/quickstart.py score out/demo out/demo-ema.safetensors

    # let ckpt-ema choose the average on held-out data, with this script as the user's own evaluation:
    ckpt-ema sweep out/demo --decay 0.9 0.98 --sigma-rel 0.05 0.1 --last 10 \
        --eval-cmd 'python examples/quickstart.py loss {weights}' --minimize -o out/demo-sweep

The task is linear regression with label noise, trained with a constant, fairly large learning rate: the weights
end up bouncing around the optimum instead of settling on it, which is exactly the situation in which an EMA of
the weights beats the last iterate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ckpt_ema

FEATURES = 32
STEPS = 1000
SAVE_EVERY = 10
BATCH = 16
LR = 0.05
NOISE = 1.0
SEED = 0


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x @ w_true + noise, with w_true fixed by SEED so train and test share it."""
    w_true = torch.randn(FEATURES, 1, generator=torch.Generator().manual_seed(SEED))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return x, x @ w_true + NOISE * torch.randn(n, 1, generator=g)


def train(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = torch.nn.Linear(FEATURES, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = make_data(STEPS * BATCH, seed=1)
    for step in range(1, STEPS + 1):
        xb, yb = x[(step - 1) * BATCH : step * BATCH], y[(step - 1) * BATCH : step * BATCH]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % SAVE_EVERY == 0:
            torch.save({"state_dict": model.state_dict(), "step": step, "arch": "quickstart-linear"}, run / f"step_{step:05d}.pt")
    print(f"trained {STEPS} steps of SGD (lr {LR}), saved {STEPS // SAVE_EVERY} checkpoints in {run}/")


def test_loss(weights: Path, seed: int = 2) -> float:
    """Mean squared error on 10,000 fresh examples: the test set (seed 2) or the validation set (seed 3)."""
    model = torch.nn.Linear(FEATURES, 1)
    state, _ = ckpt_ema.load_state_dict(weights)
    model.load_state_dict(state)
    x, y = make_data(10_000, seed=seed)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def loss(weights: Path) -> None:
    """One line for ``sweep --eval-cmd``: validation loss (chooses: the first entry) and test loss (shown)."""
    print(json.dumps({"val_mse": test_loss(weights, seed=3), "test_mse": test_loss(weights, seed=2)}))


def score(run: Path, ema: Path) -> None:
    last = sorted(run.glob("step_*.pt"))[-1]
    raw, averaged = test_loss(last), test_loss(ema)
    floor = NOISE**2  # the loss of the true weights: nothing can do better
    print(f"test MSE, last checkpoint {last.name}: {raw:.4f}")
    print(f"test MSE, EMA of the checkpoints:   {averaged:.4f}")
    print(f"excess loss over the noise floor ({floor:.2f}) cut by {100 * (1 - (averaged - floor) / (raw - floor)):.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train").add_argument("run", type=Path)
    scoring = sub.add_parser("score")
    scoring.add_argument("run", type=Path)
    scoring.add_argument("ema", type=Path)
    sub.add_parser("loss").add_argument("weights", type=Path)
    args = parser.parse_args()
    if args.command == "train":
        train(args.run)
    elif args.command == "loss":
        loss(args.weights)
    else:
        score(args.run, args.ema)


if __name__ == "__main__":
    main()
