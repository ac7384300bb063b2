"""Nothing lost (issue 12): no output replaces an input, whatever name reaches it; SIGTERM and SIGHUP clean up as
Ctrl-C does, and Ctrl-C at any moment exits 130 without a traceback; a run killed outright (kill -9) leaves
temporary files that the next run removes; names the safetensors format cannot hold are refused; a failed sweep
leaves no folder it made."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckpt_ema.cli import main
from ckpt_ema.interrupts import Interrupted, signals_as_interrupts

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def safetensors_run(folder: Path, steps: tuple[int, ...] = (1, 2, 3), numel: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in steps:
        save_file({"w": torch.full((numel,), float(s)), "b": torch.arange(3.0) * s}, str(folder / f"ckpt_{s}.safetensors"))
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_refusal(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt-ema: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- the output is an input


@pytest.mark.parametrize("how", ["same name", "symlink", "hard link", "relative path"])
def test_an_output_that_is_an_input_is_refused(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = safetensors_run(tmp_path / "run")
    victim = run / "ckpt_2.safetensors"
    before = digest(victim)
    if how == "same name":
        out = victim
    elif how == "relative path":
        monkeypatch.chdir(tmp_path)
        out = Path("run/../run/ckpt_2.safetensors")
    else:
        out = tmp_path / "ema.safetensors"
        (out.symlink_to if how == "symlink" else out.hardlink_to)(victim)
    result = CliRunner().invoke(main, ["average", str(run), "-o", str(out)])
    line = assert_one_line_refusal(result, "replace a checkpoint", str(out))
    assert ("symlink" in line) == (how == "symlink") and ("hard link" in line) == (how == "hard link")
    assert digest(victim) == before
    assert hidden_files(run) == [] and hidden_files(out.parent) == []


def test_an_output_inside_a_folder_checkpoint_or_a_sharded_set_is_refused(tmp_path: Path) -> None:
    """Every file a checkpoint consists of counts: a Hugging Face folder's model.safetensors, and the shards and
    index of a sharded set (NAME.safetensors would remove the index and other shard counts of NAME)."""
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
    single = tmp_path / "checkpoint-9"
    single.mkdir()
    save_file({"w": torch.zeros(4)}, str(single / "model.safetensors"))
    before = digest(folder / "model.safetensors")
    result = CliRunner().invoke(main, ["average", str(folder), str(single), "-o", str(folder / "model.safetensors")])
    assert_one_line_refusal(result, "replace a checkpoint")
    assert digest(folder / "model.safetensors") == before

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(2)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(other))
    result = CliRunner().invoke(main, ["average", str(sharded / "model.safetensors.index.json"), str(other),
                                       "-o", str(sharded / "model.safetensors"), "--per-checkpoint"])
    assert_one_line_refusal(result, "replace a checkpoint")
    assert sorted(p.name for p in sharded.iterdir()) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors", "model.safetensors.index.json"]


def test_a_sweep_into_the_run_folder_may_not_replace_a_checkpoint(tmp_path: Path) -> None:
    run = safetensors_run(tmp_path / "run")
    save_file({"w": torch.full((8,), 4.0), "b": torch.arange(3.0) * 4}, str(run / "ema-0.9.safetensors"))
    before = digest(run / "ema-0.9.safetensors")
    result = CliRunner().invoke(main, ["sweep", str(run), "--decay", "0.9", "--per-checkpoint", "-o", str(run),
                                       "--no-plot"])
    assert_one_line_refusal(result, "replace a checkpoint", "ema-0.9.safetensors")
    assert digest(run / "ema-0.9.safetensors") == before


def test_a_failed_sweep_leaves_no_folder_it_made(tmp_path: Path) -> None:
    run = safetensors_run(tmp_path / "run")
    save_file({"w": torch.full((8,), float("nan")), "b": torch.zeros(3)}, str(run / "ckpt_4.safetensors"))
    result = CliRunner().invoke(main, ["sweep", str(run), "--decay", "0.9", "-o", str(tmp_path / "new"), "--no-plot"])
    assert_one_line_refusal(result, "NaN")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays, empty or not
    result = CliRunner().invoke(main, ["sweep", str(run), "--decay", "0.9", "-o", str(tmp_path / "kept"), "--no-plot"])
    assert result.exit_code == 2 and (tmp_path / "kept").is_dir()


# ------------------------------------------------------------------------------------------- names the format cannot hold


@pytest.mark.parametrize("name", ["__metadata__", "bad\udcffname"])
def test_tensor_names_safetensors_cannot_hold_are_refused(tmp_path: Path, name: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2):
        torch.save({name: torch.full((3,), float(s)), "w": torch.ones(2)}, run / f"ckpt_{s}.pt")
    out = tmp_path / "ema.safetensors"
    result = CliRunner().invoke(main, ["average", str(run), "-o", str(out)])
    assert_one_line_refusal(result, "__metadata__" if name == "__metadata__" else "UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_output_name_too_long_for_its_shards_is_refused(tmp_path: Path) -> None:
    """NAME-00001-of-00002.safetensors and its temporary name must stay within 255 bytes: refused before any work."""
    run = safetensors_run(tmp_path / "run")
    out = tmp_path / ("x" * 200 + ".safetensors")
    assert_one_line_refusal(CliRunner().invoke(main, ["average", str(run), "-o", str(out)]), "too long")
    fits = tmp_path / ("x" * 150 + ".safetensors")
    result = CliRunner().invoke(main, ["average", str(run), "-o", str(fits), "--max-shard-size", "40"])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("x*-of-*.safetensors"))) > 1


# ------------------------------------------------------------------------------------------- signals


def big_run(folder: Path, count: int = 10, numel: int = 3_000_000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(1, count + 1):
        save_file({"w": torch.full((numel,), float(s))}, str(folder / f"ckpt_{s}.safetensors"))
    return folder


def start_average(run: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckpt_ema", "average", str(run), "--accum-dtype", "float64",
                             "-o", str(out), *extra], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=ENV, cwd=out.parent)


def wait_for_temporary(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """True once the run's temporary output file exists (its writing has begun); False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if hidden_files(folder):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path: Path, signum: int) -> None:
    run = big_run(tmp_path / "run")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ema.safetensors"
    save_file({"old": torch.arange(4.0)}, str(out))
    old = out.read_bytes()
    proc = start_average(run, out)
    try:
        writing = wait_for_temporary(out_dir, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert hidden_files(out_dir) == []
    if writing and proc.returncode != 0:
        assert proc.returncode == 128 + signum, (proc.returncode, err)
        assert "Traceback" not in err and err.strip().splitlines()[-1] == \
            f"ckpt-ema: error: interrupted ({signal.Signals(signum).name})", err
        assert out.read_bytes() == old
    else:  # it finished before the signal: the whole new average
        assert proc.returncode == 0 and set(load_file(out)) == {"w"}


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_exits_130_without_a_traceback(tmp_path: Path, delay: float) -> None:
    """From the first second (click, then torch being imported) to the fold: exit 130, one line, nothing left."""
    run = safetensors_run(tmp_path / "run", numel=1_000_000)
    out = tmp_path / "ema.safetensors"
    proc = start_average(run, out)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 130), (proc.returncode, err)
    if proc.returncode == 130:
        assert not out.exists() and err.strip().splitlines()[-1].startswith("ckpt-ema: error: interrupted"), err
    assert hidden_files(tmp_path) == []


