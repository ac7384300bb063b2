"""The architecture the tree shows holds: no module of the package imports another that imports it back (at any
depth, function-level imports included), the engine never imports the CIFAR-10 demo, the command line answers
--help without importing torch, and the API stays in one process unless asked for several."""

from __future__ import annotations

import ast
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


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from the source: every ``import``/``from ... import``
    statement anywhere in the file (inside functions too), except under ``if TYPE_CHECKING:`` (never run)."""
    def module_of(path: Path) -> str:
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_of(p): p for p in package.rglob("*.py")}

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges |= {t for a in node.names if (t := target(a.name))}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {t for a in node.names if (t := target(f"{node.module}.{a.name}"))}
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(REPO / "ckpt_ema")
    assert {"ckpt_ema.api", "ckpt_ema.pipeline", "ckpt_ema.cli"} <= set(graph)
    assert "ckpt_ema.pipeline" in graph["ckpt_ema.api"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.a"]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.slow
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


@pytest.mark.slow
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
