"""The readers under mutation (issue 12): real checkpoints, changed byte by byte with fixed seeds, are each refused
in one line or read exactly as an independent reader reads them (helpers.FUZZ_FORMATS: every format, every
reader added later). This is the fast subset; ``python scripts/fuzz_readers.py`` is the full run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ckpt_ema
import ckpt_ema.formats.safetensors
from ckpt_ema.cli import main
from helpers import FUZZ_FORMATS, fuzz, mutate_checkpoint

MUTANTS = 40
# Every format; DCP's checkpoint comes from a spawn of two ranks (seconds, once per session): outside the fast subset.
FORMATS = [pytest.param(name, marks=[pytest.mark.slow] if name == "dcp" else []) for name in sorted(FUZZ_FORMATS)]


@pytest.mark.parametrize("name", FORMATS)
def test_every_mutant_is_refused_in_one_line_or_read_as_an_independent_reader_reads_it(tmp_path: Path,
                                                                                     name: str) -> None:
    outcomes = fuzz(FUZZ_FORMATS[name], tmp_path, seed=12, count=MUTANTS)
    assert outcomes["refused"] + outcomes["read"] + outcomes["unchanged"] == MUTANTS
    assert outcomes["refused"] and outcomes["read"]  # both kinds of mutant occur: the run tests something


@pytest.mark.parametrize("name", FORMATS)
def test_mutants_through_the_command_line(tmp_path: Path, name: str) -> None:
    """A sample through `ckpt-ema average`: exit 2 with one error line and no output, or exit 0 with the output
    holding what the independent reader reads (accumulated in float64: the float64 tensors come back exact)."""
    fmt = FUZZ_FORMATS[name]
    original = fmt.make(_folder(tmp_path / "original"))
    rng = random.Random(3)
    for i in range(4):
        path, kind = mutate_checkpoint(fmt, original, tmp_path / f"mutant_{i}", rng)
        out = tmp_path / f"out_{i}.safetensors"
        result = CliRunner().invoke(main, ["average", str(path), "-o", str(out), "--quiet", "--accum-dtype", "float64"])
        assert "Traceback" not in result.output, (kind, result.output)
        if result.exit_code == 2:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("ckpt-ema: error: "), (kind, result.stderr)
            assert not out.exists()
        else:
            assert result.exit_code == 0, (kind, result.output)
            readings = [r for r in (reference(path) for reference in fmt.references) if r is not None]
            if not readings:  # every independent reader refuses it: ckpt-ema must have read the original weights
                readings = [fmt.references[0](original)]
            written = load_file(str(out))
            assert any(all(torch.equal(written[k], v) for k, v in r.items()) for r in readings), kind


def test_the_harness_catches_a_reader_that_trusts_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: with the safetensors reader's tiling check removed (ranges trusted as given, the old
    reader's defect), mutants are read otherwise than the safetensors package reads them, and the run says so."""
    monkeypatch.setattr(ckpt_ema.formats.safetensors, "_check_tiling", lambda entries, size: None)
    with pytest.raises(AssertionError, match="safetensors mutant"):
        fuzz(FUZZ_FORMATS["safetensors"], tmp_path, seed=12, count=200)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("name", [pytest.param("dcp", marks=[pytest.mark.slow]), "megatron"])
def test_a_mutant_written_back_like_the_input_is_refused_or_holds_what_was_read(tmp_path: Path, name: str) -> None:
    """``--like-input`` from one mutated checkpoint: exit 2 with one line and nothing written (no output, no
    temporary folder), or an output whose every file but the .distcp ones is the mutant's and whose model the
    independent reader reads as it reads the mutant's (the average of one checkpoint is that checkpoint)."""
    fmt = FUZZ_FORMATS[name]
    original = fmt.make(_folder(tmp_path / "original"))
    rng = random.Random(5)
    seen = set()
    for i in range(10):
        path, kind = mutate_checkpoint(fmt, original, tmp_path / f"mutant_{i}", rng)
        out = tmp_path / f"out_{i}"
        result = CliRunner().invoke(main, ["average", str(path), "-o", str(out), "--like-input", "--no-state",
                                           "--quiet", "--accum-dtype", "float64"])
        assert "Traceback" not in result.output, (kind, result.output)
        assert not list(tmp_path.glob(f".out_{i}.*")), kind
        if result.exit_code == 2:
            seen.add("refused")
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("ckpt-ema: error: "), (kind, result.stderr)
            assert not out.exists(), kind
            continue
        assert result.exit_code == 0, (kind, result.output)
        seen.add("written")
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".distcp")):
            assert (out / file.relative_to(path)).read_bytes() == file.read_bytes(), (kind, file.name)
        read, wrote = fmt.references[0](path), fmt.references[0](out)
        if read is None:  # the independent reader refuses the mutant (an item no average reads): ckpt-ema's readings
            read, wrote = ckpt_ema.load_state_dict(path)[0], ckpt_ema.load_state_dict(out)[0]
        assert wrote is not None and sorted(wrote) == sorted(read), kind
        assert all(torch.equal(wrote[k], v) for k, v in read.items()), kind
    assert seen == {"refused", "written"}  # both kinds of mutant occur: the run tests something
