"""``napari-muvit train --forest-levels/--color-space`` (run in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli_train import files  # noqa: F401  (the fixture)

from napari_muvit.cli import main
from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.model import load_model

TINY = ["--preset", "tiny", "--crop", "32", "--device", "cpu"]


def _train(image: Path, labels: Path, out: Path, *options: str) -> int:
    return main(["train", str(image), "--labels", str(labels), "--out", str(out), *TINY,
                 *options])


def _fitted(out: Path) -> str:
    return [e["message"] for e in ckpt.load_history(out)["events"] if e["kind"] == "quick_fit"][0]


@pytest.mark.parametrize("choice, sub_forests, read", [("level1", [1], "level 1"),
                                                       ("all", [2], "levels 1, 4")])
def test_forest_levels_are_recorded_and_printed(files, tmp_path, capsys, choice, sub_forests,
                                                read) -> None:
    image, labels = files
    out = tmp_path / choice
    assert _train(image, labels, out, "--forest-levels", choice) == 0
    err = capsys.readouterr().err
    model = load_model(out)
    assert model.head_options["forest_sub_levels"] == sub_forests
    assert model.head.forest_levels == max(sub_forests)
    if choice == "level1":  # a forest on level 1 splits on level-1 filters only
        assert int(model.head.forest.feature.max()) < model.head.bank_level_width
    assert model.meta["train_config"]["forest_levels"] == choice
    # the summary line is the quick fit's history event, choice included
    summary = f"the forest reads {read} (forest levels: {choice})"
    assert summary in _fitted(out) and summary in err


def test_color_space_of_an_rgb_image(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 90, (96, 96, 3)).astype(np.uint8)
    image[40:70, 40:70] = (200, 60, 60)
    labels = np.zeros((96, 96), np.uint8)
    labels[5:8, 5:30] = 1
    labels[50:53, 45:65] = 2
    np.save(tmp_path / "rgb.npy", image)
    np.save(tmp_path / "labels.npy", labels)
    out = tmp_path / "rgb_model"
    assert _train(tmp_path / "rgb.npy", tmp_path / "labels.npy", out, "--color-space", "rgb") == 0
    assert "filters on R, G, B" in capsys.readouterr().err
    model = load_model(out)
    assert model.in_channels == 3
    assert model.head.color_space == model.head_options["color_space"] == "channels"
    assert model.meta["train_config"]["color_space"] == "rgb"


def test_choices_that_cannot_apply_are_one_line_errors(files, tmp_path, capsys) -> None:
    image, labels = files
    cases = [
        (["--color-space", "lab"], "color space 'lab' needs RGB images; image 1 (image.npy) "
                                   "is not RGB (1 channel(s)): use color space auto"),
        (["--forest-levels", "mix", "--classifier", "mlp"],
         "forest levels 'mix': only a forest pixel head (classifier forest) reads levels"),
        (["--forest-levels", "level1", "--head", "unetr"],
         "forest levels 'level1' applies to the quick fit of a pixel head; the unetr head "
         "is fine-tuned: leave it at auto"),
        (["--color-space", "rgb", "--points", str(labels)],
         "--forest-levels and --color-space apply to a pixel head trained on --labels"),
    ]
    for i, (options, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        if "--points" in options:  # --points replaces --labels
            args = ["train", str(image), "--out", str(out), *TINY, *options]
        else:
            args = ["train", str(image), "--labels", str(labels), "--out", str(out), *TINY,
                    *options]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (out / "config.yaml").exists()
    with pytest.raises(SystemExit):  # argparse lists the choices
        _train(image, labels, tmp_path / "x", "--forest-levels", "coarse")
    assert "invalid choice: 'coarse' (choose from" in capsys.readouterr().err
