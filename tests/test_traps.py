"""The traps a new user falls into (issue 12), on folders the real trainers wrote: the first checkpoint holding most
of the weight (a warning naming the cures), aliases and links of a checkpoint (counted once, under the periodic
name), Lightning's newer last.ckpt (kept), timm's recovery snapshots (left out, with a note), wrapper prefixes
(--strip-prefix), and the smaller notes."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ckpt_ema
from ckpt_ema.cli import main
from helpers import TOLERANCE, lightning_run, linear_reference, max_abs_diff, timm_run, write_run


def cli(*args: str | Path):
    return CliRunner().invoke(main, [*map(str, args)])


def stderr_lines(result) -> list[str]:
    return result.stderr.splitlines()


# ------------------------------------------------------------------------------------------- the first checkpoint


def test_a_heavy_first_checkpoint_is_warned_about_with_its_cures(tmp_path: Path) -> None:
    """A short run with its step-0 checkpoint, --decay 0.999: step 0 keeps most of the weight. The warning names it,
    its share and the cures, in the dry run, the run and the summary; --warmup, a smaller decay (and a uniform
    mean) bring the share under 10% and silence it."""
    run = tmp_path / "run"
    write_run(run, [0, 100, 200, 300])
    share = ckpt_ema.plan(run, decay=0.999).weighting.weights[0]
    assert share > 0.5
    dry = cli("average", run, "--decay", "0.999", "--dry-run")
    assert dry.exit_code == 0, dry.output
    warning = next(line for line in dry.stderr.splitlines() if line.startswith("warning: the first checkpoint"))
    assert str(run / "ckpt_0.pt") in warning and f"{share:.0%}" in warning
    for cure in ("--warmup", "--from-step", "--bias-correction", "--decay"):
        assert cure in warning
    out = tmp_path / "ema.safetensors"
    ran = cli("average", run, "--decay", "0.999", "-o", out)
    assert ran.exit_code == 0, ran.output
    assert any(line.startswith("warning: the first checkpoint") for line in stderr_lines(ran))
    assert f"warning: {share:.0%} of the weight is on the first checkpoint" in stderr_lines(ran)[-1]  # the summary
    for cure in (["--warmup"], ["--decay", "0.98"], ["--last", "3"]):
        args = cure if cure[0] in ("--decay", "--last") else ["--decay", "0.999", *cure]
        calm = cli("average", run, *args, "--dry-run")
        assert calm.exit_code == 0 and "the first checkpoint" not in calm.output, (cure, calm.output)
    # bias correction gives step 0 no steps of its own: only its end of the line to step 100 (linear) remains
    assert ckpt_ema.plan(run, decay=0.999, bias_correction=True).weighting.weights[0] < share / 4
    # --from-step leaves step 0 out: whatever remains heavy is a trained checkpoint, and the warning says which
    later = cli("average", run, "--decay", "0.999", "--from-step", "100", "--dry-run")
    assert str(run / "ckpt_100.pt") in later.output and str(run / "ckpt_0.pt") not in later.output


def test_a_sweep_warns_per_candidate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [0, 100, 200, 300])
    result = cli("sweep", run, "--decay", "0.9", "0.999", "-o", tmp_path / "sweep", "--no-plot")
    assert result.exit_code == 0, result.output
    warned = [line for line in stderr_lines(result) if "the first checkpoint" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ema-0.999: the first checkpoint")


# ------------------------------------------------------------------------------------------- aliases and links


def test_timm_saver_folder_links_copies_recovery_and_partial_files(tmp_path: Path) -> None:
    """timm's CheckpointSaver: last, model_best and milestone are hard links of checkpoint-E files, named as such;
    recovery-4-B (inside epoch 4) and a killed save's tmp.pth.tar are left out with a note; --per-checkpoint
    counts the same five checkpoints, not extra updates."""
    run = tmp_path / "timm"
    states = timm_run(run)
    (run / "tmp.pth.tar").write_bytes((run / "checkpoint-1.pth.tar").read_bytes()[:100])  # a save killed midway
    for extra in ([], ["--per-checkpoint"]):
        found = ckpt_ema.plan(run, decay=0.5, per_checkpoint=bool(extra)).discovery
        assert [s.path.name for s in found.sources] == [f"checkpoint-{e}.pth.tar" for e in range(5)]
        skipped = "\n".join(found.skipped)
        assert f"last.pth.tar: the same file as {run / 'checkpoint-4.pth.tar'}" in skipped
        assert f"milestone-5.pth.tar: the same file as {run / 'checkpoint-4.pth.tar'}" in skipped
        assert f"model_best.pth.tar: the same file as {run / 'checkpoint-3.pth.tar'}" in skipped
        for batch in (1, 2):
            assert f"recovery-4-{batch}.pth.tar: a timm recovery snapshot, taken inside epoch 4 (after checkpoint-3)" \
                in skipped
        assert "tmp.pth.tar: the partial file of a timm save" in skipped
    result = ckpt_ema.average(run, decay=0.5)
    want = linear_reference(states, decay=0.5)
    assert max(max_abs_diff(result.state_dict[n], want[n]) for n in want) < TOLERANCE


def test_timm_aliases_copied_where_links_fail(tmp_path: Path) -> None:
    run = tmp_path / "timm"
    timm_run(run, recovery_epoch=None)
    for alias in ("last.pth.tar", "model_best.pth.tar", "milestone-5.pth.tar"):
        data = (run / alias).read_bytes()
        (run / alias).unlink()
        (run / alias).write_bytes(data)  # shutil.copy2's result: the same bytes, another file
    found = ckpt_ema.plan(run, decay=0.5).discovery
    assert [s.path.name for s in found.sources] == [f"checkpoint-{e}.pth.tar" for e in range(5)]
    skipped = "\n".join(found.skipped)
    assert f"last.pth.tar: an alias of {run / 'checkpoint-4.pth.tar'} (the same bytes)" in skipped
    assert f"model_best.pth.tar: an alias of {run / 'checkpoint-3.pth.tar'} (the same bytes)" in skipped
    # its name says 5 (epochs done), its bytes are checkpoint-4's: a copy, not a sixth checkpoint
    assert f"milestone-5.pth.tar: the same bytes as {run / 'checkpoint-4.pth.tar'}, counted once" in skipped


def test_recovery_files_alone_are_averaged_in_their_order(tmp_path: Path) -> None:
    run = tmp_path / "timm"
    timm_run(run)
    found = ckpt_ema.plan([run / "recovery-4-2.pth.tar", run / "recovery-4-1.pth.tar"], decay=0.5).discovery
    assert [s.path.name for s in found.sources] == ["recovery-4-1.pth.tar", "recovery-4-2.pth.tar"]
    assert any("one update per checkpoint" in note for note in found.notes)


@pytest.mark.parametrize("per_checkpoint", [False, True])
def test_a_best_link_never_hides_the_periodic_checkpoint(tmp_path: Path, per_checkpoint: bool) -> None:
    """best.pt -> step_30.pt sorts first; step_30.pt is kept and best.pt named as its second name. A latest.pt copy
    and a byte-identical copy under a periodic-looking name count once too."""
    run = tmp_path / "run"
    run.mkdir()
    for s in (10, 20, 30, 40):
        torch.save({"w": torch.full((3,), float(s)), "global_step": s}, run / f"step_{s}.pt")
    (run / "best.pt").symlink_to("step_30.pt")
    shutil.copyfile(run / "step_40.pt", run / "latest.pt")
    shutil.copyfile(run / "step_20.pt", run / "step_20_copy.pt")
    found = ckpt_ema.plan(run, decay=0.5, per_checkpoint=per_checkpoint).discovery
    assert [s.path.name for s in found.sources] == ["step_10.pt", "step_20.pt", "step_30.pt", "step_40.pt"]
    assert [s.step for s in found.sources] == ([1, 2, 3, 4] if per_checkpoint else [10, 20, 30, 40])
    skipped = "\n".join(found.skipped)
    assert f"best.pt: the same file as {run / 'step_30.pt'}" in skipped
    assert f"latest.pt: an alias of {run / 'step_40.pt'} (the same bytes)" in skipped
    assert f"step_20_copy.pt: the same bytes as {run / 'step_20.pt'}, counted once" in skipped


@pytest.mark.slow
def test_lightning_last_ckpt(tmp_path: Path) -> None:
    """A real Lightning run: a last.ckpt written at the end of training (step 60, newest periodic 56) is averaged
    as its own step, with a note; Lightning's "net." prefix is cut by --strip-prefix."""
    if importlib.util.find_spec("lightning") is None:  # found, not imported: test_formats needs it unimported
        pytest.skip("lightning is not installed (pip install 'ckpt-ema[test]')")
    newer = lightning_run(tmp_path / "lightning")
    found = ckpt_ema.plan(newer, decay=0.9).discovery
    assert [s.step for s in found.sources] == [8, 16, 24, 32, 40, 48, 56, 60]
    assert found.sources[-1].path.name == "last.ckpt"
    assert any("last.ckpt is newer than every periodic checkpoint (step 60, the newest periodic one 56)" in note
               for note in found.notes)
    states = {s.step: ckpt_ema.formats.registry.load_state_dict(s.path)[0] for s in found.sources}
    result = ckpt_ema.average(newer, decay=0.9)
    want = linear_reference(states, decay=0.9)
    assert max(max_abs_diff(result.state_dict[n], want[n]) for n in want) < TOLERANCE

    # the LightningModule's attribute prefix: --strip-prefix net. gives names that load into the bare Linear
    out = tmp_path / "ema.safetensors"
    result = cli("average", newer, "--decay", "0.9", "--strip-prefix", "net.", "-o", out)
    assert result.exit_code == 0, result.output
    torch.nn.Linear(4, 2).load_state_dict(load_file(out))
    bad = cli("average", newer, "--strip-prefix", "model.", "-q", "-o", tmp_path / "bad.safetensors")
    assert bad.exit_code == 2 and len(stderr_lines(bad)) == 1
    assert "tensor 'net.weight' (and 1 more) does not start with the prefix 'model.' to strip" in bad.stderr
    assert not (tmp_path / "bad.safetensors").exists()


