"""Appending to an average and following a run: the continuation's math, the engine's initial state, the state
kept beside the output and its commit protocol, and watching a trainer that writes in another process.

Every appended result is checked against a full rerun over the same checkpoints and against the independent
float64 references of tests/helpers.py (timm's recurrence run at every step).
"""

from __future__ import annotations

import builtins
import json
import random

import pytest
import torch

from ckpt_ema.engine.fold import fold
from ckpt_ema.engine.layout import Layout
from ckpt_ema.output.sinks import MemoryOutput
from ckpt_ema.weighting import DecaySchedule, ema_continuation, ema_weighting
from helpers import TOLERANCE, linear_reference, make_state, max_abs_diff, reference_ema, write_run

SCHEDULES = [
    dict(decay=0.9),
    dict(decay=0.97, warmup=True),
    dict(decay=0.95, update_after_step=7),
    dict(decay=0.97, warmup=True, update_after_step=5, min_decay=0.3),
]
STEP_SETS = [[0, 10, 20, 30, 40, 50], [1, 2, 3, 9, 10, 25, 26, 60], [2, 8, 12, 13, 14, 50, 51, 90]]


def _chain(steps: list[int], schedule: DecaySchedule, bias_correction: bool, interpolate: str, cuts: list[int]):
    """The continuation over ``steps`` cut at ``cuts``: per piece (weighting, state)."""
    pieces, state = [], None
    for lo, hi in zip([0, *cuts], [*cuts, len(steps)]):
        w, state = ema_continuation(steps[lo:hi], schedule, bias_correction, interpolate, state)
        pieces.append(w)
    return pieces, state


@pytest.mark.parametrize("interpolate", ["linear", "step"])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_continuation_gives_the_full_weights(schedule, bias_correction, interpolate):
    """Chaining continuations and unrolling them gives ema_weighting's weights; the state's total is 1 without
    bias correction and 1 - prod d(s) with it."""
    rng = random.Random(0)
    sched = DecaySchedule(**schedule)
    for steps in STEP_SETS:
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, len(steps)), rng.randint(1, 3)))
            pieces, state = _chain(steps, sched, bias_correction, interpolate, cuts)
            weights = list(pieces[0].weights)
            for w in pieces[1:]:
                weights = [x * w.prior for x in weights]
                weights[-1] += w.weights[0]
                weights += w.weights[1:]
            full = ema_weighting(steps, sched, bias_correction, interpolate).weights
            assert max(abs(a - b) for a, b in zip(weights, full)) < 1e-13
            want = 1 - sched.product(0, steps[-1], True) if bias_correction else 1.0
            assert state.total == pytest.approx(want, abs=1e-13)
            assert state.step == steps[-1]


