"""UNETR head layouts: explicit channels, tapered, and old models loading unchanged."""

from __future__ import annotations

import pytest
import torch

from napari_muvit.model import MuViTEncoder, MuViTSegmenter, load_model
from napari_muvit.model.heads import UNETRHead
from napari_muvit.weights import default_model_path


def _segmenter(**head_options) -> MuViTSegmenter:
    torch.manual_seed(0)
    enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=2, heads=2)
    return MuViTSegmenter(enc, num_classes=3, head_dim=32, head_options=head_options,
                          meta={"crop_size": 32}).eval()


def _conv_widths(model: MuViTSegmenter) -> list[int]:
    dec = model.head.pixel_decoder
    return [dec.bottleneck[0][0].out_channels] + [s[1][0].out_channels for s in dec.stages]


def test_explicit_channels_set_every_stage_and_survive_save_and_load(tmp_path) -> None:
    model = _segmenter(channels=[32, 32, 16, 8])
    assert _conv_widths(model) == [32, 32, 16, 8]
    assert model.head.out.in_channels == 8
    x = torch.rand(2, 2, 1, 32, 32)
    bbox = torch.tensor([[[0, 0], [32, 32]], [[-48, -48], [80, 80]]], dtype=torch.float64)
    bbox = bbox.expand(2, 2, 2, 2)
    with torch.no_grad():
        logits = model(x, bbox)
    assert logits.shape == (2, 3, 32, 32)
    again = load_model(model.save(tmp_path / "m"))
    assert again.head_options["channels"] == [32, 32, 16, 8]
    assert _conv_widths(again) == [32, 32, 16, 8]
    with torch.no_grad():
        torch.testing.assert_close(again(x, bbox), logits)


def test_tapered_head_halves_the_stages() -> None:
    assert _conv_widths(_segmenter(taper=True)) == [32, 16, 16, 16]
    flat = _segmenter()
    assert _conv_widths(flat) == [32, 32, 32, 32]
    params = lambda m: sum(p.numel() for p in m.head.parameters())  # noqa: E731
    assert params(_segmenter(channels=[32, 32, 16, 8])) < params(flat)


@pytest.mark.parametrize("channels", [[32, 16, 8], [32, 16, 8, 0], [32, 16.5, 8, 8]])
def test_bad_channels_are_refused_with_the_expected_count(channels) -> None:
    with pytest.raises(ValueError, match="expected 4 positive integers"):
        UNETRHead(32, 1, 8, 3, head_dim=32, skips=[0, 1], channels=channels)
    with pytest.raises(ValueError, match="not together with taper"):
        UNETRHead(32, 1, 8, 3, head_dim=32, skips=[0, 1], taper=True, channels=[32, 32, 16, 8])


def test_bundled_model_loads_unchanged_with_its_flat_head() -> None:
    model = load_model(default_model_path())
    assert "channels" not in model.head_options and not model.head_options.get("taper", False)
    assert _conv_widths(model) == [model.head_dim] * 4


def test_newly_trained_models_get_the_tapered_head_and_record_it(tmp_path) -> None:
    from napari_muvit.engine._models import new_segmenter

    torch.manual_seed(0)
    enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=2, heads=2)
    seg = new_segmenter(enc, [1, 2], "unetr", None, None, dense=False)
    assert seg.head_options["taper"] is True
    widths = _conv_widths(seg)
    assert widths[0] == seg.head_dim and widths[-1] == max(seg.head_dim >> 3, 16)
    again = load_model(seg.save(tmp_path / "new"))
    assert again.head_config["taper"] is True and _conv_widths(again) == widths
