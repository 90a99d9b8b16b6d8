"""Click options made from a request's fields: the command line writes no flag by hand.

Inside the command line (requests -> **generate** -> commands). Each field becomes one option
(or a positional argument) with its type, default, choices and help; a command's callback
receives the values and :func:`featcache.requests.build` turns them into the request, with the
same checks and messages as the API and pipeline files. Help that lists a registry's entries is
read when ``--help`` is shown, so a head or source registered later is listed too.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import click

from featcache.requests import CLI, Param, base_type, build, params

_TYPES = {int: click.INT, float: click.FLOAT, Path: click.Path(path_type=Path), str: click.STRING}


def _text(value) -> str | None:
    """A default as the command line would spell it: (0.5, 0.5, 0.5) -> "0.5,0.5,0.5"."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return None if value is None else str(value)


class FieldOption(click.Option):
    """An option whose help (and choices) are read from its field each time help is shown."""

    def __init__(self, *args, field: Param, **kwargs):
        super().__init__(*args, **kwargs)
        self.field = field

    def get_help_record(self, ctx):
        self.help = _help(self.field)
        return super().get_help_record(ctx)


def _help(p: Param) -> str:
    """The field's help, and its choices where neither the help nor the metavar shows them."""
    shown = callable(p.meta.help) or (p.meta.choices and not callable(p.meta.choices) and not p.multiple)
    return p.help + (f" [choices: {', '.join(p.choices)}]" if p.meta.choices and not shown else "")


def option_for(p: Param) -> click.Parameter:
    """The click parameter of one request field."""
    required = p.default is dataclasses.MISSING
    if p.meta.argument:
        return click.Argument([p.name], nargs=-1 if p.multiple else 1, required=required,
                              metavar=p.meta.metavar or None)
    names = [f"--{p.flag}", *([p.meta.short] if p.meta.short else []), p.name]
    common = dict(field=p, help=_help(p), required=required)
    if p.is_flag:
        return FieldOption(names, is_flag=True, default=bool(p.default) if not required else False, **common)
    if p.multiple:
        return FieldOption(names, multiple=True, default=() if required else p.default,
                           show_default=bool(p.default) and not required, metavar=p.meta.metavar or None, **common)
    base = base_type(p.hint)
    kind = _TYPES.get(base, click.STRING) if typing.get_origin(base) is not tuple else click.STRING
    metavar = p.meta.metavar or ("[" + "|".join(p.choices) + "]" if p.meta.choices and not callable(p.meta.choices)
                                 else None)
    default = None if required else p.default
    return FieldOption(names, type=kind, default=_text(default) if isinstance(default, tuple) else default,
                       show_default=default is not None, metavar=metavar, **common)


def request_command(name: str, cls, body: Callable, **settings) -> click.Command:
    """The click command ``name`` whose parameters are ``cls``'s fields; ``body(request)`` runs it."""

    def callback(**values):
        return body(build(cls, values, CLI))

    return click.Command(name, callback=callback, params=[option_for(p) for p in params(cls)],
                         help=body.__doc__, **settings)