@pytest.mark.parametrize("interpolate", ["linear", "step"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_fold_from_an_initial_mean_continues_exactly(tmp_path, bias_correction, interpolate):
    """The engine started from the mean of a first fold (and, for linear, the newest checkpoint again) gives the
    full fold's result: bit for bit with ``step`` (the same lerps), to float32 rounding with ``linear``; both
    within float32 rounding of timm's recurrence run at every step in float64."""
    # (reference_ema, the held-weights reference, knows bias correction without warmup only)
    schedule = dict(decay=0.95, warmup=not (bias_correction and interpolate == "step"), update_after_step=3)
    steps = [0, 4, 9, 10, 17, 30, 31, 45]
    saved = write_run(tmp_path, steps)
    paths = [tmp_path / f"ckpt_{s}.pt" for s in steps]
    sched = DecaySchedule(**schedule)

    def run(checkpoints, lerps, initial=None):
        sink = MemoryOutput()
        fold(checkpoints, [lerps], [sink], initial=None if initial is None else [initial],
             on_layout=lambda layout, n: sink.open(layout.shapes, layout.dtypes))
        return sink.tensors

    full = run(paths, ema_weighting(steps, sched, bias_correction, interpolate).lerps)
    first, state = ema_continuation(steps[:4], sched, bias_correction, interpolate)
    mean = run(paths[:4], first.lerps)
    torch.save(mean, tmp_path / "mean.pt")
    from ckpt_ema.formats.registry import open_checkpoint

    rest, _ = ema_continuation(steps[4:], sched, bias_correction, interpolate, state)
    appended = run(paths[3:], rest.lerps, open_checkpoint(tmp_path / "mean.pt"))
    reference = (linear_reference if interpolate == "linear" else reference_ema)(
        saved, bias_correction=bias_correction, **schedule)
    for name, want in reference.items():
        if interpolate == "step":
            assert torch.equal(appended[name], full[name]), name
        assert max_abs_diff(appended[name], full[name]) < TOLERANCE
        assert max_abs_diff(appended[name], want) < TOLERANCE
    assert torch.equal(appended["bn.num_batches_tracked"], saved[45]["bn.num_batches_tracked"])


def test_an_initial_mean_of_another_precision_or_model_is_refused(tmp_path):
    from ckpt_ema.errors import CkptEmaError
    from ckpt_ema.formats.registry import open_checkpoint

    write_run(tmp_path, [1, 2])
    paths = [tmp_path / "ckpt_1.pt", tmp_path / "ckpt_2.pt"]
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in make_state(5).items()}, tmp_path / "m64.pt")
    other = make_state(5)
    other["extra"] = torch.zeros(2)
    torch.save(other, tmp_path / "other.pt")
    for bad, words in (("m64.pt", "not the accumulator's torch.float32"), ("other.pt", "extra is extra")):
        sink = MemoryOutput()
        with pytest.raises(CkptEmaError, match=words):
            fold(paths, [[0.0, 0.5]], [sink], initial=[open_checkpoint(tmp_path / bad)],
                 on_layout=lambda layout, n: sink.open(layout.shapes, layout.dtypes))
    assert Layout  # the layout check is the engine's own (engine.layout)


# ------------------------------------------------------------------------------------------- appending


import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import ckpt_ema  # noqa: E402
import ckpt_ema.api  # noqa: E402
from ckpt_ema.errors import CkptEmaError  # noqa: E402
from ckpt_ema.follow.state import MANIFEST, StateFolder, state_folder_of  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

APPEND_CASES = {
    "linear-warmup": dict(decay=0.9, warmup=True),
    "step-warmup": dict(decay=0.9, warmup=True, interpolate="step"),
    "linear-bias-correction-after-step": dict(decay=0.93, bias_correction=True, update_after_step=6),
    "step-bias-correction-after-step": dict(decay=0.93, bias_correction=True, update_after_step=6, interpolate="step"),
    "linear-after-step": dict(decay=0.95, update_after_step=12, min_decay=0.2, warmup=True),
    "bf16-output": dict(decay=0.9, out_dtype="bfloat16"),
}
STEPS = [0, 5, 10, 20, 25, 40, 41, 42, 60, 75]


def _reference(saved: dict, options: dict) -> dict[str, torch.Tensor]:
    """timm's recurrence at every step in float64 (tests/helpers.py), for the options' schedule."""
    schedule = {k: v for k, v in options.items() if k in ("decay", "warmup", "update_after_step", "min_decay")}
    ref = linear_reference if options.get("interpolate", "linear") == "linear" else reference_ema
    return ref(saved, bias_correction=options.get("bias_correction", False), **schedule)


@pytest.mark.parametrize("case", APPEND_CASES)
def test_appending_gives_the_full_rerun(tmp_path, case):
    """Three runs of average over a growing run (old checkpoints deleted between them, as a trainer keeping its
    last K does) give the full rerun's result: bit for bit with step, to float32 rounding with linear; the
    running mean is kept in float32 beside a 16-bit output."""
    options = APPEND_CASES[case]
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    saved = write_run(run, STEPS[:4])
    first = ckpt_ema.average(run, out, **options)
    assert "from the start" in first.note
    saved.update(write_run(run, STEPS[4:7]))
    second = ckpt_ema.average(run, out, **options)
    assert second.note.startswith("appended 3 new checkpoints (steps 25..41) to the state of 4")
    keep = tmp_path / "all"
    shutil.copytree(run, keep)
    for s in STEPS[:5]:
        (run / f"ckpt_{s}.pt").unlink()
    saved.update(write_run(run, STEPS[7:]))
    write_run(keep, STEPS[7:])
    third = ckpt_ema.average(run, out, **options)
    assert third.note == "appended 3 new checkpoints (steps 42..75) to the state of 7 (5 of them since deleted)"
    assert [s.step for s in third.plan.sources] == STEPS
    got = load_file(out)
    full = ckpt_ema.average(keep, None, **options).state_dict
    planned = ckpt_ema.plan(keep, **options).weighting
    assert max(abs(a - b) for a, b in zip(third.plan.weighting.weights, planned.weights)) < 1e-12
    assert third.plan.weighting.unresolved == pytest.approx(planned.unresolved, rel=1e-9, abs=1e-13)
    mean = load_file(next(state_folder_of(out).glob("*.mean-0.safetensors")))
    for name, want in _reference(saved, options).items():
        assert mean[name].dtype == torch.float32
        assert max_abs_diff(mean[name], want) < TOLERANCE
        if options.get("interpolate") == "step" and "out_dtype" not in options:
            assert torch.equal(got[name], full[name]), name
        elif "out_dtype" in options:
            assert got[name].dtype == torch.bfloat16
            assert max_abs_diff(got[name], full[name]) <= 2 * 2 ** -8 * max(1.0, want.abs().max().item())
        else:
            assert max_abs_diff(got[name], full[name]) < TOLERANCE
    assert torch.equal(got["bn.num_batches_tracked"], saved[75]["bn.num_batches_tracked"])


