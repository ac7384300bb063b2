"""``-o DIR --like-input``: the merge written back as a checkpoint of the run's own format, checked with the formats'
own loaders: torch DCP's ``dcp.load`` for every layout built on it (torch DCP with FSDP2 and tensor parallelism,
OLMo-core, Megatron-LM, NeMo 2), and megatron-core's and OLMo-core's loaders where they are installed. The model's
entries must hold the average (equal to the float64 reference of the runs' own loaders, and to ckpt-ema's own
average bit for bit), every other entry and file the newest checkpoint's, every archive's CRC-32 right; and the
output is replaced whole or not at all, whatever stops the run."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoints import RUNS, copy_checkpoints
from helpers import assert_average, assert_refused, run_cli

import ckpt_ema
from ckpt_ema.formats.base import OWN_RECORD
from ckpt_ema.formats.dcp_reader import DcpCheckpoint, read_metadata
from ckpt_ema.output import like_input as like_input_module
from ckpt_ema.output.like_input import LikeInputOutput

REPO = Path(__file__).resolve().parent.parent
DECAY = 0.8
# Each layout: where its DCP folder lies in a checkpoint, and the prefix its model's entries carry there (what the
# trainer saves; written here from the layouts' own documentation, not from ckpt-ema's readers). OLMo-core's metadata
# records its own _StorageInfo, which torch's dcp.load cannot read (OLMo-core loads it with its own reader): its
# tensors are compared through ckpt-ema's reader here, and through OLMo-core's loader where it is installed.
LAYOUTS = {
    "dcp_fsdp": ("", "model."),  # dcp.save({"model": ..., "optim": ..., "train_state": ...})
    "dcp_tp": ("", ""),  # torchtitan: the model's tensors at the top level
    "olmo_core": ("model_and_optim", "model."),
    "megatron_lm": ("", ""),
    "nemo2": ("weights", "module."),
    "dcp_lightning_model_parallel": ("", "state_dict."),  # Lightning: {"state_dict": ..., "optimizer_0": ...}
    "dcp_lightning_fsdp": ("", "model."),  # Lightning's FSDPStrategy: {"model": ..., "optimizer_0": ...}
}
SLOW = {"dcp_fsdp", "dcp_tp", "dcp_lightning_model_parallel", "dcp_lightning_fsdp"}  # written by two ranks each


def rows() -> list:
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else []) for name in LAYOUTS]


def dcp_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor entry of the DCP folder, as torch's own ``dcp.load`` fills a state dict of them (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = read_metadata(folder / ".metadata").state_dict_metadata
    state = {fqn: torch.full(tuple(e.size), float("nan")).to(e.properties.dtype) if e.properties.dtype.is_floating_point
             else torch.zeros(tuple(e.size), dtype=e.properties.dtype)
             for fqn, e in entries.items() if isinstance(e, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state


def every_entry(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor entry of the DCP folder, read by ckpt-ema's DCP reader (for metadata torch's dcp.load cannot
    read)."""
    ckpt = DcpCheckpoint(folder, folder / ".metadata", choose=lambda metadata, paths, key, where: (
        "every entry", {f: f for f in paths}))
    return {n: ckpt.tensor(n).clone() for n in ckpt.names}


def item_bytes(folder: Path) -> dict[tuple[str, tuple[int, ...]], bytes]:
    """Every stored item of the DCP folder (tensor chunks and pickled values), by key and offsets."""
    metadata = read_metadata(folder / ".metadata")
    out = {}
    for index, info in metadata.storage_data.items():
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            out[index.fqn, tuple(index.offset or ())] = f.read(info.length)
    return out


def like_input(name: str, tmp_path: Path, *extra: str) -> Path:
    run = RUNS[name]
    out = tmp_path / "merged"
    res = run_cli("average", run.folder, "--decay", DECAY, "-o", out, "--like-input", *extra)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("name", rows())
