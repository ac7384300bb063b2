"""OLMo-core's Trainer checkpoints as inputs: a run written by ai2-olmo-core 3.0.0 itself (FSDP over 2 gloo
processes; scripts/make_olmo_fixtures.py), read without OLMo-core and compared with what OLMo-core's own loader
loads from each checkpoint (the archive's ``reference/stepN.safetensors``)."""

from __future__ import annotations

import functools
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import RUNS
from helpers import FuzzFormat, assert_refused, fuzz, linear_reference, linear_weights, max_abs_diff, run_cli
from safetensors.torch import load_file

import ckpt_ema
from ckpt_ema.formats import dcp, olmo_core
from ckpt_ema.formats.dcp_reader import DcpCheckpoint
from ckpt_ema.formats.registry import format_of, is_complete, load_state_dict, open_checkpoint

STEPS = (0, 2, 4)
OLMO_STORAGE_INFO = b"olmo_core.distributed.checkpoint.filesystem"


@pytest.fixture(scope="module")
def unpacked() -> Path:
    """The fixture table's OLMo-core run, unpacked: ``run/step0..4`` as OLMo-core wrote them, and ``reference/``."""
    return RUNS["olmo_core"].folder.parent


@pytest.fixture
def run(unpacked: Path, tmp_path: Path) -> Path:
    """A copy of the run, for a test to change."""
    return Path(shutil.copytree(unpacked / "run", tmp_path / "run"))


def reference(unpacked: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(unpacked / "reference" / f"step{step}.safetensors")


def test_each_checkpoint_reads_as_olmo_cores_loader_loads_it(unpacked: Path) -> None:
    for step in STEPS:
        folder = unpacked / "run" / f"step{step}"
        assert format_of(folder) is olmo_core.FORMAT
        got, meta = load_state_dict(folder)
        want = reference(unpacked, step)
        assert sorted(got) == sorted(want)  # the bare model's names: no model. prefix, no optim.*
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (step, name)
        assert meta["global_step"] == step and meta["global_train_tokens_seen"] == step * 32
    ckpt = open_checkpoint(unpacked / "run" / "step4")
    assert isinstance(ckpt, DcpCheckpoint)
    assert ckpt.weights_from == "the entry 'model' of model_and_optim/ (the optimizer state, optim.*, left out)"
    assert [c.sizes[0] for c in ckpt._chunks["embeddings.weight"]] == [19, 18]  # split unevenly over the 2 ranks
    assert len({c.file for chunks in ckpt._chunks.values() for c in chunks}) == 4  # 2 ranks x 2 files
    assert not torch.equal(reference(unpacked, 0)["embeddings.weight"], reference(unpacked, 4)["embeddings.weight"])


def test_the_dcp_folder_inside_reads_the_same(unpacked: Path) -> None:
    """``stepN/model_and_optim/`` given alone is a DCP folder: the same model (its entry ``model``)."""
    inner = unpacked / "run" / "step2" / "model_and_optim"
    assert format_of(inner) is dcp.FORMAT
    got, _ = load_state_dict(inner)
    assert all(torch.equal(got[n], t) for n, t in reference(unpacked, 2).items())


def test_ema_of_the_run_equals_the_float64_reference(unpacked: Path, tmp_path: Path) -> None:
    res = run_cli("average", unpacked / "run", "--decay", "0.6", "-o", tmp_path / "ema.safetensors")
    assert res.exit_code == 0, res.output
    plan = ckpt_ema.plan(unpacked / "run", decay=0.6)
    assert [(s.step, s.step_from) for s in plan.sources] == [(s, "metadata:global_step") for s in STEPS]
    got = load_file(tmp_path / "ema.safetensors")
    want = linear_reference({s: reference(unpacked, s) for s in STEPS}, decay=0.6)
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.dtype == torch.float32 and max_abs_diff(t, want[name]) < 1e-6, name


def decayed_run_end(refs: dict[int, dict[str, torch.Tensor]], window: int) -> dict[str, torch.Tensor]:
    """What a run decayed by 1-sqrt over the last ``window`` steps ends at, in float64, from checkpoints the run
    moves between linearly: the checkpoint the window begins at, plus each later interval's change scaled by the
    mean learning-rate factor phi(s) = 1 - sqrt((s - (end - window)) / window), clamped to [0, 1], over its steps."""
    steps = sorted(refs)
    end = steps[-1]
    first = max((s for s in steps if s <= end - window), default=steps[0])
    out = {n: t.double() for n, t in refs[first].items()}
    for a, b in zip(steps, steps[1:]):
        if a < first:
            continue
        phi = [1 - math.sqrt(min(max((s - (end - window)) / window, 0.0), 1.0)) for s in range(a + 1, b + 1)]
        for n in out:
            out[n] += sum(phi) / len(phi) * (refs[b][n].double() - refs[a][n].double())
    return out


def test_a_1_sqrt_window_merge_equals_the_float64_reference(unpacked: Path, tmp_path: Path) -> None:
    res = run_cli("average", unpacked / "run", "--weights", "1-sqrt", "--window-steps", "3",
                  "-o", tmp_path / "wsm.safetensors")
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "wsm.safetensors")
    want = decayed_run_end({s: reference(unpacked, s) for s in STEPS}, window=3)
    for name, t in got.items():
        assert max_abs_diff(t, want[name]) < 1e-6, name
    newest = reference(unpacked, 4)
    assert max(max_abs_diff(got[n], newest[n]) for n in got) > 1e-3  # a merge, not the newest checkpoint


