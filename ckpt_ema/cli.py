"""The ``ckpt-ema`` command line: parse the flags into :class:`~ckpt_ema.options.AverageOptions`, call the API,
print. No logic of its own.

Every error the user can cause is one line on stderr, ``ckpt-ema: error: <file>: <problem>``, with exit code 2;
a bad parameter is worded as its flag. torch is imported only when a command runs: ``--help`` and ``--version``
answer at once. The CIFAR-10 demo's commands (``train``, ``eval``) live in :mod:`ckpt_ema.cifar.cli` and are
loaded only when called.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from typing import Any

import click

from ckpt_ema import __version__
from ckpt_ema.cli_options import COUNT, NumbersOption, averaging_options, follow_options, options_from
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.interrupts import Interrupted, signal_name, signals_as_interrupts
from ckpt_ema.window_weights import WINDOW_SHAPES

# Click >= 8.2 raises this for a group called without a command; older Clicks print the help themselves.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())

# The demo's commands: name -> (module:attribute, one-line help shown before the module is imported).
DEMO_COMMANDS = {
    "train": ("ckpt_ema.cifar.cli:train_command", "Train a CIFAR-10 model, saving periodic checkpoints (the demo)."),
    "eval": ("ckpt_ema.cifar.cli:eval_command", "Score weights on CIFAR-10 (the demo)."),
}


def fail(message: str, code: int = 2) -> None:
    click.echo(f"ckpt-ema: error: {message}", err=True)
    sys.exit(code)


class CkptEmaGroup(click.Group):
    """The ``ckpt-ema`` group: errors (ours and Click's usage errors) print as one line, without usage text or
    traceback; the demo's commands are imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *DEMO_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in DEMO_COMMANDS and name not in self.commands:
            if ctx.resilient_parsing or "--help" in sys.argv[1:2] or "-h" in sys.argv[1:2]:
                return click.Command(name, help=DEMO_COMMANDS[name][1])  # the listing: no import
            module, attribute = DEMO_COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            with signals_as_interrupts():
                rv = super().main(args, prog_name or "ckpt-ema", complete_var, standalone_mode=False, **extra)
        except OptionError as exc:
            fail(exc.as_flag())
        except CkptEmaError as exc:
            fail(str(exc))
        except NO_ARGS_IS_HELP as exc:  # plain `ckpt-ema`: the help itself, not an error line
            click.echo(exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt) as exc:
            stop = exc.__cause__ if isinstance(exc, click.exceptions.Abort) else exc  # Click wraps Ctrl-C in Abort
            if isinstance(stop, Interrupted):
                fail(f"interrupted ({signal_name(stop.signum)})", stop.exit_code)
            fail("interrupted", 130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def show_progress(quiet: bool) -> bool:
    """tqdm bars only for a person watching: not with --quiet, not when stderr goes to a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def say(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(message, err=True)


def world_from_env() -> Any:
    """The processes torchrun started (one process of one without torchrun): the CLI asks for the multi-process
    path explicitly; the API never guesses it."""
    import ckpt_ema

    return ckpt_ema.World.from_env()


def reporter(quiet: bool) -> Any:
    """What the API says, on stderr: progress bars only for a person watching, nothing with --quiet."""
    import ckpt_ema

    return ckpt_ema.Reporter(progress=show_progress(quiet), say=None if quiet else lambda text: click.echo(text, err=True))


@click.group(cls=CkptEmaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-ema")
def main() -> None:
    """Recover the EMA of a model's weights after training, from the checkpoints the run saved."""


@main.command("average")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(),
              help="Where to write the average: a .safetensors file, or a model folder (DIR/: the weights plus the "
                   "newest checkpoint's config, tokenizer and adapter files, for from_pretrained).")
@click.option("--like-input", is_flag=True,
              help="Write -o DIR as a checkpoint of the run's own format (DCP: torchtitan, OLMo-core, Megatron, NeMo, "
                   "FSDP): the newest checkpoint with its model averaged, its optimizer and train state kept, for the "
                   "trainer's own loader (to resume from the merge).")
@click.option("--decay", type=float, default=None,
              help="EMA decay per training step, as passed to timm's ModelEmaV3.  [default: 0.999]")
@click.option("--half-life", type=float, default=None,
              help="Instead of --decay: steps over which a weight halves (decay = 0.5^(1/STEPS)).")
@click.option("--last", type=int, default=None, help="Instead of an EMA: the plain mean of the newest K checkpoints.")
@click.option("--sigma-rel", type=float, default=None,
              help="Instead of timm's EMA: EDM2's power-function EMA with this relative width (e.g. 0.05, 0.1).")
@click.option("--weights", "shape", type=click.Choice(WINDOW_SHAPES), default=None,
              help="Instead of an EMA: merge weights shaped like a learning-rate decay over the window (WSM), or the "
                   "uniform mean of the window.  [default with a window: uniform]")
@click.option("--window-steps", type=int, default=None, metavar="N",
              help="The window of --weights: the newest N training steps.")
@click.option("--window-tokens", type=COUNT, default=None, metavar="T",
              help="The window of --weights in tokens: the steps that trained the newest T tokens (at "
                   "--tokens-per-step, or by the token counts the checkpoints record).")
@averaging_options()
@follow_options()
@click.option("--dry-run", is_flag=True, help="Print the checkpoints, steps and weights; read no tensor.")
def average_command(inputs: tuple[str, ...], output: str | None, decay: float | None, half_life: float | None,
                    last: int | None, sigma_rel: float | None, shape: str | None, window_steps: int | None,
                    window_tokens: int | None, like_input: bool, dry_run: bool, quiet: bool, keep_state: bool,
                    watch: bool, until_step: int | None, poll: float, **params: Any) -> None:
    """Average checkpoints INPUTS (files, globs, folders) into one .safetensors file or a model folder.

    Checkpoints are taken in training-step order and folded into timm's EMA recurrence; with a checkpoint saved
    every step the result equals timm's ModelEmaV3 run online.
    """
    import ckpt_ema

    if output is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--output' (or use --dry-run)")
    if dry_run and watch:
        raise click.UsageError("--dry-run reads no tensor: it does not go with --watch")
    options = options_from(params, decay=decay, half_life=half_life, last=last, sigma_rel=sigma_rel, weights=shape,
                           window_steps=window_steps, window_tokens=window_tokens)
    world = world_from_env()
    report = reporter(quiet or world.rank != 0)
    if dry_run:
        the_plan = ckpt_ema.plan(list(inputs), options)
        report.discovery(the_plan.discovery)
        for note in the_plan.notes:
            report.note(note)
        for line in the_plan.warnings():
            report.warning(line)
        if world.rank == 0:
            click.echo(the_plan.table())
        return
    ckpt_ema.average(list(inputs), output, options, keep_state=keep_state, world=world, report=report, watch=watch,
                     poll=poll, until_step=until_step, like_input=like_input)


@main.command("sweep")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for one .safetensors per candidate, and the pictures (created if missing).")
@click.option("--decay", "decays", cls=NumbersOption, type=float, multiple=True, help="EMA decays to try: 0.99 0.999 ...")
@click.option("--half-life", "half_lives", cls=NumbersOption, type=float, multiple=True, help="EMA half-lives, in steps.")
@click.option("--sigma-rel", "sigma_rels", cls=NumbersOption, type=float, multiple=True,
              help="Power-function EMA (EDM2) widths to try: 0.05 0.1 ...")
@click.option("--last", "lasts", cls=NumbersOption, type=int, multiple=True, help="Uniform means of the newest K: 5 10 ...")
@click.option("--weights", "shapes", cls=NumbersOption, type=click.Choice(WINDOW_SHAPES), multiple=True,
              help="Window merges to try, each over every window: cosine 1-sqrt ...")
@click.option("--window-steps", "windows", cls=NumbersOption, type=int, multiple=True,
              help="Windows, in steps, of the window merges (uniform without --weights): 1000 5000 ...")
@click.option("--window-tokens", "token_windows", cls=NumbersOption, type=COUNT, multiple=True,
              help="Windows in tokens (by --tokens-per-step, or the checkpoints' own token counts).")
@averaging_options()
@click.option("--eval-cmd", default=None, metavar="CMD",
              help="Score every candidate and the final model with this shell command; {weights} is replaced by a "
                   ".safetensors path; the last line it prints is the score (a number, or a JSON object of named "
                   "numbers). The best average is copied to OUTDIR/best.safetensors if it beats the final model.")
@click.option("--maximize/--minimize", default=True, show_default=True,
              help="Whether a higher score (accuracy) or a lower one (loss) is better.")
@click.option("--eval", "evaluate", is_flag=True,
              help="CIFAR-10 demo runs: --eval-cmd 'ckpt-ema eval --score val {weights}': choose on the validation "
                   "images that train --val-split kept out; the test accuracy is shown beside.")
@click.option("--data", default=None, help="CIFAR-10 folder for --eval [default: $CKPT_EMA_DATA or the cache].")
@click.option("--test-subset", type=int, default=None, help="With --eval: score on the first M test images only.")
@click.option("--plot/--no-plot", default=True, show_default=True,
              help="Write weights.png (and the scores' picture when scored) to OUTDIR; needs matplotlib.")
@follow_options()
def sweep_command(inputs: tuple[str, ...], outdir: str, decays: tuple[float, ...], half_lives: tuple[float, ...],
                  sigma_rels: tuple[float, ...], lasts: tuple[int, ...], shapes: tuple[str, ...],
                  windows: tuple[int, ...], token_windows: tuple[int, ...], quiet: bool, eval_cmd: str | None,
                  maximize: bool, evaluate: bool, data: str | None, test_subset: int | None, plot: bool,
                  keep_state: bool, watch: bool, until_step: int | None, poll: float, **params: Any) -> None:
    """Many averages of checkpoints INPUTS from one read: every --decay, --half-life, --sigma-rel and --last at
    once; with --eval-cmd, the best of them, or the final model."""
    import ckpt_ema

    if not (decays or half_lives or lasts or sigma_rels or windows or token_windows):
        raise click.UsageError("give at least one --decay, --half-life, --sigma-rel, --last, --window-steps or "
                               "--window-tokens to sweep")
    if evaluate and eval_cmd is not None:
        raise click.UsageError("--eval is a shorthand for an --eval-cmd: give one of them")
    options = options_from(params)
    world = world_from_env()
    quiet = quiet or world.rank != 0
    scoring = None
    if evaluate:  # the demo's evaluation, as any user's: one command per weights file
        scoring = ckpt_ema.Scoring(ckpt_ema.command_scorer(demo_eval_command(data, test_subset, options.device)),
                                   "val_accuracy", label="validation")
    elif eval_cmd is not None:
        scoring = ckpt_ema.Scoring(ckpt_ema.command_scorer(eval_cmd), maximize=maximize)
    report = reporter(quiet)
    result = ckpt_ema.sweep(list(inputs), outdir, decays=decays, half_lives=half_lives, lasts=lasts,
                            sigma_rels=sigma_rels, shapes=shapes, windows=windows, token_windows=token_windows,
                            options=options, score=scoring, plot=plot, keep_state=keep_state, world=world,
                            report=report, watch=watch, poll=poll, until_step=until_step)
    if result is None or world.rank != 0:
        return
    click.echo(result.table())
    if evaluate and result.scores and not any("val_accuracy" in s for s in result.scores.values()):
        report.note("the run kept no validation images (train --val-split N), so no candidate is chosen: "
                    "choosing on the test set would inflate the result")
    elif result.best is not None and scoring is not None:
        report.line(f"best on {scoring.label or result.ranked_by}: {result.best} -> {result.best_output}")
    for note in result.notes:
        if note != result.update.message and not (evaluate and "no val_accuracy" in note):  # (said in its line)
            report.note(note)
    for picture in result.pictures:
        report.line(f"picture: {picture}")
    for candidate in result.candidates:
        for line in candidate.plan.first_checkpoint_warnings():
            report.warning(f"{candidate.name}: {line}")


def demo_eval_command(data: str | None, test_subset: int | None, device: str) -> str:
    """The command ``sweep --eval`` stands for: the CIFAR-10 demo's ``eval --score val``, run by this Python."""
    words = [sys.executable, "-m", "ckpt_ema", "eval", "--score", "val", "--quiet", "--device", device]
    words += ["--data", data] if data is not None else []
    words += ["--test-subset", str(test_subset)] if test_subset is not None else []
    return shlex.join(words) + " {weights}"
