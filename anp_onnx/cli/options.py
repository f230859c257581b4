"""click options made from the declarations of `anp_onnx.options`, and `--help` in titled sections.

One declaration gives every command its flag, type, bounds, default and help; `SectionedCommand` groups
the options under their sections' titles; `DeclaredOption` keeps an option's old names working while
`--help` shows only the current ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import click
from click.core import ParameterSource

from anp_onnx.options import SECTIONS, Option, setting

OTHER = "Other options"


class DeclaredOption(click.Option):
    """A click option with a `--help` section and hidden flags (old names that still work)."""

    def __init__(self, *args: object, section: str = OTHER, hidden_flags: Iterable[str] = (), **kwargs: object):
        super().__init__(*args, **kwargs)
        self.section = section
        self.hidden_flags = frozenset(hidden_flags)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts, self.secondary_opts
        self.opts = [flag for flag in shown[0] if flag not in self.hidden_flags]
        self.secondary_opts = [flag for flag in shown[1] if flag not in self.hidden_flags]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = shown


class SectionedCommand(click.Command):
    """`--help` lists the options under their sections' titles, in `anp_onnx.options.SECTIONS` order."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for parameter in self.get_params(ctx):
            record = parameter.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(parameter, "section", OTHER), []).append(record)
        order = [*SECTIONS, OTHER]
        for title in sorted(groups, key=lambda name: order.index(name) if name in order else len(order)):
            with formatter.section(title):
                formatter.write_dl(groups[title])


def click_type(option: Option) -> click.ParamType | type:
    """The click type of a declaration: a path, a choice, a bounded or plain number, a string."""
    if option.kind is Path:
        return click.Path(path_type=Path)
    if option.choices is not None:
        return click.Choice(list(option.choices))
    if option.kind in (int, float) and (option.low is not None or option.high is not None):
        bounded = click.IntRange if option.kind is int else click.FloatRange
        return bounded(option.low, option.high, min_open=option.low_open, max_open=option.high_open)
    return option.kind


def declared(*names: str, command: str, **overrides: object) -> Callable:
    """Decorator: the click options of the declarations `names`, in that order, spelled as `command`
    spells them; `overrides` go to every one of them (e.g. required=True)."""

    def decorate(function: Callable) -> Callable:
        for name in reversed(names):
            function = click_option(setting(name), command, **overrides)(function)
        return function

    return decorate


def click_option(option: Option, command: str, **overrides: object) -> Callable:
    kwargs: dict[str, object] = {
        "cls": DeclaredOption,
        "section": option.section,
        "hidden_flags": option.aliases,
        "help": option.help,
        "show_default": option.default is not None,
    }
    if option.default is not None:  # an explicit default=None would satisfy click's `required`
        kwargs["default"] = option.default
    if option.kind is not bool:
        kwargs["type"] = click_type(option)
    if option.metavar:
        kwargs["metavar"] = option.metavar
    kwargs.update(overrides)
    return click.option(*option.flags_for(command), *option.aliases, option.name, **kwargs)


def given(ctx: click.Context, names: Iterable[str]) -> dict[str, object]:
    """The values of the options `names` that the user gave (not click's defaults)."""
    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return {name: ctx.params[name] for name in names if ctx.get_parameter_source(name) not in defaults}


def spelled(names: Iterable[str], command: str) -> dict[str, str]:
    """How `command` spells each option, for messages."""
    return {name: setting(name).flag(command) for name in names}
