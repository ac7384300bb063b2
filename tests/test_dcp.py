"""PyTorch Distributed Checkpoint (DCP) folders as inputs: written by torch.distributed.checkpoint under gloo with two
processes (FSDP2 and tensor-parallel DTensors), read in this one process, compared with what PyTorch's own
dcp_to_torch_save consolidates. The tests that read those runs are marked slow: a spawn of two ranks writes them
(once per session, for the fixture table of tests/checkpoints.py)."""

from __future__ import annotations

import json
import math
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import DCP_STEPS, RUNS, SmallNet, dcp_model
from helpers import assert_average, assert_refused, run_cli, torchrun
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.formats.dcp import METADATA_FILE
from ckpt_ema.formats.dcp_reader import DcpCheckpoint, flat_boxes
from ckpt_ema.formats.dcp_reader import read_metadata as read_metadata_file
from ckpt_ema.formats.registry import open_checkpoint


@pytest.fixture()
def runs() -> tuple[Path, Path]:
    """The FSDP2 run and the tensor-parallel one of the fixture table (one spawn of two ranks per session)."""
    return RUNS["dcp_fsdp"].folder, RUNS["dcp_tp"].folder


def dcp_checkpoint(path: Path, key: str | None = None) -> DcpCheckpoint:
    """The DCP checkpoint at ``path``, opened as the engine opens it."""
    ckpt = open_checkpoint(path, key)
    assert isinstance(ckpt, DcpCheckpoint)
    return ckpt


def read_metadata(folder: Path):  # noqa: ANN201 - DCP's Metadata
    return read_metadata_file(folder / METADATA_FILE)


@pytest.mark.slow
def test_ema_of_an_fsdp_run_equals_the_consolidated_checkpoints(tmp_path: Path) -> None:
    """The model's own names (buffers, the bfloat16 layer) from the entry 'model', the steps from train_state.step;
    the average is the reference's, made from what dcp_to_torch_save consolidates."""
    run = RUNS["dcp_fsdp"]
    res = run_cli("average", run.folder, "--decay", "0.7", "-o", f"{tmp_path / 'out'}/")
    assert res.exit_code == 0, res.output
    assert "note: weights: the DCP entry 'model'" in res.stderr
    plan = ckpt_ema.plan(run.folder, decay=0.7)
    assert [s.step for s in plan.sources] == run.steps
    assert {s.step_from for s in plan.sources} == {"metadata:step"}  # train_state.step, not the name
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(got) == sorted(SmallNet().state_dict())
    assert_average(run, got, decay=0.7)


@pytest.mark.slow
def test_tensor_parallel_shards_and_top_level_model(runs: tuple[Path, Path]) -> None:
    """Dimension-1 shards of uneven size (7 columns over 2 ranks) and torchtitan's layout (the model's tensors at
    the top level beside train_state and dataloader): every piece the engine could ask for equals PyTorch's."""
    _, tp = runs
    ckpt = dcp_checkpoint(tp / "step-100")
    assert ckpt.weights_from == "the DCP entry of top-level tensors"
    assert ckpt.metadata == {"step": 100}
    ref = dcp_model(tp / "step-100", key=None)
    assert sorted(ckpt.names) == sorted(ref)
    assert {len(ckpt._chunks["l2t"]), len(ckpt._chunks["l2.weight"])} == {2}  # really split across the ranks
    rng = random.Random(0)
    for name, want in ref.items():
        flat = want.reshape(-1)
        assert torch.equal(ckpt.tensor(name), want), name
        for _ in range(30):
            a = rng.randint(0, flat.numel())
            b = rng.randint(a, flat.numel())
            assert torch.equal(ckpt.piece(name, a, b), flat[a:b]), (name, a, b)


