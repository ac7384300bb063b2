"""The command line's options, declared once: each flag of :class:`ckpt_ema.options.AverageOptions` (and of its
decay schedule), with the default the dataclass gives it, shared by ``average``, ``sweep`` and ``train``'s online
EMA. :func:`options_from` turns the parsed flags into the options object; sizes are parsed here, at the boundary.

Nothing here imports torch: ``ckpt-ema --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from ckpt_ema.errors import OptionError
from ckpt_ema.options import ACCUM_DTYPE_NAMES, DTYPE_NAMES, AverageOptions, parse_size
from ckpt_ema.weighting import INTERPOLATIONS, DecaySchedule

# The fields of DecaySchedule that shape d(s) besides the decay itself (flags --min-decay ... --warmup-power).
SHAPE_FIELDS = ("min_decay", "update_after_step", "warmup", "warmup_gamma", "warmup_power")


def default(cls: type, name: str) -> Any:
    """The default a dataclass declares for field ``name``: the one place each default lives."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


class Size(click.ParamType):
    """A size in bytes: 1234, 500MB, 2GiB; ``none`` for no limit where the option allows it."""

    name = "size"

    def __init__(self, allow_none: bool = False) -> None:
        self.allow_none = allow_none

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if self.allow_none and str(value).lower() == "none":
            return None
        try:
            return parse_size(value, param.name if param is not None else "size")
        except OptionError as exc:
            self.fail(exc.problem, param, ctx)


