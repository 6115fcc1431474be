"""A loaded desktop for benchmarks: one busy process per core, started and stopped here.

Shared by ``bench_predict.py`` (contention section) and ``bench_ui.py``. The busy processes
are plain ``python -c "while True: pass"`` loops, like a browser tab or another program
spinning; they are killed by their own pids when the ``with`` block ends, even on errors.

Two kinds of busy (``LOADS``): ``busy`` starts them in this process's session, so on Linux
every thread of the benchmark and every busy loop compete one by one for the cores;
``desktop`` starts each in a session of its own, as another program on a desktop runs (a
browser, a second terminal's job): with the kernel's autogroups (``/proc/sys/kernel/
sched_autogroup_enabled``) or a desktop's per-application cgroups, the scheduler then shares
the CPU between sessions first and between the threads of each session second.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

BUSY_CODE = "while True: pass"
LOADS = ("idle", "busy", "desktop")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def busy_cores(n: int | None = None, own_sessions: bool = False) -> Iterator[list[int]]:
    """Run ``n`` (default: one per core) busy Python loops for the duration of the block
    (``own_sessions``: each in a session of its own, see the module's docstring)."""
    count = cores() if n is None else int(n)
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE], start_new_session=own_sessions)
             for _ in range(count)]
    time.sleep(0.5)  # let the scheduler see them
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def load_context(load: str) -> Any:
    """The ``with`` block of a load kind (see ``LOADS``): nothing, or the busy loops."""
    if load == "idle":
        return contextlib.nullcontext([])
    if load not in LOADS:
        raise ValueError(f"unknown load {load!r}: choose one of {', '.join(LOADS)}")
    return busy_cores(own_sessions=load == "desktop")


def autogroups() -> bool | None:
    """Whether the kernel shares the CPU between sessions first (None: not Linux / unknown)."""
    try:
        return open("/proc/sys/kernel/sched_autogroup_enabled").read().strip() == "1"
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What a result row needs to be read later: CPU, flags that matter, load averages."""
    from napari_muvit.engine.hardware import cpu_capabilities

    caps = cpu_capabilities()
    return {"cores": cores(), "loadavg": list(os.getloadavg()), "autogroups": autogroups(),
            **caps.as_dict()}
