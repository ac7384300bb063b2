"""Megatron-core ``torch_dist`` checkpoints as inputs, in Megatron-LM's layout and NeMo 2's: runs written by
megatron-core 0.16.1 itself (tensor parallel 2 under gloo: ``scripts/make_megatron_fixtures.py``), read without
megatron-core, compared with what megatron-core's own loader returned for each checkpoint (the safetensors files in
``tests/fixtures/megatron/reference/``)."""

from __future__ import annotations

import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, linear_reference, max_abs_diff, run_cli
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.formats import megatron
from ckpt_ema.formats.dcp import METADATA_FILE
from ckpt_ema.formats.dcp_reader import DcpCheckpoint, read_metadata
from ckpt_ema.formats.registry import format_of, is_complete, load_state_dict, open_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron"
RUN = FIXTURES / "megatron"  # Megatron-LM's layout, float32
NEMO = FIXTURES / "nemo" / "checkpoints"  # NeMo 2's layout, bfloat16
MEGATRON_STEPS = (2, 4, 6)
NEMO_STEPS = (2, 4)


def nemo_checkpoint(step: int, last: bool = False) -> Path:
    return NEMO / (f"default--val_loss=0.00-step={step}-consumed_samples={float(4 * step)}" + ("-last" if last else ""))


def reference(layout: str, step: int) -> dict[str, torch.Tensor]:
    """The model's weights at ``step`` as megatron-core's own loader returned them when the run was written."""
    return load_file(FIXTURES / "reference" / f"{layout}-{step}.safetensors")


CHECKPOINTS = [(RUN / f"iter_{s:07d}", "megatron", s) for s in MEGATRON_STEPS] + \
              [(nemo_checkpoint(s), "nemo", s) for s in NEMO_STEPS] + \
              [(nemo_checkpoint(4, last=True), "nemo", 4), (nemo_checkpoint(2) / "weights", "nemo", 2)]


@pytest.mark.parametrize(("path", "layout", "step"), CHECKPOINTS, ids=lambda x: getattr(x, "name", str(x)))
def test_each_checkpoint_reads_to_what_megatron_core_loads(path: Path, layout: str, step: int) -> None:
    """The model's tensors, shards of both ranks merged, layers stacked on dimension 0, exactly as megatron-core
    loads them; the optimizer's entries, _extra_state and pickled values left out, and said so."""
    assert format_of(path) is megatron.FORMAT
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, DcpCheckpoint)
    want = reference(layout, step)
    assert sorted(ckpt.names) == sorted(want)  # the model's own keys: no optimizer., no module., no _extra_state
    got, _ = load_state_dict(path)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert ckpt.weights_from is not None and "left out: 18 optimizer tensors (optimizer.*)" in ckpt.weights_from
    assert len(ckpt._chunks["embedding.word_embeddings.weight"]) == 2  # vocabulary rows split over the 2 ranks
    assert len(ckpt._chunks["decoder.layers.mlp.linear_fc1.weight"]) == 4  # 2 layers x 2 ranks
    assert got["decoder.layers.mlp.linear_fc1.weight"].shape == (2, 22, 13)
    assert megatron.megatron_step(path, ckpt.metadata) == (step, "name")
    assert is_complete(path)


