"""Errors a user can act on. The CLI prints these without a traceback; anything else is a bug."""


class FedefmError(Exception):
    """Base class for every error caused by input, configuration or files the user controls."""


class DataError(FedefmError, ValueError):
    """A dataset, image or mask is unreadable, inconsistent or empty; the message names the file."""


class ConfigError(FedefmError, ValueError):
    """An option or a combination of options is invalid; the message names the option and the fix."""


class WeightsError(FedefmError, ValueError):
    """A weights file is unreadable, truncated, unsafe or does not match the model."""
