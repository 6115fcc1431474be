"""CPU thread budgets and the OpenMP wait policy, for GUI jobs, CLI runs and Dask workers.

Two problems make PyTorch slow on a desktop whose cores are also used by other programs:

* **Spin-waiting.** PyTorch's CPU wheels use GNU OpenMP; by default its threads busy-wait at
  every barrier for a partner thread. When the OS has descheduled that partner (another program
  runs on its core) the whole team waits a full time slice: measured 6-10x slower with one busy
  process per core. ``OMP_WAIT_POLICY=PASSIVE`` makes idle OpenMP threads sleep instead. The
  runtime reads it **once, when torch is imported**, so :func:`configure_wait_policy` sets it
  from ``napari_muvit/__init__.py`` (imported before torch by napari, the CLI and
  ``import napari_muvit``) unless the user set a policy, and records whether it came too late.
* **Oversubscription by ourselves.** Training and live prediction in the GUI, or N Dask workers
  on one machine, each using every core. ``torch.set_num_threads`` acts **per OS thread** with
  the OpenMP backend (measured: a value set inside a worker thread is that thread's own and
  does not change the main thread's; threads that never set one take the last value set
  anywhere at their first parallel op). So each job sets its own count in its own thread:
  :func:`thread_budget` for a fixed count, :class:`ThreadShares` to divide the cores among jobs
  that run at the same time, leaving the GUI thread a core.
* **Teams that wait for a descheduled member.** Even with passive waiting, a team of *n*
  threads finishes an operation only when its slowest member does; with another program busy
  on every core each member keeps losing its core, and one thread was up to 2x faster than two
  (docs/benchmarks.md, stop 25). On a quiet machine two are faster. So a job that was given no
  explicit count measures its batches: :class:`ThreadTuner` tries the budget, half of it and
  one thread, uses the fastest, and tries the others again now and then as the load changes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

__all__ = [
    "ThreadShares",
    "ThreadTuner",
    "available_cores",
    "configure_wait_policy",
    "default_threads",
    "thread_budget",
    "wait_policy",
    "worker_threads",
]

#: what :func:`configure_wait_policy` sets: GNU OpenMP (PyTorch's Linux/Windows wheels) reads
#: ``OMP_WAIT_POLICY``; Intel OpenMP (some conda builds) also needs ``KMP_BLOCKTIME=0``.
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: variables that mean "the user chose a wait policy": never overridden
USER_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@dataclass(frozen=True)
class WaitPolicy:
    """What the OpenMP runtime of this process does while it waits.

    ``status``: ``"passive"`` (set by napari-muvit before torch loaded), ``"user"`` (the user's
    own variables, kept), ``"late"`` (torch was imported before napari-muvit: the runtime
    spin-waits; set ``OMP_WAIT_POLICY=PASSIVE`` in the environment or import napari_muvit
    first) or ``"unset"`` (:func:`configure_wait_policy` was not called).
    """

    status: str
    detail: str

    @property
    def short(self) -> str:
        """A few words for the one-line runtime description."""
        return {
            "passive": "passive wait",
            "user": f"wait policy from env ({self.detail})",
            "late": "spin wait (torch imported first)",
        }.get(self.status, "spin wait")


_POLICY = WaitPolicy("unset", "")


def configure_wait_policy(environ: MutableMapping[str, str] | None = None,
                          torch_loaded: bool | None = None) -> WaitPolicy:
    """Make OpenMP threads sleep instead of spin when they wait, if nobody decided otherwise.

    Sets :data:`PASSIVE_ENV` in ``environ`` (default ``os.environ``, which child processes such
    as Dask workers inherit) unless one of :data:`USER_POLICY_VARS` is already set. Returns
    (and remembers, for :func:`wait_policy`) what is in effect. ``torch_loaded`` (default:
    whether ``torch`` is in ``sys.modules``) tells whether the runtime has already read its
    environment, in which case the variables still reach child processes but not this one.
    """
    global _POLICY
    env = os.environ if environ is None else environ
    loaded = ("torch" in sys.modules) if torch_loaded is None else torch_loaded
    user = {k: env[k] for k in USER_POLICY_VARS if env.get(k)}
    if user:
        policy = WaitPolicy("user", ", ".join(f"{k}={v}" for k, v in user.items()))
    else:
        for key, value in PASSIVE_ENV.items():
            env[key] = value
        policy = (WaitPolicy("late", "torch was imported before napari_muvit") if loaded
                  else WaitPolicy("passive", "OMP_WAIT_POLICY=PASSIVE"))
    if environ is None:
        _POLICY = policy
    return policy


def wait_policy() -> WaitPolicy:
    """The wait policy recorded by the last :func:`configure_wait_policy` on ``os.environ``."""
    return _POLICY


# --------------------------------------------------------------------------------------------
# how many cores
# --------------------------------------------------------------------------------------------


def _cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole CPUs allowed by a cgroup-v2 quota (containers), or ``None`` without a quota."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, int(int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def default_threads(reserve: int = 0) -> int:
    """torch threads for one job: every available core but ``reserve`` (at least one).

    With the passive wait policy, all cores were fastest both on an idle machine and with one
    busy process per core (docs/benchmarks.md, contention section); GUI jobs reserve one core
    for the event loop.
    """
    return max(1, available_cores() - max(0, int(reserve)))


def worker_threads(workers: int, cores: int | None = None) -> int:
    """torch threads per worker when ``workers`` processes share one machine (cores // N)."""
    n = available_cores() if cores is None else int(cores)
    return max(1, n // max(1, int(workers)))


# --------------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def thread_budget(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` torch threads **in the calling thread**, then restore.

    ``None`` keeps the current count. Because the count is per OS thread (OpenMP backend), a
    budget taken inside a worker thread does not change the GUI thread's or another job's.
    """
    import torch

    before = torch.get_num_threads()
    wanted = before if threads is None else max(1, int(threads))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class ThreadTuner:
    """The torch thread count of a job's next batch (or step), from measured speed.

    Candidates for a budget of *n* threads: *n*, *n* // 2 and 1. Each is tried once (the
    job's very first measurement is a warm-up and not counted), then the one with the least
    time per tile (a running mean, recent batches weigh half) is used; every
    ``explore_every``-th batch tries one of the others again, so a change of load is noticed
    within a few dozen batches at a cost of one batch in ``explore_every``.
    """

    def __init__(self, explore_every: int = 16) -> None:
        self.explore_every = max(2, int(explore_every))
        self.seconds_per_item: dict[int, float] = {}
        self._chosen = 0
        self._warm = False

    @staticmethod
    def candidates(budget: int) -> list[int]:
        """The counts tried for ``budget`` threads, largest first."""
        budget = max(1, int(budget))
        return sorted({budget, max(1, budget // 2), 1}, reverse=True)

    def choose(self, budget: int) -> int:
        """The count for the next batch (at most ``budget``)."""
        options = self.candidates(budget)
        if len(options) == 1:
            return options[0]
        untried = [n for n in options if n not in self.seconds_per_item]
        if untried:
            return untried[0]
        best = min(options, key=self.seconds_per_item.__getitem__)
        self._chosen += 1
        if self._chosen % self.explore_every:
            return best
        others = [n for n in options if n != best]
        return others[(self._chosen // self.explore_every) % len(others)]

    def apply(self, budget: int) -> int:
        """Set the calling thread's torch count to :meth:`choose`'s; return it."""
        import torch

        n = self.choose(budget)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n

    def record(self, threads: int, seconds: float, items: int) -> None:
        """A batch of ``items`` took ``seconds`` with ``threads`` threads."""
        if items <= 0 or seconds <= 0:
            return
        if not self._warm:  # the first batch builds kernels and thread teams: not a speed
            self._warm = True
            return
        per_item = seconds / items
        old = self.seconds_per_item.get(threads)
        self.seconds_per_item[threads] = per_item if old is None else 0.5 * (old + per_item)

    def best(self) -> int | None:
        """The fastest count measured so far (None before any)."""
        if not self.seconds_per_item:
            return None
        return min(self.seconds_per_item, key=self.seconds_per_item.__getitem__)


class JobThreads:
    """One job's share of a :class:`ThreadShares` pool; call it for the current share."""

    def __init__(self, pool: ThreadShares, name: str, fixed: int | None) -> None:
        self._pool = pool
        self.name = name
        self.fixed = fixed

    def __call__(self) -> int:
        return self.fixed if self.fixed is not None else self._pool.share()

    @property
    def adaptive(self) -> bool:
        """Whether the count may be tuned by speed (no count fixed by the job or the user)."""
        return self.fixed is None and not self._pool.threads

    def apply(self) -> int:
        """Set the current share as the calling thread's torch thread count; return it."""
        import torch

        n = self()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n


class ThreadShares:
    """Divide ``cores - reserve`` torch threads among the jobs running at the same time.

    A GUI holds one pool: training and live prediction each enter :meth:`job` in their worker
    thread and get ``max(1, budget // running jobs)`` threads; a job that calls its
    :class:`JobThreads` again (e.g. between batches) picks up the new share when another job
    starts or ends. ``reserve=1`` leaves the event loop a core. ``threads`` (a user setting)
    overrides the budget.
    """

    def __init__(self, threads: int | None = None, reserve: int = 1,
                 cores: Callable[[], int] = available_cores) -> None:
        self.threads = threads
        self.reserve = reserve
        self._cores = cores
        self._running: dict[int, str] = {}
        self._lock = threading.Lock()
        self._next = 0

    @property
    def budget(self) -> int:
        """Threads shared by all jobs (the user's setting, else cores minus the reserve)."""
        if self.threads:
            return max(1, int(self.threads))
        return max(1, self._cores() - self.reserve)

    def share(self) -> int:
        """Threads of one job now (each running job gets an equal share, at least one)."""
        with self._lock:
            running = max(1, len(self._running))
        return max(1, self.budget // running)

    def running(self) -> list[str]:
        """Names of the jobs holding a share."""
        with self._lock:
            return list(self._running.values())

    @contextlib.contextmanager
    def job(self, name: str, threads: int | None = None) -> Iterator[JobThreads]:
        """Hold a share while the body runs in this thread (its torch count is set and restored).

        ``threads`` fixes this job's count instead of sharing.
        """
        import torch

        with self._lock:
            key = self._next
            self._next += 1
            self._running[key] = name
        handle = JobThreads(self, name, threads)
        before = torch.get_num_threads()
        try:
            handle.apply()
            yield handle
        finally:
            with self._lock:
                self._running.pop(key, None)
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
