"""Shared fixtures: where the real CIFAR-10 batches are (tests that need them skip cleanly when there are none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The folder holding ``cifar-10-batches-py/``: ``$CKPT_EMA_DATA``, else ``<repo>/../shared/data``."""
    from ckpt_ema.cifar.data import has_batches

    candidates = [Path(os.environ["CKPT_EMA_DATA"])] if os.environ.get("CKPT_EMA_DATA") else []
    candidates.append(REPO.parent / "shared" / "data")
    for folder in candidates:
        if has_batches(folder):
            return folder
    pytest.skip(
        f"no CIFAR-10 batches in {' or '.join(map(str, candidates))}; "
        "set CKPT_EMA_DATA to a folder holding cifar-10-batches-py/"
    )
