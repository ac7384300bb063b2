#!/usr/bin/env bash
# Static checks, as CI runs them before the tests: ruff (pyflakes rules and syntax errors) and mypy over ckpt_ema/,
# both configured in pyproject.toml. Makes .venv if missing, like test.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
"$VENV/bin/ruff" check ckpt_ema tests scripts examples
"$VENV/bin/mypy"
