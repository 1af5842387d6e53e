"""The errors the user reads: bad input stops a command with a one-line `ClusiamError`
(`cli.main` prints `error: <message>`; anything else keeps its traceback). Imports nothing."""


class ClusiamError(Exception):
    """Base class: bad input, told in one line."""


class ConfigError(ClusiamError, ValueError):
    """A config (or command-line value) that cannot run; the message names the key."""


class DataError(ClusiamError, ValueError):
    """Input data that cannot be used (missing, empty, unreadable, not fitting)."""


class CheckpointError(ClusiamError):
    """A work directory or checkpoint that cannot be read."""


class ConversionError(ClusiamError, ValueError):
    """A PyTorch checkpoint or output file that does not map onto our network."""


class NonFiniteError(ClusiamError, FloatingPointError):
    """Training produced NaN/Inf; raised before anything is checkpointed."""


def find_clusiam_error(error: BaseException):
    """The ClusiamError `error` is or was raised from (`__cause__` only), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ClusiamError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None
