"""What every benchmark line carries: the machine, the versions and the command."""
import json
import os
import platform
import shlex
import sys


def machine_info():
    import jax
    info = {
        'machine': platform.machine(), 'cpu_count': os.cpu_count(),
        'python': platform.python_version(), 'jax': jax.__version__,
        'backend': jax.default_backend(), 'devices': jax.device_count(),
        'device_kind': jax.devices()[0].device_kind,
        'command': ' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        import flax
        info['flax'] = flax.__version__
    except ImportError:
        pass
    return info


def emit(record: dict):
    """One JSON line on stdout (flushed: benchmarks are read while they run)."""
    print(json.dumps(record), flush=True)
