"""Shared fixtures: the table of runs of every checkpoint format (tests/checkpoints.py), made under pytest's
temporary folder; where the real CIFAR-10 batches are (tests that need them skip cleanly when there are none)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from checkpoints import RUNS, RunTable

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def run_table(tmp_path_factory: pytest.TempPathFactory) -> RunTable:
    """The table of runs, each made on first use under this session's temporary folder and kept for the session
    (also for the makers that use it outside fixtures, such as the fuzzing harness's DCP checkpoint)."""
    RUNS.root = tmp_path_factory.mktemp("runs")
    return RUNS


@pytest.fixture(autouse=True)
def one_thread_for_tiny_tensors(request: pytest.FixtureRequest) -> Iterator[None]:
    """One torch thread for each test not marked slow (the slow ones train real networks): the tensors are tiny, so a
    second thread only adds overhead, and where the cores are busy it spins for seconds (the fast subset took 3
    times as long on 2 loaded cores with torch's default threads)."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
