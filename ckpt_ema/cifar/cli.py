"""The ``train`` and ``eval`` commands: parse options, call :mod:`ckpt_ema.cifar.train` / :mod:`ckpt_ema.cifar.evaluate`, print.

They are plain Click commands that the ``ckpt-ema`` group (:mod:`ckpt_ema.cli`) loads when they are called; errors
are raised as CkptEmaError and the group prints them as one line with exit code 2. torch is imported when a command
runs, not for ``--help``.

The online-EMA options of ``train`` are ``average``'s schedule options with an ``ema-`` prefix (``--ema-decay``,
``--ema-min-decay``, ``--ema-update-after-step``, ``--ema-warmup/--no-ema-warmup``, ``--ema-warmup-gamma``,
``--ema-warmup-power``), with the same defaults, so that ``average --decay D --warmup`` over a run's checkpoints is
the post-hoc twin of ``train --ema-decay D --ema-warmup``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from ckpt_ema.cli_options import SHAPE_FIELDS, schedule_shape_from, schedule_shape_options
from ckpt_ema.cifar import ARCH_NAMES
from ckpt_ema.errors import CkptEmaError
from ckpt_ema.weighting import DecaySchedule

# The seed's short class names: table headers for --per-class.
SHORT_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def data_option(command: Any) -> Any:
    return click.option(
        "--data",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder holding cifar-10-batches-py/ [default: $CKPT_EMA_DATA, else ~/.cache/ckpt-ema/cifar10].",
    )(command)


@click.command("train")
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="The run folder (checkpoints, run.json)."
)
@click.option(
    "--model",
    "arch",
    type=click.Choice(ARCH_NAMES),
    default="net",
    show_default=True,
    help="net: the seed's CNN; resnet: a small ResNet with BatchNorm.",
)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW's peak learning rate.")
@click.option(
    "--min-lr", type=float, default=1e-4, show_default=True, help="Where the cosine ends (the seed's eta_min)."
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "constant"]),
    default="cosine",
    show_default=True,
    help="cosine: per step over the whole run; constant: what the seed's per-epoch scheduler amounts to.",
)
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW's decoupled weight decay.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Initialisation, data order, augmentation, val split."
)
@click.option("--save-every", type=int, default=None, help="Save a checkpoint every N steps [default: once per epoch].")
@click.option("--keep-last", type=int, default=None,
              help="Keep only the newest K checkpoints, deleting older ones after each save (as trainers' "
                   "save_total_limit does) [default: keep all].")
@click.option(
    "--val-split",
    type=int,
    default=0,
    show_default=True,
    help="Keep N training images out of training (recorded in run.json).",
)
@click.option(
    "--augment/--no-augment", default=True, show_default=True, help="Random crop (padding 4) and horizontal flip."
)
@click.option(
    "--ema-decay",
    type=float,
    default=None,
    help="Also keep timm's ModelEmaV3 online with this decay; saved to RUN/online_ema/ema.pt.",
)
@schedule_shape_options(prefix="ema-")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@data_option
@click.option(
    "--train-subset", type=int, default=None, help="Train on the first N training images only (quick runs, tests)."
)
@click.option("--test-subset", type=int, default=None, help="Score the summary on the first M test images only.")
@click.option(
    "--eval/--no-eval",
    "evaluate",
    default=True,
    show_default=True,
    help="Score the final model (and EMA) on the test set.",
)
@click.option("--resume", is_flag=True, help="Continue from the newest step_*.pt in the run folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, notes or summary.")
def train_command(output: str, ema_decay: float | None, quiet: bool, **options: Any) -> None:
    """Train a CIFAR-10 model, saving step_XXXXXXXX.pt checkpoints to the run folder -o RUN_DIR."""
    ctx = click.get_current_context()
    given = [f"--ema-{n.replace('_', '-')}" for n in SHAPE_FIELDS
             if ctx.get_parameter_source(f"ema_{n}") == click.core.ParameterSource.COMMANDLINE]
    shape = schedule_shape_from(options, prefix="ema_")
    if ema_decay is None and given:
        raise CkptEmaError(f"{', '.join(given)}: these shape the online EMA, which needs --ema-decay D")
    ema = None if ema_decay is None else DecaySchedule(decay=ema_decay, **shape)
    from ckpt_ema.cifar.train import TrainConfig, train  # torch loads here, not for --help

    try:
        result = train(TrainConfig(output=Path(output), ema=ema, quiet=quiet, **options))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (ckpt_ema.interrupts)
        click.echo(f"ckpt-ema: interrupted; the checkpoints saved so far stay in {output}: continue with --resume",
                   err=True)
        raise SystemExit(getattr(exc, "exit_code", 130)) from None
    if not quiet:
        click.echo(result.summary(), err=True)


@click.command("eval")
@click.argument("weights", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "arch",
    type=click.Choice(ARCH_NAMES),
    default=None,
    help="Architecture [default: the 'arch' in each file's metadata].",
)
@data_option
@click.option("--key", default=None, help="Where the weights are inside a .pt/.ckpt (e.g. state_dict_ema).")
@click.option("--per-class", is_flag=True, help="Also report accuracy per class.")
@click.option(
    "--bn-recalibrate",
    "bn_batches",
    type=int,
    default=0,
    show_default=True,
    help="Recompute BatchNorm statistics on N training batches first; report before and after.",
)
@click.option("--test-subset", type=int, default=None, help="Score on the first M test images only.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects (file, accuracy, loss, ...).")
@click.option("--score", "score_split", type=click.Choice(["val", "test"]), default=None,
              help="End with one line for sweep --eval-cmd: a JSON object of accuracies, this split's first "
                   "(val: the images train --val-split kept out).")
@click.option("-q", "--quiet", is_flag=True, help="No notes on stderr.")
def eval_command(
    weights: tuple[str, ...],
    arch: str | None,
    data: str | None,
    key: str | None,
    per_class: bool,
    bn_batches: int,
    test_subset: int | None,
    device: str,
    as_json: bool,
    score_split: str | None,
    quiet: bool,
) -> None:
    """Score WEIGHTS (anything average reads or writes) on the CIFAR-10 test set."""
    from ckpt_ema.cifar.evaluate import EvalData, evaluate_file  # torch loads here, not for --help
    from ckpt_ema.discover import expand_inputs
    from ckpt_ema.engine.runner import check_device

    if bn_batches < 0:
        raise CkptEmaError(f"--bn-recalibrate must be >= 0 batches, got {bn_batches}")
    dev = check_device(device)
    paths, _ = expand_inputs(list(weights))  # folders and globs, as average reads them
    eval_data = EvalData(data, test_subset, dev)
    results = []
    for path in paths:
        results.append(evaluate_file(path, eval_data, arch, key, bn_batches, per_class, dev))
        if not quiet and not as_json and len(paths) > 1:
            click.echo(f"scored {path}", err=True)
    click.echo(json.dumps(results, indent=1) if as_json else format_table(results, per_class))
    if score_split is not None:
        click.echo(score_line(results, score_split, quiet))


def score_line(results: list[dict[str, Any]], split: str, quiet: bool) -> str:
    """The last line ``sweep --eval-cmd`` reads: ``{"val_accuracy": ..., "test_accuracy": ...}``, ``split`` first.

    A run that kept no validation images has no ``val_accuracy``: a note says so, and a sweep then chooses nothing
    rather than choose on the test set.
    """
    if len(results) != 1:
        raise CkptEmaError(f"--score scores one weights file, got {len(results)}")
    r = results[0]
    scores = {"test_accuracy": r["accuracy"]}
    if "val" in r:
        scores["val_accuracy"] = r["val"]["accuracy"]
    elif split == "val" and not quiet:
        click.echo(f"note: {r['file']}: the run kept no validation images (train --val-split N): no val_accuracy",
                   err=True)
    first = f"{split}_accuracy"
    return json.dumps({first: scores[first], **scores} if first in scores else scores)


def format_table(results: list[dict[str, Any]], per_class: bool = False) -> str:
    """One row per file: test accuracy and loss; val, before-recalibration and per-class columns when present."""
    header = ["file", "arch", "step", "test acc", "test loss"]
    has_val = any("val" in r for r in results)
    has_bn = any("bn_recalibrate" in r for r in results)
    if has_bn:
        header += ["acc before BN", "loss before BN"]
    if has_val:
        header += ["val acc", "val loss"]
    if per_class:
        header += list(SHORT_CLASSES)
    rows = []
    for r in results:
        row = [
            r["file"],
            r["arch"],
            "" if r["step"] is None else str(r["step"]),
            f"{r['accuracy']:.4f}",
            f"{r['loss']:.4f}",
        ]
        if has_bn:
            before = r.get("bn_recalibrate", {}).get("before")
            row += [f"{before['accuracy']:.4f}", f"{before['loss']:.4f}"] if before else ["", ""]
        if has_val:
            row += [f"{r['val']['accuracy']:.4f}", f"{r['val']['loss']:.4f}"] if "val" in r else ["", ""]
        if per_class:
            row += ["" if a is None or math.isnan(a) else f"{a:.3f}" for a in r["per_class"].values()]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    return "\n".join(lines)