def test_an_append_opens_only_the_new_checkpoints(tmp_path, monkeypatch):
    """Old checkpoints are recognised from the listing: none of them is opened (no header, no pickle)."""
    from ckpt_ema.formats import torch_save

    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, STEPS[:6])
    ckpt_ema.average(run, out, decay=0.9)
    write_run(run, STEPS[6:8])
    opened: list[str] = []
    real = torch_save.read_torch_weights
    monkeypatch.setattr(torch_save, "read_torch_weights", lambda file, key: (opened.append(file.name), real(file, key))[1])
    real_open = builtins.open  # any byte of a file, e.g. to tell copies apart
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (opened.append(Path(file).name), real_open(file, *a, **k))[1])
    again = ckpt_ema.average(run, out, decay=0.9)
    assert again.note.startswith("appended 2")
    checkpoints_opened = sorted({n for n in opened if n.startswith("ckpt_")})
    assert checkpoints_opened == ["ckpt_41.pt", "ckpt_42.pt"]
    assert again.bytes_read < 3 * (run / "ckpt_41.pt").stat().st_size + 2 * out.stat().st_size


def test_up_to_date_writes_nothing_and_other_options_start_over(tmp_path):
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, STEPS[:5])
    ckpt_ema.average(run, out, decay=0.9)
    before = out.stat().st_mtime_ns
    again = ckpt_ema.average(run, out, decay=0.9)
    assert again.note == "up to date: no new checkpoint after step 25"
    assert out.stat().st_mtime_ns == before
    other = ckpt_ema.average(run, out, decay=0.8)
    assert other.note == "averaged 5 checkpoints from the start (the state cannot go on: --decay was 0.9, now 0.8)"
    bf16 = ckpt_ema.average(run, out, decay=0.8, out_dtype="bfloat16")  # the outputs only: rewritten from the state
    assert bf16.note.startswith("rewrote")
    assert load_file(out)["layer.weight"].dtype == torch.bfloat16
    assert torch.equal(load_file(out)["layer.weight"],
                       ckpt_ema.average(run, None, decay=0.8, out_dtype="bfloat16").state_dict["layer.weight"])


def test_a_changed_or_inserted_checkpoint_starts_over_or_fails_when_files_are_gone(tmp_path):
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, [10, 20, 30])
    ckpt_ema.average(run, out, decay=0.9)
    write_run(run, [15])
    inserted = ckpt_ema.average(run, out, decay=0.9)
    assert inserted.note.startswith("averaged 4 checkpoints from the start (the state cannot go on: ")
    assert "ckpt_15.pt (step 15) is new but not after the newest checkpoint averaged (step 30)" in inserted.note
    torch.save(make_state(99), run / "ckpt_20.pt")
    changed = ckpt_ema.average(run, out, decay=0.9)
    assert "ckpt_20.pt changed since it was averaged" in changed.note
    assert torch.equal(load_file(out)["layer.weight"], ckpt_ema.average(run, None, decay=0.9).state_dict["layer.weight"])
    (run / "ckpt_10.pt").unlink()
    torch.save(make_state(98), run / "ckpt_20.pt")
    with pytest.raises(CkptEmaError, match=r"ckpt_20.pt changed since it was averaged\), and averaging from the "
                                           r"start needs .*ckpt_10.pt, which is gone; remove .*ema.ckpt-ema-state"):
        ckpt_ema.average(run, out, decay=0.9)


