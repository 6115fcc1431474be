"""Advisory locks: one napari-muvit writer per prediction store or training folder.

Two runs writing into one store (or one run folder) silently mix their results, so every writer
holds :func:`advisory_lock` on its output for the whole run. A second writer, in another
process or another thread of this one, gets a one-line :class:`LockedError` naming the holder.

Design:

* **Where the lock lives.** A hidden *sibling* file ``.<name>.napari-muvit.lock`` next to the
  protected path (``runs/.S.zarr.napari-muvit.lock`` protects ``runs/S.zarr``), not a file inside
  it: the path may not exist yet when the run starts, and ``--overwrite`` or a checkpoint swap
  may delete and replace the folder during the run; a lock inside would vanish with it. The path
  is resolved first, so ``S.zarr``, ``./S.zarr`` and a symlink to it share one lock.
* **Atomic creation.** The lock's JSON (pid, host, start time, a random token) is written to a
  private temporary file and hard-linked to the lock name: the link fails if the lock exists
  (like ``O_CREAT|O_EXCL``) and the lock is never visible half-written. On a file system
  without hard links the lock is created with ``O_CREAT|O_EXCL`` and written in place (a reader
  then treats an unreadable lock younger than :data:`UNREADABLE_GRACE_S` as held).
* **Stale locks.** A process killed with ``kill -9`` (or a power cut) leaves its lock behind. On
  the same host a lock whose process is gone (or whose pid now belongs to a process started
  later, i.e. a reused pid) is stale and is taken over. To take over, the stale file is renamed
  to a private name first and checked to still hold the stale content, so two processes that
  both find the lock stale cannot both win. A lock from another host (a shared file system)
  cannot be checked: the error says which file to delete if that run is gone.
* **Threads.** A process-wide registry makes a second thread fail like a second process; the
  thread that holds a lock may re-enter it (the CLI and the API it calls both lock the store).
* **Release.** Always on leaving the ``with`` block, exceptions and Ctrl-C included; the file is
  removed only if it still holds this holder's token.

The locks are advisory: they stop napari-muvit runs from colliding, not other programs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_muvit.errors import InputError

LOCK_SUFFIX = ".napari-muvit.lock"
# an unreadable lock file younger than this may still be being written by its creator
UNREADABLE_GRACE_S = 10.0

__all__ = ["LOCK_SUFFIX", "AdvisoryLock", "LockInfo", "LockedError", "advisory_lock", "lock_path", "read_lock"]


class LockedError(InputError):
    """The store or run folder is held by another napari-muvit run (another process/thread)."""

    def __init__(self, message: str, lock_file: Path, holder: LockInfo | None) -> None:
        super().__init__(message)
        self.lock_file = lock_file
        self.holder = holder


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder."""

    pid: int
    host: str
    started: float  # time.time() when the lock was taken
    token: str
    what: str = ""
    pid_start: str | None = None  # the process' start time (Linux), tells a reused pid apart

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, since {since}"


def lock_path(path: str | Path) -> Path:
    """The lock file that protects ``path`` (which need not exist)."""
    resolved = Path(os.path.abspath(path))
    with contextlib.suppress(OSError):
        resolved = resolved.resolve()
    if resolved.name in ("", ".", ".."):
        raise InputError(f"cannot lock {str(path)!r}: it names no file or folder")
    return resolved.with_name(f".{resolved.name}{LOCK_SUFFIX}")


def read_lock(path: str | Path) -> LockInfo | None:
    """The holder of ``path``'s lock, or ``None`` if it is unlocked or the lock is unreadable."""
    return _parse(_read_text(lock_path(path)))


# --------------------------------------------------------------------------------------------
# process liveness
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), ``None`` where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 2 (comm) may contain spaces and parentheses: split after its closing parenthesis
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of the full line


def _process_is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process on Windows
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return not _process_is_zombie(pid)  # killed but not yet reaped by its parent


def _pid_alive_windows(pid: int) -> bool:  # pragma: no cover - exercised on Windows only
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _holder_is_gone(info: LockInfo) -> bool:
    """True if ``info``'s process has certainly ended (it ran on this host)."""
    if info.host != socket.gethostname():
        return False
    if not _pid_alive(info.pid):
        return True
    # the pid is alive: it is still the holder unless the pid was reused by a later process
    return info.pid_start is not None and _process_start(info.pid) not in (None, info.pid_start)


# --------------------------------------------------------------------------------------------
# lock file I/O
# --------------------------------------------------------------------------------------------


