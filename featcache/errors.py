"""One exception type for user errors, and the one message shape for unknown names.

Every stage raises :class:`FeatcacheError` for bad input; the CLI prints it as a single
line and exits with status 2 (1 for :class:`NothingWorked`). Nothing here imports torch, so the CLI starts fast.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatcacheError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class DataError(FeatcacheError):
    """A problem with the dataset itself (its files, labels or limits): the same for every backbone, so a
    stage that goes on past one model's failure (``rank``) stops on it instead."""


class BudgetError(FeatcacheError):
    """A ``--memory`` budget the request cannot keep (less than one chunk's work, or a score that reads every row):
    the request's problem, not one model's, so ``rank`` stops on it as on a :class:`DataError`."""


class NothingWorked(FeatcacheError):
    """Every model of a ranking or a choice failed, each for its own reason (said above it): the input was
    well formed but nothing could be done with it, exit status 1 (not 2, a usage error)."""

    exit_code = 1


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return matches[0] if matches else None


def need(module: str, what: str, extra: str = "hub"):
    """Import an optional dependency, or one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FeatcacheError(f"{what} needs the {module} package: pip install 'featcache[{extra}]'") from None


def require(ok: bool, flag: str, value, rule: str) -> None:
    """Raise the one-line error naming ``flag`` and its ``value`` unless ``ok``.

    Example: ``--dropout must lie in [0, 1). Got 1.5 instead.``
    """
    if not ok:
        raise FeatcacheError(f"{flag} must {rule}. Got {value} instead.")


def unknown(option: str, name: str, known: Iterable[str]) -> FeatcacheError:
    """The error for a name that is not one of ``known``.

    Example: ``The '--backbone' option must be one of {mobilenet_v2, resnet18}. Got
    'resnt18' instead; did you mean 'resnet18'?``
    """
    known = sorted(known)
    message = f"The '{option}' option must be one of {{{', '.join(known)}}}. Got '{name}' instead"
    guess = closest(name, known)
    return FeatcacheError(message + (f"; did you mean '{guess}'?" if guess else "."))




def check_choice(option: str, value: str, allowed: Iterable[str]) -> None:
    """Raise the unknown-name error unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise unknown(option, value, allowed)
