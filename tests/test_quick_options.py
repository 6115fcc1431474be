"""The quick fit's user choices (issue 13): which levels the forest reads and what its filters
see of RGB images (``TrainConfig.forest_levels``/``color_space``, ``train(forest_levels=,
color_space=)``), recorded in the model and refused in one line where they cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
from test_quicktrain import _bar_context, _colour_discs, _discs, _quick_cfg, _tiny

from napari_muvit.data.strokes import simulate_strokes
from napari_muvit.engine.api import predict, train
from napari_muvit.engine.quicktrain import forced_forest_levels
from napari_muvit.engine.trainer import TrainConfig
from napari_muvit.errors import InputError
from napari_muvit.model import load_model
from napari_muvit.model.checkpoint import load_history


def _messages(out, kind: str) -> list[str]:
    return [e["message"] for e in load_history(out)["events"] if e["kind"] == kind]


def test_each_choice_names_one_candidate_of_the_automatic_choice():
    assert forced_forest_levels("auto", 3) is None
    assert forced_forest_levels("level1", 3) == (1,)
    assert forced_forest_levels("all", 3) == (3,)
    assert forced_forest_levels("mix", 3) == (1, 2, 3)
    # one level: the three forests are the same
    assert forced_forest_levels("all", 1) == forced_forest_levels("mix", 1) == (1,)
    with pytest.raises(InputError, match="forest_levels: expected one of auto, level1, all, mix"):
        forced_forest_levels("coarse", 2)


def test_the_config_refuses_unknown_choices():
    with pytest.raises(InputError, match="forest_levels: expected one of auto, level1, all, mix"):
        TrainConfig(forest_levels="coarse")
    with pytest.raises(InputError, match="color_space: expected one of auto, rgb, lab, hed, got 'hsv'"):
        TrainConfig(color_space="hsv")
    assert (TrainConfig().forest_levels, TrainConfig().color_space) == ("auto", "auto")


@pytest.mark.parametrize("choice, sub_forests", [("level1", [1]), ("all", [2]), ("mix", [1, 2])])
def test_forest_levels_force_what_the_forest_reads(tmp_path, choice, sub_forests):
    # the class of a disc shows only at level 4 (a bar 35+ px away): on its own, the automatic
    # choice reads every level here (test_quicktrain); forcing level 1 must blind the forest
    image, truth = _bar_context()
    strokes = simulate_strokes(truth, strokes_per_class=4, length=20, seed=0)
    out = tmp_path / "m"
    model = train(image, strokes, out=out, init=_tiny(), head="pixel", config=_quick_cfg(),
                  forest_levels=choice)
    head = model.head
    assert model.head_options["forest_sub_levels"] == sub_forests
    assert head.forest_levels == model.head_options["forest_levels"] == max(sub_forests)
    split_columns = head.forest.feature.numpy()
    reads_coarse = bool((split_columns >= head.bank_level_width).any())
    assert reads_coarse == (choice != "level1")
    disc = truth > 0
    accuracy = float((predict(image, model, device="cpu")[disc] == truth[disc] + 1).mean())
    if choice == "level1":  # identical discs at level 1: a guess
        assert accuracy < 0.8
    else:
        assert accuracy >= 0.9
    # recorded: the fit's event (no held-out scores: nothing was chosen), the saved head and
    # the run's configuration
    fitted = _messages(out, "quick_fit")
    assert f"(forest levels: {choice})" in fitted[0] and "held-out" not in fitted[0]
    again = load_model(out)
    assert again.head.forest_levels == max(sub_forests)
    assert again.head_options["forest_sub_levels"] == sub_forests
    assert again.meta["train_config"]["forest_levels"] == choice


@pytest.mark.parametrize("choice, recorded, filters", [("rgb", "channels", "R, G, B"),
                                                       ("lab", "lab", "CIELAB")])
def test_color_space_sets_the_filters_of_rgb_images(tmp_path, choice, recorded, filters):
    image, truth = _colour_discs()
    strokes = simulate_strokes(truth, strokes_per_class=3, length=20, seed=0)
    out = tmp_path / "m"
    model = train(image, strokes, out=out, init=_tiny(), head="pixel", config=_quick_cfg(),
                  color_space=choice)
    assert model.head.color_space == model.head_options["color_space"] == recorded
    assert load_model(out).head.color_space == recorded
    assert f"filters on {filters}" in _messages(out, "quick_fit")[0]
    assert f"(color space: {choice})" in _messages(out, "color_space")[0]
    assert mean_dice_of(image, model, truth) > 0.85  # hue discs: both colour spaces see it


def test_lab_applies_to_an_mlp_pixel_head_too(tmp_path):
    image, truth = _colour_discs()
    strokes = simulate_strokes(truth, strokes_per_class=3, length=20, seed=0)
    model = train(image, strokes, out=tmp_path / "m", init=_tiny(), head="pixel",
                  config=_quick_cfg(classifier="mlp", steps=2), color_space="lab")
    assert model.head.forest is None and model.head.color_space == "lab"
    assert load_model(tmp_path / "m").head.color_space == "lab"
    # auto keeps an MLP head's filters on R, G, B (CIELAB was measured for the forest only)
    auto = train(image, strokes, out=tmp_path / "a", init=_tiny(), head="pixel",
                 config=_quick_cfg(classifier="mlp", steps=2))
    assert auto.head.color_space == "channels" and "color_space" not in auto.head_options


def mean_dice_of(image, model, truth) -> float:
    from napari_muvit.metrics import mean_dice

    return mean_dice(predict(image, model, device="cpu"), truth + 1)


def test_choices_that_cannot_apply_are_refused_in_one_line_before_anything_is_written(tmp_path):
    image, truth = _discs(96)
    strokes = simulate_strokes(truth, strokes_per_class=3, length=20, seed=0)
    cases = [
        # a grey image has no colours to convert
        (dict(color_space="lab"),
         "color space 'lab' needs RGB images; image 1 (ndarray(96, 96) (in memory)) is not RGB "
         "(1 channel(s)): use color space auto"),
        # an MLP head's classifier reads every feature: there is no forest to restrict
        (dict(forest_levels="level1", config=_quick_cfg(classifier="mlp")),
         "forest levels 'level1': only a forest pixel head (classifier forest) reads levels"),
        # the paper's heads are fine-tuned, not fitted: nothing reads the choice
        (dict(color_space="rgb", head="unetr"),
         "color space 'rgb' applies to the quick fit of a pixel head; the unetr head is "
         "fine-tuned: leave it at auto"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        out = tmp_path / f"m{i}"
        kwargs = {"head": "pixel", "config": _quick_cfg(), **kwargs}
        with pytest.raises(InputError) as err:
            train(image, strokes, out=out, init=_tiny(), **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (out / "config.yaml").exists()