@pytest.mark.slow
def test_a_piece_costs_at_most_its_own_size(runs: tuple[Path, Path]) -> None:
    """A piece is a view of the mapped file or a copy of just its elements, never of the whole tensor or chunk:
    memory stays within the engine's chunk whatever the tensor's size."""
    fsdp, tp = runs
    for ckpt in (dcp_checkpoint(fsdp / "step-2"), dcp_checkpoint(tp / "step-200")):
        for name in ckpt.names:
            numel = math.prod(ckpt.shapes()[name][0])
            for a, b in ((0, numel // 3), (numel // 3, numel), (1, max(numel - 1, 1))):
                piece = ckpt.piece(name, a, b)
                maps = [m for m in ckpt._maps.values()
                        if m.data_ptr() <= piece.data_ptr() < m.data_ptr() + m.nbytes()]
                assert maps or piece.untyped_storage().nbytes() == piece.nbytes, (name, a, b)


@pytest.mark.slow
def test_key_chooses_the_entry_and_a_wrong_key_is_refused(runs: tuple[Path, Path], tmp_path: Path) -> None:
    fsdp, tp = runs
    assert dcp_checkpoint(fsdp / "step-2", key="model").names == dcp_checkpoint(fsdp / "step-2").names
    optim = dcp_checkpoint(fsdp / "step-2", key="optim.state.l1.weight")
    assert sorted(optim.names) == ["exp_avg", "exp_avg_sq", "step"]
    assert_refused([fsdp, "--key", "nope"], "no tensors under the key 'nope'", "model, optim, train_state",
                   out=tmp_path / "x.safetensors")


def test_flat_boxes_cover_the_range_in_order() -> None:
    rng = random.Random(1)
    for shape in [(5, 7), (3, 4, 5), (7,), (), (2, 3, 1, 5)]:
        n = math.prod(shape)
        for _ in range(40):
            a = rng.randint(0, n)
            b = rng.randint(a, n)
            index = torch.arange(n).view(shape)
            got = [index[tuple(slice(lo, hi) for lo, hi in zip(l, h))].reshape(-1) for _, l, h in flat_boxes(shape, a, b)]
            starts = [at for at, _, _ in flat_boxes(shape, a, b)]
            assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long), torch.arange(a, b))
            assert starts == [int(g[0]) for g in got]


# ------------------------------------------------------------------------------------------- refusals


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def item_ends(folder: Path) -> dict[str, tuple[int, int]]:
    """Per .distcp file: where its model items end, and where its last item of any kind ends."""
    md = read_metadata(folder)
    ends: dict[str, tuple[int, int]] = {}
    for index, info in md.storage_data.items():
        model_end, any_end = ends.get(info.relative_path, (0, 0))
        end = info.offset + info.length
        ends[info.relative_path] = (max(model_end, end) if index.fqn.startswith("model.") else model_end,
                                    max(any_end, end))
    return ends


