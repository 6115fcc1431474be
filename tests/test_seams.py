"""Tile seams (issue 13): zero padding in the decoder marked every tile edge.

Root cause: the UNETR/Mask2Former decoders padded their 3×3 convolutions with zeros, so the
border of every prediction tile looked like a dark frame; on bright, flat regions (white
background) the first/last rows and columns of each tile flipped class. New models pad by
replicating the crop's border; older checkpoints (no ``padding_mode`` in their config) keep
zeros, and blending overlapping tiles removes what is left.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.data.geometry import centered_nested_bboxes
from napari_muvit.engine._models import fresh_encoder, new_segmenter
from napari_muvit.metrics import seam_ratio
from napari_muvit.engine.api import predict
from napari_muvit.model import MuViTSegmenter, load_model


def _segmenter(padding_mode: str, head: str = "unetr", levels=(1,)) -> MuViTSegmenter:
    # one level: every token of a constant image is then the same (with a coarser level the
    # attention mix of the two levels' tokens depends on the position)
    torch.manual_seed(0)
    enc = fresh_encoder("tiny", 1, levels)
    return MuViTSegmenter(
        enc, head=head, num_classes=3, head_dim=32, head_options={"padding_mode": padding_mode}
    ).eval()


def _constant_logits(model: MuViTSegmenter, value: float, size: int = 32) -> torch.Tensor:
    """Logits of one tile of a constant image, every level's crop inside the image."""
    bb = centered_nested_bboxes((256, 256), size, model.levels)
    src = PyramidSource([np.full((640, 640), value, np.float32)])
    crops, valid = src.read_nested(bb, model.levels, size)
    assert valid.all()
    with torch.no_grad():
        return model(torch.from_numpy(crops)[None], torch.from_numpy(bb)[None])[0]


@pytest.mark.parametrize("head", ["unetr", "mask2former"])
def test_replicate_padding_leaves_a_constant_tile_constant(head):
    # all tokens of a constant image are equal, so a seam-free head outputs one value per class
    logits = _constant_logits(_segmenter("replicate", head), 0.8)
    spread = (logits - logits[:, 16:17, 16:17]).abs().amax()
    assert float(spread) < 1e-5


@pytest.mark.parametrize("head", ["unetr", "mask2former"])
def test_zero_padding_marks_the_tile_border(head):
    # the test above would catch a return of zero padding: the border differs from the centre
    logits = _constant_logits(_segmenter("zeros", head), 0.8)
    dev = (logits - logits[:, 16:17, 16:17]).abs().amax(0)
    # ten times the spread allowed above, at the first row and the first column
    assert float(dev[0].max()) > 1e-4 and float(dev[:, 0].max()) > 1e-4


def test_new_models_pad_by_replication_and_keep_it_on_disk(tmp_path):
    enc = fresh_encoder("tiny", 1, (1, 4))
    seg = new_segmenter(enc, [1, 2], "unetr", None, None, dense=False)
    assert seg.head_options["padding_mode"] == "replicate"
    pads = {m.padding_mode for m in seg.head.modules() if isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (3, 3)}
    assert pads == {"replicate"}
    seg.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    pads = {m.padding_mode for m in again.head.modules() if isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (3, 3)}
    assert pads == {"replicate"}


def test_bundled_model_keeps_zero_padding():
    # checkpoints without the option were trained with zeros: loading must not change them
    from napari_muvit.weights import load_default_model

    seg = load_default_model()
    assert "padding_mode" not in seg.head_options
    pads = {m.padding_mode for m in seg.head.modules() if isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (3, 3)}
    assert pads == {"zeros"}


def test_unknown_padding_mode_is_refused():
    with pytest.raises(ValueError, match="padding_mode"):
        _segmenter("circular")