def test_a_uniform_mean_rereads_its_newest_k_and_needs_them(tmp_path):
    run, out = tmp_path / "run", tmp_path / "last.safetensors"
    write_run(run, [1, 2, 3, 4, 5])
    ckpt_ema.average(run, out, last=3)
    write_run(run, [6])
    (run / "ckpt_1.pt").unlink()
    again = ckpt_ema.average(run, out, last=3)
    assert again.note.startswith("appended 1")
    assert torch.equal(load_file(out)["layer.weight"], ckpt_ema.average(run, None, last=3).state_dict["layer.weight"])
    write_run(run, [7])
    (run / "ckpt_5.pt").unlink()
    with pytest.raises(CkptEmaError, match="ckpt_5.pt: a uniform mean of the newest 3 checkpoints needs this one again"):
        ckpt_ema.average(run, out, last=3)


def test_a_sweep_appends_every_candidate(tmp_path):
    run, outdir = tmp_path / "run", tmp_path / "sweep"
    write_run(run, STEPS[:5])
    kwargs = dict(decays=[0.8, 0.9], lasts=[2], warmup=True, plot=False)
    ckpt_ema.api.sweep(run, outdir, **kwargs)
    write_run(run, STEPS[5:])
    (run / "ckpt_0.pt").unlink()
    result = ckpt_ema.api.sweep(run, outdir, **kwargs)
    assert result.notes[0].startswith("appended 5 new checkpoints (steps 40..75) to the state of 5")
    write_run(tmp_path / "all", STEPS)
    for candidate in result.candidates:
        opts = candidate.plan.options
        full = ckpt_ema.average(tmp_path / "all", None, opts).state_dict
        got = load_file(candidate.output)
        for name in full:
            assert max_abs_diff(got[name], full[name]) < TOLERANCE, (candidate.name, name)
    assert sorted(p.name for p in (outdir / "ckpt-ema-state").iterdir())[-1] == MANIFEST


def test_no_state_is_kept_when_asked(tmp_path):
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, [1, 2])
    ckpt_ema.average(run, out, decay=0.9)
    assert state_folder_of(out).is_dir()
    ckpt_ema.average(run, out, decay=0.9, keep_state=False)
    assert not state_folder_of(out).exists()
    assert StateFolder(state_folder_of(out)).load() is None


# ------------------------------------------------------------------------------------------- interruptions


