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
from pathlib import Path
from typing import Any

import click

from ckpt_ema import __version__
from ckpt_ema.cli_options import NumbersOption, averaging_options, follow_options, options_from
from ckpt_ema.errors import CkptEmaError, OptionError
from ckpt_ema.interrupts import Interrupted, signal_name, signals_as_interrupts

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
    from ckpt_ema.engine.distributed import World

    return World.from_env()


@click.group(cls=CkptEmaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-ema")
def main() -> None:
    """Recover the EMA of a model's weights after training, from the checkpoints the run saved."""


@main.command("average")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(),
              help="Where to write the average: a .safetensors file, or a model folder (DIR/: the weights plus the "
                   "newest checkpoint's config, tokenizer and adapter files, for from_pretrained).")
@click.option("--decay", type=float, default=None,
              help="EMA decay per training step, as passed to timm's ModelEmaV3.  [default: 0.999]")
@click.option("--half-life", type=float, default=None,
              help="Instead of --decay: steps over which a weight halves (decay = 0.5^(1/STEPS)).")
@click.option("--last", type=int, default=None, help="Instead of an EMA: the plain mean of the newest K checkpoints.")
@click.option("--sigma-rel", type=float, default=None,
              help="Instead of timm's EMA: EDM2's power-function EMA with this relative width (e.g. 0.05, 0.1).")
@averaging_options()
@follow_options()
@click.option("--dry-run", is_flag=True, help="Print the checkpoints, steps and weights; read no tensor.")
def average_command(inputs: tuple[str, ...], output: str | None, decay: float | None, half_life: float | None,
                    last: int | None, sigma_rel: float | None, dry_run: bool, quiet: bool, keep_state: bool,
                    watch: bool, until_step: int | None, poll: float, **params: Any) -> None:
    """Average checkpoints INPUTS (files, globs, folders) into one .safetensors file or a model folder.

    Checkpoints are taken in training-step order and folded into timm's EMA recurrence; with a checkpoint saved
    every step the result equals timm's ModelEmaV3 run online.
    """
    from ckpt_ema.api import check_output, plan, run
    from ckpt_ema.output.folder import is_folder_output

    if output is None and not dry_run:
        raise click.UsageError("missing option '-o' / '--output' (or use --dry-run)")
    if output is not None:
        check_output(output)
    options = options_from(params, decay=decay, half_life=half_life, last=last, sigma_rel=sigma_rel)
    world = world_from_env()
    quiet = quiet or world.rank != 0
    _check_follow_flags(keep_state, watch, until_step, poll, world, dry_run)
    if output is not None and keep_state and not dry_run and not world.is_distributed:
        from ckpt_ema.follow.state import StateFolder, state_folder_of
        from ckpt_ema.follow.update import Target

        out = Path(output)
        _follow([Target("average", options, out, folder=is_folder_output(output))], StateFolder(state_folder_of(out)),
                list(inputs), watch, until_step, poll, quiet)
        return
    the_plan = plan(list(inputs), options)
    _print_notes(the_plan.discovery, quiet)
    for note in the_plan.notes:
        say(f"note: {note}", quiet)
    if dry_run:
        for line in the_plan.warnings():
            say(f"warning: {line}", quiet)
        if world.rank == 0:
            click.echo(the_plan.table())
        return
    result = run(the_plan, output, progress=show_progress(quiet), world=world)
    for note in result.notes:
        say(f"note: {note}", quiet)
    for line in the_plan.warnings():  # after the run: a failing run's error stays its one line
        say(f"warning: {line}", quiet)
    say(result.summary(), quiet)
    if output is not None and world.rank == 0:
        from ckpt_ema.follow.state import StateFolder, state_folder_of

        StateFolder(state_folder_of(Path(output))).remove()  # it no longer describes the output


def _check_follow_flags(keep_state: bool, watch: bool, until_step: int | None, poll: float, world: Any,
                        dry_run: bool = False) -> None:
    if watch and (not keep_state or dry_run or world.is_distributed):
        why = "--no-state" if not keep_state else "--dry-run" if dry_run else "several processes (torchrun)"
        raise click.UsageError(f"--watch keeps state beside the output: it does not go with {why}")
    if until_step is not None and not watch:
        raise click.UsageError("--until-step goes with --watch")
    if not poll > 0:
        raise OptionError("poll", f"must be > 0 seconds, got {poll}")


