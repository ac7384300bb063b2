"""``torchrun --nproc-per-node 2 ... ckpt-ema average|sweep`` on CPU (gloo): the same tensors as one process, bit
for bit; a sharded output that the real ``safetensors`` package reads; and a failure on one rank that leaves
nothing behind. Three torchrun launches in all: each costs a few seconds of start-up."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import torchrun
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.formats.registry import open_checkpoint
from ckpt_ema.engine.distributed import partition
from ckpt_ema.output.atomic import check_output_path
from ckpt_ema.engine.layout import Layout

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this torch has no torch.distributed with gloo")

STEPS = (10, 20, 30, 40)
# Small enough that big tensors are cut into several chunks and each rank writes more than one shard.
OPTIONS = ["--decay", "0.9", "--max-memory", "512KB", "--max-shard-size", "150KB"]
API_OPTIONS = {"decay": 0.9, "max_memory": "512KB", "max_shard_size": "150KB"}
SWEEP_OPTIONS = ["--decay", "0.5", "0.9", "--max-memory", "512KB", "--max-shard-size", "150KB", "--no-plot"]


def weights(step: int) -> dict[str, torch.Tensor]:
    """Tensors of different sizes and dtypes, so that both ranks get work, and one stored transposed."""
    g = torch.Generator().manual_seed(step)
    return {
        "embed.weight": torch.randn(300, 250, generator=g),  # 300 KB: cut into chunks
        "block.0.weight": torch.randn(200, 150, generator=g).t(),  # non-contiguous
        "block.0.bias": torch.randn(150, generator=g),
        "block.1.weight": torch.randn(180, 160, generator=g).to(torch.bfloat16),
        "block.1.bias": torch.randn(160, generator=g, dtype=torch.float64),
        "norm.weight": torch.randn(64, generator=g),
        "norm.num_batches_tracked": torch.tensor(step),
        "head.weight": torch.randn(10, 64, generator=g),
    }


def write_run(folder: Path, poisoned: str | None = None) -> Path:
    folder.mkdir()
    for step in STEPS:
        state = weights(step)
        if poisoned is not None and step == STEPS[-2]:
            state[poisoned][(0,) * state[poisoned].dim()] = float("nan")
        torch.save({"state_dict": state, "step": step}, folder / f"ckpt_{step}.pt")
    return folder


def read_sharded(index: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a sharded output read with the real safetensors package, and its index."""
    meta = json.loads(index.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(meta["weight_map"].values())):
        tensors.update(load_file(str(index.parent / shard)))
    return tensors, meta


def header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t.contiguous()), name


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_partition_balances_bytes_deterministically_in_layout_order() -> None:
    sizes = {"a": 10, "b": 70, "c": 30, "d": 30, "e": 40, "f": 0}
    layout = Layout({n: (k,) for n, k in sizes.items()}, {n: torch.float32 for n in sizes}, Path("x"))
    shares = partition(layout, 2)
    assert shares == [["b", "d"], ["a", "c", "e", "f"]]  # 70+30 | 40+30+10+0: largest first onto the lighter rank
    assert shares == partition(layout, 2)
    assert partition(layout, 1) == [list(sizes)]
    many = partition(layout, 8)  # more ranks than tensors: some ranks have nothing to do
    assert sorted(sum(many, [])) == sorted(sizes) and [] in many


@pytest.fixture(scope="module")
def distributed_average(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One two-rank average of a small run: (run folder, output, the torchrun result)."""
    root = tmp_path_factory.mktemp("dist")
    run = write_run(root / "run")
    out = root / "out" / "ema.safetensors"
    out.parent.mkdir()
    return run, out, torchrun("average", run, "-o", out, *OPTIONS)


@pytest.mark.slow
def test_two_ranks_average_like_one_process(distributed_average, tmp_path: Path) -> None:
    run, out, result = distributed_average
    assert result.returncode == 0, result.stderr
    index = out.with_name(out.name + ".index.json")
    got, meta = read_sharded(index)
    single = ckpt_ema.average(run, tmp_path / "single.safetensors", keep_state=False, **API_OPTIONS)
    assert_same_tensors(got, single.state_dict)
    # The index lists every tensor in layout order, the whole size, and the metadata one process writes.
    assert list(meta["weight_map"]) == list(weights(1))
    assert meta["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.state_dict.values())
    first_file = single.files[0]
    assert {k: v for k, v in meta["metadata"].items() if k != "total_size"} == {
        k: v for k, v in header_metadata(first_file).items() if k != "total_size"}
    # Both ranks wrote shards; the summary is printed once, by rank 0.
    layout = Layout.of(open_checkpoint(run / "ckpt_40.pt", None))
    shares = partition(layout, 2)
    assert all(shares)
    owners = [{meta["weight_map"][n] for n in names} for names in shares]
    assert not owners[0] & owners[1]
    assert len(set(meta["weight_map"].values())) >= 3
    assert result.stderr.count("averaged 4 checkpoints") == 1
    assert no_temporaries(out.parent)


@pytest.mark.slow
def test_two_ranks_sweep_like_one_process(tmp_path: Path, distributed_average) -> None:
    run, _, _ = distributed_average
    out = tmp_path / "sweep"
    result = torchrun("sweep", run, "-o", out, *SWEEP_OPTIONS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ema-0.9") == 1  # the table, from rank 0 only
    ckpt_ema.sweep([run], tmp_path / "single", decays=[0.5, 0.9], max_memory="512KB", max_shard_size=None,
                   keep_state=False)
    for name in ("ema-0.5", "ema-0.9"):
        got, _ = read_sharded(out / f"{name}.safetensors.index.json")
        assert_same_tensors(got, load_file(str(tmp_path / "single" / f"{name}.safetensors")))
    assert no_temporaries(out)


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank_and_leaves_no_output(tmp_path: Path, distributed_average) -> None:
    _, previous, _ = distributed_average
    out_dir = tmp_path / "out"
    shutil.copytree(previous.parent, out_dir)  # an output from an earlier run, which must survive
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    # NaN in a tensor that rank 1 folds, in one checkpoint: only rank 1 can see it.
    probe = write_run(tmp_path / "probe")
    owned_by_1 = partition(Layout.of(open_checkpoint(probe / "ckpt_10.pt", None)), 2)[1]
    poisoned = next(n for n in owned_by_1 if weights(1)[n].is_floating_point())
    bad = write_run(tmp_path / "bad", poisoned)
    result = torchrun("average", bad, "-o", check_output_path(out_dir / "ema.safetensors"), *OPTIONS)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("ckpt-ema: error:")]
    assert lines, result.stderr
    assert all(line == f"ckpt-ema: error: rank 1: {bad / 'ckpt_30.pt'}: tensor {poisoned!r} contains NaN"
               for line in lines), lines
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert no_temporaries(out_dir)
