"""``napari-muvit train`` never loses or mixes a user's files (issue 14): user files in the run
folder survive ``--resume``, a second run on a folder gets a one-line error, kill -9 leaves a
resumable folder without leaked temporaries, and hostile or broken inputs give one line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_muvit
from napari_muvit.cli import main
from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.model import load_model

TINY_RUN = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--device", "cpu", "--quiet"]
# runs with steps (resume, kill, checkpoints): the fine-tuned MLP head, not the default forest
TINY = [*TINY_RUN, "--classifier", "mlp"]
SRC = Path(napari_muvit.__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (96, 96)).astype(np.float32)
    image[40:70, 40:70] += 80
    labels = np.zeros((96, 96), np.int16)
    labels[5:8, 5:30] = 1
    labels[50:53, 45:65] = 2
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path / "image.npy", tmp_path / "labels.npy"


def _train_args(image: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(image), "--labels", str(labels), "--out", str(out), *TINY, *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # exactly one line
    return err


def test_resume_keeps_the_users_files(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    out = tmp_path / "model"
    assert main(_train_args(image, labels, out, "--steps", "2")) == 0
    (out / "NOTES.txt").write_text("my notes")
    (out / "my_predictions.zarr").mkdir()
    (out / "my_predictions.zarr" / "zarr.json").write_text("{}")
    args = _train_args(image, labels, out, "--steps", "4", "--resume",
                       "--checkpoint-every", "1steps")
    assert main(args) == 0
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert (out / "my_predictions.zarr" / "zarr.json").read_text() == "{}"
    assert ckpt.load_train_state(out)["step"] == 4
    # --overwrite starts over, but replaces only napari-muvit's own files
    assert main(_train_args(image, labels, out, "--steps", "1", "--overwrite")) == 0
    assert ckpt.load_train_state(out)["step"] == 1 and (out / "NOTES.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy", "labels.npy", "model"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "napari_muvit", *args]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(SRC) + (os.pathsep + path if path else "")}


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the trainer exited early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 is a POSIX signal")
def test_second_run_is_refused_and_kill_9_leaves_a_resumable_folder(files, tmp_path: Path) -> None:
    image, labels = files
    out = tmp_path / "run"
    first = subprocess.Popen(
        _cli(*_train_args(image, labels, out, "--steps", "100000", "--checkpoint-every", "1steps")),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: (out / "train_state.pt").is_file(), 300, "first checkpoint", first)
        (out / "NOTES.txt").write_text("mine")
        second = subprocess.run(
            _cli(*_train_args(image, labels, out, "--steps", "5", "--resume")),
            env=_env(), capture_output=True, text=True, timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"pid {first.pid}" in second.stderr and "in use by another napari-muvit run" in (
            second.stderr
        )
        assert out.is_dir() and (out / "train_state.pt").is_file()  # never left absent
        time.sleep(0.5)  # let it be in the middle of some checkpoint
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run left its lock and possibly a half-written checkpoint: the next run takes
    # the stale lock over, finishes or undoes that checkpoint and continues
    step = ckpt.load_train_state(out)["step"]
    assert main(_train_args(image, labels, out, "--steps", str(step + 2), "--resume")) == 0
    assert ckpt.load_train_state(out)["step"] == step + 2
    assert (out / "NOTES.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["NOTES.txt", "config.yaml", "history.json", "model.safetensors", "train_state.pt"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy", "labels.npy", "run"]


def test_hostile_init_folders_fail_fast_with_one_line(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    enc = tmp_path / "enc"
    assert main(["pretrain", str(image), "--levels", "1,4", "--out", str(enc), "--steps", "1",
                 *TINY_RUN]) == 0
    config = enc / "config.yaml"
    good = config.read_text()
    bomb = ["  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)
    ]
    config.write_text(good.replace("meta:\n", "meta:\n" + "\n".join(bomb) + "\n", 1))
    # refused by counting aliases before expanding them (expanding took > 150 s and 2.5 GB)
    assert main(_train_args(image, labels, tmp_path / "o", "--init", str(enc))) == 2
    assert "YAML aliases expand to more than" in _error_line(capsys)
    config.write_text(good.replace("  dim: ", "  dim: 65536 #", 1).replace(
        "  num_layers: ", "  num_layers: 64 #", 1))
    assert main(_train_args(image, labels, tmp_path / "o", "--init", str(enc))) == 2
    assert "outside the plausible range" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_bad_labels_are_one_line_errors(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    values = np.load(labels)
    negative = tmp_path / "negative.npy"
    np.save(negative, np.where(values == 2, -1, values).astype(np.int16))
    assert main(_train_args(image, negative, tmp_path / "o")) == 2
    err = _error_line(capsys)
    assert "negative.npy" in err and "negative values" in err and "set them to 0" in err
    single = tmp_path / "single.npy"
    np.save(single, np.where(values == 2, 0, values).astype(np.int16))
    assert main(_train_args(image, single, tmp_path / "o")) == 2
    assert "paint at least two classes" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_refused_train_state_is_one_line(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    out = tmp_path / "run"
    assert main(_train_args(image, labels, out, "--steps", "1")) == 0
    torch.save({"step": 1, "x": _Evil()}, out / "train_state.pt")
    assert main(_train_args(image, labels, out, "--steps", "2", "--resume")) == 2
    err = _error_line(capsys)
    assert "train_state.pt" in err and "refused" in err and "weights_only=False" not in err


def test_full_disk_during_training_says_so(files, tmp_path: Path, capsys, monkeypatch) -> None:
    image, labels = files
    out = tmp_path / "run"
    assert main(_train_args(image, labels, out, "--steps", "2")) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    args = _train_args(image, labels, out, "--steps", "4", "--resume", "--checkpoint-every",
                       "1steps")
    assert main(args) == 2
    err = _error_line(capsys)
    assert f"no space left on {out}" in err and "enforce fail" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # previous checkpoint kept
    monkeypatch.undo()
    assert main(args) == 0 and ckpt.load_train_state(out)["step"] == 4
    assert load_model(out).label_values == [1, 2]
