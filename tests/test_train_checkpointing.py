"""Atomic checkpoint folders, crash recovery and output-folder protection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.errors import CheckpointError, InputError


def _write(text: str):
    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_text("format: napari-muvit\n")
        (tmp / "data.txt").write_text(text)

    return write


def test_atomic_replace_swaps_complete_folders(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt.atomic_replace_folder(out, _write("one"))
    ckpt.atomic_replace_folder(out, _write("two"))
    assert (out / "data.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt.atomic_replace_folder(out, _write("good"))

    def crash(tmp: Path) -> None:
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_replace_folder(out, crash)
    assert (out / "data.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_recover_after_crash_between_renames(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt.atomic_replace_folder(out, _write("good"))
    os.rename(out, tmp_path / ".run.old-123")  # the crash window: old moved away, new not in
    (tmp_path / ".run.tmp-456").mkdir()
    ckpt.recover_folder(out)
    assert (out / "data.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_train_state_loads_weights_only(tmp_path: Path) -> None:
    state = {
        "step": 3,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}},
        "rng": torch.get_rng_state(),
        "config": {"lr": 1e-4, "levels": [1, 8]},
    }
    ckpt.save_train_state(tmp_path, state)
    loaded = ckpt.load_train_state(tmp_path)
    assert loaded["step"] == 3 and torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(2)
    )
    (tmp_path / ckpt.TRAIN_STATE).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read training state"):
        ckpt.load_train_state(tmp_path)


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
    ckpt.atomic_replace_folder(model, _write("m"))
    with pytest.raises(InputError, match="already holds a model.*--overwrite"):
        ckpt.check_out_folder(model, resume=False, overwrite=False)
    assert ckpt.check_out_folder(model, resume=False, overwrite=True) is False

    run = tmp_path / "run"

    def write_run(tmp: Path) -> None:
        _write("r")(tmp)
        ckpt.save_train_state(tmp, {"step": 4})
        ckpt.save_history(tmp, {"status": "running", "step": 4})

    ckpt.atomic_replace_folder(run, write_run)
    with pytest.raises(InputError, match=r"training run \(unfinished, step 4\).*--resume"):
        ckpt.check_out_folder(run, resume=False, overwrite=False)
    assert ckpt.check_out_folder(run, resume=True, overwrite=False) is True
    assert ckpt.check_out_folder(run, resume=False, overwrite=True) is False
