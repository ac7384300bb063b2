"""``--watch``: every format a run saves is folded once its writer is done with it (and not before), an input that
is not there is one line at once, and behind a fast trainer that keeps its last 3 every checkpoint is folded or
named, never silently lost.

Each run is saved into the watched folder the way its library writes it (a file written in place, a model folder
filled file by file, DCP's ``.metadata`` last, DeepSpeed's ``latest`` last), and the watched average must equal
the average of the same checkpoints read at once. (DCP: tests/test_dcp.py, beside its fixtures.)
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import RUNS
from helpers import TOLERANCE, make_state, max_abs_diff
from safetensors.torch import load_file, save

import ckpt_ema
import ckpt_ema.api
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.follow.state import StateFolder, state_folder_of
from ckpt_ema.pipeline import Target
from ckpt_ema.follow.watch import Watcher, run_spacing, unseen_steps

DECAY = 0.9


def watcher(run: Path | str, out: Path, notes: list[str], **kwargs: object) -> Watcher:
    target = [Target("average", ckpt_ema.api.resolve_options(None, dict(decay=DECAY)), out)]
    return Watcher([run], target, StateFolder(state_folder_of(out)), on_note=notes.append, **kwargs)  # type: ignore[arg-type]


def folded_steps(w: Watcher) -> list[int]:
    return [] if w.last is None else [s.step for s in w.last.plans[0].sources]  # type: ignore[misc]


def fold(w: Watcher, step: int, timeout: float = 30) -> None:
    """Poll until the checkpoint at ``step`` is folded (it is taken once its listing has settled)."""
    deadline = time.monotonic() + timeout
    while step not in folded_steps(w):
        assert time.monotonic() < deadline, f"step {step} not folded in {timeout} s: {folded_steps(w)}"
        w.step()
        time.sleep(0.05)


def assert_not_folded(w: Watcher, step: int) -> None:
    """A few polls, a settle time apart: the checkpoint at ``step`` is not taken."""
    for _ in range(3):
        w.step()
        time.sleep(0.3)
    assert step not in folded_steps(w), folded_steps(w)


def assert_average_of(out: Path, inputs: list[Path]) -> None:
    """The watched output equals the average of ``inputs`` read at once."""
    want = ckpt_ema.average(inputs, None, decay=DECAY).state_dict
    got = load_file(out)
    assert sorted(got) == sorted(want)
    assert all(max_abs_diff(got[k], want[k]) < TOLERANCE for k in want)


def write_in_two_halves(data: bytes, path: Path, w: Watcher, step: int) -> None:
    """Write ``data`` to ``path`` in place, as a trainer does: the first half, then (once the watcher has looked
    and left the half file alone) the rest."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        assert_not_folded(w, step)
        f.write(data[len(data) // 2 :])


def torch_bytes(obj: object) -> bytes:
    blob = io.BytesIO()
    torch.save(obj, blob)
    return blob.getvalue()


SAVERS: dict[str, Callable[[int], bytes]] = {
    "safetensors": lambda step: save(make_state(step), metadata={"step": str(step)}),
    "pt": lambda step: torch_bytes({"state_dict": make_state(step), "step": step}),
    "legacy-pt": lambda step: _legacy_bytes({"state_dict": make_state(step), "step": step}),
}


def _legacy_bytes(obj: object) -> bytes:
    blob = io.BytesIO()
    torch.save(obj, blob, _use_new_zipfile_serialization=False)
    return blob.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_file_is_folded_once_it_is_whole(tmp_path: Path, fmt: str) -> None:
    """A checkpoint file written in place is left alone while half written, and folded once whole."""
    run, source, out = tmp_path / "run", tmp_path / "all", tmp_path / "ema.safetensors"
    run.mkdir()
    source.mkdir()
    notes: list[str] = []
    w = watcher(run, out, notes, poll=0.05)
    for step in (10, 20, 30):
        data = SAVERS[fmt](step)
        (source / f"ckpt_{step}.{fmt}").write_bytes(data)
        write_in_two_halves(data, run / f"ckpt_{step}.{fmt}", w, step)
        fold(w, step)
    assert folded_steps(w) == [10, 20, 30]
    assert_average_of(out, sorted(source.iterdir()))
    assert not [n for n in notes if "never seen" in n or "deleted" in n], notes


def test_an_old_style_pickle_is_taken_once_nothing_writes_to_it(tmp_path: Path) -> None:
    """A legacy torch.save file has no end mark: it is taken once its listing has settled."""
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    w = watcher(run, out, [], poll=0.05)
    for step in (10, 20):
        (run / f"ckpt_{step}.pt").write_bytes(SAVERS["legacy-pt"](step))
        fold(w, step)
    assert_average_of(out, sorted(run.glob("*.pt")))


@pytest.fixture()
def llama_run() -> Path:
    """The fixture table's Hugging Face Trainer run of a tiny Llama."""
    return RUNS["hf_trainer"].folder


@pytest.mark.slow
def test_model_folders_are_folded_once_their_weights_are_whole(llama_run: Path, tmp_path: Path) -> None:
    """A Trainer's checkpoint-N folders, filled file by file (the weights in two halves): each is folded once its
    weights are whole, at the step its trainer_state.json records."""
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    w = watcher(run, out, [], poll=0.05)
    checkpoints = sorted(llama_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in checkpoints:
        step = int(checkpoint.name.split("-")[1])
        target = run / checkpoint.name
        target.mkdir()
        for file in sorted(checkpoint.iterdir()):
            if file.name != "model.safetensors":
                shutil.copy(file, target / file.name)
        assert_not_folded(w, step)  # no weights yet: no checkpoint yet
        write_in_two_halves((checkpoint / "model.safetensors").read_bytes(), target / "model.safetensors", w, step)
        fold(w, step)
    assert [s.step_from for s in w.last.plans[0].sources] == ["trainer_state.json"] * len(checkpoints)  # type: ignore[union-attr]
    assert_average_of(out, checkpoints)


@pytest.mark.slow
@pytest.mark.parametrize("run_name", ["zero1-fp32", "zero2-bf16", "zero3-fp16"])
def test_deepspeed_tags_are_folded_once_latest_names_them(tmp_path: Path, run_name: str) -> None:
    """DeepSpeed writes every rank's files into the tag folder, then ``latest``: a tag newer than what ``latest``
    names is left alone, and folded once ``latest`` names it."""
    fixture = RUNS[f"deepspeed_{run_name}"].folder
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    w = watcher(run, out, [], poll=0.05)
    tags = sorted((p for p in fixture.iterdir() if p.is_dir()), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    for k, tag in enumerate(tags):
        shutil.copytree(tag, run / tag.name, copy_function=shutil.copy)  # written now, like the trainer's files
        step = int(re.findall(r"\d+", tag.name)[-1])
        if k:
            assert_not_folded(w, step)  # `latest` still names the tag before
        (run / "latest").write_text(tag.name)
        fold(w, step)
    assert folded_steps(w) == [int(re.findall(r"\d+", t.name)[-1]) for t in tags]
    assert_average_of(out, [fixture])


# ------------------------------------------------------------------------------------------- inputs


@pytest.mark.slow
def test_a_missing_folder_is_one_line_at_once(tmp_path: Path) -> None:
    """``--watch`` on a path that is not there: the same line as without --watch, exit 2, no waiting."""
    env = {**os.environ, "PYTHONPATH": str(Path(ckpt_ema.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "ckpt_ema", "average", "nothere", "--watch", "--decay", "0.9", "-o",
                           "ema.safetensors"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "ckpt-ema: error: nothere: no such file or folder\n")
    assert sorted(os.listdir(tmp_path)) == []
    with pytest.raises(CkptEmaError, match="no such file or folder"):
        watcher(tmp_path / "nothere", tmp_path / "ema.safetensors", []).run()


def test_a_glob_that_matches_nothing_yet_is_waited_for(tmp_path: Path) -> None:
    """A run that has not saved yet looks like a glob matching nothing: the watcher says so once and waits."""
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    notes: list[str] = []
    w = watcher(str(run / "ckpt_*.pt"), out, notes, poll=0.05)
    w.step()
    w.step()
    assert notes == [f"waiting: {run / 'ckpt_*.pt'}: no checkpoint matches this pattern"]
    (run / "ckpt_10.pt").write_bytes(SAVERS["pt"](10))
    fold(w, 10)


# ------------------------------------------------------------------------------------------- behind a fast trainer


def test_the_run_spacing_names_what_lies_between() -> None:
    assert run_spacing([10, 30, 40]) == 10 and unseen_steps([10, 30, 40], 10) == [(10, 30)]
    assert run_spacing([10, 20, 30, 60, 70]) == 10 and unseen_steps([10, 20, 30, 60, 70], 10) == [(30, 60)]
    assert run_spacing([0, 10, 20, 30, 155]) == 10 and unseen_steps([0, 10, 20, 30, 155], 10) == []
    assert run_spacing([1, 2, 4, 8, 16]) is None  # growing intervals: nothing to say between them
    assert run_spacing([5]) is None


class Trainer(threading.Thread):
    """Saves a checkpoint every ``every`` seconds at steps 10, 20, ... into ``run`` (written in place), keeps
    the newest 3 (and a copy of every one in ``all``)."""

    def __init__(self, run: Path, fmt: str, every: float, count: int) -> None:
        super().__init__(daemon=True)
        self.run_folder, self.fmt, self.every, self.count = run, fmt, every, count
        self.all = run.parent / "all"
        self.all.mkdir()
        self.steps = [10 * (i + 1) for i in range(count)]

    def run(self) -> None:
        for step in self.steps:
            time.sleep(self.every)  # training
            data = SAVERS[self.fmt](step)
            (self.all / f"ckpt_{step:04d}.{self.fmt}").write_bytes(data)
            (self.run_folder / f"ckpt_{step:04d}.{self.fmt}").write_bytes(data)
            for old in sorted(self.run_folder.glob(f"ckpt_*.{self.fmt}"))[:-3]:
                old.unlink()


def named_steps(notes: list[str]) -> set[int]:
    """The steps the watcher's notes name as missed: by file, or by the run's spacing."""
    named: set[int] = set()
    for note in notes:
        if m := re.match(r".*ckpt_(\d+)\.\w+ was deleted before it could be read", note):
            named.add(int(m[1]))
        elif m := re.match(r"steps? ([\d, .]+?)(?: \(\d+ checkpoints\))? (?:was|were) never seen", note):
            if ".." in m[1]:
                lo, hi = map(int, m[1].split(".."))
                named.update(range(lo, hi + 1, 10))
            else:
                named.update(int(s) for s in m[1].split(", "))
    return named


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "every", "count"), [("pt", 0.3, 20), ("safetensors", 1.0, 8)])
def test_behind_a_fast_trainer_every_checkpoint_is_folded_or_named(tmp_path: Path, fmt: str, every: float,
                                                                   count: int) -> None:
    """Default flags, a trainer keeping its newest 3: each checkpoint is folded, or named in a note (deleted after
    it was listed, or never listed at all while the run's spacing says it was saved); the output is the average of
    the folded ones."""
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    trainer = Trainer(run, fmt, every, count)
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        if line.startswith("waiting: ") and not trainer.is_alive():
            trainer.start()  # the watch has begun: the run starts saving

    target = [Target("average", ckpt_ema.api.resolve_options(None, dict(decay=DECAY)), out)]
    w = Watcher([run], target, StateFolder(state_folder_of(out)), until_step=trainer.steps[-1], on_note=note)
    timer = threading.Timer(count * every + 60, w.stop.set)  # a watch that never ends fails below, not forever
    timer.start()
    w.run()
    timer.cancel()
    trainer.join()
    folded = folded_steps(w)
    assert folded[-1] == trainer.steps[-1], (folded, notes)
    assert set(folded) | named_steps(notes) == set(trainer.steps), (folded, notes)
    assert not set(folded) & named_steps(notes), (folded, notes)
    assert_average_of(out, [trainer.all / f"ckpt_{s:04d}.{fmt}" for s in folded])
