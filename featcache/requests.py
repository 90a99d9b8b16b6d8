"""The field machinery every stage's request is made of: one declaration per flag.

Below every stage, beside errors and registry. A request is a frozen dataclass whose fields
are declared with :func:`option`: type (the annotation), default, constraint, choices and
help text. From those fields alone come the command line's click options (``cli.generate``),
a pipeline file's keys (``featcache.pipeline``) and the Python API's keyword arguments
(``featcache.api``): a flag is written once. :func:`build` is the one validator: it turns
values from any of the three fronts into a request, and its messages name the value the
user gave as that front spells it (``--image-size`` on the command line, ``image_size`` in
Python, ``image-size`` in a pipeline file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import FeatcacheError, closest

META = "featcache"


@dataclass(frozen=True)
class Meta:
    """What a field says about itself beyond its type and default.

    Args:
        help: the one help text (``--help``, the API's docstring); a callable is read when help is shown
            (a registry's entries, which plug-ins add to).
        flag: the command line's long name without dashes [default: the field's name with dashes].
        short: a short flag such as ``-q``.
        choices: the names allowed, or a callable giving them (a registry's keys).
        check: ``value -> bool``; ``rule`` completes "FLAG must ..." when it is false.
        split: a tuple field whose values may also be comma-separated (``--head logreg,svm``).
        metavar: how ``--help`` shows the value.
        argument: positional on the command line (``RUN...``).
        shared: a shared pipeline file may set it (False: only a person, on the command line or in Python).
        writes: a path featcache writes to (a shared pipeline file may only name one below the folder it runs
            in).
    """

    help: str | Callable[[], str] = ""
    flag: str = ""
    short: str = ""
    choices: tuple | Callable[[], Iterable[str]] = ()
    check: Callable[[object], bool] | None = None
    rule: str = ""
    split: bool = False
    metavar: str = ""
    argument: bool = False
    shared: bool = True
    writes: bool = False


def option(default=dataclasses.MISSING, *, help, **meta):
    """A request field: ``image_size: int | None = option(None, help="...", check=..., rule="...")``.

    A list or tuple default is stored as a tuple (requests are frozen and hashable).
    """
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={META: Meta(help=help, **meta)})


# --- the checks and options every stage shares, declared once ----------------------------------------------


def at_least(n: int, rule: str | None = None) -> dict:
    """The one lower-bound check of a whole number: ``option(64, **at_least(1), help=...)``."""
    return {"check": lambda v: v >= n, "rule": rule or ("be 0 or more" if n == 0 else f"be at least {n}")}


FRACTION = {"check": lambda v: 0 < v < 1, "rule": "lie between 0 and 1"}
QUIET = "No progress bars (from Python: nothing printed at all)."


def quiet_option():
    """``--quiet``/``-q``: the same flag in every stage that shows progress."""
    return option(False, short="-q", help=QUIET)


def device_option(help: str, default: str = "auto"):
    """``--device``: where a stage runs its networks or solvers (the one rule: :mod:`featcache.device`)."""
    from featcache.device import DEVICES

    return option(default, choices=DEVICES, help=help)


def runs_dir_option(help: str, writes: bool = True):
    """``--runs-dir``: where run folders are written (or, for a stage that only reads them, read)."""
    return option(Path("runs"), writes=writes, help=help)


@dataclass(frozen=True)
class Param:
    """One field of a request as the fronts see it."""

    name: str  # the field's (and the API keyword's) name
    hint: object  # the resolved type
    default: object
    meta: Meta

    @property
    def flag(self) -> str:
        """The long flag / pipeline key, without dashes: ``image-size``."""
        return self.meta.flag or self.name.replace("_", "-")

    @property
    def help(self) -> str:
        return self.meta.help() if callable(self.meta.help) else self.meta.help

    @property
    def choices(self) -> tuple[str, ...]:
        c = self.meta.choices
        return tuple(c() if callable(c) else c)

    @property
    def is_flag(self) -> bool:
        return base_type(self.hint) is bool

    @property
    def multiple(self) -> bool:
        """Repeatable on the command line: a tuple of free-form strings."""
        args = typing.get_args(base_type(self.hint))
        return typing.get_origin(base_type(self.hint)) is tuple and args[-1:] == (Ellipsis,) and args[0] is str


class Front:
    """How one front spells a field, for messages: the command line, Python or a pipeline file."""

    def __init__(self, name: str, spell: Callable[[Param], str]):
        self.name, self.spell = name, spell

    def __repr__(self):
        return f"Front({self.name})"


CLI = Front("cli", lambda p: f"--{p.flag}")
API = Front("api", lambda p: p.name)
PIPELINE = Front("pipeline", lambda p: p.flag)


@functools.cache
def params(cls) -> tuple[Param, ...]:
    """Every field of the request class ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple(Param(f.name, hints[f.name], f.default, f.metadata[META])
                 for f in dataclasses.fields(cls) if META in f.metadata)


def base_type(hint):
    """``X | None`` -> X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _optional(hint) -> bool:
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return union and type(None) in typing.get_args(hint)


class InvalidValue(Exception):
    """A value that is not of its field's type; ``what`` says what was expected ("a valid integer")."""

    def __init__(self, what: str):
        self.what = what


_KIND = {int: "a valid integer", float: "a valid number", str: "a string", Path: "a path", bool: "true or false"}


def _scalar(value, kind):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise InvalidValue(_KIND[bool])
    if kind in (int, float):
        if isinstance(value, str):  # from the command line or --set: the text of a number
            with contextlib.suppress(ValueError):
                return kind(value.strip())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is float or isinstance(value, int) or value.is_integer():  # 3.0 is a whole number, 3.5 is not
                return kind(value)
        raise InvalidValue(_KIND[kind])
    if kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise InvalidValue(_KIND[Path])
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # images, runs: what one call returned, the next takes
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a pipeline's combos = 3 means "3"
        raise InvalidValue(_KIND[str])
    raise TypeError(f"featcache.requests cannot read a field of type {kind!r}")


def convert(p: Param, value):
    """A value from any front -> the field's type; raises InvalidValue with what was expected."""
    hint = base_type(p.hint)
    if value is None:
        if _optional(p.hint):
            return None
        raise InvalidValue(_KIND.get(hint, "a value"))
    if typing.get_origin(hint) is not tuple:
        return _scalar(value, hint)
    args = typing.get_args(hint)
    kind = args[0]
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if p.meta.split or kind is not str:  # numbers always come comma-separated in one string
        items = [piece.strip() if isinstance(piece, str) else piece for item in items
                 for piece in (item.split(",") if isinstance(item, str) else [item])]
        items = [i for i in items if i != ""]
    try:
        out = tuple(_scalar(i, kind) for i in items)
    except InvalidValue:
        raise InvalidValue(_tuple_kind(args)) from None
    if args[-1:] != (Ellipsis,) and len(out) != len(args):
        raise InvalidValue(_tuple_kind(args))
    return out


def _tuple_kind(args) -> str:
    kind = {int: "whole numbers", float: "numbers", str: "names"}[args[0]]
    if args[-1:] == (Ellipsis,):
        return f"comma-separated {kind} such as {'1,5,10' if args[0] is int else '0.01,0.1,1' if args[0] is float else 'a,b'}"
    return f"{len(args)} comma-separated {kind} such as {','.join(['0.5'] * len(args))}"


def shown(value) -> str:
    """A value as a message quotes it: ``'big'``, ``1.5``, ``(1, 2)``."""
    return repr(value) if isinstance(value, str) else str(value)


def check(p: Param, value, front: Front) -> None:
    """The field's own constraint and choices; the message names the value as ``front`` spells the field."""
    name = front.spell(p)
    choices = p.choices
    if choices and value is not None:
        for item in (value if isinstance(value, tuple) else (value,)):
            if item not in choices:
                raise unknown_value(name, item, choices)
    if p.meta.check is not None and value is not None and not p.meta.check(value):
        raise FeatcacheError(f"{name} must {p.meta.rule}. Got {shown(value)} instead.")
    if p.meta.writes and value is not None:
        _writable(name, Path(value), folder=p.name.endswith("_dir"))


def _writable(name: str, path: Path, folder: bool) -> None:
    """A folder option (``--runs-dir``) must not name a file, a file option (``--output``) must not name a
    folder, and neither may sit below a file: one line before anything runs."""
    if folder and path.exists() and not path.is_dir():
        raise FeatcacheError(f"{name} {path} is a file, not a folder: give a folder")
    if not folder and path.is_dir():
        raise FeatcacheError(f"{name} {path} is a folder: give a file name")
    for parent in path.parents if not folder else (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise FeatcacheError(f"{name} {path}: {parent} is a file, so nothing can be written below it")
            break


def unknown_value(name: str, value, known) -> FeatcacheError:
    """The one message for a value outside its choices (errors.unknown's shape)."""
    known = sorted(known)
    guess = closest(str(value), known)
    return FeatcacheError(f"The '{name}' option must be one of {{{', '.join(known)}}}. Got '{value}' instead"
                          + (f"; did you mean '{guess}'?" if guess else "."))


def respell(message: str, cls, front: Front) -> str:
    """A message a stage wrote with command-line flags (``--image-size``), in ``front``'s spelling."""
    if front is CLI:
        return message
    flags = {f"--{p.flag}": front.spell(p) for p in params(cls)}
    return re.sub(r"--[a-z][a-z0-9-]*", lambda m: flags.get(m.group(0), m.group(0)), message)


def build(cls, values: dict, front: Front, where: str = ""):
    """The request ``cls`` from ``values`` (field name -> value as the front gave it), validated.

    Unknown names, values of the wrong type, out-of-range values and the request's own
    cross-field checks all raise one :class:`FeatcacheError` naming the value as ``front``
    spells its field (``where`` prefixes the message, e.g. a pipeline file and table).
    """
    prefix = f"{where}: " if where else ""
    known = {p.name: p for p in params(cls)}
    kwargs = {}
    for name, value in values.items():
        p = known.get(name)
        if p is None:
            spelled = {front.spell(q): q for q in known.values()}
            guess = closest(name, spelled)
            raise FeatcacheError(f"{prefix}unknown {'keyword' if front is API else 'key' if front is PIPELINE else 'option'} "
                                 f"'{name}'" + (f"; did you mean '{guess}'?" if guess else
                                                f" (known: {', '.join(sorted(spelled))})"))
        try:
            converted = convert(p, value)
        except InvalidValue as exc:
            raise FeatcacheError(f"{prefix}Invalid value for '{front.spell(p)}': {shown(value)} is not {exc.what}") from None
        try:
            check(p, converted, front)
        except FeatcacheError as exc:
            raise FeatcacheError(prefix + str(exc)) from None
        kwargs[name] = converted
    missing = [p for p in known.values() if p.default is dataclasses.MISSING and p.name not in kwargs]
    if missing:
        raise FeatcacheError(f"{prefix}missing {', '.join(repr(front.spell(p)) for p in missing)}")
    try:
        return cls(**kwargs)
    except FeatcacheError as exc:
        raise FeatcacheError(prefix + respell(str(exc), cls, front)) from None


def changed(request) -> dict:
    """Field name -> value for every field of ``request`` that differs from its default."""
    return {p.name: getattr(request, p.name) for p in params(type(request))
            if getattr(request, p.name) != p.default}


def request_hash(value, length: int = 16) -> str:
    """The one hash of what a result depends on (a run's request, a sweep's folder, a pipeline stage, an
    unfinished fine-tune): SHA-256 of its JSON with sorted keys (paths and other objects as text), cut to
    ``length`` hex digits. Stable across featcache versions: run folders, sweep folders and ledgers name
    their results by it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def signature(cls):
    """An ``inspect.Signature`` of keyword-only parameters, one per field: what ``help()`` and a notebook's
    completion show for an API function made from ``cls``."""
    import inspect

    return inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY,
                          default=inspect.Parameter.empty if p.default is dataclasses.MISSING else p.default,
                          annotation=p.hint)
        for p in params(cls)])


def docs(cls) -> str:
    """One line per field, for an API function's docstring."""
    lines = []
    for p in params(cls):
        choices = f" One of: {', '.join(p.choices)}." if p.meta.choices and not callable(p.meta.choices) else ""
        default = "" if p.default is dataclasses.MISSING else f" [default: {p.default!r}]"
        lines.append(f"    {p.name}: {p.help}{choices}{default}")
    return "\n".join(lines)


def carried_fields(target: type, request) -> list[str]:
    """The fields of ``target`` (a runner's config) that ``request`` has by name: what :func:`carried` copies."""
    own = {f.name for f in dataclasses.fields(request)}
    return [f.name for f in dataclasses.fields(target) if f.name in own]


def carried(target: type, request, **given):
    """The one rule by which a request becomes what its runner takes: every field of ``target`` that the request
    has by name is the request's value, as :func:`build` checked it; ``given`` holds what the stage derives (the
    feature config, a field the runner names otherwise, a resolved path). Nothing is copied by hand, so a field
    added to both is carried without a line more."""
    values = {name: getattr(request, name) for name in carried_fields(target, request) if name not in given}
    return target(**values, **given)
