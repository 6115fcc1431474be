"""Advisory locks on stores and run folders: real processes, kill -9, threads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from napari_muvit.errors import InputError
from napari_muvit.locks import LockedError, advisory_lock, lock_path, read_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")

HOLDER = """
import sys, time
from napari_muvit.locks import advisory_lock
with advisory_lock(sys.argv[1], "prediction store"):
    print("locked", flush=True)
    time.sleep(120)
"""

CONTENDER = """
import sys
from napari_muvit.locks import advisory_lock, LockedError
try:
    with advisory_lock(sys.argv[1], "prediction store"):
        print("acquired", flush=True)
except LockedError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def _contend(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONTENDER, str(path)], capture_output=True,
                          text=True, env=_env(), timeout=120)


def test_second_process_gets_one_line_error_naming_the_holder(tmp_path) -> None:
    store = tmp_path / "S.zarr"
    holder = _start_holder(store)
    try:
        result = _contend(store)
        assert result.returncode == 3
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"prediction store {store} is in use by another napari-muvit run" in lines[0]
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0]
        assert str(lock_path(store)) in lines[0]  # what to delete if that run is gone
        # this process is refused as well, and the holder's lock is untouched
        with pytest.raises(LockedError, match="in use by another napari-muvit run"):
            with advisory_lock(store, "prediction store"):
                pass
        assert read_lock(store).pid == holder.pid
    finally:
        holder.terminate()
        holder.wait()


def test_lock_of_a_killed_process_is_recovered(tmp_path) -> None:
    store = tmp_path / "S.zarr"
    holder = _start_holder(store)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(store).exists()  # kill -9 left it behind
    result = _contend(store)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "acquired"
    assert not lock_path(store).exists()  # released on exit
    assert not [p for p in tmp_path.iterdir() if p.name != "S.zarr"]  # no temp/grave files left


def test_lock_is_released_on_exit_and_on_exception(tmp_path) -> None:
    store = tmp_path / "out"
    with advisory_lock(store, "training folder") as file:
        info = read_lock(store)
        assert file == lock_path(store) and file.parent == tmp_path
        assert info.pid == os.getpid() and info.what == "training folder"
    assert not file.exists()
    with pytest.raises(RuntimeError):
        with advisory_lock(store):
            raise RuntimeError("boom")
    assert not file.exists()
    with advisory_lock(store):  # free again
        pass


def test_second_thread_is_refused_and_same_thread_may_reenter(tmp_path) -> None:
    store = tmp_path / "S.zarr"
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with advisory_lock(store, "prediction store"):
                pass
        except LockedError as exc:
            errors.append(exc)

    with advisory_lock(store, "prediction store"):
        with advisory_lock(tmp_path / "." / "S.zarr"):  # same path, same thread: re-entrant
            pass
        assert lock_path(store).exists()  # the inner exit did not release the outer lock
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1
    assert "another job of this napari-muvit session" in str(errors[0])
    assert not lock_path(store).exists()
    thread = threading.Thread(target=other_thread)  # released: the thread gets it now
    thread.start()
    thread.join()
    assert len(errors) == 1


def test_many_threads_racing_get_exactly_one_winner(tmp_path) -> None:
    store = tmp_path / "S.zarr"
    barrier = threading.Barrier(6)
    inside = []
    refused = []
    release = threading.Event()

    def worker() -> None:
        barrier.wait()
        try:
            with advisory_lock(store):
                inside.append(1)
                release.wait(10)
        except LockedError:
            refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    while len(inside) + len(refused) < 6 and (len(refused) < 5):
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert (len(inside), len(refused)) == (1, 5)


def _forge(store: Path, **fields) -> Path:
    data = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - 60,
            "token": "forged", "what": "prediction store", "pid_start": None}
    data.update(fields)
    file = lock_path(store)
    file.write_text(json.dumps(data))
    return file


def test_reused_pid_is_stale_but_other_host_is_not(tmp_path) -> None:
    store = tmp_path / "S.zarr"
    # our own pid, but a different process start time: the pid was reused after a crash
    _forge(store, pid_start="1")
    with advisory_lock(store):
        assert read_lock(store).token != "forged"
    # a lock from another machine (shared disk) cannot be checked: refused, naming the file
    file = _forge(store, host="some-other-host", pid=12345)
    with pytest.raises(LockedError, match="pid 12345 on host some-other-host") as err:
        with advisory_lock(store):
            pass
    assert f"delete {file}" in str(err.value)
    assert "\n" not in str(err.value)
    assert file.exists()


def test_unreadable_lock_file_is_held_while_fresh_and_stale_when_old(tmp_path) -> None:
    store = tmp_path / "S.zarr"
    file = lock_path(store)
    file.write_text("")  # a creator that has not written its JSON yet
    with pytest.raises(LockedError, match="is locked by another napari-muvit run"):
        with advisory_lock(store):
            pass
    old = time.time() - 3600
    os.utime(file, (old, old))
    with advisory_lock(store):
        pass
    assert not file.exists()


def test_lock_in_a_missing_or_readonly_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        with advisory_lock(tmp_path / "nope" / "S.zarr", "prediction store"):
            pass
    if os.geteuid() == 0:
        return  # root writes anywhere: the read-only case cannot be produced
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot create its lock file"):
            with advisory_lock(ro / "S.zarr"):
                pass
    finally:
        ro.chmod(0o700)


def test_nested_holders_release_in_any_order(tmp_path) -> None:
    from napari_muvit.locks import AdvisoryLock

    store = tmp_path / "S.zarr"
    outer = AdvisoryLock(store, "prediction store")
    inner = AdvisoryLock(store, "prediction store")
    outer.acquire()
    inner.acquire()  # e.g. the store object re-enters the lock the API call took
    outer.release()
    assert lock_path(store).exists()  # still held by the inner holder
    inner.release()
    assert not lock_path(store).exists()
    inner.release()  # idempotent
    # released from another thread than the one that acquired (a store closed by a worker)
    outer.acquire()
    thread = threading.Thread(target=outer.release)
    thread.start()
    thread.join()
    assert not lock_path(store).exists()
    with advisory_lock(store):
        pass
