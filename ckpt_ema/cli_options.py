"""Click pieces shared by the commands: option groups and an option that takes several numbers."""

from __future__ import annotations

from typing import Any

import click


def ema_schedule_options(prefix: str = "") -> Any:
    """The options of timm's ModelEmaV3 that define the per-step decay, shared by ``average`` and ``train``."""
    return stack(
        click.option(f"--{prefix}min-decay", type=float, default=0.0, show_default=True,
                     help="Lower bound on the decay during warmup (timm's min_decay)."),
        click.option(f"--{prefix}update-after-step", type=int, default=0, show_default=True,
                     help="Copy the model, without averaging, up to and including this step + 1."),
        click.option(f"--{prefix}warmup/--no-{prefix}warmup", default=False, show_default=True,
                     help="timm's use_warmup: decay = 1 - (1 + t/gamma)^-power, capped at --decay."),
        click.option(f"--{prefix}warmup-gamma", type=float, default=1.0, show_default=True,
                     help="gamma of the warmup formula."),
        click.option(f"--{prefix}warmup-power", type=float, default=2 / 3, show_default="2/3",
                     help="power of the warmup formula (timm's default 2/3)."),
    )


def stack(*decorators: Any) -> Any:
    """Apply ``decorators`` as if written one above the other, first on top."""

    def decorate(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


class NumbersOption(click.Option):
    """An option that takes one or more numbers after one flag: ``--decay 0.99 0.999 0.9999``.

    The tokens after the flag are taken while they parse as numbers, so checkpoint paths may follow; repeating
    the flag works too.
    """

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = getattr(parser, "_long_opt", {}).get(name) or getattr(parser, "_short_opt", {}).get(name)
            if option is None:
                continue  # a Click without these internals: the flag still works, repeated once per value
            process = option.process

            def take_numbers(value: str, state: Any, process: Any = process) -> None:
                process(value, state)
                while state.rargs and _is_number(state.rargs[0]):
                    process(state.rargs.pop(0), state)

            option.process = take_numbers


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