def test_handlers_are_restored_and_ignored_signals_stay_ignored() -> None:
    def mine(signum, frame):  # noqa: ANN001
        raise AssertionError("the previous handler must not run inside the block")

    previous = signal.signal(signal.SIGTERM, mine)
    ignored = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(Interrupted) as caught:
            with signals_as_interrupts():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup's choice is kept
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert caught.value.exit_code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, ignored)


# ------------------------------------------------------------------------------------------- kill -9 leftovers


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path: Path) -> None:
    run = big_run(tmp_path / "run", count=6)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ema.safetensors"
    proc = start_average(run, out)
    try:
        assert wait_for_temporary(out_dir, proc), proc.communicate()
        proc.kill()  # SIGKILL: nothing can clean up
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    left = hidden_files(out_dir)
    assert len(left) == 1 and f".{proc.pid}@" in left[0]
    # another writer's temporary file (another host on a shared filesystem) is reported, never removed
    foreign = out_dir / f".ema.safetensors.{proc.pid}@elsewhere.abcdefgh.tmp"
    foreign.write_bytes(b"x")
    result = CliRunner().invoke(main, ["average", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"removed {out_dir / left[0]}, a temporary file left by a killed run (process {proc.pid})" in result.stderr
    assert f"{foreign}: a temporary file of ema.safetensors by process {proc.pid} on elsewhere, left alone" \
        in result.stderr
    assert hidden_files(out_dir) == [foreign.name]
    assert load_file(out)["w"].shape == (3_000_000,)


def test_a_running_writers_temporary_file_is_left_alone(tmp_path: Path) -> None:
    run = safetensors_run(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:16]
    alive = tmp_path / f".ema.safetensors.{os.getpid()}@{host}.abcdefgh.tmp"  # this test process: running
    alive.write_bytes(b"x")
    result = CliRunner().invoke(main, ["average", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert alive.exists() and "left alone" in result.stderr