def test_a_piece_is_read_from_the_chunks_that_hold_it() -> None:
    """Flat pieces across the rank and layer boundaries equal the reference's elements."""
    ckpt = open_checkpoint(RUN / "iter_0000004")
    want = reference("megatron", 4)
    for name in ("embedding.word_embeddings.weight", "decoder.layers.mlp.linear_fc2.weight"):
        flat = want[name].reshape(-1)
        for a, b in ((0, 1), (5, flat.numel() // 2 + 7), (flat.numel() // 2 - 3, flat.numel())):
            assert torch.equal(ckpt.piece(name, a, b), flat[a:b]), (name, a, b)


def test_runs_are_found_with_their_steps() -> None:
    """Megatron-LM's run folder (its tracker checked), NeMo 2's checkpoints folder (its -last copy of the newest
    checkpoint not counted twice): steps from the folders' names."""
    plan = ckpt_ema.plan(RUN, decay=0.9)
    assert [(s.path.name, s.step, s.step_from) for s in plan.sources] == \
           [(f"iter_{s:07d}", s, "name") for s in MEGATRON_STEPS]
    plan = ckpt_ema.plan(NEMO, decay=0.9)
    assert [(s.path, s.step) for s in plan.sources] == [(nemo_checkpoint(s), s) for s in NEMO_STEPS]
    last = nemo_checkpoint(4, last=True)
    assert plan.discovery.skipped == [f"{last}: NeMo 2's -last copy of {nemo_checkpoint(4).name} (the same checkpoint "
                                      "saved twice), not averaged a second time"]


def weighted(refs: list[dict[str, torch.Tensor]], coefficients: list[float]) -> dict[str, torch.Tensor]:
    return {n: sum(c * r[n].double() for c, r in zip(coefficients, refs)) for n in refs[0]}


def test_ema_of_a_megatron_run_equals_the_float64_reference(tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    res = run_cli("average", RUN, "--decay", "0.7", "-o", out)
    assert res.exit_code == 0, res.output
    assert "left out: 18 optimizer tensors" in res.stderr
    want = linear_reference({s: reference("megatron", s) for s in MEGATRON_STEPS}, decay=0.7)
    got = load_file(out)
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.dtype == torch.float32 and max_abs_diff(t, want[name]) < 1e-6, name


def cosine_coefficients(steps: list[int], window: int) -> list[float]:
    """The WSM merge of a cosine decay over the newest ``window`` steps, step by step: each interval between two
    checkpoints weighed by the mean of the decayed learning-rate factor over its steps."""
    end = steps[-1]
    first = max((i for i, s in enumerate(steps) if s <= end - window), default=0)
    phi = [sum((1 + math.cos(math.pi * min(max((s - end + window) / window, 0.0), 1.0))) / 2 for s in range(a + 1, b + 1))
           / (b - a) for a, b in zip(steps[first:], steps[first + 1:])]
    return [0.0] * first + [1 - phi[0], *[x - y for x, y in zip(phi, [*phi[1:], 0.0])]]


def test_cosine_window_merge_of_a_megatron_run_equals_the_float64_reference(tmp_path: Path) -> None:
    out = tmp_path / "wsm.safetensors"
    res = run_cli("average", RUN, "--weights", "cosine", "--window-steps", "3", "-o", out)
    assert res.exit_code == 0, res.output
    coefficients = cosine_coefficients(list(MEGATRON_STEPS), 3)
    assert all(c > 0.05 for c in coefficients)  # every checkpoint counts
    want = weighted([reference("megatron", s) for s in MEGATRON_STEPS], coefficients)
    got = load_file(out)
    for name, t in got.items():
        assert max_abs_diff(t, want[name]) < 1e-6, name


def test_ema_of_a_nemo_run_equals_the_float64_reference(tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    res = run_cli("average", NEMO, "--decay", "0.5", "--out-dtype", "float32", "-o", out)
    assert res.exit_code == 0, res.output
    want = linear_reference({s: reference("nemo", s) for s in NEMO_STEPS}, decay=0.5)
    got = load_file(out)
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert max_abs_diff(t, want[name]) < 1e-6, name


def copy_checkpoint(tmp_path: Path, step: int = 4) -> Path:
    folder = tmp_path / "run" / f"iter_{step:07d}"
    shutil.copytree(RUN / folder.name, folder)
    return folder


def test_damaged_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    folder = copy_checkpoint(tmp_path)
    (folder / "__1_0.distcp").unlink()
    assert_refused([folder], "__1_0.distcp is missing", out=tmp_path / "a.safetensors")

    folder = copy_checkpoint(tmp_path / "truncated")
    data = (folder / "__0_1.distcp").read_bytes()
    (folder / "__0_1.distcp").write_bytes(data[:-100])
    assert_refused([folder], "__0_1.distcp", "truncated", out=tmp_path / "b.safetensors")

    for at, said in ((0, "not a readable DCP metadata file"), (-1, "not a readable DCP metadata file")):
        folder = copy_checkpoint(tmp_path / f"flipped{at}")
        data = bytearray((folder / METADATA_FILE).read_bytes())
        data[at] ^= 0xFF
        (folder / METADATA_FILE).write_bytes(bytes(data))
        assert_refused([folder], METADATA_FILE, said, out=tmp_path / f"c{at}.safetensors")

    folder = copy_checkpoint(tmp_path / "unfinished")
    (folder / megatron.CONFIG_FILE).unlink()  # megatron-core writes it last
    assert not is_complete(folder)
    assert_refused([folder], "no metadata.json", "did not finish", out=tmp_path / "d.safetensors")

    folder = copy_checkpoint(tmp_path / "zarr")
    (folder / megatron.CONFIG_FILE).write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    assert_refused([folder], "sharded_backend is 'zarr'", out=tmp_path / "e.safetensors")

    assert_refused([RUN / "iter_0000002", "--key", "model"], "--key model does not apply",
                   out=tmp_path / "f.safetensors")


def test_a_tracker_naming_a_missing_iteration_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    shutil.rmtree(run / "iter_0000006")  # the newest checkpoint, which the tracker names, is gone
    assert_refused([run], "latest_checkpointed_iteration.txt", "names the checkpoint iter_0000006",
                   out=tmp_path / "a.safetensors")
    (run / megatron.TRACKER_FILE).write_text("six")
    assert_refused([run], "holds 'six', not an iteration", out=tmp_path / "b.safetensors")


def test_the_metadata_admits_the_save_plans_and_nothing_else(tmp_path: Path) -> None:
    """megatron-core pickles each rank's DCP save plan into the metadata: those records load, any other class of
    the planner is still refused."""
    from torch.distributed.checkpoint.planner import LoadPlan, SavePlan

    metadata = read_metadata(RUN / "iter_0000002" / METADATA_FILE)
    plans = metadata.all_local_plans  # type: ignore[attr-defined]
    assert len(plans) == 2 and all(isinstance(p, SavePlan) and p.items for p in plans)
    metadata.all_local_plans = [LoadPlan(items=[])]  # type: ignore[attr-defined]
    bad = tmp_path / METADATA_FILE
    bad.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ckpt_ema.CkptEmaError, match="pickles torch.distributed.checkpoint.planner.LoadPlan"):
        read_metadata(bad)


def test_reading_needs_no_megatron(tmp_path: Path) -> None:
    """In a process where megatron cannot be imported, both layouts read to the reference."""
    code = (
        "import sys; sys.modules['megatron'] = None; sys.modules['nemo'] = None\n"
        "import torch; from safetensors.torch import load_file\n"
        "from ckpt_ema.formats.registry import load_state_dict\n"
        f"for path, ref in [({str(RUN / 'iter_0000006')!r}, {str(FIXTURES / 'reference' / 'megatron-6.safetensors')!r}),"
        f" ({str(nemo_checkpoint(4))!r}, {str(FIXTURES / 'reference' / 'nemo-4.safetensors')!r})]:\n"
        "    got, want = load_state_dict(path)[0], load_file(ref)\n"
        "    assert sorted(got) == sorted(want) and all(torch.equal(got[k], v) for k, v in want.items())\n"
        "assert 'megatron' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "print('read')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "read", done.stderr


def test_an_unfinished_save_is_not_one_of_the_runs_checkpoints(tmp_path: Path) -> None:
    """megatron-core writes metadata.json last (an asynchronous save, when every rank is done): until then the
    folder is left out of its run, and refused when given alone."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    (run / "iter_0000006" / megatron.CONFIG_FILE).unlink()
    (run / megatron.TRACKER_FILE).write_text("4")  # Megatron-LM updates its tracker after the save
    assert [s.step for s in ckpt_ema.plan(run, decay=0.9).sources] == [2, 4]


# ---------------------------------------------------------------------------------------------------- fp32 masters

MASTERS = FIXTURES / "masters"  # bfloat16 runs whose optimizer keeps fp32 masters (scripts/make_megatron_fixtures.py)
MASTER_RUNS = {"float16": "optimizer.state.fp32_param.", "fully_reshardable": "optimizer.state.param."}
MASTER_STEPS = (2, 4)


def model_entries(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's own (bfloat16) entries of a checkpoint, read through the DCP reader by their flat keys."""
    def by_key(metadata: object, paths: object, key: object, folder: object) -> tuple[str, dict[str, str]]:
        return "the model entries", {n: n for n in names}

    ckpt = DcpCheckpoint(path, path / METADATA_FILE, choose=by_key)
    return {n: ckpt.piece(n, 0, math.prod(ckpt._shape[n][0])).view(ckpt._shape[n][0]).clone() for n in names}


@pytest.mark.parametrize("step", MASTER_STEPS)
@pytest.mark.parametrize("run", sorted(MASTER_RUNS))
def test_fp32_masters_are_read_in_place_of_the_model_entries(run: str, step: int) -> None:
    """Where the optimizer names a master per parameter, the weights are the masters, bit for bit as megatron-core's
    own loader returns them; the bfloat16 model entries are those masters rounded (so reading them would lose
    what the masters hold), and both are listed in ``entries``, the master first."""
    path = MASTERS / run / f"iter_{step:07d}"
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, DcpCheckpoint)
    want = reference(f"masters-{run}", step)
    assert sorted(ckpt.names) == sorted(want) and len(want) == 9
    got, _ = load_state_dict(path)
    for name, t in want.items():
        assert t.dtype == torch.float32 and got[name].dtype == torch.float32 and torch.equal(got[name], t), name
    prefix = MASTER_RUNS[run]
    assert ckpt.weights_from is not None
    assert ckpt.weights_from.startswith("the fp32 master weights in the optimizer state") and prefix in ckpt.weights_from
    assert "for 9 of the model's 9 tensors; left out: 18 optimizer tensors (optimizer.*)" in ckpt.weights_from
    assert ckpt.entries == {name: [prefix + name, name] for name in want}
    model = model_entries(path, sorted(want))
    for name, t in want.items():
        assert model[name].dtype == torch.bfloat16 and torch.equal(model[name], t.to(torch.bfloat16)), name
    rounded = sum(int((model[n].float() != t).sum()) for n, t in want.items())
    assert rounded > 0.9 * sum(t.numel() for t in want.values())  # the masters hold more than bfloat16 does


@pytest.mark.parametrize("run", sorted(MASTER_RUNS))
def test_ema_of_the_masters_equals_the_float64_reference(run: str, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    res = run_cli("average", MASTERS / run, "--decay", "0.6", "-o", out)
    assert res.exit_code == 0, res.output
    assert "the fp32 master weights" in res.stderr
    want = linear_reference({s: reference(f"masters-{run}", s) for s in MASTER_STEPS}, decay=0.6)
    got = load_file(out)
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.dtype == torch.float32 and max_abs_diff(t, want[name]) < 1e-6, name


def test_masters_in_the_distributed_optimizers_buckets_are_not_mapped_and_said() -> None:
    """dp_reshardable (Megatron-LM's default for the distributed optimizer) keeps the masters in flat buckets that
    name no parameter: the model's entries are read, bit-exact, and the run names the flag that saves mappable
    masters."""
    path = MASTERS / "dp_reshardable" / "iter_0000002"
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, DcpCheckpoint)
    want = reference("masters-dp_reshardable", 2)
    got, _ = load_state_dict(path)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert t.dtype == torch.bfloat16 and torch.equal(got[name], t), name
    bucket = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32).bucket_idx_0.param"
    assert ckpt.weights_from is not None and ckpt.weights_from.startswith(
        "the model's entries of the megatron-core checkpoint; fp32 masters not read, in a layout ckpt-ema does not "
        f"map to the parameters: 1 entries ({bucket}, ...; save with Megatron-LM's --dist-ckpt-optim-fully-reshardable")
    assert ckpt.entries == {name: [name] for name in want}
    assert megatron.unmapped_masters(read_metadata(path / METADATA_FILE), path) == [bucket]


def test_entries_of_checkpoints_without_masters_are_their_own_keys() -> None:
    """The default of every DCP checkpoint: each tensor's one flat key (NeMo 2's with its module. prefix)."""
    assert open_checkpoint(RUN / "iter_0000002").entries == {n: [n] for n in reference("megatron", 2)}
    assert open_checkpoint(nemo_checkpoint(2)).entries == {n: [f"module.{n}"] for n in reference("nemo", 2)}


def copy_masters(tmp_path: Path, run: str = "float16", step: int = 4) -> Path:
    folder = tmp_path / run / f"iter_{step:07d}"
    shutil.copytree(MASTERS / run / folder.name, folder)
    return folder


def test_damaged_masters_are_refused_in_one_line(tmp_path: Path) -> None:
    folder = copy_masters(tmp_path / "missing")
    (folder / "__1_1.distcp").unlink()
    assert_refused([folder], "__1_1.distcp is missing", out=tmp_path / "a.safetensors")

    folder = copy_masters(tmp_path / "truncated", "fully_reshardable")
    data = (folder / "__0_0.distcp").read_bytes()
    (folder / "__0_0.distcp").write_bytes(data[:-7])
    assert_refused([folder], "__0_0.distcp", "truncated", out=tmp_path / "b.safetensors")

    name = "decoder.final_layernorm.weight"
    folder = copy_masters(tmp_path / "twice")
    metadata = read_metadata(folder / METADATA_FILE)
    entries = metadata.state_dict_metadata
    entries["optimizer.state.param." + name] = entries["optimizer.state.fp32_param." + name]
    (folder / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    assert_refused([folder], f"two fp32 masters of '{name}'", out=tmp_path / "d.safetensors")


@pytest.mark.parametrize(("field", "value"), [("size", torch.Size([1, 13])), ("dtype", torch.bfloat16)])
def test_a_master_in_a_layout_not_mapped_leaves_its_model_entry_read_and_said(field: str, value: object,
                                                                              tmp_path: Path) -> None:
    """A per-parameter master of another shape (megatron-core before 0.14 saved the distributed optimizer's masters
    flattened) or dtype is not read: its model entry is, the others' masters are, and the run says which."""
    name = "decoder.final_layernorm.weight"
    master = "optimizer.state.fp32_param." + name
    folder = copy_masters(tmp_path)
    metadata = read_metadata(folder / METADATA_FILE)
    entry = metadata.state_dict_metadata[master]
    setattr(entry.properties if field == "dtype" else entry, field, value)
    (folder / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    ckpt = open_checkpoint(folder)
    assert isinstance(ckpt, DcpCheckpoint) and ckpt.weights_from is not None
    assert "for 8 of the model's 9 tensors (the other 1: the model's entries)" in ckpt.weights_from
    assert f"1 entries ({master}, ...;" in ckpt.weights_from
    assert ckpt.entries[name] == [name]
    assert megatron.unmapped_masters(metadata, folder) == [master]
    got, _ = load_state_dict(folder)
    want = reference("masters-float16", 4)
    assert torch.equal(got[name], want[name].to(torch.bfloat16))  # the model entry: the master rounded
    assert all(torch.equal(got[n], t) for n, t in want.items() if n != name)
