"""Bad input, security and atomicity of `ckpt-ema average`, through the command line (issue 2).

Every bad input: exit code 2, exactly one line on stderr that names the file and the problem, no traceback, and no
output file. Checkpoints that pickle code are refused without running it. An existing output is left byte for byte
as it was by a failed or interrupted run, and no temporary file stays behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckpt_ema
import ckpt_ema.formats.base
import ckpt_ema.formats.torch_save
import ckpt_ema.output.sinks
from ckpt_ema.cli import main

REPO = Path(__file__).resolve().parent.parent


def weights(seed: int, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(n, n, generator=g),
        "enc.bias": torch.randn(n, generator=g),
        "bn.running_var": torch.rand(n, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(seed),
    }


def good_run(folder: Path, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in steps:
        torch.save(weights(s), folder / f"ckpt_{s}.pt")
    return folder


def invoke(*args: str | Path):
    return CliRunner().invoke(main, ["average", *map(str, args)])


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_bad_input(args: list, *fragments: str, out: Path) -> str:
    """Exit code 2, one line on stderr holding every fragment, no traceback, nothing on stdout, no output file."""
    before = files_in(out.parent)
    res = invoke(*args, "-o", out)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit)  # not an uncaught exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("ckpt-ema: error: "), line
    assert "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert res.stdout == ""
    assert not out.exists()
    assert files_in(out.parent) == before  # no temporary file either
    return line


# ------------------------------------------------------------------------------------------- missing input


def test_no_checkpoint_in_folder(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("no weights here")
    assert_bad_input([tmp_path / "run"], str(tmp_path / "run"), "no checkpoint found", out=tmp_path / "o.safetensors")


def test_missing_path(tmp_path: Path) -> None:
    good_run(tmp_path / "run")
    assert_bad_input([tmp_path / "run", tmp_path / "nope.pt"], str(tmp_path / "nope.pt"), "no such file",
                     out=tmp_path / "o.safetensors")


def test_glob_matching_nothing(tmp_path: Path) -> None:
    good_run(tmp_path / "run")
    pattern = str(tmp_path / "run" / "model_*.pt")
    assert_bad_input([pattern], pattern, "no checkpoint matches", out=tmp_path / "o.safetensors")


def test_a_file_that_is_not_a_checkpoint_by_name(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_bad_input([tmp_path / "notes.txt"], "notes.txt", "not a checkpoint", out=tmp_path / "o.safetensors")


# ------------------------------------------------------------------------------------------- unreadable files


def broken_copy_of_run(tmp_path: Path, bad_name: str, content: bytes) -> tuple[Path, Path]:
    run = good_run(tmp_path / "run", (1, 2, 4))
    bad = run / bad_name
    bad.write_bytes(content)
    return run, bad


def test_truncated_torch_file(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run", (1, 2, 4))
    torch.save(weights(3, n=64), run / "full.pt")
    data = (run / "full.pt").read_bytes()
    (run / "full.pt").unlink()
    (run / "ckpt_3.pt").write_bytes(data[: len(data) // 2])
    assert_bad_input([run], "ckpt_3.pt", "not a readable PyTorch checkpoint", out=tmp_path / "o.safetensors")


@pytest.mark.parametrize("content", ["random", "text", "empty", "pickled_list", "no_tensors"])
def test_not_a_checkpoint(tmp_path: Path, content: str) -> None:
    run = good_run(tmp_path / "run", (1, 2, 4))
    bad = run / "ckpt_3.pt"
    if content == "random":
        bad.write_bytes(random.Random(0).randbytes(4096))
    elif content == "text":
        bad.write_text("this is a text file renamed to .pt\n" * 20)
    elif content == "empty":
        bad.write_bytes(b"")
    elif content == "pickled_list":
        torch.save([1, 2, 3], bad)
    else:
        torch.save({"epoch": 3, "lr": 0.1}, bad)
    line = assert_bad_input([run], "ckpt_3.pt", out=tmp_path / "o.safetensors")
    assert "not a" in line or "no weights" in line, line


GARBAGE = {
    **{f"random{seed}": random.Random(seed).randbytes(1 + 997 * seed) for seed in range(6)},
    # what a legacy (non-zip) torch.save file starts with, then garbage that breaks the unpickler in other ways
    # (IndexError, KeyError, UnicodeDecodeError inside torch's weights-only unpickler for these seeds)
    **{f"pickle_garbage{seed}": b"\x80\x02" + random.Random(seed).randbytes(200) for seed in (2, 14, 20, 195)},
    "unknown_pickle_protocol": b"\x80\x57" + random.Random(0).randbytes(200),  # torch would warn about it
    "zip_garbage": b"PK\x03\x04" + random.Random(1).randbytes(300),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_never_crashes(tmp_path: Path, name: str) -> None:
    """Whatever the garbage, the answer is one error line: no traceback, no hang, no warning printed besides."""
    run, bad = broken_copy_of_run(tmp_path, "ckpt_3.pt", GARBAGE[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = assert_bad_input([run], "ckpt_3.pt", out=tmp_path / "o.safetensors")
    assert not [str(w.message) for w in caught]
    assert "refusing" not in line  # corrupt data is not a security refusal


def test_unreadable_file(tmp_path: Path) -> None:
    """A dangling link (a checkpoint deleted under it) cannot be read; neither can a file without read permission."""
    run = good_run(tmp_path / "run", (1, 2, 4))
    (run / "ckpt_3.pt").symlink_to(tmp_path / "deleted.pt")
    assert_bad_input([run], "ckpt_3.pt", out=tmp_path / "o.safetensors")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without read permission")
def test_file_without_read_permission(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run", (1, 2, 4))
    torch.save(weights(3), run / "ckpt_3.pt")
    (run / "ckpt_3.pt").chmod(0)
    assert_bad_input([run], "ckpt_3.pt", out=tmp_path / "o.safetensors")


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors(tmp_path: Path, cut: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2, 3):
        save_file(weights(s, n=32), str(run / f"ckpt_{s}.safetensors"))
    data = (run / "ckpt_2.safetensors").read_bytes()
    (run / "ckpt_2.safetensors").write_bytes(data[:20] if cut == "header" else data[: len(data) - 100])
    assert_bad_input([run], "ckpt_2.safetensors", out=tmp_path / "o.safetensors")


def safetensors_bytes(header: object, data: bytes = b"\0" * 4, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return (len(text) if header_len is None else header_len).to_bytes(8, "little") + text + data


ONE_F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
MALFORMED_SAFETENSORS = {
    "header_not_json": b"\x06\0\0\0\0\0\0\0{\"a\": " + b"\0" * 4,
    "header_not_an_object": safetensors_bytes([1, 2, 3]),
    "header_longer_than_file": safetensors_bytes({"w": ONE_F32}, header_len=10**6),
    "absurd_header_length": safetensors_bytes({"w": ONE_F32}, header_len=2**62),
    "unknown_dtype": safetensors_bytes({"w": {**ONE_F32, "dtype": "F33"}}),
    "offsets_do_not_fit_shape": safetensors_bytes({"w": {**ONE_F32, "shape": [2]}}),
    "entry_not_an_object": safetensors_bytes({"w": 5}),
    "metadata_not_strings": safetensors_bytes({"__metadata__": {"step": 3}, "w": ONE_F32}),
    "metadata_not_a_map": safetensors_bytes({"__metadata__": ["step"], "w": ONE_F32}),
    "data_missing": safetensors_bytes({"w": {**ONE_F32, "shape": [100], "data_offsets": [0, 400]}}),
}


@pytest.mark.parametrize("name", list(MALFORMED_SAFETENSORS))
def test_malformed_safetensors(tmp_path: Path, name: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.ones(1)}, str(run / "ckpt_1.safetensors"))
    (run / "ckpt_2.safetensors").write_bytes(MALFORMED_SAFETENSORS[name])
    assert_bad_input([run], "ckpt_2.safetensors", out=tmp_path / "o.safetensors")


# ------------------------------------------------------------------------------------------- content


def test_tensors_differ_in_names_and_shapes(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run", (1, 2))
    other = weights(3)
    other.pop("enc.bias")
    other["head.weight"] = torch.zeros(2)
    other["enc.weight"] = torch.zeros(4, 4)
    torch.save(other, run / "ckpt_3.pt")
    assert_bad_input([run], "ckpt_3.pt", "enc.bias", "head.weight", "enc.weight", "[4, 4]",
                     out=tmp_path / "o.safetensors")


def test_many_differences_are_cut_short(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run", (1,))
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(20)}, run / "ckpt_2.pt")
    line = assert_bad_input([run], "ckpt_2.pt", "more", out=tmp_path / "o.safetensors")
    assert len(line) < 600 and line.count("layer") < 20  # the first few are listed, not all


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_name_file_and_tensor(tmp_path: Path, bad_value: float) -> None:
    run = good_run(tmp_path / "run", (1, 2, 4))
    sd = weights(3)
    sd["bn.running_var"][5] = bad_value
    torch.save(sd, run / "ckpt_3.pt")
    kind = "NaN" if bad_value != bad_value else "Inf"
    assert_bad_input([run], "ckpt_3.pt", "bn.running_var", kind, out=tmp_path / "o.safetensors")


def test_nan_in_a_safetensors_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2, 3):
        sd = weights(s)
        if s == 1:
            sd["enc.weight"][0, 0] = float("nan")  # in the first checkpoint, which still carries weight
        save_file(sd, str(run / f"ckpt_{s}.safetensors"))
    assert_bad_input([run, "--decay", "0.99"], "ckpt_1.safetensors", "enc.weight", "NaN",
                     out=tmp_path / "o.safetensors")


@pytest.mark.parametrize("option,value", [("--decay", "1.5"), ("--decay", "-0.1"), ("--decay", "nan"),
                                          ("--min-decay", "2")])
def test_decay_outside_0_1(tmp_path: Path, option: str, value: str) -> None:
    run = good_run(tmp_path / "run")
    assert_bad_input([run, option, value], option, "[0, 1]", out=tmp_path / "o.safetensors")


@pytest.mark.parametrize("decay", ["0", "1"])
def test_decay_bounds_are_allowed(tmp_path: Path, decay: str) -> None:
    """[0, 1] is closed: 0 is the newest checkpoint, 1 keeps the first (timm's copy at step 1)."""
    run = good_run(tmp_path / "run")
    out = tmp_path / "o.safetensors"
    res = invoke(run, "--decay", decay, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    want = weights(3) if decay == "0" else weights(1)
    got = load_file(out)
    assert torch.equal(got["enc.weight"], want["enc.weight"])
    assert torch.equal(got["bn.num_batches_tracked"], weights(3)["bn.num_batches_tracked"])


def test_output_must_be_safetensors(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run")
    assert_bad_input([run], "ema.pt", ".safetensors", out=tmp_path / "ema.pt")


def test_output_folder_missing(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run")
    out = tmp_path / "no" / "such" / "folder" / "ema.safetensors"
    res = invoke(run, "-o", out)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and str(out) in res.stderr and "folder does not exist" in res.stderr
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------- security


class CallsOsSystem:
    """Pickles as a call to os.system: the classic malicious checkpoint. Its command only creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class CallsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class Harmless:
    """An arbitrary class: building one would run its __setstate__, here one that leaves a marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


PAYLOADS = {"os_system": CallsOsSystem, "eval": CallsEval, "arbitrary_class": Harmless}


@pytest.mark.parametrize("where", ["top", "inside_container"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_pickled_code_is_refused_and_never_run(tmp_path: Path, payload: str, where: str) -> None:
    run = good_run(tmp_path / "run", (1, 2, 4))
    marker = tmp_path / "PWNED"
    sd = weights(3)
    obj = {**sd, "x": PAYLOADS[payload](marker)} if where == "top" else {
        "state_dict": sd, "optimizer": {"hook": PAYLOADS[payload](marker)}}
    torch.save(obj, run / "ckpt_3.pt")
    # the payload is live: a full unpickling would run it (checked on a copy with its own marker)
    live = tmp_path / "LIVE"
    torch.save({"x": PAYLOADS[payload](live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()

    for args in ([run, "--dry-run"], [run, "-o", tmp_path / "o.safetensors"]):
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert len(res.stderr.splitlines()) == 1
        assert "ckpt_3.pt" in res.stderr and "refusing to load" in res.stderr, res.stderr
        assert not marker.exists(), "the checkpoint's pickled code ran"
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(ckpt_ema.CkptEmaError, match="refusing"):
        ckpt_ema.load_state_dict(run / "ckpt_3.pt")
    assert not marker.exists()


def test_refusal_names_what_was_pickled(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run", (1, 2, 4))
    torch.save({**weights(3), "x": CallsOsSystem(tmp_path / "PWNED")}, run / "ckpt_3.pt")
    line = assert_bad_input([run], "ckpt_3.pt", "refusing to load", "system", out=tmp_path / "o.safetensors")
    assert "could run code" in line


def test_payload_in_training_state_is_never_opened(tmp_path: Path) -> None:
    """Files that are not weights (training_args.bin, optimizer.pt) in a Hugging Face folder are not even loaded."""
    marker = tmp_path / "PWNED"
    for s in (10, 20):
        folder = tmp_path / "run" / f"checkpoint-{s}"
        folder.mkdir(parents=True)
        save_file(weights(s), str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": s}))
        torch.save(CallsOsSystem(marker), folder / "training_args.bin")
        torch.save({"state": Harmless(marker)}, folder / "optimizer.pt")
    out = tmp_path / "o.safetensors"
    res = invoke(tmp_path / "run", "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert out.exists() and not marker.exists()


def test_allowed_harmless_types_still_load(tmp_path: Path) -> None:
    """The short allow-list: argparse.Namespace (timm), paths, numpy scalars; nothing else is needed to load them."""
    import argparse

    import numpy as np

    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2):
        torch.save({"state_dict": weights(s), "args": argparse.Namespace(model="tiny", lr=0.1),
                    "dir": Path("/runs/x"), "best": np.float64(0.5), "dtype": np.dtype("float32")},
                   run / f"ckpt_{s}.pt")
    res = invoke(run, "-o", tmp_path / "o.safetensors", "--quiet")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------- atomicity


def existing_output(tmp_path: Path) -> tuple[Path, bytes]:
    """A previous, valid output in its own folder; returns it and its bytes."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ema.safetensors"
    res = invoke(good_run(tmp_path / "old"), "-o", out, "--quiet", "--no-state")
    assert res.exit_code == 0, res.output
    return out, out.read_bytes()


def test_failed_run_leaves_existing_output_intact(tmp_path: Path) -> None:
    out, old = existing_output(tmp_path)
    run = good_run(tmp_path / "run", (1, 2, 4))
    sd = weights(3)
    sd["enc.bias"][0] = float("nan")  # found only after reading: the output was already being written
    torch.save(sd, run / "ckpt_3.pt")
    res = invoke(run, "-o", out)
    assert res.exit_code == 2 and "NaN" in res.stderr
    assert out.read_bytes() == old
    assert files_in(out.parent) == {"ema.safetensors"}


def interrupting(original, after_calls: int, seen: list):
    """Wrap ``original`` so that its call number ``after_calls + 1`` raises KeyboardInterrupt (Ctrl-C)."""
    calls = []

    def wrapper(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after_calls:
            seen.append(sorted(p.name for p in self.path.parent.iterdir()))
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    return wrapper


def test_interrupted_write_leaves_existing_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of writing the output file: old output unchanged, the partial file removed."""
    out, old = existing_output(tmp_path)
    run = good_run(tmp_path / "run", (1, 2, 3, 4))
    seen: list = []
    monkeypatch.setattr(ckpt_ema.output.sinks.SafetensorsOutput, "write",
                        interrupting(ckpt_ema.output.sinks.SafetensorsOutput.write, 2, seen))
    res = invoke(run, "-o", out)
    assert seen, "the write was never reached"
    assert any(name.endswith(".tmp") for name in seen[0]), seen  # a partial file existed when Ctrl-C came
    assert res.exit_code == 130
    # (Click ends the ^C line the terminal echoed with a newline first: blank lines aside, one line)
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("ckpt-ema: error: interrupted"), lines
    assert out.read_bytes() == old
    assert files_in(out.parent) == {"ema.safetensors"}


def test_interrupted_rename_leaves_existing_output_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the new file is complete but before it replaces the old one."""
    out, old = existing_output(tmp_path)
    run = good_run(tmp_path / "run", (1, 2, 3, 4))
    real_replace = os.replace
    hit = []

    def replace(src, dst, *a, **k):
        if Path(dst) == out:
            hit.append(src)
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(ckpt_ema.output.sinks.os, "replace", replace)
    res = invoke(run, "-o", out)
    assert hit and res.exit_code == 130
    assert out.read_bytes() == old
    # The state, committed just before, is ahead of the output: the next run rewrites the output from it
    # (tests/test_follow.py). A real SIGINT cannot land here: it is held back while a state commits.
    assert files_in(out.parent) == {"ema.safetensors", "ema.ckpt-ema-state"}


class FillsUp:
    """A file on a disk that is full after ``room`` bytes: writes beyond raise ENOSPC, like a real full disk."""

    def __init__(self, file, room: int) -> None:  # noqa: ANN001
        self._file = file
        self._room = room

    def write(self, data) -> int:  # noqa: ANN001
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= n
        return self._file.write(data)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._file, name)

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


@pytest.mark.parametrize("room", [0, 100, 8_000], ids=["at_once", "in_the_header", "in_the_data"])
def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """ENOSPC while writing: one line, exit 2, the old output intact, no temporary file left."""
    out, old = existing_output(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2, 3, 4):
        torch.save(weights(s, n=64), run / f"ckpt_{s}.pt")  # 16 KB of tensor data: the header is well under 8 KB
    real_fdopen = os.fdopen
    monkeypatch.setattr(ckpt_ema.output.sinks.os, "fdopen", lambda *a, **k: FillsUp(real_fdopen(*a, **k), room))
    res = invoke(run, "-o", out)
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(res.stderr.splitlines()) == 1
    assert "No space left" in res.stderr and str(out) in res.stderr
    assert out.read_bytes() == old
    assert files_in(out.parent) == {"ema.safetensors"}


@pytest.mark.slow
def test_sigint_to_a_real_process(tmp_path: Path) -> None:
    """`python -m ckpt_ema average` on enough data to take a moment, Ctrl-C (SIGINT) while it works.

    Interrupted: the old output is byte for byte intact. If the run happened to finish first, the output is the
    complete new average. Either way no temporary file is left.
    """
    run = tmp_path / "run"
    run.mkdir()
    n_ckpt, numel = 12, 3_000_000  # 12 x 12 MB
    for s in range(1, n_ckpt + 1):
        save_file({"w": torch.full((numel,), float(s)), "b": torch.full((7,), float(s))},
                  str(run / f"ckpt_{s}.safetensors"))
    save_file({"w": torch.zeros(numel), "b": torch.zeros(7)}, str(run / "last.safetensors"))  # an alias: a note
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "ema.safetensors"
    save_file({"old": torch.arange(10.0)}, str(out))
    old = out.read_bytes()

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt_ema", "average", str(run), "--decay", "0.5", "--accum-dtype", "float64",
         "-o", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        # "skipped ...last.safetensors" comes once planning is done, right before averaging starts
        before = [proc.stderr.readline()]
        while before[-1] and "last.safetensors" not in before[-1]:
            before.append(proc.stderr.readline())
        assert "last.safetensors" in before[-1], before
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = {"ema.safetensors"} | ({"ema.ckpt-ema-state"} if proc.returncode == 0 else set())
    assert not [p.name for p in out_dir.iterdir() if p.name not in kept]  # no .tmp left, no state unless done
    if proc.returncode == 0:  # it finished before the signal: the output is the whole new average
        got = load_file(out)
        assert torch.allclose(got["w"][:10], torch.full((10,), n_ckpt - 1.0 + 0.5 ** (n_ckpt - 1)), atol=1e-6)
    else:
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, rest)
        assert "Traceback" not in rest, rest
        assert out.read_bytes() == old


# ------------------------------------------------------------------------------------------- dry run, quiet


def corrupt_tensor_data(path: Path) -> None:
    """Overwrite a safetensors file's tensor bytes with NaN, keeping its header: reading any tensor now fails."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    data_start = 8 + header_len
    size = path.stat().st_size
    nan = torch.full(((size - data_start) // 4,), float("nan")).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(data_start)
        f.write(nan + b"\xff" * ((size - data_start) - len(nan)))
    assert keys


def test_dry_run_reads_no_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for s in (5, 10, 20):
        save_file({"w": torch.full((4,), float(s))}, str(run / f"ckpt_{s}.safetensors"))
        corrupt_tensor_data(run / f"ckpt_{s}.safetensors")
    torch.save({"model": {"w": torch.zeros(4)}, "step": 30}, run / "ckpt_30.pt")
    # any tensor read through the checkpoint reader would now fail loudly
    def no_tensor(self, name):  # noqa: ANN001
        raise AssertionError(f"--dry-run read tensor {name} of {self.path}")

    monkeypatch.setattr(ckpt_ema.formats.base.Checkpoint, "tensor", no_tensor)
    out = tmp_path / "ema.safetensors"
    res = invoke(run, "--decay", "0.9", "--dry-run", "-o", out)
    assert res.exit_code == 0, (res.output, res.exception)
    assert not out.exists() and files_in(tmp_path) == {"run"}
    the_plan = ckpt_ema.plan([run], decay=0.9)
    rows = [r for r in map(str.split, res.stdout.splitlines()) if len(r) == 4 and r[0].isdigit() and r[1].isdigit()]
    assert [int(r[1]) for r in rows] == [5, 10, 20, 30]
    assert [float(r[2]) for r in rows] == pytest.approx(list(the_plan.weighting.weights), rel=1e-3)
    assert [Path(r[3]).name for r in rows] == ["ckpt_5.safetensors", "ckpt_10.safetensors", "ckpt_20.safetensors",
                                               "ckpt_30.pt"]
    assert f"the newest {the_plan.weighting.effective_window()} carry 99%" in res.stdout

    # the real run does read them: the NaN data is found (proves the dry run succeeded by not reading)
    monkeypatch.undo()
    res = invoke(run, "--decay", "0.9", "-o", out)
    assert res.exit_code == 2 and "NaN" in res.stderr
    assert not out.exists()


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    run = good_run(tmp_path / "run")
    torch.save(weights(3), tmp_path / "run" / "last.pt")  # an alias: normally reported
    out = tmp_path / "ema.safetensors"
    loud = invoke(run, "-o", out)
    assert loud.exit_code == 0 and "last.pt" in loud.stderr and "averaged 3 checkpoints" in loud.stderr
    out.unlink()
    res = invoke(run, "-o", out, "--quiet")
    assert res.exit_code == 0
    assert res.output == "" and res.stderr == "" and res.stdout == ""
    assert out.exists()


def test_plain_ckpt_ema_shows_the_help_not_an_error() -> None:
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0
    assert res.output.startswith("Usage: ") and "average" in res.output and "error" not in res.output


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_broken_link_in_a_run_folder_is_one_line(tmp_path: Path, kind: str) -> None:
    """A symlink loop (or a link to nothing) named like a checkpoint: one line naming it, not a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        torch.save({"w": torch.full((3,), float(step))}, run / f"step_{step}.pt")
    if kind == "loop":
        (run / "a.pt").symlink_to(run / "b.pt")
        (run / "b.pt").symlink_to(run / "a.pt")
    else:
        (run / "a.pt").symlink_to(run / "gone.pt")
    result = CliRunner().invoke(main, ["average", str(run), "--dry-run"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckpt-ema: error: {run / 'a.pt'}: cannot read:"), result.output
