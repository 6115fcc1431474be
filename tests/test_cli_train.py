"""``napari-muvit train`` / ``pretrain`` command lines (run in-process: no interpreter start-up)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from napari_muvit.cli import main
from napari_muvit.cli.train import ProgressLine, parse_interval
from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.errors import InputError
from napari_muvit.model import MuViTMAE, MuViTSegmenter, load_model


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (96, 96)).astype(np.float32)
    image[40:70, 40:70] += 80
    labels = np.zeros((96, 96), np.uint8)
    labels[5:8, 5:30] = 1
    labels[50:53, 45:65] = 2
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path / "image.npy", tmp_path / "labels.npy"


TINY = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--device", "cpu", "--quiet"]


def test_train_resume_and_protection(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    out = tmp_path / "model"
    # fine-tuning runs resume: the MLP pixel head (a forest has no steps; tested below)
    args = ["train", str(image), "--labels", str(labels), "--out", str(out), *TINY,
            "--classifier", "mlp"]
    assert main([*args, "--steps", "2", "--checkpoint-every", "1steps"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model = load_model(out)
    assert isinstance(model, MuViTSegmenter) and model.label_values == [1, 2]
    # file names only: a model folder must not carry this machine's paths
    provenance = ckpt.load_history(out)["provenance"]
    assert provenance["images"] == [image.name] and provenance["labels"] == [labels.name]
    assert str(tmp_path) not in (out / "config.yaml").read_text()
    assert str(tmp_path) not in (out / "history.json").read_text()
    # existing run, no --resume: one-line error, exit 2, nothing touched
    assert main([*args, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume" in err and "--overwrite" in err
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert ckpt.load_train_state(out)["step"] == 3
    assert ckpt.load_history(out)["steps"] == [1, 2, 3]


def test_train_bad_input_is_one_line(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((50, 96), np.uint8))
    code = main(["train", str(image), "--labels", str(wrong), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "level-1 shape (96, 96)" in err and err.count("\n") == 1
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((96, 96), np.uint8))
    assert (
        main(["train", str(image), "--labels", str(empty), "--out", str(tmp_path / "o"), *TINY])
        == 2
    )
    assert "no annotated" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                str(image),
                "--labels",
                str(labels),
                str(labels),
                "--out",
                str(tmp_path / "o"),
                *TINY,
            ]
        )
        == 2
    )
    assert "one label image per IMAGE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pretrain_then_train_from_it(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    mae = tmp_path / "mae"
    assert (
        main(["pretrain", str(image), "--levels", "1,4", "--out", str(mae), "--steps", "2", *TINY])
        == 0
    )
    assert isinstance(load_model(mae), MuViTMAE)
    seg = tmp_path / "seg"
    assert (
        main(
            [
                "train",
                str(image),
                "--labels",
                str(labels),
                "--out",
                str(seg),
                "--init",
                str(mae),
                "--steps",
                "1",
                "--crop",
                "32",
                "--batch",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert ckpt.load_history(seg)["provenance"]["init"] == mae.name


def test_interval_parsing_and_progress_line() -> None:
    assert parse_interval("60") == (60.0, "seconds")
    assert parse_interval("5m") == (300.0, "seconds")
    assert parse_interval("200steps") == (200.0, "steps")
    with pytest.raises(InputError, match="checkpoint-every"):
        parse_interval("soon")
    stream = io.StringIO()
    line = ProgressLine(stream, log_interval=0.0)
    line({"step": 1, "steps": 10, "loss": 0.5, "lr": 1e-4, "status": "running"})
    line({"step": 10, "steps": 10, "loss": 0.25, "lr": 1e-6, "val_dice": 0.9, "status": "finished"})
    text = stream.getvalue().splitlines()
    assert text[0].startswith("step 1/10 loss 0.5000 lr 1.00e-04")
    assert "val Dice 0.900" in text[-1]


def test_default_train_fits_a_forest_in_one_pass(files, tmp_path: Path, capsys) -> None:
    image, labels = files
    out = tmp_path / "forest"
    assert main(["train", str(image), "--labels", str(labels), "--out", str(out),
                 "--preset", "tiny", "--crop", "32", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "painted pixels" in captured.err and "nothing to fine-tune" in captured.err
    model = load_model(out)
    assert model.head_type == "pixel" and model.head.forest.num_trees > 0
    assert ckpt.load_train_state(out)["step"] == 0
    # resuming a forest is refused in one line; --overwrite refits
    assert main(["train", str(image), "--labels", str(labels), "--out", str(out),
                 "--preset", "tiny", "--crop", "32", "--device", "cpu", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no fine-tuning to resume" in err