def _read_text(file: Path) -> str | None:
    try:
        return file.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def _parse(text: str | None) -> LockInfo | None:
    if not text:
        return None
    try:
        data: dict[str, Any] = json.loads(text)
        return LockInfo(
            pid=int(data["pid"]), host=str(data["host"]), started=float(data["started"]),
            token=str(data["token"]), what=str(data.get("what", "")),
            pid_start=None if data.get("pid_start") is None else str(data["pid_start"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _create_exclusive(file: Path, text: str) -> bool:
    """Create ``file`` holding ``text`` iff it does not exist; False if it does."""
    tmp = file.with_name(f"{file.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with open(tmp, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, file)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network/FAT file systems): exclusive create
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _break_stale(file: Path, seen: str | None) -> None:
    """Remove ``file`` if it still holds the stale content ``seen``.

    It is renamed to a private name first (atomic), so of several processes that found the same
    stale lock only one removes it; if the renamed file turns out to be a fresh lock that another
    process created in between, it is linked back.
    """
    grave = file.with_name(f"{file.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(file, grave)
    except FileNotFoundError:
        return  # someone else broke it
    if _read_text(grave) != seen:
        with contextlib.suppress(OSError):
            os.link(grave, file)
    with contextlib.suppress(OSError):
        grave.unlink()


# --------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------

@dataclass
class _Holding:
    """A lock held by this process: the thread that took it, nesting depth, file token."""

    thread: int
    depth: int
    token: str


_registry_lock = threading.Lock()
_held: dict[Path, _Holding] = {}  # lock file -> holding, for the locks this process holds


def _locked_message(path: str | Path, what: str, file: Path, info: LockInfo | None) -> str:
    if info is None:
        return (f"{what} {path} is locked by another napari-muvit run ({file} exists); wait for "
                f"it or, if no other run is using it, delete {file}")
    holder = info.describe()
    if info.pid == os.getpid() and info.host == socket.gethostname():
        return (f"{what} {path} is in use by another job of this napari-muvit session "
                f"({holder}); wait for it to finish or cancel it")
    return (f"{what} {path} is in use by another napari-muvit run ({holder}); wait for it or, "
            f"if that run is gone, delete {file}")


class AdvisoryLock:
    """The napari-muvit lock of one store or run folder; see :func:`advisory_lock`.

    Use it as a context manager, or call :meth:`acquire` / :meth:`release` when the lock
    outlives one block (a prediction store holds it from creation to ``close()``).
    ``release`` may run on another thread than ``acquire`` and is idempotent.
    """

    def __init__(self, path: str | Path, what: str = "output") -> None:
        self.path = path
        self.what = what
        self.file = lock_path(path)
        self._owner: int | None = None  # thread that acquired (None: not held)

    @property
    def held(self) -> bool:
        return self._owner is not None

    def acquire(self) -> Path:
        """Take the lock (see :func:`advisory_lock`); returns the lock file."""
        if self._owner is not None:
            raise RuntimeError(f"lock of {self.path} is already held by this object")
        file, me = self.file, threading.get_ident()
        with _registry_lock:
            entry = _held.get(file)
            if entry is not None:
                if entry.thread != me:
                    info = _parse(_read_text(file))
                    raise LockedError(_locked_message(self.path, self.what, file, info), file, info)
                entry.depth += 1
                self._owner = me
                return file
            # reserve before touching the disk: other threads now fail
            entry = _held[file] = _Holding(me, 1, secrets.token_hex(8))
        try:
            _acquire(self.path, self.what, file, entry.token)
        except BaseException:
            with _registry_lock:
                _held.pop(file, None)
            raise
        self._owner = me
        return file

    def release(self) -> None:
        """Give the lock back; the lock file goes when the last nested holder releases."""
        if self._owner is None:
            return
        file = self.file
        with _registry_lock:
            self._owner = None
            entry = _held.get(file)
            if entry is None:
                return
            entry.depth -= 1
            if entry.depth > 0:
                return
            # removed under the registry lock: another thread cannot see our file after this
            _held.pop(file, None)
            current = _parse(_read_text(file))
            if current is not None and current.token == entry.token:
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()

    def __enter__(self) -> Path:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def advisory_lock(path: str | Path, what: str = "output") -> AdvisoryLock:
    """The napari-muvit lock of ``path`` (a store or run folder), to use with ``with``.

    ``what`` names the path in the error (e.g. ``"prediction store"``); ``with`` yields the
    lock file. Raises :class:`LockedError` (one line, naming the holder) if another process or
    thread holds it; a lock left by a dead process on this host is taken over. Re-entrant
    within one thread (nested holders share the outermost holder's lock file).
    """
    return AdvisoryLock(path, what)


def _acquire(path: str | Path, what: str, file: Path, token: str) -> None:
    text = json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
        "token": token, "what": what, "pid_start": _process_start(os.getpid()),
    })
    if not file.parent.is_dir():
        raise InputError(f"{what} {path}: its folder {file.parent} does not exist")
    for _ in range(5):  # each retry follows a stale lock removed by this or another process
        try:
            if _create_exclusive(file, text):
                return
        except OSError as exc:
            raise InputError(
                f"{what} {path}: cannot create its lock file {file} "
                f"({exc.strerror or exc}); choose a writable location"
            ) from exc
        seen = _read_text(file)
        if seen is None:
            continue  # released meanwhile
        info = _parse(seen)
        if info is not None:
            if not _holder_is_gone(info):
                raise LockedError(_locked_message(path, what, file, info), file, info)
        else:
            try:
                age = time.time() - file.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < UNREADABLE_GRACE_S:  # possibly still being written by its creator
                raise LockedError(_locked_message(path, what, file, None), file, None)
        _break_stale(file, seen)
    raise LockedError(_locked_message(path, what, file, _parse(_read_text(file))), file, None)
