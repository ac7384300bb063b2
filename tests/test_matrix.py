"""Every format of the fixture table (tests/checkpoints.py) through every path an average takes: to a .safetensors
file, to a model folder (-o DIR/), to a checkpoint like the input (--like-input), in memory, a sweep, an append to an earlier output, --watch, and torchrun. Each
output must equal a float64 reference computed here from the weights as the format's own library loads them: timm's
EMA run at every step over the weights moving linearly between saves, or the uniform mean of the newest checkpoints
(helpers.reference_average); each tensor in its input dtype, to that dtype's rounding (float32: 1e-5); integer
tensors are the newest checkpoint's.

Torchrun takes DeepSpeed's runs once per ZeRO stage (a cell costs seconds). A cell that fails today because of a
known defect is marked xfail(strict=True) naming it, so that the fix shows.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from checkpoints import FORMATS, RUNS, copy_checkpoints
from helpers import (
    assert_average,
    assert_refused,
    reference_average,
    reference_hf_sharded,
    run_cli,
    torchrun,
)
from safetensors.torch import load_file

import ckpt_ema

DECAY = 0.8
LAST = 2
WATCH_DEADLINE = 10.0  # seconds after which a watch still running is sent SIGTERM (it stops, and the cell fails)

# (path, format) -> (the defect, the exception it shows as) of the cells that fail today: none since the watcher's
# completeness checks were fixed (safetensors raised NameError, DCP's .distcp files were taken for one zip).
KNOWN_FAILURES: dict[tuple[str, str], tuple[str, type[BaseException]]] = {}
# Formats whose runs two ranks write (seconds, once per session: a spawn, or Lightning's Trainer): outside the fast subset.
SLOW_FORMATS = {"dcp_fsdp", "dcp_tp", "dcp_lightning_model_parallel", "dcp_lightning_fsdp"}
# The rows whose checkpoints are built on torch DCP: what --like-input writes.
DCP_BASED = ("dcp_", "olmo_core", "megatron_", "nemo2")
# A torchrun cell costs seconds: DeepSpeed's runs go through it once per ZeRO stage. The runs of one stage differ in
# the optimizer's dtypes, which the other paths cover; under torchrun each rank reads its share with the same reader.
TORCHRUN_DEEPSPEED = {"deepspeed_zero1-fp32", "deepspeed_zero2-bf16", "deepspeed_zero3-fp16"}
assert TORCHRUN_DEEPSPEED <= set(FORMATS), sorted(TORCHRUN_DEEPSPEED - set(FORMATS))


def formats(path: str) -> list:
    """The formats, as the parameters of the cells of ``path`` (every one; for torchrun, DeepSpeed's of
    TORCHRUN_DEEPSPEED): a known failure marked xfail(strict=True), the formats of SLOW_FORMATS marked slow."""
    params = []
    for name in FORMATS:
        if path == "torchrun" and name.startswith("deepspeed_") and name not in TORCHRUN_DEEPSPEED:
            continue
        marks = [pytest.mark.slow] if name in SLOW_FORMATS else []
        if (path, name) in KNOWN_FAILURES:
            reason, raises = KNOWN_FAILURES[path, name]
            marks.append(pytest.mark.xfail(strict=True, reason=reason, raises=raises))
        params.append(pytest.param(name, marks=marks))
    return params


def cli_ok(*args: object) -> str:
    """``ckpt-ema ARGS`` in this process; it must succeed; its stderr. An exception it ended with is raised here."""
    res = run_cli(*args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, (res.exit_code, res.output)
    return res.stderr


# ------------------------------------------------------------------------------------------- the paths


@pytest.mark.parametrize("name", formats("file"))
def test_average_to_a_file(name: str, tmp_path: Path) -> None:
    run = RUNS[name]
    cli_ok("average", run.folder, "--decay", DECAY, "-o", tmp_path / "ema.safetensors")
    assert_average(run, load_file(tmp_path / "ema.safetensors"), decay=DECAY)


@pytest.mark.parametrize("name", formats("folder"))
def test_average_to_a_model_folder(name: str, tmp_path: Path) -> None:
    """-o DIR/: the weights file, and where the format has a loader of its own (transformers, PEFT), the folder as
    that loader reads it."""
    run = RUNS[name]
    out = tmp_path / "avg"
    cli_ok("average", run.folder, "--decay", DECAY, "-o", f"{out}/")
    assert_average(run, load_file(out / run.weights_file), decay=DECAY)
    if run.load_folder is not None:
        assert_average(run, run.load_folder(out), decay=DECAY)


@pytest.mark.parametrize("name", formats("like_input"))
def test_average_like_the_input(name: str, tmp_path: Path) -> None:
    """-o DIR --like-input: a format built on torch DCP gets a checkpoint of its own layout holding the average (read
    back as any input: tests/test_like_input.py loads it with torch DCP's own loader); any other is refused in one
    line, before anything is written."""
    run = RUNS[name]
    out = tmp_path / "merged"
    if name.startswith(DCP_BASED):
        cli_ok("average", run.folder, "--decay", DECAY, "-o", out, "--like-input")
        assert_average(run, ckpt_ema.load_state_dict(out)[0], decay=DECAY)
    else:
        assert_refused([run.folder, "--decay", DECAY, "--like-input"], "--like-input writes checkpoints built on "
                       "PyTorch Distributed Checkpoint", out=out)


@pytest.mark.parametrize("name", formats("memory"))
def test_average_in_memory(name: str) -> None:
    run = RUNS[name]
    assert_average(run, ckpt_ema.average(run.folder, decay=DECAY).state_dict, decay=DECAY)


@pytest.mark.parametrize("name", formats("sweep"))
def test_sweep_writes_each_candidate(name: str, tmp_path: Path) -> None:
    run = RUNS[name]
    cli_ok("sweep", run.folder, "--decay", DECAY, "--last", LAST, "--no-plot", "-o", tmp_path / "sweep")
    assert_average(run, load_file(tmp_path / "sweep" / f"ema-{DECAY:g}.safetensors"), decay=DECAY)
    assert_average(run, load_file(tmp_path / "sweep" / f"last-{LAST}.safetensors"), last=LAST)


@pytest.mark.parametrize("name", formats("append"))
def test_append_equals_the_full_average(name: str, tmp_path: Path) -> None:
    """The first checkpoints averaged, the newest added to the run, the same command again: the second run folds
    in only the newest, and gives the average of all."""
    run = RUNS[name]
    folder, out = tmp_path / "run", tmp_path / "ema.safetensors"
    copy_checkpoints(run, run.steps[:-1], folder)
    cli_ok("average", folder, "--decay", DECAY, "-o", out)
    copy_checkpoints(run, run.steps[-1:], folder)
    again = cli_ok("average", folder, "--decay", DECAY, "-o", out)
    assert f"appended 1 new checkpoint (step {run.steps[-1]})" in again, again
    assert_average(run, load_file(out), decay=DECAY)


@pytest.mark.parametrize("name", formats("watch"))
def test_watch_until_the_last_step(name: str, tmp_path: Path) -> None:
    """--watch over a run whose first checkpoints exist; the newest is added from a thread once the watcher has
    written its first output; --until-step stops it there."""
    run = RUNS[name]
    folder, out = tmp_path / "run", tmp_path / "ema.safetensors"
    copy_checkpoints(run, run.steps[:-1], folder)

    def trainer() -> None:
        while not out.exists() and not done.is_set():
            time.sleep(0.02)
        copy_checkpoints(run, run.steps[-1:], folder)

    def stop_watching() -> None:
        timed_out.set()
        os.kill(os.getpid(), signal.SIGTERM)  # the watcher stops on it, as on Ctrl-C

    done, timed_out = threading.Event(), threading.Event()
    adder = threading.Thread(target=trainer)
    watchdog = threading.Timer(WATCH_DEADLINE, stop_watching)
    adder.start()
    watchdog.start()
    try:
        stderr = cli_ok("average", folder, "--watch", "--until-step", run.steps[-1], "--poll", 0.05, "--decay",
                        DECAY, "-o", out)
    finally:
        watchdog.cancel()
        done.set()
        adder.join()
    assert not timed_out.is_set(), f"still watching after {WATCH_DEADLINE} s: {stderr}"
    assert_average(run, load_file(out), decay=DECAY)


@pytest.mark.slow
@pytest.mark.parametrize("name", formats("torchrun"))
def test_torchrun_two_ranks(name: str, tmp_path: Path) -> None:
    """Two ranks each write their share of the tensors: OUT.index.json and its shards, read here as the
    safetensors package reads each shard the index names."""
    run = RUNS[name]
    out = tmp_path / "ema.safetensors"
    done = torchrun("average", run.folder, "--decay", DECAY, "-o", out, "--no-state")
    assert done.returncode == 0, done.stderr
    got = reference_hf_sharded(out.with_name(out.name + ".index.json"))
    assert got is not None, sorted(p.name for p in tmp_path.iterdir())
    assert_average(run, got, decay=DECAY)


def test_the_reference_tells_the_averages_apart() -> None:
    """The check can fail: the EMA of one run is not its uniform mean, nor the EMA of another decay, to the
    tolerance the cells use."""
    run = RUNS["torch_state_dict"]
    got = {n: t.to(run.weights[run.steps[-1]][n].dtype) for n, t in reference_average(run, decay=DECAY).items()}
    assert_average(run, got, decay=DECAY)
    for other in ({"last": LAST}, {"decay": 0.9}):
        with pytest.raises(AssertionError, match="beyond"):
            assert_average(run, got, **other)
