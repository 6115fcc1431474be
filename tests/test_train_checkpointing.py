"""The one atomic writer (model/_atomic.py), crash recovery and output-folder protection."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.errors import CheckpointError, InputError
from napari_muvit.model import _atomic
from napari_muvit.model.checkpoint import OWNED_FILES

OWNED = ("config.yaml", "model.safetensors", "history.json", "train_state.pt")


def _writers(tag: str, names=OWNED):
    def make(name):
        def write(path: Path) -> None:
            text = "format: napari-muvit\n" if name == "config.yaml" else ""
            path.write_text(f"{text}# {tag} {name}\n")

        return write

    return {name: make(name) for name in names}


def _state(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


def test_commit_replaces_only_owned_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _atomic.commit_files(out, _writers("one"), OWNED_FILES)
    (out / "NOTES.txt").write_text("mine")
    (out / "my_predictions.zarr").mkdir()
    (out / "my_predictions.zarr" / "0").write_text("chunk")
    _atomic.commit_files(out, _writers("two", OWNED[:3]), OWNED_FILES)
    state = _state(out)
    assert state["NOTES.txt"] == "mine"
    assert (out / "my_predictions.zarr" / "0").read_text() == "chunk"
    assert all("two" in state[n] for n in OWNED[:3])
    assert "train_state.pt" not in state  # owned, not written: removed in the same commit
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["NOTES.txt", "my_predictions.zarr", *OWNED[:3]]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_write_leaves_previous_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _atomic.commit_files(out, _writers("good"), OWNED_FILES)
    writers = _writers("bad")

    def crash(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("boom")

    writers["train_state.pt"] = crash
    before = _state(out)
    with pytest.raises(RuntimeError, match="boom"):
        _atomic.commit_files(out, writers, OWNED_FILES)
    assert _state(out) == before


def test_full_disk_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _atomic.commit_files(out, _writers("good"), OWNED_FILES)
    writers = _writers("new")

    def torch_full(path: Path) -> None:  # what torch.save raises on ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    writers["train_state.pt"] = torch_full
    with pytest.raises(CheckpointError, match=f"no space left on {out}") as info:
        _atomic.commit_files(out, writers, OWNED_FILES)
    assert "\n" not in str(info.value) and "enforce" not in str(info.value)
    assert all("good" in t for n, t in _state(out).items())


def test_a_wrapped_write_error_on_a_full_disk_is_reported_as_full(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    out = tmp_path / "run"
    _atomic.commit_files(out, _writers("good"), OWNED_FILES)
    writers = _writers("new")

    def torch_full(path: Path) -> None:  # torch.save's message on a full tmpfs
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 827456 "
                           "vs 827344")

    writers["train_state.pt"] = torch_full
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(8 << 20, 8 << 20, 4096))
    with pytest.raises(CheckpointError, match="no space left on"):
        _atomic.commit_files(out, writers, OWNED_FILES)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room left: as it is
        _atomic.commit_files(out, writers, OWNED_FILES)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulating kill -9 needs os.fork")
def test_kill_at_every_moment_of_a_commit_leaves_old_or_new(tmp_path: Path) -> None:
    """A child process commits and dies (os._exit, like kill -9) at the n-th file-system step;
    after recovery the folder holds the complete old set or the complete new set."""
    old, new = _writers("old"), _writers("new")
    outcomes = set()
    for n in range(1, 40):
        out = tmp_path / f"run{n}"
        _atomic.commit_files(out, old, OWNED_FILES)
        (out / "NOTES.txt").write_text("mine")
        pid = os.fork()
        if pid == 0:  # child: die at the n-th write/fsync/rename, leaving everything as is
            calls = [0]

            def step(fn):
                def wrapped(*a, **k):
                    calls[0] += 1
                    if calls[0] == n:
                        os._exit(9)
                    return fn(*a, **k)

                return wrapped

            os.replace, os.fsync, os.unlink = step(os.replace), step(os.fsync), step(os.unlink)
            try:
                _atomic.commit_files(out, new, OWNED_FILES)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.waitstatus_to_exitcode(status) == 9
        # a reader that does not write sees one complete set, before any recovery
        seen = {name: _atomic.committed_path(out, name).read_text() for name in OWNED}
        assert len({"old" if "old" in t else "new" for t in seen.values()}) == 1, (n, seen)
        _atomic.recover_files(out)
        state = _state(out)
        assert state.pop("NOTES.txt") == "mine"
        assert sorted(state) == sorted(OWNED), (n, sorted(state))
        versions = {"old" if "old" in text else "new" for text in state.values()}
        assert len(versions) == 1 and versions <= {"old", "new"}, (n, state)
        assert seen == {name: state[name] for name in OWNED}, n  # the reader saw the outcome
        outcomes.add((killed, versions.pop()))
        if not killed:
            break
    # the sweep saw kills that kept the old set, kills that completed the new one, and the end
    assert {(True, "old"), (True, "new"), (False, "new")} <= outcomes


def test_reader_follows_a_pending_journal(tmp_path: Path) -> None:
    out = tmp_path / "m"
    _atomic.commit_files(out, _writers("old"), OWNED_FILES)
    (out / ".config.yaml.tmp-1-ab").write_text("new config")
    (out / _atomic.JOURNAL).write_text(
        '{"token": "1-ab", "replace": {"config.yaml": ".config.yaml.tmp-1-ab"}, '
        '"remove": ["train_state.pt"]}'
    )
    assert _atomic.committed_path(out, "config.yaml").read_text() == "new config"
    assert _atomic.committed_path(out, "train_state.pt") is None
    assert "old" in _atomic.committed_path(out, "history.json").read_text()
    _atomic.recover_files(out)
    assert (out / "config.yaml").read_text() == "new config"
    assert not (out / "train_state.pt").exists() and not (out / _atomic.JOURNAL).exists()


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_recovery_removes_leaked_temporaries_of_dead_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _atomic.commit_files(out, _writers("good"), OWNED_FILES)
    dead, alive = _dead_pid(), os.getpid()
    # what older versions leaked beside the folder when killed during a checkpoint
    leaked = [f".run.tmp-{dead}-1a2b3c4d", f"..run.tmp-{dead}-1a2b3c4d.tmp-k_3x9q",
              f".run.old-{dead}-0f0f0f0f"]
    kept = [f".run.tmp-{alive}-99999999", ".other.tmp-1-00000000"]
    for name in leaked + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("x")
    (out / f".model.safetensors.tmp-{dead}-abcdef12").write_text("half")  # in-folder temp
    ckpt.recover_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", *kept])
    assert sorted(p.name for p in out.iterdir()) == sorted(OWNED)


def test_legacy_crash_between_renames_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _atomic.commit_files(out, _writers("good"), OWNED_FILES)
    os.rename(out, tmp_path / f".run.old-{_dead_pid()}-12345678")
    ckpt.recover_folder(out)
    assert "good" in (out / "model.safetensors").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_train_state_loads_weights_only(tmp_path: Path) -> None:
    state = {
        "step": 3,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}},
        "rng": torch.get_rng_state(),
        "config": {"lr": 1e-4, "levels": [1, 8]},
    }
    torch.save(state, tmp_path / ckpt.TRAIN_STATE)
    loaded = ckpt.load_train_state(tmp_path)
    assert loaded["step"] == 3 and torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(2)
    )
    (tmp_path / ckpt.TRAIN_STATE).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read training state"):
        ckpt.load_train_state(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_refused_train_state_is_one_line_without_unsafe_advice(tmp_path: Path) -> None:
    torch.save({"step": 1, "payload": _Evil()}, tmp_path / ckpt.TRAIN_STATE)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_train_state(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message
    assert str(tmp_path / ckpt.TRAIN_STATE) in message and "refused" in message


def test_out_folder_rules(tmp_path: Path) -> None:
    assert ckpt.check_out_folder(tmp_path / "new", resume=False, overwrite=False) is False
    assert ckpt.check_out_folder(tmp_path / "new", resume=True, overwrite=False) is False
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ckpt.check_out_folder(empty, resume=False, overwrite=False) is False

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for resume, overwrite in [(False, False), (True, False), (False, True)]:
        with pytest.raises(InputError, match="not a napari-muvit model folder"):
            ckpt.check_out_folder(user, resume=resume, overwrite=overwrite)

    model = tmp_path / "model"
    _atomic.commit_files(model, _writers("m", OWNED[:2]), OWNED_FILES)
    with pytest.raises(InputError, match="already holds a model.*--overwrite"):
        ckpt.check_out_folder(model, resume=False, overwrite=False)
    assert ckpt.check_out_folder(model, resume=False, overwrite=True) is False

    run = tmp_path / "run"
    writers = _writers("r", OWNED[:2])
    writers["history.json"] = lambda p: p.write_text('{"status": "running", "step": 4}')
    writers["train_state.pt"] = lambda p: torch.save({"step": 4}, p)
    _atomic.commit_files(run, writers, OWNED_FILES)
    with pytest.raises(InputError, match=r"training run \(unfinished, step 4\).*--resume"):
        ckpt.check_out_folder(run, resume=False, overwrite=False)
    assert ckpt.check_out_folder(run, resume=True, overwrite=False) is True
    assert ckpt.check_out_folder(run, resume=False, overwrite=True) is False


def test_hostile_config_in_an_out_folder_is_foreign_not_a_hang(tmp_path: Path) -> None:
    out = tmp_path / "bomb"
    out.mkdir()
    lines = ["format: napari-muvit", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (out / "config.yaml").write_text("\n".join(lines) + "\n")  # 10^9 values when expanded
    assert ckpt.folder_kind(out) == "foreign"
