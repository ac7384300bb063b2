"""Sweeps, uniform means, windows, half-lives and linear interpolation between checkpoints (issue 4).

* ``--interpolate linear`` against an independent float64 reference that walks every training step with the
  weights on the straight line between the two checkpoints around it and d(s) from timm's own
  ``ModelEmaV3.get_decay``; with a checkpoint every step, linear, step and timm's online EMA are one thing.
* One sweep reads each checkpoint's tensors once, whatever the number of candidates (spies on the readers).
* Every candidate of a sweep is the file ``average`` writes alone with the same options; ``--last K`` is a plain
  float64 mean; windows select the right checkpoints; ``--half-life H`` is ``--decay 0.5 ** (1 / H)``.
* Bad values: exit 2, one line, nothing written.
* ``sweep --eval`` on a tiny real CIFAR-10 run: the best on validation is chosen and copied byte for byte, the
  pictures are PNG files; without a validation split nothing is chosen.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckpt_ema
import ckpt_ema.formats.safetensors
import ckpt_ema.formats.torch_save
import ckpt_ema.engine.fold
import ckpt_ema.engine.layout
from ckpt_ema.cli import main
from ckpt_ema.engine.runner import chunk_elems
from helpers import (assert_matches_timm, linear_reference, linear_weights, make_state, max_abs_diff,
                     train_and_checkpoint, write_run)

# The helpers of the issue-2 tests: d(s) straight from timm, the tiny state dicts, the runs that save them.

SPARSE_STEPS = [3, 10, 11, 40, 100]
FROM_ZERO_STEPS = [0, 4, 9, 30, 31, 77]  # initial weights saved at step 0: linear gives them weight, step does not
FLOATS = ("layer.weight", "layer.bias", "bn.running_var")


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ------------------------------------------------------------------------------------------- the linear reference


LINEAR_CASES = {
    "plain": (False, dict(decay=0.97)),
    "fast": (False, dict(decay=0.8)),
    "after20": (False, dict(decay=0.95, update_after_step=20)),  # timm's copy falls inside an interval
    "warmup": (False, dict(decay=0.99, warmup=True)),
    "warmup_min": (False, dict(decay=0.99, warmup=True, min_decay=0.9, warmup_gamma=3.0, warmup_power=0.8)),
    "warmup_after": (False, dict(decay=0.99, warmup=True, update_after_step=7)),
    "bc_plain": (True, dict(decay=0.97)),
    "bc_slow": (True, dict(decay=0.999)),  # the correction divides by 1 - 0.999^100, far from 1
    "bc_after20": (True, dict(decay=0.95, update_after_step=20)),
    "bc_warmup_min": (True, dict(decay=0.99, warmup=True, min_decay=0.5, warmup_gamma=2.0)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[int, dict[str, torch.Tensor]]]]:
    """Two irregular runs of plain state dicts: one from step 3, one from step 0."""
    out = {}
    for name, steps in (("sparse", SPARSE_STEPS), ("from_zero", FROM_ZERO_STEPS)):
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, write_run(folder, steps))
    return out


@pytest.mark.parametrize("run_name", ["sparse", "from_zero"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_interpolation_matches_the_reference(runs, run_name: str, case: str) -> None:
    folder, saved = runs[run_name]
    bias_correction, schedule = LINEAR_CASES[case]
    steps = sorted(saved)
    ref = linear_reference(saved, bias_correction=bias_correction, **schedule)
    result = ckpt_ema.average([folder], interpolate="linear", bias_correction=bias_correction,
                              accum_dtype="float64", **schedule)
    assert [s.step for s in result.plan.sources] == steps
    for name, want in ref.items():
        assert result.state_dict[name].dtype == torch.float32
        assert max_abs_diff(result.state_dict[name], want) <= 1e-6, name  # float32 output rounding
    assert torch.equal(result.state_dict["bn.num_batches_tracked"], saved[steps[-1]]["bn.num_batches_tracked"])

    want_weights = linear_weights(steps, bias_correction=bias_correction, **schedule)
    assert sum(want_weights) == pytest.approx(1.0, abs=1e-12)
    assert list(result.plan.weighting.weights) == pytest.approx(want_weights, abs=1e-12)


def test_linear_is_not_step(runs, tmp_path: Path) -> None:
    """Guard against a vacuous reference: on sparse checkpoints the two models of the interval differ a lot, and
    weights saved at step 0 count under linear (timm's first update copies theta(1), 1/4 of the way to step 4)."""
    folder, saved = runs["sparse"]
    linear = ckpt_ema.average([folder], decay=0.97, interpolate="linear")
    held = ckpt_ema.average([folder], decay=0.97, interpolate="step")
    assert max_abs_diff(linear.state_dict["layer.weight"], held.state_dict["layer.weight"]) > 1e-2
    assert max_abs_diff(linear.state_dict["layer.weight"],
                        linear_reference(saved, decay=0.97)["layer.weight"]) <= 1e-6

    # Steps 0 and 4, decay 0.5: theta(s) = (1 - s/4) theta_0 + s/4 theta_4; theta_0's share after each step:
    # 3/4 (the copy), then 0.5 * 3/4 + 0.5 * 1/2 = 5/8, 0.5 * 5/8 + 0.5 * 1/4 = 7/16, 0.5 * 7/16 + 0 = 7/32.
    write_run(tmp_path / "two", [0, 4])
    assert linear_weights([0, 4], decay=0.5) == pytest.approx([7 / 32, 25 / 32], abs=1e-15)
    assert ckpt_ema.plan([tmp_path / "two"], decay=0.5, interpolate="linear").weighting.weights == pytest.approx(
        (7 / 32, 25 / 32), abs=1e-15)
    assert ckpt_ema.plan([tmp_path / "two"], decay=0.5, interpolate="step").weighting.weights == (0.0, 1.0)


EVERY_STEP = {
    "plain": (dict(decay=0.8), dict(decay=0.8)),
    "warmup_after": (dict(decay=0.9, use_warmup=True, update_after_step=3),
                     dict(decay=0.9, warmup=True, update_after_step=3)),
}


@pytest.mark.parametrize("save_initial", [False, True], ids=["from_step_1", "from_step_0"])
@pytest.mark.parametrize("case", list(EVERY_STEP))
def test_every_step_linear_equals_step_equals_timm_online(tmp_path: Path, case: str, save_initial: bool) -> None:
    timm_kwargs, our_kwargs = EVERY_STEP[case]
    expected = train_and_checkpoint(tmp_path / "run", timm_kwargs, save_initial=save_initial)
    linear = ckpt_ema.average([tmp_path / "run"], interpolate="linear", **our_kwargs)
    held = ckpt_ema.average([tmp_path / "run"], interpolate="step", **our_kwargs)
    assert_matches_timm(linear.state_dict, expected)
    assert_matches_timm(held.state_dict, expected)
    assert list(linear.plan.weighting.weights) == pytest.approx(list(held.plan.weighting.weights), abs=1e-15)


# ------------------------------------------------------------------------------------------- one read per sweep


def big_state(seed: int) -> dict[str, torch.Tensor]:
    """make_state plus a tensor bigger than a chunk (split across chunks)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {**make_state(seed), "big.weight": torch.randn(50_000, generator=g)}


def write_big_run(folder: Path, fmt: str) -> dict[Path, dict[str, torch.Tensor]]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for s in SPARSE_STEPS:
        state = big_state(s)
        if fmt == "pt":
            path = folder / f"ckpt_{s}.pt"
            torch.save({"state_dict": state, "step": s}, path)
        else:
            path = folder / f"ckpt_{s}.safetensors"
            save_file(state, str(path), metadata={"step": str(s)})
        saved[path] = state
    return saved


class ReadSpy:
    """Counts, per file, what ckpt-ema reads: torch.load calls, safetensors files mapped, tensor views taken, files
    the engine opens, and the elements of each tensor handed to the fold (the only way data reaches it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.torch_loads: Counter = Counter()
        self.safetensors_maps: Counter = Counter()
        self.tensor_views: Counter = Counter()
        self.engine_opens: Counter = Counter()
        self.elements: Counter = Counter()
        spy = self

        real_load = ckpt_ema.formats.torch_save.torch_load_safely

        def torch_load_safely(path: Path):  # noqa: ANN202
            spy.torch_loads[Path(path)] += 1
            return real_load(path)

        class CountedSafetensorsFile(ckpt_ema.formats.safetensors.SafetensorsFile):
            def __init__(self, path: Path) -> None:
                spy.safetensors_maps[Path(path)] += 1
                super().__init__(path)

            def tensor(self, name: str) -> torch.Tensor:
                spy.tensor_views[(Path(self.path), name)] += 1
                return super().tensor(name)

        real_open = ckpt_ema.engine.fold.open_checkpoint

        def open_checkpoint(path: Path, key: str | None = None):  # noqa: ANN202
            spy.engine_opens[Path(path)] += 1
            return real_open(path, key)

        real_piece = ckpt_ema.engine.layout.FlatViews.piece

        def piece(views, p):  # noqa: ANN001, ANN202
            out = real_piece(views, p)
            spy.elements[(Path(views.ckpt.path), p.name)] += out.numel()
            return out

        monkeypatch.setattr(ckpt_ema.formats.torch_save, "torch_load_safely", torch_load_safely)
        monkeypatch.setattr(ckpt_ema.formats.safetensors, "SafetensorsFile", CountedSafetensorsFile)
        monkeypatch.setattr(ckpt_ema.engine.fold, "open_checkpoint", open_checkpoint)
        monkeypatch.setattr(ckpt_ema.engine.layout.FlatViews, "piece", piece)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_one_sweep_reads_each_checkpoint_once_whatever_the_number_of_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    saved = write_big_run(tmp_path / "run", fmt)
    paths = list(saved)
    newest = paths[-1]
    budget = "512KB"  # chunks smaller than big.weight, for one candidate and for six
    assert chunk_elems(ckpt_ema.AverageOptions.build(max_memory=budget), 1) < 50_000
    sweeps = {
        1: ["--decay", "0.9"],
        6: ["--decay", "0.5", "0.9", "0.99", "--half-life", "7", "--last", "1", "3"],
    }
    counts = {}
    for n, candidates in sweeps.items():
        with monkeypatch.context() as m:
            spy = ReadSpy(m)
            out = tmp_path / f"out{n}"
            ok(cli("sweep", tmp_path / "run", "-o", out, *candidates, "--interpolate", "linear",
                   "--max-memory", budget, "--no-plot", "-q"))
        assert len(list(out.glob("*.safetensors"))) == n
        counts[n] = spy
        # Each checkpoint is opened once, when discovery reads its step; the engine reads the one discovery opened.
        assert not spy.engine_opens
        # Every element of every float tensor reaches the fold exactly once, whatever the chunks and candidates.
        floats = Counter({(p, name): t.numel() for p, state in saved.items() for name, t in state.items()
                          if t.is_floating_point()})
        assert Counter({key: n for key, n in spy.elements.items() if key in floats}) == floats
        # Integer tensors are copied from the newest checkpoint only (into each candidate's file).
        assert {key for key in spy.elements if key not in floats} == {(newest, "bn.num_batches_tracked")}
        if fmt == "pt":
            # one weights-only torch.load (mmap'd): its pickle gives the step, its tensors are what the engine reads
            assert spy.torch_loads == Counter({p: 1 for p in paths})
            assert not spy.safetensors_maps
        else:
            # one map: its header gives the step, the engine reads through it (views of it: no copy, no read)
            assert spy.safetensors_maps == Counter({p: 1 for p in paths})
            assert set(spy.tensor_views) == {(p, name) for p, state in saved.items() for name in state
                                             if (p, name) in floats or p == newest}
    one, six = counts[1], counts[6]
    assert (one.torch_loads, one.safetensors_maps, one.engine_opens) == (
        six.torch_loads, six.safetensors_maps, six.engine_opens)
    float_reads = [Counter({k: n for k, n in spy.elements.items() if k[1] != "bn.num_batches_tracked"})
                   for spy in (one, six)]
    assert float_reads[0] == float_reads[1]


# ------------------------------------------------------------------------------------------- each candidate alone


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return metadata, load_file(path)


def assert_same_file(got: Path, want: Path) -> None:
    """The same metadata (options, inputs, weights), tensors, dtypes and shapes; values to 1e-6 relative to the
    weights' scale (about 1): chunks of another size may round a last bit differently."""
    got_meta, got_tensors = read_safetensors(got)
    want_meta, want_tensors = read_safetensors(want)
    assert got_meta == want_meta
    assert list(got_tensors) == list(want_tensors)
    for name, w in want_tensors.items():
        g = got_tensors[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        if w.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(g, w), name


CANDIDATES = {  # file stem -> the option that makes it in `average`
    "ema-0.8": ["--decay", "0.8"],
    "ema-0.97": ["--decay", "0.97"],
    "ema-halflife-12.5": ["--half-life", "12.5"],
    "last-1": ["--last", "1"],
    "last-3": ["--last", "3"],
}


@pytest.mark.parametrize("extra", [[], ["--warmup", "--update-after-step", "5"], ["--bias-correction"]],
                         ids=["plain", "warmup_after", "bias_correction"])
@pytest.mark.parametrize("interpolate", ["step", "linear"])
def test_each_candidate_equals_average_alone(runs, tmp_path: Path, interpolate: str, extra: list[str]) -> None:
    folder, _ = runs["sparse"]
    out = tmp_path / "sweep"
    res = ok(cli("sweep", folder, "-o", out, "--decay", "0.8", "0.97", "--half-life", "12.5", "--last", "1", "3",
                 "--interpolate", interpolate, *extra, "--no-plot", "-q"))
    assert {p.name for p in out.iterdir() if p.is_file()} == {f"{name}.safetensors" for name in CANDIDATES}
    for name, option in CANDIDATES.items():
        assert re.search(rf"^{re.escape(name)}\s", res.stdout, re.M), name  # a row of the table
        alone = tmp_path / f"alone-{name}.safetensors"
        # a uniform mean takes no EMA-only options: the sweep drops them for its --last candidates
        own = [x for x in extra if x not in ("--warmup", "--bias-correction")] if name.startswith("last-") else extra
        ok(cli("average", folder, "-o", alone, *option, "--interpolate", interpolate, *own, "-q"))
        assert_same_file(out / f"{name}.safetensors", alone)
    # and the candidates are not all the same file
    a, b = load_file(out / "ema-0.8.safetensors"), load_file(out / "last-3.safetensors")
    assert max_abs_diff(a["layer.weight"], b["layer.weight"]) > 1e-2


# ------------------------------------------------------------------------------------------- --last, windows, half-life


def test_last_with_ema_only_options_is_refused(runs) -> None:
    folder, _ = runs["sparse"]
    for extra in (["--decay", "0.9"], ["--warmup"], ["--bias-correction"], ["--half-life", "3"]):
        res = cli("average", folder, "--last", "2", *extra, "--dry-run")
        assert res.exit_code == 2 and "uniform mean" in res.stderr and extra[0] in res.stderr, res.stderr


@pytest.mark.parametrize("k", [1, 2, 5])
def test_last_k_is_the_plain_mean_of_the_newest_k(runs, k: int) -> None:
    folder, saved = runs["sparse"]
    result = ckpt_ema.average([folder], last=k)  # float32 accumulation
    newest = SPARSE_STEPS[-k:]
    for name in FLOATS:
        want = torch.stack([saved[s][name].double() for s in newest]).mean(0)
        assert max_abs_diff(result.state_dict[name], want) <= 1e-6, name
    assert torch.equal(result.state_dict["bn.num_batches_tracked"], saved[SPARSE_STEPS[-1]]["bn.num_batches_tracked"])
    assert list(result.plan.weighting.weights) == [0.0] * (len(SPARSE_STEPS) - k) + [1 / k] * k
    if k > 1:  # not the newest checkpoint alone
        assert max_abs_diff(result.state_dict["layer.weight"], saved[SPARSE_STEPS[-1]]["layer.weight"]) > 1e-2


def test_a_sweep_of_uniform_means_ignores_ema_options_that_would_leave_an_ema_nothing(runs, tmp_path: Path) -> None:
    # With bias correction and every step at or before --update-after-step, an EMA has nothing to average; a
    # sweep of --last candidates alone builds no EMA, so it must not fail for it.
    folder, saved = runs["sparse"]
    ok(cli("sweep", folder, "-o", tmp_path, "--last", "2", "--bias-correction", "--update-after-step", "100000",
           "--no-plot", "-q"))
    got = load_file(tmp_path / "last-2.safetensors")
    for name in FLOATS:
        want = torch.stack([saved[s][name].double() for s in SPARSE_STEPS[-2:]]).mean(0)
        assert max_abs_diff(got[name], want) <= 1e-6, name


WINDOWS = [  # (from_step, to_step, the steps inside)
    (10, 40, [10, 11, 40]),
    (11, None, [11, 40, 100]),
    (None, 10, [3, 10]),
    (40, 40, [40]),
    (4, 99, [10, 11, 40]),
]


@pytest.mark.parametrize("from_step,to_step,inside", WINDOWS)
def test_windows_select_the_right_checkpoints(runs, from_step: int | None, to_step: int | None,
                                              inside: list[int]) -> None:
    folder, saved = runs["sparse"]
    files = [folder / f"ckpt_{s}.pt" for s in inside]
    for options in (dict(decay=0.9, interpolate="linear"), dict(decay=0.6, interpolate="step", bias_correction=True),
                    dict(last=min(2, len(inside)))):
        windowed = ckpt_ema.average([folder], from_step=from_step, to_step=to_step, **options)
        alone = ckpt_ema.average(files, **options)
        assert [s.step for s in windowed.plan.sources] == inside
        assert windowed.plan.weighting.weights == alone.plan.weighting.weights
        for name, want in alone.state_dict.items():
            assert torch.equal(windowed.state_dict[name], want), (options, name)
    # the newest checkpoint of the window, not of the run, gives the integer tensors
    assert torch.equal(windowed.state_dict["bn.num_batches_tracked"], saved[inside[-1]]["bn.num_batches_tracked"])


def test_sweep_over_a_window(runs, tmp_path: Path) -> None:
    folder, _ = runs["sparse"]
    out = tmp_path / "sweep"
    ok(cli("sweep", folder, "-o", out, "--from-step", "10", "--to-step", "40", "--decay", "0.9", "--last", "2",
           "--no-plot", "-q"))
    files = [folder / f"ckpt_{s}.pt" for s in (10, 11, 40)]
    for name, options in (("ema-0.9", dict(decay=0.9)), ("last-2", dict(last=2))):
        got = load_file(out / f"{name}.safetensors")
        want = ckpt_ema.average(files, **options).state_dict
        for n, w in want.items():
            assert torch.equal(got[n], w), (name, n)
        inputs = json.loads(read_safetensors(out / f"{name}.safetensors")[0]["ckpt_ema_inputs"])
        assert [i["step"] for i in inputs] == [10, 11, 40]


@pytest.mark.parametrize("interpolate", ["step", "linear"])
def test_half_life_is_the_decay_that_halves_a_weight(runs, tmp_path: Path, interpolate: str) -> None:
    folder, _ = runs["sparse"]
    half_life = 12.5
    by_half_life = ckpt_ema.average([folder], half_life=half_life, interpolate=interpolate)
    by_decay = ckpt_ema.average([folder], decay=0.5 ** (1 / half_life), interpolate=interpolate)
    assert by_half_life.plan.weighting.weights == by_decay.plan.weighting.weights
    for name, want in by_decay.state_dict.items():
        assert torch.equal(by_half_life.state_dict[name], want), name

    # What the name promises, checked on weights alone: with a checkpoint every step, a checkpoint H steps older
    # than another weighs half as much.
    regular = tmp_path / "regular"
    regular.mkdir()
    for s in range(1, 41):
        torch.save({"x": torch.zeros(1)}, regular / f"c_{s}.pt")
    weights = ckpt_ema.plan([regular], half_life=8, interpolate=interpolate).weighting.weights
    for i in range(9, 40):
        assert weights[i] / weights[i - 8] == pytest.approx(2.0, rel=1e-9)


# ------------------------------------------------------------------------------------------- bad values


BAD = {
    "sweep_last_0": (["sweep", "--last", "0"], "--last"),
    "sweep_last_more_than_there_are": (["sweep", "--last", "2", "6"], "--last 6"),
    "sweep_decay_above_1": (["sweep", "--decay", "0.9", "1.5"], "--decay"),
    "sweep_decay_below_0": (["sweep", "--decay", "-0.1"], "--decay"),
    "sweep_half_life_0": (["sweep", "--half-life", "0"], "--half-life"),
    "sweep_no_candidates": (["sweep"], "--last"),
    "sweep_duplicate_decay": (["sweep", "--decay", "0.9", "0.9"], "ema-0.9"),
    "sweep_duplicate_last": (["sweep", "--last", "3", "--decay", "0.9", "--last", "3"], "last-3"),
    "sweep_empty_window": (["sweep", "--decay", "0.9", "--from-step", "41", "--to-step", "99"], "no checkpoint"),
    "average_last_0": (["average", "--last", "0"], "--last"),
    "average_last_more_than_there_are": (["average", "--last", "6"], "--last 6"),
    "average_decay_and_half_life": (["average", "--decay", "0.9", "--half-life", "10"], "--half-life"),
    "average_decay_above_1": (["average", "--decay", "1.01"], "--decay"),
    "average_empty_window": (["average", "--from-step", "101"], "no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_one_line_errors_and_write_nothing(runs, tmp_path: Path, case: str) -> None:
    folder, _ = runs["sparse"]
    (command, *options), fragment = BAD[case]
    out = tmp_path / ("sweep" if command == "sweep" else "ema.safetensors")
    before = {p.name for p in tmp_path.iterdir()}
    res = cli(command, folder, "-o", out, *options)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit)  # not an uncaught exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ckpt-ema: error: "), lines[0]
    assert fragment in lines[0], (fragment, lines[0])
    assert res.stdout == ""
    assert {p.name for p in tmp_path.iterdir()} == before  # no output, no folder, no temporary file


# ------------------------------------------------------------------------------------------- sweep --eval on CIFAR-10

ROW = re.compile(r"^(?P<name>\S+)\s+\S+\s+\d+\s+[\d.e+-]+%\s+(?P<val>[\d.]+%|-)\s+(?P<test>[\d.]+%|-)\s+(?P<what>.*)$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cifar_runs(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two tiny real runs (1,500 training images, 2 epochs, a checkpoint every 10 steps): with and without a
    validation split of 300 images. Training and scoring run on one thread: a small net gains little from two,
    and threads that spin while another process holds the cores make a 2 s run take 20."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path_factory.mktemp("cifar")
        for name, extra in (("val", ["--val-split", 300]), ("no_val", [])):
            ok(cli("train", "-o", base / name, "--data", cifar_dir, "--train-subset", 1500, "--test-subset", 500,
                   "--epochs", 2, "--save-every", 10, *extra, "--no-eval", "-q"))
        yield {"val": base / "val", "no_val": base / "no_val"}
    finally:
        torch.set_num_threads(threads)


def table_rows(stdout: str) -> dict[str, re.Match]:
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match and match["name"] not in ("candidate", "final"):
            rows[match["name"]] = match
    return rows


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert height > 100 and width > 100, (path, height, width)


SWEPT = ["ema-0.5", "ema-0.9", "last-3"]


@pytest.mark.slow
def test_sweep_eval_chooses_the_best_on_validation(cifar_runs: dict[str, Path], cifar_dir: Path,
                                                   tmp_path: Path) -> None:
    """--eval is ``--eval-cmd 'ckpt-ema eval --score val {weights}'``: the best candidate on validation is copied
    when it beats the final model; otherwise the final model is the answer and nothing is copied."""
    pytest.importorskip("matplotlib")
    from ckpt_ema.cifar.evaluate import EvalData, load_model, run_splits, score

    out = tmp_path / "sweep"
    res = ok(cli("sweep", cifar_runs["val"], "-o", out, "--decay", "0.5", "0.9", "--last", "3",
                 "--eval", "--data", cifar_dir, "--test-subset", 500))
    rows = table_rows(res.stdout)
    assert sorted(rows) == sorted(SWEPT), res.stdout
    final_row = re.search(r"^final model\s+(?P<val>[\d.]+)%\s+[\d.]+%", res.stdout, re.M)
    assert final_row, res.stdout
    printed = {name: float(row["val"].rstrip("%")) for name, row in rows.items()}
    best = max(printed, key=lambda name: printed[name])
    marked = [name for name, row in rows.items() if "<- best on validation" in row["what"]]

    # Re-score every file on the run's validation images: the table is right, and so is the choice.
    data = EvalData(cifar_dir, 500)
    rescored = {}
    for name in [*SWEPT, "final-model"]:
        model, _, metadata = load_model(out / f"{name}.safetensors")
        _, val = run_splits(metadata, data)
        assert val is not None and len(val) == 300
        rescored[name] = 100 * score(model, val).accuracy
    for name in SWEPT:
        assert abs(rescored[name] - printed[name]) <= 0.005 + 1e-9, (name, rescored[name], printed[name])
    assert abs(rescored["final-model"] - float(final_row["val"])) <= 0.005 + 1e-9
    assert len(set(rescored.values())) > 1  # the candidates are really different models
    if rescored[best] > rescored["final-model"]:
        assert marked == [best], res.stdout
        assert (out / "best.safetensors").read_bytes() == (out / f"{best}.safetensors").read_bytes()
    else:
        assert marked == [] and "the final model is best on validation" in res.stderr, (res.stdout, res.stderr)
        assert not (out / "best.safetensors").exists()
    assert_png(out / "weights.png")
    assert_png(out / "accuracy.png")


@pytest.mark.slow
def test_sweep_eval_without_a_validation_split_chooses_nothing(cifar_runs: dict[str, Path], cifar_dir: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = ok(cli("sweep", cifar_runs["no_val"], "-o", out, "--last", "2", "--eval",
                 "--data", cifar_dir, "--test-subset", 500, "--no-plot"))
    assert "note:" in res.stderr and "validation" in res.stderr, res.stderr
    assert not (out / "best.safetensors").exists()
    assert "best on validation" not in res.stdout
    rows = table_rows(res.stdout)
    assert sorted(rows) == ["last-2"], res.stdout
    for row in rows.values():
        assert row["val"] == "-" and row["test"].endswith("%"), row.group(0)
    assert {p.name for p in out.iterdir() if p.is_file()} == {"last-2.safetensors", "final-model.safetensors"}


def test_a_budget_too_small_for_every_candidate_splits_the_sweep_into_passes(runs, tmp_path: Path) -> None:
    folder, _ = runs["sparse"]
    candidates = ["--decay", "0.8", "0.9", "0.97", "--last", "1", "2", "3"]
    one = ok(cli("sweep", folder, "-o", tmp_path / "one", *candidates, "--no-plot"))
    # (2 per candidate + 2) float32 values a chunk element, chunks of at least 1024: 2 candidates fit, 3 do not
    split = ok(cli("sweep", folder, "-o", tmp_path / "split", *candidates, "--no-plot", "--max-memory", "30000B"))
    assert "read 5 checkpoints once" in one.stderr
    assert "3 times (the memory budget holds fewer candidates at once)" in split.stderr
    for f in (tmp_path / "one").glob("*.safetensors"):
        (meta_one, one_tensors), (meta_split, split_tensors) = read_safetensors(f), read_safetensors(tmp_path / "split" / f.name)
        assert json.loads(meta_split["ckpt_ema_options"])["max_memory"] == 30000
        assert meta_one["ckpt_ema_inputs"] == meta_split["ckpt_ema_inputs"]
        assert one_tensors.keys() == split_tensors.keys()
        for name, t in one_tensors.items():
            assert max_abs_diff(t, split_tensors[name]) <= 1e-6, (f.name, name)
