"""Errors a user can act on. The CLI prints these (and OS errors, and a missing optional extra) as one line
without a traceback; anything else is a bug."""

import difflib
from collections.abc import Iterable


class FedefmError(Exception):
    """Base class for every error caused by input, configuration or files the user controls."""


class DataError(FedefmError, ValueError):
    """A dataset, image or mask is unreadable, inconsistent or empty; the message names the file."""


class ConfigError(FedefmError, ValueError):
    """An option or a combination of options is invalid; the message names the option and the fix."""


class WeightsError(FedefmError, ValueError):
    """A weights file is unreadable, truncated, unsafe or does not match the model."""


def choose(option: str, value: str, known: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``known``, else raise ConfigError with a did-you-mean hint."""
    known = list(known)
    if value in known:
        return value
    close = difflib.get_close_matches(str(value), known, n=1) or [k for k in known if k.startswith(str(value))][:1]
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"{option} {value}: {hint}Known: {', '.join(known)}")