@pytest.mark.slow
def test_truncated_distcp_is_refused_in_a_line_saying_how_short_it_is(runs: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """Even when only optimizer bytes are gone (the model's are all there): the file, what it holds, what the
    metadata needs."""
    run = copy_run(runs[0], tmp_path)
    folder = run / "step-4"
    name, (model_end, any_end) = next((n, e) for n, e in item_ends(folder).items() if e[1] > e[0])
    last = next(k.fqn for k, v in read_metadata(folder).storage_data.items()
                if v.relative_path == name and v.offset + v.length == any_end)
    with open(folder / name, "r+b") as f:
        f.truncate(any_end - 1)
    error = assert_refused([run], out=f"{tmp_path / 'out'}/")
    assert error == (f"ckpt-ema: error: {folder / name}: holds {any_end - 1} bytes, the DCP metadata needs {any_end} "
                     f"(it stores {last!r} up to there): truncated")


@pytest.mark.slow
def test_a_missing_distcp_is_refused_in_a_line_naming_it(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path)
    (run / "step-6" / "__1_0.distcp").unlink()
    error = assert_refused([run], out=tmp_path / "ema.safetensors")
    assert re.fullmatch(rf"ckpt-ema: error: {re.escape(str(run / 'step-6'))}: __1_0\.distcp is missing \(the DCP "
                        r"metadata stores '[\w.]+' in it\)", error), error


@pytest.mark.slow
def test_watch_folds_a_dcp_run_once_its_metadata_is_written(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Each checkpoint copied in as DCP saves it (every rank's .distcp files, then .metadata, renamed into place):
    left alone until its .metadata is there, then folded; the result is the average of the run read at once. A
    checkpoint missing a .distcp file stops the watch with the line that says so."""
    from test_watch import assert_average_of, fold, folded_steps, watcher

    fsdp, _ = runs
    run, out = tmp_path / "run", tmp_path / "ema.safetensors"
    run.mkdir()
    w = watcher(run, out, [], poll=0.05)
    for step in DCP_STEPS:
        source, folder = fsdp / f"step-{step}", run / f"step-{step}"
        folder.mkdir()
        for file in sorted(source.glob("*.distcp")):
            shutil.copy(file, folder / file.name)
        for _ in range(3):
            w.step()
        assert step not in folded_steps(w)
        shutil.copy(source / METADATA_FILE, folder / f"{METADATA_FILE}.tmp")
        (folder / f"{METADATA_FILE}.tmp").rename(folder / METADATA_FILE)
        fold(w, step)
    assert folded_steps(w) == list(DCP_STEPS)
    assert_average_of(out, [fsdp])
    broken = run / "step-8"
    shutil.copytree(fsdp / f"step-{DCP_STEPS[-1]}", broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CkptEmaError, match=r"step-8: __1_0\.distcp is missing \(the DCP metadata stores"):
        fold(w, 8)


@pytest.mark.slow
def test_corrupt_item_header_refused(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path)
    folder = run / "step-2"
    md = read_metadata(folder)
    info = next(v for k, v in md.storage_data.items() if k.fqn == "model.l1.weight")
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length - 22)  # the zip's end-of-central-directory record
        f.write(b"\xff" * 22)
    assert_refused([run], info.relative_path, "not a readable tensor", out=tmp_path / "ema.safetensors")


def mutate_metadata(folder: Path, change) -> None:  # noqa: ANN001 - a function of the Metadata
    md = read_metadata(folder)
    change(md)
    with open(folder / METADATA_FILE, "wb") as f:
        pickle.dump(md, f)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["chunk outside", "chunks overlap", "items share bytes", "dtype", "path escapes",
                                  "planner map"])
def test_inconsistent_metadata_refused(runs: tuple[Path, Path], tmp_path: Path, what: str) -> None:
    run = copy_run(runs[0], tmp_path)

    def change(md) -> None:  # noqa: ANN001
        entry = md.state_dict_metadata["model.emb.weight"]
        if what == "chunk outside":
            entry.chunks[1].sizes = torch.Size([19, 16])  # 19 + 19 rows of 37
        elif what == "chunks overlap":
            entry.chunks[1].offsets, entry.chunks[1].sizes = torch.Size([18, 0]), torch.Size([18, 16])
            entry.chunks[0].sizes = torch.Size([19, 16])
            key = next(k for k in md.storage_data if k.fqn == "model.emb.weight" and k.offset[0] == 19)
            md.storage_data[type(key)("model.emb.weight", [18, 0])] = md.storage_data.pop(key)
        elif what == "items share bytes":  # one entry's record pointed at another's item (same shape and dtype)
            model = next(k for k in md.storage_data if k.fqn == "model.l1.weight")
            moment = next(k for k in md.storage_data if k.fqn == "optim.state.l1.weight.exp_avg" and k.offset == model.offset)
            md.storage_data[model] = md.storage_data[moment]
        elif what == "dtype":
            entry.properties.dtype = torch.float16
        elif what == "planner map":
            md.planner_data["model.l1.weight"] = ("model", "l9.weight")
        else:
            next(iter(md.storage_data.values())).relative_path = "../elsewhere.distcp"

    mutate_metadata(run / "step-4", change)
    fragment = {"chunk outside": "outside its shape", "chunks overlap": "exactly once",
                "items share bytes": "at overlapping bytes of",
                "dtype": "the metadata says torch.float16", "path escapes": "not a file of this folder",
                "planner map": "not the path its name joins"}[what]
    assert_refused([run], fragment, out=tmp_path / "ema.safetensors")


@pytest.mark.slow
def test_a_storage_entry_missing_a_field_is_refused(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """A .metadata whose storage entry lost a field (a flipped byte in its pickle did this) is refused in a line."""
    run = copy_run(runs[0], tmp_path)
    mutate_metadata(run / "step-4", lambda md: delattr(next(iter(md.storage_data.values())), "length"))
    assert_refused([run], ".metadata", "_StorageInfo without all its fields", out=tmp_path / "ema.safetensors")


class RunsCode:
    """Pickles as a call to os.system, which must never run: its command would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_metadata_pickling_code_is_refused_not_run(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(runs[0], tmp_path)
    marker = tmp_path / "ran"
    mutate_metadata(run / "step-2", lambda md: setattr(md, "planner_data", RunsCode(marker)))
    assert_refused([run], "refusing to load", "posix.system", out=tmp_path / "ema.safetensors")
    assert not marker.exists()


@pytest.mark.slow
def test_reading_needs_no_process_group(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """A fresh interpreter reads and averages without torch.distributed ever being initialized."""
    code = ("import ckpt_ema, torch.distributed as d, sys; r = ckpt_ema.average(sys.argv[1], None, last=2); "
            "assert not d.is_initialized(); print(len(r.state_dict))")
    done = subprocess.run([sys.executable, "-c", code, str(runs[1])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(SmallNet().state_dict()))


@pytest.mark.slow
def test_under_torchrun_each_rank_folds_its_share_into_a_new_folder(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Two processes read the same DCP run, each folding its share of the tensors, into a folder neither found:
    bit for bit what one process writes."""
    fsdp, _ = runs
    done = torchrun("average", fsdp, "--decay", "0.7", "--max-shard-size", "2KB", "-o", f"{tmp_path / 'out'}/")
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / "out" / shard))
    want = ckpt_ema.average(fsdp, None, decay=0.7).state_dict
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
