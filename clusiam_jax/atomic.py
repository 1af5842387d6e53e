"""Writing files so that a crash never leaves a half-written file under its final name."""
import contextlib
import os


@contextlib.contextmanager
def atomic_write(path: str):
    """Yields a temporary path next to `path`, renamed onto it only if the body
    finishes. The temporary name ends in `.tmp<pid>`, which no reader takes for output."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
