"""The one family of errors the user reads: bad input stops a command with a
`ClusiamError` whose message is one line naming the culprit and the fix; `cli.main` prints
it as `error: <message>`, anything else keeps its traceback. Imports nothing (grain
workers raise DataError too).
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
    """The ClusiamError that `error` is or was raised from (`raise ... from`: a library
    re-raising our input error), or None; a bug raised while handling one is no cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ClusiamError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None
