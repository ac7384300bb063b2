"""The ``ckpt-ema`` command line: parse options, call the library, print. No logic of its own.

Every error the user can cause is one line on stderr, ``ckpt-ema: error: <file>: <problem>``, with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ckpt_ema import __version__
from ckpt_ema.api import ACCUM_DTYPES, DTYPES, plan, run
from ckpt_ema.distributed import World
from ckpt_ema.cli_options import NumbersOption, ema_schedule_options, stack
from ckpt_ema.plan import INTERPOLATIONS
from ckpt_ema.output import check_output_path
from ckpt_ema.errors import CkptEmaError


# Click >= 8.2 raises this for a group called without a command; older Clicks print the help themselves.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def fail(message: str, code: int = 2) -> None:
    click.echo(f"ckpt-ema: error: {message}", err=True)
    sys.exit(code)


class OneLineErrors(click.Group):
    """A group whose errors (ours and Click's usage errors) print as one line, without usage text or traceback."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name or "ckpt-ema", complete_var, standalone_mode=False, **extra)
        except CkptEmaError as exc:
            fail(str(exc))
        except NO_ARGS_IS_HELP as exc:  # plain `ckpt-ema`: the help itself, not an error line
            click.echo(exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            fail("interrupted", 130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def show_progress(quiet: bool) -> bool:
    """tqdm bars only for a person watching: not with --quiet, not when stderr goes to a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def is_rank_zero() -> bool:
    """True but in the ranks other than 0 under torchrun: one process speaks for all of them."""
    return World.from_env().rank == 0


def say(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(message, err=True)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-ema")
def main() -> None:
    """Recover the EMA of a model's weights after training, from the checkpoints the run saved."""


# How the checkpoints are read and the averages computed: shared by ``average`` and ``sweep``.
averaging_options = stack(
    ema_schedule_options(),
    click.option("--bias-correction", is_flag=True,
                 help="Start from zero and divide by 1 - prod(decay) (Adam's correction) instead of copying the first."),
    click.option("--interpolate", type=click.Choice(INTERPOLATIONS), default="linear", show_default=True,
                 help="The weights between two checkpoints: held at the newer one (step) or moving linearly (linear)."),
    click.option("--from-step", type=int, default=None, help="Use only checkpoints at this step or later."),
    click.option("--to-step", type=int, default=None, help="Use only checkpoints at this step or earlier."),
    click.option("--per-checkpoint", is_flag=True, help="Ignore steps: every checkpoint counts as one update."),
    click.option("--key", default=None, help="Where the weights are inside each checkpoint (e.g. state_dict_ema)."),
    click.option("--device", default="cpu", show_default=True, help="Where to accumulate: cpu, cuda, mps."),
    click.option("--accum-dtype", type=click.Choice(ACCUM_DTYPES), default="float32", show_default=True,
                 help="Precision of the running average."),
    click.option("--out-dtype", type=click.Choice(list(DTYPES)), default=None,
                 help="dtype of every output tensor [default: each tensor's input dtype]."),
    click.option("--max-memory", default=None,
                 help="Memory budget for accumulators, e.g. 500MB [default: a quarter of available memory, at most 2 GB]."),
    click.option("--max-shard-size", default="5GB", show_default=True,
                 help="Shard a larger output into NAME-0000k-of-0000n.safetensors + NAME.safetensors.index.json."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar, notes or summary."),
)


@main.command("average")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the average (.safetensors).")
@click.option("--decay", type=float, default=None,
              help="EMA decay per training step, as passed to timm's ModelEmaV3.  [default: 0.999]")
@click.option("--half-life", type=float, default=None,
              help="Instead of --decay: steps over which a weight halves (decay = 0.5^(1/STEPS)).")
@click.option("--last", type=int, default=None, help="Instead of an EMA: the plain mean of the newest K checkpoints.")
@averaging_options
@click.option("--dry-run", is_flag=True, help="Print the checkpoints, steps and weights; read no tensor.")
def average_command(inputs: tuple[str, ...], output: str | None, dry_run: bool, quiet: bool, **options: Any) -> None:
    """Average checkpoints INPUTS (files, globs, folders) into one .safetensors file.

    Checkpoints are taken in training-step order and folded into timm's EMA recurrence; with a checkpoint saved
    every step the result equals timm's ModelEmaV3 run online.
    """
    if output is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--output' (or use --dry-run)")
    if output is not None:
        check_output_path(output)
    quiet = quiet or not is_rank_zero()
    the_plan = plan(list(inputs), **options)
    _print_notes(the_plan.discovery, quiet)
    if dry_run:
        if is_rank_zero():
            click.echo(the_plan.table())
        return
    result = run(the_plan, output, progress=show_progress(quiet))
    say(result.summary(), quiet)


@main.command("sweep")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for one .safetensors per candidate, and the pictures (created if missing).")
@click.option("--decay", "decays", cls=NumbersOption, type=float, multiple=True, help="EMA decays to try: 0.99 0.999 ...")
@click.option("--half-life", "half_lives", cls=NumbersOption, type=float, multiple=True, help="EMA half-lives, in steps.")
@click.option("--last", "lasts", cls=NumbersOption, type=int, multiple=True, help="Uniform means of the newest K: 5 10 ...")
@averaging_options
@click.option("--eval", "evaluate", is_flag=True,
              help="Score every candidate on the run's validation images (train --val-split) and the test set; "
                   "copy the best on validation to OUTDIR/best.safetensors.")
@click.option("--data", default=None, help="CIFAR-10 folder for --eval [default: $CKPT_EMA_DATA or the cache].")
@click.option("--test-subset", type=int, default=None, help="With --eval: score on the first M test images only.")
@click.option("--plot/--no-plot", default=True, show_default=True,
              help="Write weights.png (and accuracy.png with --eval) to OUTDIR; needs matplotlib.")
def sweep_command(inputs: tuple[str, ...], outdir: str, quiet: bool, evaluate: bool, data: str | None,
                  test_subset: int | None, plot: bool, **options: Any) -> None:
    """Many averages of checkpoints INPUTS from one read: every --decay, --half-life and --last at once."""
    from ckpt_ema.output import copy_atomically
    from ckpt_ema.plots import plot_accuracy, plot_weights
    from ckpt_ema.sweep import plan_sweep, run_sweep, score_candidates, sweep_table

    folder = Path(outdir)
    quiet = quiet or not is_rank_zero()
    if not folder.parent.is_dir():
        raise CkptEmaError("the output folder's parent does not exist", folder)
    candidates = plan_sweep(list(inputs), **options)
    _print_notes(candidates[0].plan.discovery, quiet)
    folder.mkdir(exist_ok=True)
    result = run_sweep(candidates, folder, progress=show_progress(quiet))
    if not is_rank_zero():
        return  # under torchrun: the table, scores and pictures come from rank 0
    reads = "once" if result.passes == 1 else f"{result.passes} times (the memory budget holds fewer candidates at once)"
    say(f"read {len(candidates[0].plan.sources)} checkpoints {reads} for {len(candidates)} candidates in "
        f"{result.seconds:.1f} s; wrote {folder}/<candidate>.safetensors", quiet)
    pictures = [folder / "weights.png"] if plot and plot_weights(candidates, folder / "weights.png") else []
    if not evaluate:
        click.echo(sweep_table(candidates))
    else:
        scores = score_candidates(candidates, data, options["device"], test_subset)
        final = scores.final_model
        click.echo(sweep_table(candidates, scores.by_candidate, scores.best, final))
        if scores.best is None:
            say("note: the run kept no validation images (train --val-split N), so no candidate is chosen: "
                "choosing on the test set would inflate the result", quiet)
        else:
            best = next(c for c in candidates if c.name == scores.best)
            copy_atomically(best.output, folder / "best.safetensors")
            say(f"best on validation: {best.name} -> {folder / 'best.safetensors'}", quiet)
        reference = {f"final model, {k.split('_')[0]}": v for k, v in final.items()}
        if plot and plot_accuracy(candidates, scores.by_candidate, reference, folder / "accuracy.png"):
            pictures.append(folder / "accuracy.png")
    if plot and not pictures:
        say("note: no pictures: matplotlib is not installed (pip install 'ckpt-ema[plot]')", quiet)
    for picture in pictures:
        say(f"picture: {picture}", quiet)


def _print_notes(discovery: Any, quiet: bool) -> None:
    for line in discovery.skipped:
        say(f"skipped {line}", quiet)
    for line in discovery.notes:
        say(f"note: {line}", quiet)


# The CIFAR-10 commands live in their own module: they pull in torchvision and the training loop.
from ckpt_ema.cli_cifar import eval_command, train_command  # noqa: E402

main.add_command(train_command, "train")
main.add_command(eval_command, "eval")
