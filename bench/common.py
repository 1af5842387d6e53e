"""What every benchmark line carries (machine, versions, command), and CPU-time accounting."""
import json
import os
import platform
import shlex
import sys

_TICKS = os.sysconf('SC_CLK_TCK')


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


def process_tree_cpu_s(root_pid: int) -> float:
    """User+system CPU seconds of root_pid, its live descendants and reaped children."""
    parent, ticks = {}, {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(')') + 2:].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        # utime, stime (+ cutime, cstime of the root: workers that already exited)
        used = int(fields[11]) + int(fields[12])
        if pid == root_pid:
            used += int(fields[13]) + int(fields[14])
        ticks[pid] = used
    tree, todo = {root_pid}, [root_pid]
    while todo:
        current = todo.pop()
        for pid, pp in parent.items():
            if pp == current and pid not in tree:
                tree.add(pid)
                todo.append(pid)
    return sum(ticks.get(p, 0) for p in tree) / _TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq)."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / _TICKS
