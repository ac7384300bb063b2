#!/usr/bin/env bash
# The end-to-end example on a fresh machine: makes .venv if missing, installs, then trains a small model with
# noisy SGD (saving a checkpoint every 10 steps), averages the checkpoints with ckpt-ema, and compares the
# test loss of the last checkpoint with that of the average. Runs offline in well under a minute.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
RUN="${1:-out/demo}"
set -x
python examples/quickstart.py train "$RUN"
ckpt-ema average "$RUN" --decay 0.98 --dry-run | tail -n 4
ckpt-ema average "$RUN" --decay 0.98 -o "$RUN-ema.safetensors"
python examples/quickstart.py score "$RUN" "$RUN-ema.safetensors"