def test_dcp_load_reads_the_merge_and_the_newest_checkpoints_other_state(name: str, tmp_path: Path) -> None:
    run = RUNS[name]
    inner, prefix = LAYOUTS[name]
    newest = run.folder / run.entries[run.steps[-1]][0]
    inputs = {p: p.read_bytes() for p in run.folder.rglob("*") if p.is_file()}
    out = like_input(name, tmp_path)
    assert {p: p.read_bytes() for p in run.folder.rglob("*") if p.is_file()} == inputs  # no input changed
    load = every_entry if name == "olmo_core" else dcp_tensors
    got, before = load(out / inner), load(newest / inner)
    assert sorted(got) == sorted(before)
    model = {fqn[len(prefix):]: t for fqn, t in got.items() if fqn.startswith(prefix) and fqn[len(prefix):] in
             run.weights[run.steps[-1]]}
    assert_average(run, model, decay=DECAY)  # the float64 reference of the run's own loader
    mine = ckpt_ema.average(run.folder, decay=DECAY).state_dict
    for name_, t in model.items():
        assert torch.equal(t, mine[name_]), name_  # what ckpt-ema averages, bit for bit
    kept = {fqn for fqn in got if fqn[len(prefix):] not in model or not fqn.startswith(prefix)}
    for fqn in kept:  # optimizer state, train state, ...: the newest checkpoint's
        assert torch.equal(got[fqn], before[fqn]), fqn
    items, items_before = item_bytes(out / inner), item_bytes(newest / inner)
    others = [key for key in items if not (key[0].startswith(prefix) and key[0][len(prefix):] in model)]
    assert others, "the run saves more than the model"
    for key, data in items.items():
        if key in others:
            assert data == items_before[key], key  # every other item byte for byte (pickled values too)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert archive.testzip() is None, key  # each rewritten archive's CRC-32 matches its bytes
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == sorted([*files, Path(OWN_RECORD)])
    for relative in files:
        if not relative.name.endswith(".distcp"):
            assert (out / relative).read_bytes() == (newest / relative).read_bytes(), relative
    assert not list(tmp_path.glob(".merged.*")), "no temporary folder left"


