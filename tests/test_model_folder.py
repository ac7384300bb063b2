"""A model folder as output (-o DIR/) and PEFT adapter runs as inputs: runs written by transformers and PEFT on a
tiny Llama (built from its config, no download), the outputs loaded back with from_pretrained and PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import LLAMA_STEPS, RUNS
from helpers import assert_refused, max_abs_diff, run_cli
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS = LLAMA_STEPS
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
TRAINER_FILES = {"trainer_state.json", "optimizer.pt", "rng_state.pth"}


@pytest.fixture()
def llama_run() -> Path:
    """The fixture table's Hugging Face Trainer run of a tiny Llama."""
    return RUNS["hf_trainer"].folder


@pytest.fixture()
def lora_run() -> Path:
    """The fixture table's PEFT LoRA run (the base model beside it, in ``../base``)."""
    return RUNS["peft_lora"].folder


def mean_of(files: list[Path]) -> dict[str, torch.Tensor]:
    states = [load_file(f) for f in files]
    return {n: sum(s[n].double() for s in states) / len(states) for n in states[0]}


def assert_loaded(model: torch.nn.Module, want: dict[str, torch.Tensor], prefix: str = "") -> None:
    params = dict(model.named_parameters())
    for name, t in want.items():
        assert max_abs_diff(params[prefix + name], t) < 1e-6, name


@pytest.mark.parametrize("shard", [False, True])
def test_folder_output_loads_with_from_pretrained(llama_run: Path, tmp_path: Path, shard: bool) -> None:
    out = tmp_path / "avg"
    res = run_cli("average", llama_run, "--last", "3", "-o", f"{out}/", *(["--max-shard-size", "20KB"] if shard else []))
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert MODEL_FILES <= names and not names & TRAINER_FILES
    assert ("model.safetensors.index.json" in names) == shard
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the run's model was
    assert_loaded(model, mean_of([llama_run / f"checkpoint-{s}" / "model.safetensors" for s in STEPS]))
    transformers.PreTrainedTokenizerFast.from_pretrained(out)  # the tokenizer came along


def test_tied_weights_saved_under_both_names_load_tied(llama_run: Path, tmp_path: Path) -> None:
    """Inputs that store lm_head.weight beside the embedding (a state dict saved by hand or by DCP) still give a
    folder from_pretrained loads with the two tied."""
    run = tmp_path / "run"
    for s in STEPS:
        folder = run / f"checkpoint-{s}"
        folder.mkdir(parents=True)
        state = load_file(llama_run / f"checkpoint-{s}" / "model.safetensors")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_bytes((llama_run / f"checkpoint-{s}" / "config.json").read_bytes())
    res = run_cli("average", run, "--last", "3", "-o", f"{tmp_path / 'out'}/")
    assert res.exit_code == 0, res.output
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_lora_run_averages_into_an_adapter_peft_loads(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    res = run_cli("average", lora_run, "--decay", "0.5", "-o", f"{out}/")
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not {p.name for p in out.iterdir()} & TRAINER_FILES
    import ckpt_ema

    plan = ckpt_ema.plan(lora_run, decay=0.5)
    assert [s.step for s in plan.sources] == list(STEPS)
    states = [load_file(lora_run / f"checkpoint-{s}" / "adapter_model.safetensors") for s in STEPS]
    want = {n: sum(w * st[n].double() for w, st in zip(plan.weighting.weights, states)) for n in states[0]}
    base = transformers.LlamaForCausalLM.from_pretrained(lora_run.parent / "base")
    model = peft.PeftModel.from_pretrained(base, out)
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(want)
    for name, t in want.items():
        assert max_abs_diff(loaded[name], t) < 1e-6, name


def test_folder_over_an_input_checkpoint_is_refused(llama_run: Path) -> None:
    target = llama_run / "checkpoint-6"
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    res = run_cli("average", llama_run, "--last", "2", "-o", f"{target}/")
    assert res.exit_code == 2 and "the output is one of the inputs" in res.stderr
    res = run_cli("average", llama_run, "--last", "2", "-o", f"{target / 'avg'}/")
    assert res.exit_code == 2 and "written into the input checkpoint" in res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_a_failed_run_leaves_no_folder(llama_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "run"
    bad.mkdir()
    for s in STEPS:
        (bad / f"checkpoint-{s}").symlink_to(llama_run / f"checkpoint-{s}")
    broken = tmp_path / "run" / "checkpoint-8"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")
    assert_refused([bad], "checkpoint-8", out=f"{tmp_path / 'out'}/")
    assert not (tmp_path / "out").exists()


def test_config_is_the_newest_checkpoints(llama_run: Path, tmp_path: Path) -> None:
    config = llama_run / "checkpoint-6" / "config.json"
    original = config.read_text()
    try:
        config.write_text(json.dumps({**json.loads(original), "marker": 6}))
        res = run_cli("average", llama_run, "--last", "2", "-o", f"{tmp_path / 'out'}/")
    finally:
        config.write_text(original)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["marker"] == 6


@pytest.mark.parametrize("adapter", [False, True], ids=["model", "adapter"])
def test_a_model_folder_output_appends_and_keeps_its_state_beside_it(llama_run: Path, lora_run: Path,
                                                                       tmp_path: Path, adapter: bool) -> None:
    """-o DIR/ keeps its state in DIR.ckpt-ema-state (the folder holds only what loaders read): a later run reads
    only the new checkpoint, and the folder then holds the full rerun's average, loadable as before."""
    import shutil

    import ckpt_ema

    source = lora_run if adapter else llama_run
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    for s in STEPS[:2]:
        shutil.copytree(source / f"checkpoint-{s}", run / f"checkpoint-{s}")
    first = run_cli("average", run, "--decay", "0.5", "-o", f"{out}/")
    assert first.exit_code == 0, first.output
    assert (tmp_path / "avg.ckpt-ema-state" / "manifest.json").is_file()
    shutil.copytree(source / f"checkpoint-{STEPS[2]}", run / f"checkpoint-{STEPS[2]}")
    shutil.rmtree(run / f"checkpoint-{STEPS[0]}")  # a trainer keeping its last 2
    again = run_cli("average", run, "--decay", "0.5", "-o", f"{out}/")
    assert again.exit_code == 0, again.output
    assert f"step {STEPS[2]}: appended 1 new checkpoint (step {STEPS[2]}) to the state of 2 (1 of them since deleted)" \
        in again.stderr, again.stderr
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    names = {p.name for p in out.iterdir()}
    assert weights in names and not names & TRAINER_FILES and not any("ckpt-ema" in n for n in names)
    want = ckpt_ema.average(source, None, decay=0.5).state_dict
    got = load_file(out / weights)
    assert set(got) == set(want) and all(max_abs_diff(got[k], want[k]) < 1e-6 for k in want)
    if not adapter:
        assert_loaded(transformers.LlamaForCausalLM.from_pretrained(out), want)
