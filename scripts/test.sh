#!/usr/bin/env bash
# The whole test suite, on a fresh machine or not: makes .venv if missing, installs, runs pytest.
# CIFAR-10 tests read the data set from $CKPT_EMA_DATA (default: ../shared/data beside the checkout, if present).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
if [ -z "${CKPT_EMA_DATA:-}" ] && [ -d "$ROOT/../shared/data/cifar-10-batches-py" ]; then
    export CKPT_EMA_DATA="$(cd "$ROOT/../shared/data" && pwd)"
fi
exec "$VENV_PY" -m pytest "$@"