def test_constant_image_prediction_has_no_tile_pattern():
    # engine level: the predicted probabilities of a constant image are the same at a tile's
    # border and in its middle (zero padding: border rows differ)
    seg = _segmenter("replicate", levels=(1, 4))
    img = np.full((384, 384), 0.7, np.float32)
    _, probs = predict(img, seg, device="cpu", tile_size=32, probabilities=True)
    inner = probs[:, 160:224, 160:224].astype(np.float32)  # tiles whose context lies inside
    assert float(np.abs(inner - inner[:, :1, :1]).max()) < 2e-3


# ------------------------------------------------------------------------------ seam_ratio
def test_seam_ratio_detects_tile_aligned_label_changes():
    rng = np.random.default_rng(0)
    # smooth blobs: changes anywhere
    yy, xx = np.mgrid[0:256, 0:256]
    smooth = ((np.sin(yy / 9.0) + np.cos(xx / 13.0 + rng.uniform())) > 0.3).astype(np.uint8)
    clean = seam_ratio(smooth, 64)
    assert 0.5 < clean["ratio"] < 1.6
    # the same labels with the first column of every tile flipped: a seam
    seamed = smooth.copy()
    seamed[:, ::64] = 1 - seamed[:, ::64]
    dirty = seam_ratio(seamed, 64)
    assert dirty["ratio"] > 5 * clean["ratio"]
    assert dirty["border"] > 0.45  # x borders all change, y borders as often as elsewhere


def test_seam_ratio_respects_the_grid_origin():
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 22:] = 1  # one change, between world x 29 and 30 when the crop starts at x = 8
    assert seam_ratio(lab, 30, origin=(0, 8))["border"] > 0
    assert seam_ratio(lab, 30, origin=(0, 0))["border"] == 0


def test_predict_overlap_none_blends_and_zero_overlap_stays_available(monkeypatch):
    # overlap=None (the CLI's default) is tile // 8 (blending); the API default 0 is unblended
    from napari_muvit.engine import predictor as predict_module

    seen = []
    real = predict_module.Predictor.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("overlap"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(predict_module.Predictor, "__init__", spy)
    seg = _segmenter("replicate", levels=(1, 4))
    img = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    blended = predict(img, seg, device="cpu", tile_size=32, overlap=None)
    plain = predict(img, seg, device="cpu", tile_size=32)
    assert seen == [4, 0]
    assert blended.shape == plain.shape == (96, 96)
    assert predict_module.default_overlap(64) == 8


def test_cli_predict_blends_by_default(tmp_path):
    from napari_muvit.cli import main
    from napari_muvit.engine.sinks import read_store_info

    seg = _segmenter("replicate", levels=(1, 4))
    seg.meta["crop_size"] = 32
    seg.save(tmp_path / "m")
    np.save(tmp_path / "img.npy", np.random.default_rng(0).random((96, 96)).astype(np.float32))
    out = tmp_path / "labels.zarr"
    code = main(["predict", str(tmp_path / "img.npy"), "--model", str(tmp_path / "m"),
                 "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0
    assert read_store_info(out)["overlap"] == 4  # 32 // 8


def test_forest_heads_blend_a_quarter_of_the_tile():
    """A forest's image filters see replicated pixels at a tile's edge: its default blending
    overlap is a quarter of the tile (an eighth for heads on the encoder's features)."""
    import napari_muvit.engine._models as models
    from napari_muvit.engine.predictor import Predictor, default_overlap

    torch.manual_seed(0)
    enc = fresh_encoder("tiny", 1, (1, 4))
    forest = MuViTSegmenter(enc, head="pixel", num_classes=2,
                            head_options=dict(models.NEW_PIXEL_HEAD_OPTIONS)).eval()
    unetr = _segmenter("replicate")
    assert default_overlap(64, forest) == 16 and default_overlap(64, unetr) == 8
    assert default_overlap(64) == 8
    assert Predictor(forest, device="cpu", tile_size=32, overlap=None).overlap == 8
    assert Predictor(unetr, device="cpu", tile_size=32, overlap=None).overlap == 4