import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fails", ["replace", "fsync", "link"])
@pytest.mark.parametrize("exception", [OSError, KeyboardInterrupt])
def test_an_update_interrupted_at_any_step_resumes_or_redoes_cleanly(tmp_path, monkeypatch, fails, exception):
    """Fail (an I/O error, or Ctrl-C) at every rename, every flush and every hard link (the state's running mean
    to its output, the newest checkpoint into the state) of an append of a sweep, in turn. After each: every output
    is whole and is the old or the new result, no temporary file is left, and the next run gives the full rerun's
    result (it appends again, or rewrites outputs the committed state is ahead of). A link that fails with an I/O
    error (a file system without hard links) is a copy instead."""
    run, outdir = tmp_path / "run", tmp_path / "sweep"
    write_run(run, STEPS[:5])
    kwargs = dict(decays=[0.8], lasts=[2], warmup=True, plot=False)
    ckpt_ema.api.sweep(run, outdir, **kwargs)
    old = {p.name: load_file(p) for p in outdir.glob("*.safetensors")}
    write_run(run, STEPS[5:7])
    write_run(tmp_path / "all", STEPS[:7])
    new = {f"{n}.safetensors": ckpt_ema.average(tmp_path / "all", None, **o).state_dict
           for n, o in (("ema-0.8", dict(decay=0.8, warmup=True)), ("last-2", dict(last=2)))}
    real = getattr(os, fails)
    calls = []
    monkeypatch.setattr(os, fails, lambda *a: calls.append(a) or real(*a))
    backup = tmp_path / "backup"
    shutil.copytree(outdir, backup)
    ckpt_ema.api.sweep(run, outdir, **kwargs)  # a dry run of the append, to count the calls
    points = len(calls)
    assert points >= {"replace": 3, "fsync": 4, "link": 2}[fails]  # (link: the mean and the newest checkpoint)
    for k in range(points):
        shutil.rmtree(outdir)
        shutil.copytree(backup, outdir)
        seen = [0]

        def failing(*a, k=k):
            seen[0] += 1
            if seen[0] == k + 1:
                raise exception(5, "injected") if exception is OSError else exception()
            return real(*a)

        monkeypatch.setattr(os, fails, failing)
        failed = True
        try:
            ckpt_ema.api.sweep(run, outdir, **kwargs)
            # only the folders' fsync, after the commit, is best effort; a failed link is a copy
            assert fails == "fsync" or (fails == "link" and exception is OSError), k
            failed = False
        except (CkptEmaError, exception):
            pass
        monkeypatch.setattr(os, fails, real)
        assert not [n for n in _files_in(outdir) if n.endswith(".tmp")], k
        for name in old:
            got = load_file(outdir / name)
            assert any(all(max_abs_diff(got[t], ref[t]) < TOLERANCE for t in got) for ref in (old[name], new[name])), k
        after = ckpt_ema.api.sweep(run, outdir, **kwargs)
        assert after.notes[0].startswith(("appended 2", "rewrote", "up to date") if failed else "up to date"), k
        for name, ref in new.items():
            got = load_file(outdir / name)
            assert all(max_abs_diff(got[t], ref[t]) < TOLERANCE for t in ref), (k, name)
        state = outdir / "ckpt-ema-state"
        generation = json.loads((state / MANIFEST).read_text())["generation"]
        assert all(n == MANIFEST or n.startswith(generation) for n in _files_in(state)), k


KILL_SCRIPT = """
import sys
import ckpt_ema
ckpt_ema.average(sys.argv[1], sys.argv[2], decay=0.9, warmup=True)
print("done", flush=True)
"""


@pytest.mark.slow
def test_killed_at_random_moments_the_next_run_gives_the_full_result(tmp_path):
    """SIGKILL (no cleanup at all) an appending process at moments spread over its run, several times: every
    next run ends with the full rerun's result."""
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    big = {f"w{i}": torch.randn(256, 256) for i in range(24)}  # 6 MB a checkpoint: the update takes a moment
    for s in (0, 10, 20):
        torch.save({"state_dict": {k: v + s for k, v in big.items()}, "step": s}, run.mkdir(exist_ok=True) or run / f"c_{s}.pt")
    ckpt_ema.average(run, out, decay=0.9, warmup=True)
    env = {**os.environ, "PYTHONPATH": str(Path(ckpt_ema.__file__).parents[1])}
    rng = random.Random(1)
    for attempt, s in enumerate((30, 40, 50, 60)):
        torch.save({"state_dict": {k: v + s for k, v in big.items()}, "step": s}, run / f"c_{s}.pt")
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run), str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2.0 + rng.random() * 2.0)  # start-up is about 2 s on a busy machine: kill around the update
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        for leftover in tmp_path.glob(".*.tmp"):  # a killed process cannot remove its temporary files
            leftover.unlink()
        result = ckpt_ema.average(run, out, decay=0.9, warmup=True)
        full = ckpt_ema.average(run, None, decay=0.9, warmup=True).state_dict
        got = load_file(out)
        assert all(max_abs_diff(got[k], full[k]) < 1e-4 for k in full), (attempt, result.note)


# ------------------------------------------------------------------------------------------- watching


TRAINER = """
import io, os, sys, time
from pathlib import Path
import torch
run, every, last, keep = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
(run.parent / "all").mkdir(exist_ok=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(0, last + 1):
    if step:
        loss = model(torch.randn(32, 8)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    if step % every:
        continue
    blob = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "step": step}, blob)
    data = blob.getvalue()
    torch.save({"state_dict": model.state_dict(), "step": step}, run.parent / "all" / f"ckpt_{step:04d}.pt")
    (run / "tmp.pth.tar").write_bytes(data[: len(data) // 2])  # a temporary name, left half written
    with open(run / f"ckpt_{step:04d}.pt", "wb") as f:  # written in place, slowly: a watcher must wait
        for i in range(0, len(data), 4096):
            f.write(data[i : i + 4096]); f.flush(); time.sleep(0.002)
    for old in sorted(run.glob("ckpt_*.pt"))[:-keep]:
        old.unlink()
    time.sleep(0.5)  # a step of real training takes a while: here each checkpoint lives 2 s or more
print("trainer done", flush=True)
"""


