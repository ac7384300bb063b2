"""The architecture the tree shows holds: the engine never imports the CIFAR-10 demo, the command line answers
--help without importing torch, and the API stays in one process unless asked for several."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt_ema
from ckpt_ema.errors import OptionError
from helpers import write_run

REPO = Path(__file__).resolve().parent.parent
ENGINE_MODULES = ["ckpt_ema.api", "ckpt_ema.sweeping", "ckpt_ema.cli", "ckpt_ema.planning", "ckpt_ema.discover",
                  "ckpt_ema.plots", "ckpt_ema.engine.runner", "ckpt_ema.formats.registry", "ckpt_ema.output.sinks"]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, **env})


def test_the_engine_never_imports_the_demo() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in ENGINE_MODULES)
            + "print(sorted(m for m in sys.modules if m.startswith('ckpt_ema.cifar') or m.startswith('torchvision')))")
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["average", "--help"], ["sweep", "--help"],
                                  ["train", "--help"], ["eval", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    code = ("import sys\nfrom ckpt_ema.cli import main\nsys.argv = ['ckpt-ema', *%r]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)" % (args,))
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("NO TORCH"), done.stderr
    assert "Usage:" in done.stdout or "version" in done.stdout


def test_the_api_runs_in_one_process_even_under_a_torchrun_environment(tmp_path: Path) -> None:
    """A script that calls average() on rank 0 only must not wait for other ranks: no process group is joined
    unless the caller passes a World."""
    write_run(tmp_path / "run", [1, 2, 3])
    code = ("import ckpt_ema\nr = ckpt_ema.average([%r], decay=0.5)\nprint(len(r.state_dict))" % str(tmp_path / "run"))
    done = python(code, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"


def test_errors_name_the_parameter_in_the_api_and_the_flag_in_the_cli() -> None:
    with pytest.raises(OptionError) as caught:
        ckpt_ema.AverageOptions.build(decay=1.5)
    assert str(caught.value) == "decay must be in [0, 1], got 1.5"
    assert caught.value.as_flag() == "--decay must be in [0, 1], got 1.5"


def test_one_options_object_round_trips_through_its_flat_form() -> None:
    options = ckpt_ema.AverageOptions.build(half_life=50, warmup=True, max_memory="64MiB", last=None)
    assert options.max_memory == 64 << 20 and options.schedule.warmup
    assert ckpt_ema.AverageOptions.build(**options.flat()) == options
    assert options.replaced(last=3).schedule == ckpt_ema.DecaySchedule()  # a uniform mean takes no schedule
    assert options.replaced(decay=0.9).schedule.warmup and options.replaced(decay=0.9).schedule.decay == 0.9


def test_the_keyword_api_and_the_options_object_give_the_same_average(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [5, 10, 20])
    by_keywords = ckpt_ema.average(tmp_path / "run", decay=0.9, warmup=True).state_dict
    options = ckpt_ema.AverageOptions(schedule=ckpt_ema.DecaySchedule(decay=0.9, warmup=True))
    by_object = ckpt_ema.average(tmp_path / "run", options=options).state_dict
    assert by_keywords.keys() == by_object.keys()
    assert all(torch.equal(by_keywords[k], by_object[k]) for k in by_keywords)