def test_the_untrained_step0_is_averaged_and_warned_about(unpacked: Path, tmp_path: Path) -> None:
    res = run_cli("average", unpacked / "run", "--decay", "0.8", "-o", tmp_path / "ema.safetensors")
    assert res.exit_code == 0, res.output
    share = linear_weights(list(STEPS), decay=0.8)[0]
    assert share > 0.2 and f"step0 (step 0), holds {share:.0%} of the weight" in res.stderr


def test_recognition_and_completeness(run: Path) -> None:
    """A save under way (``stepN-tmp/``, then ``stepN/`` before its ``.metadata.json``) is no checkpoint of the
    run yet; without ``train/rank0.pt`` the step is the folder's name."""
    shutil.copytree(run / "step4", run / "step6-tmp")
    (run / "step6-tmp" / ".metadata.json").unlink()
    assert [s.path.name for s in ckpt_ema.plan(run, decay=0.5).sources] == ["step0", "step2", "step4"]
    (run / "step6-tmp").rename(run / "step6")
    assert not is_complete(run / "step6") and is_complete(run / "step4")
    shutil.rmtree(run / "step6" / "train")
    assert format_of(run / "step6") is None  # neither .metadata.json nor train/: no OLMo-core checkpoint
    (run / "step6" / ".metadata.json").write_text('{"ephemeral": false, "version": "3.0.0"}')
    source = ckpt_ema.plan(run, decay=0.5).sources[-1]
    assert (source.path.name, source.step, source.step_from) == ("step6", 6, "name")


# ------------------------------------------------------------------------------------------- damaged folders


def test_a_missing_distcp_file_is_refused(run: Path, tmp_path: Path) -> None:
    (run / "step4" / "model_and_optim" / "__1_1.distcp").unlink()
    assert_refused([run, "--decay", "0.5"], "model_and_optim", "__1_1.distcp is missing", out=tmp_path / "o.safetensors")


def test_a_truncated_distcp_file_is_refused(run: Path, tmp_path: Path) -> None:
    file = run / "step2" / "model_and_optim" / "__0_0.distcp"
    file.write_bytes(file.read_bytes()[:-100])
    assert_refused([run, "--decay", "0.5"], "__0_0.distcp", "truncated", out=tmp_path / "o.safetensors")


