"""One small exception hierarchy for the whole project.

The runtime maps these to gRPC status codes in one place (issue 4); the CLI prints them as
one-line errors. Every message names the problem and, where there is a choice, the valid values.
"""


class WaraError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(WaraError, ValueError):
    """An invalid option: config field, CLI flag, wavelet, mode, shape constraint."""


class AdapterError(WaraError, ValueError):
    """An adapter artifact is malformed: missing file or key, wrong shape, NaN/Inf, bad version."""


class IncompatibleAdapterError(AdapterError):
    """A well-formed adapter that does not fit this base model (fingerprint, shapes, modules)."""