def test_strip_prefix_is_an_option_of_the_api_and_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2):
        save_file({"model.w": torch.full((2,), float(s))}, str(run / f"ckpt_{s}.safetensors"))
    out = tmp_path / "ema.safetensors"
    result = ckpt_ema.average(run, out, decay=0.5, strip_prefix="model.")
    assert list(result.state_dict) == ["w"]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ckpt_ema_options"])["strip_prefix"] == "model."
    with pytest.raises(ckpt_ema.OptionError, match="strip_prefix"):
        ckpt_ema.AverageOptions(strip_prefix="")


# ------------------------------------------------------------------------------------------- the smaller notes


def test_an_input_given_twice_is_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [1, 2])
    result = cli("average", run / "ckpt_1.pt", run / "ckpt_1.pt", run / "ckpt_2.pt", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"skipped {run / 'ckpt_1.pt'}: given twice, counted once" in stderr_lines(result)


def test_identical_sweep_candidates_are_noted(tmp_path: Path) -> None:
    """With warmup, decays that never bind within the run give the same average."""
    run = tmp_path / "run"
    write_run(run, [10, 20, 30])
    result = cli("sweep", run, "--warmup", "--decay", "0.99", "0.999", "0.9999", "-o", tmp_path / "s", "--no-plot")
    assert result.exit_code == 0, result.output
    notes = [line for line in stderr_lines(result) if "the same weights" in line]
    assert notes == ["note: ema-0.999 gives the same weights as ema-0.99: the same average",
                     "note: ema-0.9999 gives the same weights as ema-0.99: the same average"]
    distinct = cli("sweep", run, "--decay", "0.9", "0.99", "-o", tmp_path / "t", "--no-plot")
    assert distinct.exit_code == 0 and "the same weights" not in distinct.output


def test_warmup_with_bias_correction_is_noted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [10, 20, 30])
    both = cli("average", run, "--warmup", "--bias-correction", "--dry-run")
    assert both.exit_code == 0
    assert any(line.startswith("note: --warmup and --bias-correction are two cures") and "changes nothing" in line
               for line in stderr_lines(both))
    assert ckpt_ema.plan(run, warmup=True, bias_correction=True).weighting.weights == \
        ckpt_ema.plan(run, warmup=True).weighting.weights  # what the note says: nothing changes
    alone = cli("average", run, "--bias-correction", "--dry-run")
    assert "two cures" not in alone.output


