"""One output, whatever happens to it: two runs at once, the same command twice, parts of the output deleted, a sweep
that fails or is rerun with fewer candidates (issue 20's items 3 and 6-10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import RUNS
from helpers import run_cli, write_run
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.output.lock import lock_path_of, output_lock

RULES = {"ema": ["--decay", "0.9", "--warmup"], "sigma-rel": ["--sigma-rel", "0.1"], "last": ["--last", "3"]}


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    """``ckpt-ema ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "ckpt_ema", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_whatever_is_deleted_the_same_command_gives_the_same_bytes(tmp_path: Path, rule: str) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, [5, 10, 20, 30, 40, 50])
    first = run_cli("average", run, *RULES[rule], "-o", out, "-q")
    assert first.exit_code == 0, first.output
    want = out.read_bytes()
    state = tmp_path / "ema.ckpt-ema-state"
    for delete in (["output"], ["state"], ["output", "state"], []):
        if "output" in delete:
            out.unlink()
        if "state" in delete:
            for f in state.iterdir():
                f.unlink()
            state.rmdir()
        again = run_cli("average", run, *RULES[rule], "-o", out)
        assert again.exit_code == 0 and "Traceback" not in again.output, (delete, again.output)
        assert out.read_bytes() == want, delete
        assert state.is_dir()


@pytest.mark.slow
def test_a_model_folder_is_written_byte_for_byte_the_same(tmp_path: Path) -> None:
    run = RUNS["hf_trainer"].folder
    for name in ("a", "b"):
        done = run_cli("average", run, "--decay", "0.8", "-o", f"{tmp_path / name}/", "-q")
        assert done.exit_code == 0, done.output
    a, b = files_under(tmp_path / "a"), files_under(tmp_path / "b")
    assert a == b and "model.safetensors" in a


@pytest.mark.slow
@pytest.mark.slow
def test_a_second_run_on_a_locked_output_refuses_in_one_line(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, [1, 2, 3])
    with output_lock(out):
        done = cli("average", run, "-o", out)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"ckpt-ema: error: {out}: another ckpt-ema run (pid {os.getpid()}) is writing "
                                   "this output; wait for it to finish or choose another output")
    assert not out.exists() and not (tmp_path / "ema.ckpt-ema-state").exists()
    assert cli("average", run, "-o", out).returncode == 0  # released with the holder
    assert not lock_path_of(out).exists()


@pytest.mark.slow
@pytest.mark.slow
def test_a_killed_holder_leaves_the_output_unlocked(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, [1, 2, 3])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ckpt_ema.output.lock import output_lock\n"
                               f"with output_lock(__import__('pathlib').Path({str(out)!r})):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert cli("average", run, "-o", out).returncode == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    done = cli("average", run, "-o", out)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.slow
def test_two_runs_at_once_give_one_complete_result_and_no_orphan(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, list(range(1, 41)))
    argv = [sys.executable, "-m", "ckpt_ema", "average", str(run), "--decay", "0.9", "-o", str(out)]
    runs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in runs]
    codes = [p.returncode for p in runs]
    assert 0 in codes and set(codes) <= {0, 2}, (codes, errors)
    for code, err in zip(codes, errors):
        assert "Traceback" not in err
        if code == 2:
            assert "is writing this output" in err.strip().splitlines()[-1]
    want = ckpt_ema.average(run, None, decay=0.9).state_dict
    got = load_file(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    state = tmp_path / "ema.ckpt-ema-state"
    manifest = state / "manifest.json"
    assert manifest.is_file()
    named = set(manifest.read_text().split('"'))
    assert all(f.name in named for f in state.iterdir() if f.name != "manifest.json"), sorted(state.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.ckpt-ema-state", "ema.safetensors", "run"]


@pytest.mark.slow
@pytest.mark.slow
def test_a_sweep_whose_eval_fails_leaves_no_folder_it_made(tmp_path: Path) -> None:
    run, outdir = tmp_path / "run", tmp_path / "sweep"
    write_run(run, [1, 2, 3, 4])
    done = cli("sweep", run, "--decay", "0.5", "0.9", "--eval-cmd", "exit 3", "-o", outdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert not outdir.exists()


@pytest.mark.slow
@pytest.mark.slow
def test_a_sweep_rerun_with_fewer_candidates_leaves_one_sweeps_files(tmp_path: Path) -> None:
    run, outdir = tmp_path / "run", tmp_path / "sweep"
    write_run(run, [1, 2, 3, 4])
    score = f"{sys.executable} -c \"print(1)\" {{weights}}"
    assert cli("sweep", run, "--decay", "0.5", "0.9", "--last", "2", "--eval-cmd", score, "-o", outdir).returncode == 0
    mine = tmp_path / "sweep" / "notes.safetensors"  # a file of the user's, not ckpt-ema's: kept
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, mine)
    done = cli("sweep", run, "--decay", "0.9", "-o", outdir, "--no-plot")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in outdir.glob("*.safetensors")) == ["ema-0.9.safetensors", "notes.safetensors"]


@pytest.mark.slow
@pytest.mark.slow
def test_the_summary_counts_the_checkpoints_that_weigh_something(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [1, 2, 3, 4, 5, 6])
    done = cli("average", run, "--last", "4", "-o", tmp_path / "a.safetensors")
    assert "averaged 4 of 6 checkpoints" in done.stderr, done.stderr
    done = cli("average", run / "ckpt_6.pt", "-o", tmp_path / "b.safetensors")
    assert "averaged 1 checkpoint (" in done.stderr and "1 checkpoints" not in done.stderr, done.stderr


@pytest.mark.slow
def test_half_life_with_decay_names_both_flags(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [1, 2])
    done = cli("average", tmp_path / "run", "--half-life", "10", "--decay", "0.9", "--dry-run")
    assert done.returncode == 2
    assert done.stderr.strip() == "ckpt-ema: error: --half-life replaces --decay: give one of them, not both"


@pytest.mark.slow
def test_help_shows_defaults_as_values(tmp_path: Path) -> None:
    done = cli("average", "--help")
    text = " ".join(done.stdout.split())
    assert "[default: 5GB]" in text and "[default: 2/3]" in text and "(5GB)" not in text, text


@pytest.mark.slow
@pytest.mark.slow
def test_until_step_without_watch_is_refused_as_a_flag(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [1, 2])
    done = cli("average", tmp_path / "run", "--until-step", "5", "-o", tmp_path / "a.safetensors")
    assert done.returncode == 2 and done.stderr.startswith("ckpt-ema: error: --until-step "), done.stderr
    assert not (tmp_path / "a.safetensors").exists()