def stack(*decorators: Any) -> Any:
    """Apply ``decorators`` as if written one above the other, first on top."""

    def decorate(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def schedule_shape_options(prefix: str = "") -> Any:
    """The options of timm's ModelEmaV3 that shape the per-step decay: ``average``/``sweep`` (no prefix) and
    ``train``'s online EMA (prefix ``ema-``)."""
    d = lambda name: default(DecaySchedule, name)  # noqa: E731
    return stack(
        click.option(f"--{prefix}min-decay", type=float, default=d("min_decay"), show_default=True,
                     help="Lower bound on the decay during warmup (timm's min_decay)."),
        click.option(f"--{prefix}update-after-step", type=int, default=d("update_after_step"), show_default=True,
                     help="Copy the model, without averaging, up to and including this step + 1."),
        click.option(f"--{prefix}warmup/--no-{prefix}warmup", default=d("warmup"), show_default=True,
                     help=f"timm's use_warmup: the decay at step s is max(min(1 - (1 + t/gamma)^-power, "
                          f"--{prefix}decay), --{prefix}min-decay) with t = s - --{prefix}update-after-step - 1 "
                          f"(gamma, power: --{prefix}warmup-gamma, --{prefix}warmup-power); without it, "
                          f"--{prefix}decay."),
        click.option(f"--{prefix}warmup-gamma", type=float, default=d("warmup_gamma"), show_default=True,
                     help="gamma of the warmup formula."),
        click.option(f"--{prefix}warmup-power", type=float, default=d("warmup_power"),
                     help="power of the warmup formula (timm's default).  [default: 2/3]"),
    )


def schedule_shape_from(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Pop the schedule-shaping flags (``ema_min_decay`` ... with a prefix) out of Click's ``params``."""
    return {name: params.pop(prefix + name) for name in SHAPE_FIELDS}


def averaging_options() -> Any:
    """The flags of every AverageOptions field except the weights themselves (decay, half-life, last), which
    ``average`` takes once and ``sweep`` several times."""
    d = lambda name: default(AverageOptions, name)  # noqa: E731
    return stack(
        schedule_shape_options(),
        click.option("--bias-correction", is_flag=True, default=d("bias_correction"),
                     help="Start from zero and divide by 1 - prod(decay) (Adam's correction) instead of copying the first."),
        click.option("--interpolate", type=click.Choice(INTERPOLATIONS), default=d("interpolate"), show_default=True,
                     help="The weights between two checkpoints: moving linearly (linear) or held at the newer (step)."),
        click.option("--from-step", type=int, default=d("from_step"), help="Use only checkpoints at this step or later."),
        click.option("--to-step", type=int, default=d("to_step"), help="Use only checkpoints at this step or earlier."),
        click.option("--tokens-per-step", type=COUNT, default=d("tokens_per_step"), metavar="N",
                     help="Tokens one optimizer step trains on (batch x sequence length), for --window-tokens "
                          "(without it: the token counts the checkpoints record)."),
        click.option("--per-checkpoint", is_flag=True, default=d("per_checkpoint"),
                     help="Ignore steps: every checkpoint counts as one update."),
        click.option("--key", default=d("key"), help="Where the weights are inside each checkpoint (e.g. state_dict_ema)."),
        click.option("--strip-prefix", default=d("strip_prefix"), metavar="PREFIX",
                     help="Cut PREFIX from every tensor name (a wrapper's, e.g. Lightning's 'model.'), so that the "
                          "average loads into the bare model; a tensor without it is an error."),
        click.option("--device", default=d("device"), show_default=True, help="Where to accumulate: cpu, cuda, mps."),
        click.option("--accum-dtype", type=click.Choice(ACCUM_DTYPE_NAMES), default=d("accum_dtype"), show_default=True,
                     help="Precision of the running average."),
        click.option("--out-dtype", type=click.Choice(DTYPE_NAMES), default=d("out_dtype"),
                     help="dtype of every output tensor [default: each tensor's input dtype]."),
        click.option("--max-memory", type=Size(), default=d("max_memory"),
                     help="Memory budget for accumulators, e.g. 500MB [default: a quarter of available memory, at most 2 GiB]."),
        click.option("--max-shard-size", type=Size(allow_none=True), default=d("max_shard_size"),
                     help="Shard a larger output into NAME-0000k-of-0000n.safetensors + NAME.safetensors.index.json "
                          "(none: never).  [default: 5GB]"),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, notes or summary."),
    )


def follow_options() -> Any:
    """The flags of keeping an output current as the run grows (:mod:`ckpt_ema.follow`): ``average`` and ``sweep``."""
    return stack(
        click.option("--state/--no-state", "keep_state", default=True, show_default=True,
                     help="Keep beside the output what a later run needs to fold in only the new checkpoints "
                          "(OUT.ckpt-ema-state/; a sweep: OUTDIR/ckpt-ema-state/)."),
        click.option("--watch", is_flag=True,
                     help="Follow a run in progress: fold each new checkpoint once the trainer has written it, "
                          "rewriting the output(s) after each; stop with Ctrl-C or --until-step."),
        click.option("--until-step", type=int, default=None,
                     help="With --watch: stop once a checkpoint at this step or later is folded."),
        click.option("--poll", type=float, default=2.0, show_default=True,
                     help="With --watch: seconds between two looks at the inputs."),
    )


def options_from(params: dict[str, Any], **weights: Any) -> AverageOptions:
    """The options object from Click's parsed ``params`` (consumed) and the weights (``decay=``, ``half_life=``,
    ``last=``, ``sigma_rel=``): built once, here, at the boundary."""
    fields = {f.name for f in dataclasses.fields(AverageOptions)} - {"schedule", "last", "sigma_rel"}
    rest = {name: params.pop(name) for name in list(params) if name in fields}
    rest.update({name: weights.pop(name) for name in ("weights", "window_steps", "window_tokens") if name in weights})
    shape = schedule_shape_from(params)
    for name, what in (("last", "a uniform mean"), ("sigma_rel", "a power-function EMA")):
        if weights.get(name) is None:
            continue
        ema_only = {"--decay": weights.get("decay") is not None, "--half-life": weights.get("half_life") is not None,
                    "--last": name != "last" and weights.get("last") is not None,
                    "--sigma-rel": name != "sigma_rel" and weights.get("sigma_rel") is not None,
                    "--warmup": shape["warmup"], "--bias-correction": rest["bias_correction"]}
        given = [flag for flag, on in ema_only.items() if on]
        if given:
            raise OptionError(name, f"{weights[name]} is {what}: {', '.join(given)} cannot go with it")
        rest["bias_correction"] = False
        return AverageOptions(**{name: weights[name]}, **rest)
    return AverageOptions.build(decay=weights.get("decay"), half_life=weights.get("half_life"), **shape, **rest)


class Count(click.ParamType):
    """A whole number, also written as a float literal that is one: ``8000000000``, ``8e9``, ``4_194_304``."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            pass
        try:
            number = float(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if not number.is_integer():
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


COUNT = Count()


class NumbersOption(click.Option):
    """An option that takes one or more values after one flag: ``--decay 0.99 0.999 0.9999`` (numbers), or
    ``--weights cosine 1-sqrt`` (a choice's words).

    The tokens after the flag are taken while they are values of its type, so checkpoint paths may follow;
    repeating the flag works too.
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = getattr(parser, "_long_opt", {}).get(name) or getattr(parser, "_short_opt", {}).get(name)
            if option is None:
                continue  # a Click without these internals: the flag still works, repeated once per value
            process = option.process

            def take_values(value: str, state: Any, process: Any = process) -> None:
                process(value, state)
                while state.rargs and self._is_value(state.rargs[0]):
                    process(state.rargs.pop(0), state)

            option.process = take_values

    def _is_value(self, token: str) -> bool:
        if isinstance(self.type, click.Choice):
            return token in self.type.choices
        try:
            float(token)
        except ValueError:
            return False
        return True