@pytest.mark.parametrize("where, said", [
    (OLMO_STORAGE_INFO, "the metadata pickles olmo_core.distributed.`heckpoint.filesystem._StorageInfo"),
    (b"sizes", "a ChunkStorageMetadata without all its fields"),  # the name of a field of every chunk
    (b"state_dict_metadata", "not a DCP metadata file written by the file system writer"),
    (b".", "not a readable DCP metadata file (corrupt pickle"),  # the pickle's last byte, STOP
])
def test_a_flipped_byte_in_the_metadata_is_refused(run: Path, tmp_path: Path, where: bytes, said: str) -> None:
    file = run / "step4" / "model_and_optim" / ".metadata"
    data = bytearray(file.read_bytes())
    at = len(data) - 1 if where == b"." else data.index(where) + len(where) // 2 + 1
    data[at] ^= 0x03
    file.write_bytes(bytes(data))
    assert_refused([run, "--decay", "0.5"], str(file), said, out=tmp_path / "o.safetensors")


def test_a_train_state_that_pickles_code_is_refused(run: Path, tmp_path: Path) -> None:
    file = run / "step2" / "train" / "rank0.pt"
    torch.save({"global_step": 2, "callbacks": {"hook": functools.partial(print, "ran")}}, file)
    assert_refused([run, "--decay", "0.5"], str(file), "functools.partial", out=tmp_path / "o.safetensors")


# ------------------------------------------------------------------------------------------- without OLMo-core

WITHOUT_OLMO_CORE = """
import pickle, sys
sys.modules["olmo_core"] = None  # importing olmo_core, or anything under it, now fails
import torch
from safetensors.torch import load_file
from ckpt_ema.formats.registry import load_state_dict
step = sys.argv[1]
try:
    pickle.load(open(f"{step}/model_and_optim/.metadata", "rb"))
except ImportError:
    pass
else:
    raise SystemExit("the metadata unpickled without OLMo-core: this test would prove nothing")
got, meta = load_state_dict(step)
want = load_file(sys.argv[2])
assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
assert "olmo_core" not in {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}
print("read", meta["global_step"])
"""


@pytest.mark.slow
def test_reading_needs_no_olmo_core(unpacked: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", WITHOUT_OLMO_CORE, unpacked / "run" / "step4",
                           unpacked / "reference" / "step4.safetensors"],
                          capture_output=True, text=True, timeout=120, cwd=repo, env={"PYTHONPATH": str(repo)})
    assert done.returncode == 0 and done.stdout.strip() == "read 4", done.stderr


# ------------------------------------------------------------------------------------------- under mutation


class _TorchStorageInfo(pickle.Unpickler):
    """pickle's own unpickler, with OLMo-core's _StorageInfo read as torch's (the reference needs no OLMo-core)."""

    def find_class(self, module: str, name: str) -> object:
        if module == OLMO_STORAGE_INFO.decode() and name == "_StorageInfo":
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            return _StorageInfo
        return super().find_class(module, name)


def reference_dcp_load(step: Path) -> dict[str, torch.Tensor] | None:
    """torch DCP's own loader (the ``_load_state_dict`` that ``dcp_to_torch_save`` runs, no process group) on
    ``model_and_optim/``: the ``model`` entry; None when it refuses."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Reader(FileSystemReader):
        def read_metadata(self, *args: object, **kwargs: object):  # noqa: ANN202 - DCP's Metadata
            with open(step / olmo_core.MODEL_FOLDER / dcp.METADATA_FILE, "rb") as f:
                metadata = _TorchStorageInfo(f).load()
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=Reader(step / olmo_core.MODEL_FOLDER),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        return {n: t for n, t in state["model"].items() if isinstance(t, torch.Tensor)}
    except BaseException:  # noqa: BLE001 - any refusal of the reference counts as a refusal (DCP's is a BaseException)
        return None


def _olmo_step(unpacked: Path) -> FuzzFormat:
    def make(folder: Path) -> Path:
        return Path(shutil.copytree(unpacked / "run" / "step4", folder / "step4"))

    return FuzzFormat("olmo_core", make, lambda p: sorted(f for f in p.rglob("*") if f.is_file()),
                      (reference_dcp_load,))


@pytest.mark.slow
def test_mutants_are_refused_in_one_line_or_read_as_torch_dcp_reads_them(unpacked: Path, tmp_path: Path) -> None:
    outcomes = fuzz(_olmo_step(unpacked), tmp_path, seed=21, count=40)
    assert outcomes["refused"] + outcomes["read"] + outcomes["unchanged"] == 40
    assert outcomes["refused"] and outcomes["read"]
