"""The one family of errors the user is meant to read.

Everything that stops a command because of its input (a config key, a data source, a
run directory, a checkpoint, a file to convert, an evaluation input) raises a subclass
of `ClusiamError` whose message is one line naming the culprit and, where there is one,
the fix. The command line (`clusiam_jax.cli`) catches `ClusiamError` once and prints
`error: <message>`; anything else is a bug and keeps its traceback.

This module imports nothing: grain worker processes, which must stay free of JAX, raise
`DataError` too.
"""


class ClusiamError(Exception):
    """Base class: bad input, told in one line."""


class ConfigError(ClusiamError, ValueError):
    """A config (or command-line value) that cannot run; the message names the key."""


class DataError(ClusiamError, ValueError):
    """Input data that cannot be used: a missing or empty source, a bad manifest,
    nothing readable, a splits file that does not fit the export."""


class CheckpointError(ClusiamError):
    """A work directory or checkpoint that cannot be read: no run there, no checkpoint,
    or none that restores."""


class ConversionError(ClusiamError, ValueError):
    """A PyTorch checkpoint or output file that does not map onto our network."""


class NonFiniteError(ClusiamError, FloatingPointError):
    """Training produced NaN/Inf; raised before anything is checkpointed."""


def find_clusiam_error(error: BaseException):
    """The ClusiamError that `error` is or was raised from (`raise ... from`), or None.

    A library that re-raises an input error inside its own (`from`) still gets the user's
    one line. Only explicit causes are followed: a bug raised while a ClusiamError was
    being handled keeps its traceback.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ClusiamError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None