def _follow(targets: list[Any], folder: Any, inputs: list[str], watch: bool, until_step: int | None, poll: float,
            quiet: bool, average: bool = True) -> Any:
    """One update of ``targets`` from their state, or with ``watch`` one per new checkpoint until stopped; returns
    the last update. One update of an ``average`` is said here (what was reused, warnings, the summary); a sweep's,
    by the caller once the candidates are scored."""
    from ckpt_ema.follow.update import update
    from ckpt_ema.follow.watch import check_inputs, watch as follow_run

    if not watch:
        done = update(inputs, targets, folder, progress=show_progress(quiet),
                      on_discovery=lambda found: _print_notes(found, quiet))
        for note in done.notes:
            say(f"note: {note}", quiet)
        if not average:
            return done
        say(_update_line(done, targets), quiet)
        if done.action != "up to date":  # its notes, warnings and summary, as without a state
            from ckpt_ema.api import AverageResult

            for note in done.plans[0].notes:
                say(f"note: {note}", quiet)
            for line in done.plans[0].warnings():
                say(f"warning: {line}", quiet)
            say(AverageResult(None, done.plans[0], {}, targets[0].output, done.seconds, done.bytes_read,
                              done.files[0]).summary(), quiet)
        return done
    check_inputs(inputs)  # a path that is not there: one line now, not a watch that never ends
    say(f"watching {', '.join(inputs)} (every {poll:g} s{'' if until_step is None else f', until step {until_step}'}); "
        "Ctrl-C stops", quiet)
    done = follow_run(inputs, targets, folder, poll=poll, until_step=until_step,
                      on_update=lambda u: click.echo(_update_line(u, targets), err=True),
                      on_note=lambda line: say(line, quiet))
    if done is None:
        say("stopped before any checkpoint was folded", quiet)
    else:
        say(f"stopped: {_where(targets)} holds steps {done.plans[0].sources[0].step}..{done.plans[0].sources[-1].step}"
            f" ({len(done.plans[0].sources)} checkpoints)", quiet)
    return done


def _where(targets: list[Any]) -> str:
    return str(targets[0].output) if len(targets) == 1 else f"{targets[0].output.parent}/ ({len(targets)} candidates)"


def _update_line(done: Any, targets: list[Any]) -> str:
    """One line per update: the newest step, what was done, the time, where."""
    sources = done.plans[0].sources
    return f"step {sources[-1].step}: {done.message}; {done.seconds:.2f} s -> {_where(targets)}"


@main.command("sweep")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for one .safetensors per candidate, and the pictures (created if missing).")
@click.option("--decay", "decays", cls=NumbersOption, type=float, multiple=True, help="EMA decays to try: 0.99 0.999 ...")
@click.option("--half-life", "half_lives", cls=NumbersOption, type=float, multiple=True, help="EMA half-lives, in steps.")
@click.option("--sigma-rel", "sigma_rels", cls=NumbersOption, type=float, multiple=True,
              help="Power-function EMA (EDM2) widths to try: 0.05 0.1 ...")