def _cli(*args: object, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(ckpt_ema.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "ckpt_ema", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_watch_follows_a_trainer_in_another_process(tmp_path):
    """A trainer writes each checkpoint in place, slowly, and keeps only its last 4; a watching average and a
    watching sweep fold every checkpoint, never a half-written one, and end with the full rerun's result."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(ckpt_ema.__file__).parents[1])}
    average = _cli("average", run, "--watch", "--until-step", 150, "--poll", 0.2, "--decay", 0.95, "--warmup",
                   "-o", tmp_path / "ema.safetensors")
    sweep = _cli("sweep", run, "--watch", "--until-step", 150, "--poll", 0.3, "--decay", 0.9, 0.95, "--last", 2,
                 "--no-plot", "-o", tmp_path / "sweep")
    trainer = subprocess.run([sys.executable, "-c", TRAINER, str(run), "10", "150", "4"], env=env, timeout=240,
                             capture_output=True, text=True)
    assert trainer.returncode == 0, trainer.stderr
    for proc in (average, sweep):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        lines = err.splitlines()
        assert lines[0].startswith("watching "), err
        assert lines[-1].startswith("stopped: "), err
        assert "holds steps 0..150 (16 checkpoints)" in lines[-1], err
        updates = [line for line in lines[1:-1] if line.startswith("step ")]
        assert len(updates) >= 2 and all(" -> " in line for line in updates), err
    full = {n: ckpt_ema.average(tmp_path / "all", None, **o).state_dict
            for n, o in (("ema", dict(decay=0.95, warmup=True)), ("ema-0.9", dict(decay=0.9)),
                         ("last-2", dict(last=2)))}
    for name, path in (("ema", tmp_path / "ema.safetensors"), ("ema-0.9", tmp_path / "sweep" / "ema-0.9.safetensors"),
                       ("last-2", tmp_path / "sweep" / "last-2.safetensors")):
        got = load_file(path)
        assert all(max_abs_diff(got[k], full[name][k]) < TOLERANCE for k in full[name]), name
    assert len(list(run.glob("ckpt_*.pt"))) == 4


@pytest.mark.slow
def test_watch_stops_cleanly_on_sigterm(tmp_path):
    run = tmp_path / "run"
    write_run(run, [1, 2, 3])
    watcher = _cli("average", run, "--watch", "--poll", 0.2, "--decay", 0.9, "-o", tmp_path / "ema.safetensors")
    deadline = time.monotonic() + 60
    while not (tmp_path / "ema.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    write_run(run, [4])
    time.sleep(1.5)
    watcher.send_signal(signal.SIGTERM)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    assert err.splitlines()[-1].endswith("holds steps 1..4 (4 checkpoints)"), err
    got = load_file(tmp_path / "ema.safetensors")
    want = ckpt_ema.average(run, None, decay=0.9).state_dict
    assert all(max_abs_diff(got[k], want[k]) < TOLERANCE for k in want)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_the_demo_trainer_keeps_its_last_k(cifar_dir, tmp_path):
    """``ckpt-ema train --keep-last 3``: after every save only the newest 3 checkpoints are left, and an average
    kept current while it trains (appended after the run here) needs no more."""
    from click.testing import CliRunner

    from ckpt_ema.cli import main

    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "-o", str(run), "--data", str(cifar_dir), "--train-subset", "256",
                                    "--epochs", "2", "--save-every", "2", "--keep-last", "3", "--no-eval", "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_00000004.pt", "step_00000006.pt",
                                                              "step_00000008.pt"]
    avg = ckpt_ema.average(run, tmp_path / "ema.safetensors", decay=0.9)
    assert [s.step for s in avg.plan.sources] == [4, 6, 8]


@pytest.mark.parametrize("interpolate", ["linear", "step"])
def test_a_power_ema_candidate_appends_like_an_ema(tmp_path, interpolate):
    """A power EMA (sigma_rel) goes on from its running mean: appends read only the new checkpoints, survive the
    old ones' deletion, and give the full rerun's result and unresolved share."""
    run, outdir = tmp_path / "run", tmp_path / "sweep"
    write_run(run, STEPS[:4])
    kwargs = dict(decays=[0.9], sigma_rels=[0.05, 0.2], interpolate=interpolate, plot=False)
    ckpt_ema.api.sweep(run, outdir, **kwargs)
    keep = tmp_path / "all"
    write_run(keep, STEPS)
    for lo, hi in ((4, 7), (7, 10)):
        write_run(run, STEPS[lo:hi])
        again = ckpt_ema.api.sweep(run, outdir, **kwargs)
        assert again.notes[0].startswith(f"appended {hi - lo} new checkpoints"), again.notes
        for s in STEPS[: hi - 2]:
            (run / f"ckpt_{s}.pt").unlink(missing_ok=True)  # the trainer keeps its last 2
    assert again.notes[0].endswith("(5 of them since deleted)"), again.notes
    for candidate in again.candidates:
        full = ckpt_ema.average(keep, None, candidate.plan.options)
        got = load_file(candidate.output)
        assert all(max_abs_diff(got[k], full.state_dict[k]) < TOLERANCE for k in full.state_dict), candidate.name
        assert candidate.plan.weighting.weights == pytest.approx(full.plan.weighting.weights, abs=1e-12)
        assert candidate.plan.weighting.unresolved == pytest.approx(full.plan.weighting.unresolved, rel=1e-9)


def test_an_update_naming_part_of_the_run_never_averages_that_part_alone(tmp_path):
    """A watcher names only the new checkpoints; when the state cannot go on, the update asks for the whole run
    instead of averaging the part it was given."""
    from ckpt_ema.pipeline import FullInputsNeeded, Target, run as update

    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, STEPS[:5])
    ckpt_ema.average(run, out, decay=0.9)
    write_run(run, STEPS[5:6])
    target = [Target("average", ckpt_ema.api.resolve_options(None, dict(decay=0.8)), out)]
    with pytest.raises(FullInputsNeeded, match="--decay was 0.9, now 0.8"):
        update([run / "ckpt_40.pt"], target, StateFolder(state_folder_of(out)), whole_run=False)
    done = update([run], target, StateFolder(state_folder_of(out)))
    assert done.message.startswith("averaged 6 checkpoints from the start")


def test_a_checkpoint_deleted_while_settling_is_noted_and_the_newer_ones_go_on(tmp_path):
    """A trainer keeping its last K can delete a checkpoint between the watcher's two listings of it: that one is
    said to be missed, and the checkpoints after it are folded in the same poll (they used to wait behind the gone
    one forever, so that a fast trainer was never caught up with)."""
    from ckpt_ema.pipeline import Target
    from ckpt_ema.follow.watch import Watcher

    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, [10, 20, 30])
    target = [Target("average", ckpt_ema.api.resolve_options(None, dict(decay=0.9)), out)]
    notes: list[str] = []
    watcher = Watcher([run], target, StateFolder(state_folder_of(out)), poll=0.01, on_note=notes.append)
    watcher.stop.wait = lambda timeout=None: (run / "ckpt_10.pt").unlink(missing_ok=True)  # the trainer, meanwhile
    for path in run.iterdir():
        os.utime(path)  # just written: confirmed by a second listing (one written long ago is taken at once)
    watcher.step()
    assert notes == [f"{run / 'ckpt_10.pt'} was deleted before it could be read: its interval is interpolated from "
                     "its neighbours"]
    assert watcher.last is not None and [s.step for s in watcher.last.plans[0].sources] == [20, 30]
    want = ckpt_ema.average(run, None, decay=0.9).state_dict
    got = load_file(out)
    assert all(max_abs_diff(got[k], want[k]) < TOLERANCE for k in want)


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_the_state_links_instead_of_copying_and_refuses_a_link_rewritten_in_place(tmp_path, monkeypatch, links):
    """A float32 output is its running mean and the newest checkpoint is kept by a hard link (no byte written
    twice); where links fail, copies. Appending with --strip-prefix reads both right (the copy holds the names as
    averaged, the link the checkpoint's own); an output or a newest checkpoint rewritten in place since (the same
    file, new bytes: a link would now hold them) is refused in one line, never folded."""
    if not links:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(1, "not permitted")))
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    saved = write_run(run, STEPS[:4])
    for s in STEPS:
        saved.setdefault(s, make_state(s))
    prefixed = {s: {f"model.{k}": v for k, v in saved[s].items()} for s in STEPS}
    for s in STEPS[:4]:
        torch.save(prefixed[s], run / f"ckpt_{s}.pt")
    options = dict(decay=0.9, warmup=True, strip_prefix="model.")
    ckpt_ema.average(run, out, **options)
    state = state_folder_of(out)
    mean = next(state.glob("*.mean-0.safetensors"))
    theta = next(state.glob("*.theta.*"))
    assert (mean.stat().st_ino == out.stat().st_ino) is links
    assert (theta.stat().st_ino == (run / "ckpt_20.pt").stat().st_ino) is links
    assert theta.name.endswith(".pt" if links else ".safetensors")
    for s in STEPS[4:6]:
        torch.save(prefixed[s], run / f"ckpt_{s}.pt")
    (run / "ckpt_20.pt").unlink()  # the trainer deletes the newest averaged: its interval needs it again
    appended = ckpt_ema.average(run, out, **options)
    assert appended.note.startswith("appended 2")
    want = _reference({s: saved[s] for s in STEPS[:6]}, dict(decay=0.9, warmup=True))
    got = load_file(out)
    assert all(max_abs_diff(got[k], want[k]) < TOLERANCE for k in want)
    if not links:
        return
    # The output rewritten in place (a script saving over it): the state's mean changed with it. The state cannot
    # go on: averaging from the start needs ckpt_20.pt, which is gone.
    with open(out, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    torch.save(prefixed[STEPS[6]], run / f"ckpt_{STEPS[6]}.pt")
    with pytest.raises(CkptEmaError, match=r"cannot go on from the state \(an output was rewritten in place since, "
                                           r"and the state's link to it with it\), and averaging from the start "
                                           r"needs .*ckpt_20.pt"):
        ckpt_ema.average(run, out, **options)
    # With every checkpoint there, it averages from the start; then the trainer rewrites the newest in place.
    torch.save(prefixed[20], run / "ckpt_20.pt")
    redone = ckpt_ema.average(run, out, **options)
    assert redone.note.startswith("averaged 7 checkpoints from the start (the state cannot go on: an output was "
                                  "rewritten in place since")
    time.sleep(0.01)
    torch.save({k: v + 1 for k, v in prefixed[STEPS[6]].items()}, run / f"ckpt_{STEPS[6]}.pt")  # the same file
    redone = ckpt_ema.average(run, out, **options)
    assert redone.note.startswith(f"averaged 7 checkpoints from the start (the state cannot go on: the newest "
                                  f"checkpoint averaged, {run / f'ckpt_{STEPS[6]}.pt'}, was rewritten in place")


@pytest.mark.parametrize("mutation", ["dtype not a dtype", "dtype a torch attribute", "dtypes of other tensors",
                                      "a link to no state file", "a link of three numbers"])
def test_a_corrupt_manifest_is_refused_in_one_line(tmp_path, mutation):
    """The manifest's dtypes and links are checked before use (a flipped byte in a dtype gave a traceback)."""
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    write_run(run, STEPS[:3])
    ckpt_ema.average(run, out, decay=0.9)
    write_run(run, STEPS[3:4])
    path = state_folder_of(out) / MANIFEST
    m = json.loads(path.read_text())
    first = next(iter(m["dtypes"]))
    if mutation == "dtype not a dtype":
        m["dtypes"][first] = "float3;"
    elif mutation == "dtype a torch attribute":
        m["dtypes"][first] = "nn"
    elif mutation == "dtypes of other tensors":
        m["dtypes"] = {f"other.{k}": v for k, v in m["dtypes"].items()}
    elif mutation == "a link to no state file":
        m["links"] = {"elsewhere.pt": [1, 2]}
    else:
        m["links"] = {m["theta"]: [1, 2, 3]}
    path.write_text(json.dumps(m))
    with pytest.raises(CkptEmaError) as refused:
        ckpt_ema.average(run, out, decay=0.9)
    assert "\n" not in str(refused.value) and "remove the folder to start over" in str(refused.value)
