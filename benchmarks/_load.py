"""A loaded desktop for benchmarks: one busy process per core, started and stopped here.

Shared by ``bench_predict.py`` (contention section) and ``bench_ui.py``. The busy processes
are plain ``python -c "while True: pass"`` loops, like a browser tab or another program
spinning; they are killed by their own pids when the ``with`` block ends, even on errors.
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


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def busy_cores(n: int | None = None) -> Iterator[list[int]]:
    """Run ``n`` (default: one per core) busy Python loops for the duration of the block."""
    count = cores() if n is None else int(n)
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE]) for _ in range(count)]
    time.sleep(0.5)  # let the scheduler see them
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def machine() -> dict[str, Any]:
    """What a result row needs to be read later: CPU, flags that matter, load averages."""
    from napari_muvit.engine.hardware import cpu_capabilities

    caps = cpu_capabilities()
    return {"cores": cores(), "loadavg": list(os.getloadavg()), **caps.as_dict()}