@click.option("--last", "lasts", cls=NumbersOption, type=int, multiple=True, help="Uniform means of the newest K: 5 10 ...")
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
                  sigma_rels: tuple[float, ...], lasts: tuple[int, ...], quiet: bool, eval_cmd: str | None,
                  maximize: bool, evaluate: bool, data: str | None, test_subset: int | None, plot: bool,
                  keep_state: bool, watch: bool, until_step: int | None, poll: float, **params: Any) -> None:
    """Many averages of checkpoints INPUTS from one read: every --decay, --half-life, --sigma-rel and --last at
    once; with --eval-cmd, the best of them, or the final model."""
    from ckpt_ema.scoring import command_scorer
    from ckpt_ema.sweeping import (Scoring, finish_sweep, identical_candidates, output_folder, plan_sweep, run_sweep,
                                   sweep_result_of, sweep_table, sweep_targets, sweep_warnings)

    folder = Path(outdir)
    world = world_from_env()
    quiet = quiet or world.rank != 0
    if not folder.parent.is_dir():
        raise CkptEmaError("the output folder's parent does not exist", folder)
    if not (decays or half_lives or lasts or sigma_rels):
        raise click.UsageError("give at least one --decay, --half-life, --sigma-rel or --last to sweep")
    if evaluate and eval_cmd is not None:
        raise click.UsageError("--eval is a shorthand for an --eval-cmd: give one of them")
    options = options_from(params)
    _check_follow_flags(keep_state, watch, until_step, poll, world)
    scoring = None
    if evaluate:  # the demo's evaluation, as any user's: one command per weights file
        scoring = Scoring(command_scorer(demo_eval_command(data, test_subset, options.device)), "val_accuracy",
                          label="validation")
    elif eval_cmd is not None:
        scoring = Scoring(command_scorer(eval_cmd), maximize=maximize)
    if keep_state and not world.is_distributed:
        targets, state = sweep_targets(folder, options, decays=list(decays), half_lives=list(half_lives),
                                       lasts=list(lasts), sigma_rels=list(sigma_rels))
        with output_folder(folder):
            done = _follow(targets, state, list(inputs), watch, until_step, poll, quiet, average=False)
        if done is None:
            return
        result = sweep_result_of(targets, done)
        result.notes = identical_candidates(result.candidates)  # (the update's line and its notes are said)
        finish_sweep(result, folder, score=scoring, plot=plot)
        if not watch:
            say(_update_line(done, targets), quiet)
            if done.action != "up to date":
                for note in result.candidates[0].plan.notes:
                    say(f"note: {note}", quiet)
                for line in sweep_warnings(result.candidates):
                    say(f"warning: {line}", quiet)
                say(f"read {len(done.new)} checkpoints {_reads(result.passes)} for {len(targets)} candidates in "
                    f"{done.seconds:.1f} s; wrote {folder}/<candidate>.safetensors", quiet)
    else:
        candidates = plan_sweep(list(inputs), options, decays=list(decays), half_lives=list(half_lives),
                                lasts=list(lasts), sigma_rels=list(sigma_rels))
        _print_notes(candidates[0].plan.discovery, quiet)
        for note in candidates[0].plan.notes:
            say(f"note: {note}", quiet)
        for line in sweep_warnings(candidates):
            say(f"warning: {line}", quiet)
        result = run_sweep(candidates, folder, score=scoring, plot=plot, progress=show_progress(quiet), world=world)
        if world.rank != 0:
            return
        say(f"read {len(candidates[0].plan.sources)} checkpoints {_reads(result.passes)} for {len(candidates)} "
            f"candidates in {result.seconds:.1f} s; wrote {folder}/<candidate>.safetensors", quiet)
    click.echo(sweep_table(result, scoring))
    if evaluate and result.scores and not any("val_accuracy" in s for s in result.scores.values()):
        say("note: the run kept no validation images (train --val-split N), so no candidate is chosen: "
            "choosing on the test set would inflate the result", quiet)
    elif result.best is not None:
        say(f"best on {scoring.label or result.ranked_by}: {result.best} -> {result.best_output}", quiet)  # type: ignore[union-attr]
    for note in result.notes:
        if not (evaluate and "no val_accuracy" in note):
            say(f"note: {note}", quiet)
    for picture in result.pictures:
        say(f"picture: {picture}", quiet)
    for candidate in result.candidates:
        for line in candidate.plan.first_checkpoint_warnings():
            say(f"warning: {candidate.name}: {line}", quiet)


def _reads(passes: int) -> str:
    return "once" if passes == 1 else f"{passes} times (the memory budget holds fewer candidates at once)"


def demo_eval_command(data: str | None, test_subset: int | None, device: str) -> str:
    """The command ``sweep --eval`` stands for: the CIFAR-10 demo's ``eval --score val``, run by this Python."""
    words = [sys.executable, "-m", "ckpt_ema", "eval", "--score", "val", "--quiet", "--device", device]
    words += ["--data", data] if data is not None else []
    words += ["--test-subset", str(test_subset)] if test_subset is not None else []
    return shlex.join(words) + " {weights}"


def _print_notes(discovery: Any, quiet: bool) -> None:
    for line in discovery.skipped:
        say(f"skipped {line}", quiet)
    for line in discovery.notes:
        say(f"note: {line}", quiet)