def test_an_alias_at_the_step_of_a_periodic_checkpoint_with_other_bytes(tmp_path: Path) -> None:
    """Lightning may write last.ckpt with other callback state than the periodic file of the same step: the step
    makes it an alias all the same."""
    run = tmp_path / "run"
    run.mkdir()
    for s in (8, 16):
        torch.save({"state_dict": {"w": torch.full((2,), float(s))}, "global_step": s, "callbacks": {"n": s}},
                   run / f"epoch=0-step={s}.ckpt")
    torch.save({"state_dict": {"w": torch.full((2,), 16.0)}, "global_step": 16, "callbacks": {"n": "other"}},
               run / "last.ckpt")
    found = ckpt_ema.plan(run, decay=0.5).discovery
    assert [s.step for s in found.sources] == [8, 16]
    assert f"{run / 'last.ckpt'}: an alias of {run / 'epoch=0-step=16.ckpt'} (the same step 16), not averaged a " \
           "second time" in found.skipped


@pytest.mark.parametrize("command,prefix", [("train", "--ema-"), ("average", "--")])
def test_help_states_the_warmup_formula(command: str, prefix: str) -> None:
    text = " ".join(re.sub(r"-\n\s+", "-", cli(command, "--help").output).split())  # Click wraps at hyphens
    assert f"max(min(1 - (1 + t/gamma)^-power, {prefix}decay), {prefix}min-decay)" in text
    assert f"t = s - {prefix}update-after-step - 1" in text
    assert "capped" not in text


def test_unchanged_weights_saved_at_two_steps_stay_two_checkpoints(tmp_path: Path) -> None:
    """ckpt_10 and ckpt_20 with the same bytes (nothing trained in between) are two samples of the run, not
    copies: only second names (another family, an alias, the same step) count once."""
    run = tmp_path / "run"
    run.mkdir()
    for s, value in ((10, 1.0), (20, 1.0), (30, 2.0)):
        save_file({"w": torch.full((4,), value)}, str(run / f"ckpt_{s}.safetensors"))
    found = ckpt_ema.plan(run, decay=0.5).discovery
    assert [s.step for s in found.sources] == [10, 20, 30] and found.skipped == []