def test_megatron_cores_own_loader_reads_the_merge(tmp_path: Path) -> None:
    """megatron-core's ``dist_checkpointing.load_plain_tensors`` (one gloo process), where it is installed."""
    pytest.importorskip("megatron.core")
    out = like_input("megatron_lm", tmp_path)
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(REPO / 'scripts')!r})
import torch.distributed as dist
from make_megatron_fixtures import accommodate_cpu
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://{tmp_path / 'init'}")
accommodate_cpu()
from megatron.core import dist_checkpointing
from safetensors.torch import save_file
loaded = dist_checkpointing.load_plain_tensors({str(out)!r})
save_file({{k: v.contiguous() for k, v in loaded.items() if isinstance(v, torch.Tensor)}}, {str(tmp_path / 'loaded.safetensors')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "loaded.safetensors")
    run = RUNS["megatron_lm"]
    assert_average(run, {n: loaded[n] for n in run.weights[run.steps[-1]]}, decay=DECAY)
    assert any(n.startswith("optimizer.") for n in loaded)


def test_olmo_cores_own_loader_reads_the_merge(tmp_path: Path) -> None:
    """OLMo-core's ``load_model_and_optim_state`` into a fresh model, where ai2-olmo-core is installed."""
    pytest.importorskip("olmo_core")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_olmo_fixtures import model_config
    finally:
        sys.path.remove(str(REPO / "scripts"))
    from olmo_core.distributed.checkpoint import load_model_and_optim_state

    out = like_input("olmo_core", tmp_path)
    model = model_config().build(init_device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    load_model_and_optim_state(out / "model_and_optim", model)
    assert_average(RUNS["olmo_core"], {n: t.detach() for n, t in model.state_dict().items()}, decay=DECAY)


def test_an_append_writes_the_merge_of_all_and_then_is_up_to_date(tmp_path: Path) -> None:
    run = RUNS["megatron_lm"]
    folder, out = tmp_path / "run", tmp_path / "merged"
    copy_checkpoints(run, run.steps[:-1], folder)
    ckpt_ema.average(folder, out, like_input=True, decay=DECAY)
    copy_checkpoints(run, run.steps[-1:], folder)
    done = ckpt_ema.average(folder, out, like_input=True, decay=DECAY)
    assert done is not None and done.action == "appended"
    assert_average(run, ckpt_ema.load_state_dict(out)[0], decay=DECAY)
    assert (out / "common.pt").read_bytes() == (folder / run.entries[run.steps[-1]][0] / "common.pt").read_bytes()
    again = ckpt_ema.average(folder, out, like_input=True, decay=DECAY)
    assert again is not None and again.action == "up to date"


@pytest.mark.parametrize("exchange", [True, False])
def test_an_earlier_output_is_replaced_whole(tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """In one step where the system swaps two folders (renameat2), else moved aside first; nothing left over."""
    if not exchange:
        monkeypatch.setattr(like_input_module, "_exchange", lambda a, b: False)
    run = RUNS["megatron_lm"]
    out = tmp_path / "merged"
    ckpt_ema.average(run.folder, out, like_input=True, keep_state=False, decay=0.5)
    (out / "stray").write_text("a file of the earlier output")
    ckpt_ema.average(run.folder, out, like_input=True, keep_state=False, decay=DECAY)
    assert not (out / "stray").exists()
    assert_average(run, ckpt_ema.load_state_dict(out)[0], decay=DECAY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_run_folder_holding_the_output_averages_without_it(tmp_path: Path) -> None:
    """An output written into the run's folder is ckpt-ema's (its record), not a checkpoint of the run."""
    run = RUNS["megatron_lm"]
    folder = tmp_path / "run"
    copy_checkpoints(run, run.steps, folder)
    ckpt_ema.average(folder, folder / "merged", like_input=True, keep_state=False, decay=DECAY)
    again = ckpt_ema.average(folder, decay=DECAY)
    assert again is not None and len(again.plan.sources) == len(run.steps)
    assert_average(run, again.state_dict, decay=DECAY)


@pytest.mark.parametrize("stage", ["open", "write", "prepare", "publish_index"])
def test_a_failure_at_any_stage_leaves_the_earlier_output_and_nothing_else(
        tmp_path: Path, stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RUNS["megatron_lm"]
    out = tmp_path / "merged"
    ckpt_ema.average(run.folder, out, like_input=True, keep_state=False, decay=0.5)
    earlier = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    original = getattr(LikeInputOutput, stage)

    def failing(self: LikeInputOutput, *args: object) -> object:
        if stage == "publish_index":  # the moment before the rename: everything written and flushed
            raise KeyboardInterrupt
        original(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(LikeInputOutput, stage, failing)
    with pytest.raises(KeyboardInterrupt):
        ckpt_ema.average(run.folder, out, like_input=True, keep_state=False, decay=DECAY)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


KILLED_AT_PREPARE = """
import os, signal, sys
from ckpt_ema.output import like_input as like_input_module
from ckpt_ema.output.like_input import LikeInputOutput
prepare = LikeInputOutput.prepare
def prepare_then_die(self):
    prepare(self)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
LikeInputOutput.prepare = prepare_then_die
from ckpt_ema.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_a_signal_before_the_commit_leaves_the_earlier_output(tmp_path: Path, signum: str) -> None:
    """SIGTERM unwinds like Ctrl-C and removes the copy; after SIGKILL the copy stays, and the next write of the same
    output removes it (its writer is no longer running) and says so."""
    run = RUNS["megatron_lm"]
    out = tmp_path / "merged"
    ckpt_ema.average(run.folder, out, like_input=True, keep_state=False, decay=0.5)
    earlier = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ["average", str(run.folder), "--decay", str(DECAY), "-o", str(out), "--like-input", "--no-state"]
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_PREPARE, signum, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode in (-getattr(signal, signum), 128 + getattr(signal, signum)), proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    left = [p for p in tmp_path.iterdir() if p.name != "merged"]
    assert len(left) == (1 if signum == "SIGKILL" else 0), left
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    if left:
        assert f"removed {left[0]}, a temporary file left by a killed run" in res.stderr, res.stderr
    assert_average(run, ckpt_ema.load_state_dict(out)[0], decay=DECAY)


def test_refusals_each_in_one_line(tmp_path: Path) -> None:
    run = RUNS["megatron_lm"]
    newest = run.folder / run.entries[run.steps[-1]][0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    assert_refused([run.folder, "--like-input"], "is not an earlier output of --like-input", out=mine)
    assert (mine / "notes.txt").exists()
    assert_refused([run.folder, "--like-input", "--out-dtype", "bfloat16"], "--out-dtype does not go with it",
                   out=tmp_path / "merged")
    assert_refused([run.folder, "--like-input"], "names a file: give a folder", out=tmp_path / "m.safetensors")
    (tmp_path / "afile").write_text("x")
    assert_refused([run.folder, "--like-input"], "the output is a file", out=tmp_path / "afile")
    copy = tmp_path / "run"
    shutil.copytree(run.folder, copy)
    inside = copy / newest.name / "merged"
    assert_refused([copy, "--like-input"], "would be written into the input checkpoint", out=inside)
    res = run_cli("average", RUNS["torch_state_dict"].folder, "-o", tmp_path / "m2", "--like-input")
    assert res.exit_code == 2 and "--like-input writes checkpoints built on PyTorch Distributed Checkpoint" in res.stderr
    assert not (tmp_path / "m2").exists()


KILLED_AT_RENAME = """
import os, signal, sys
from ckpt_ema.output import like_input as like_input_module
from ckpt_ema.output.like_input import LikeInputOutput
LikeInputOutput.publish_index = lambda self: os.kill(os.getpid(), signal.SIGKILL)
from ckpt_ema.cli import main
main(sys.argv[1:])
"""


def test_killed_after_the_states_commit_the_next_run_rewrites_the_output(tmp_path: Path) -> None:
    """An append killed between the state's commit point (its manifest) and the output's rename: the output on disk
    is not the one the state recorded, and the next run writes it again from the state."""
    run = RUNS["megatron_lm"]
    folder, out = tmp_path / "run", tmp_path / "merged"
    copy_checkpoints(run, run.steps[:-1], folder)
    args = ["average", str(folder), "--decay", str(DECAY), "-o", str(out), "--like-input"]
    assert run_cli(*args).exit_code == 0
    copy_checkpoints(run, run.steps[-1:], folder)
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_RENAME, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    assert "rewrote" in res.stderr and "removed" in res.stderr, res.stderr
    assert_average(run, ckpt_ema.load_state_dict(out)[0], decay=DECAY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.ckpt-ema-state", "run"]


MASTERS = REPO / "tests" / "fixtures" / "megatron" / "masters"  # bfloat16 runs whose optimizer keeps fp32 masters


@pytest.mark.parametrize(("run", "prefix"), [("float16", "optimizer.state.fp32_param."),
                                             ("fully_reshardable", "optimizer.state.param.")])
def test_fp32_masters_get_the_merge_and_the_bf16_model_its_rounding(tmp_path: Path, run: str, prefix: str) -> None:
    """A resume of a mixed-precision Megatron run loads the fp32 masters over the model: both hold the merge, the
    masters as averaged (from the masters), the bfloat16 model entries rounded from it."""
    from safetensors.torch import load_file

    from helpers import linear_reference

    folder, out = MASTERS / run, tmp_path / "merged"
    ckpt_ema.average(folder, out, like_input=True, keep_state=False, decay=0.6)
    got = dcp_tensors(out)
    merged = ckpt_ema.average(folder, decay=0.6).state_dict
    want = linear_reference({s: load_file(REPO / "tests" / "fixtures" / "megatron" / "reference" /
                                          f"masters-{run}-{s}.safetensors") for s in (2, 4)}, decay=0.6)
    for name, t in merged.items():
        assert got[prefix + name].dtype == torch.float32 and torch.equal(got[prefix + name], t), name
        assert (got[prefix + name].double() - want[name]).abs().max() < 1e-6, name
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name


def test_masters_that_cannot_be_mapped_are_refused(tmp_path: Path) -> None:
    """Megatron-LM's default distributed-optimizer layout keeps the masters in flat buckets ckpt-ema cannot map: a
    resume would load the newest checkpoint's masters over the merge, so --like-input refuses, in one line."""
    assert_refused([MASTERS / "dp_reshardable", "--like-input"], "fp32 master copies of the model that ckpt-ema "
                   "cannot map", "--dist-ckpt-optim-fully-reshardable", out=tmp_path / "merged")
