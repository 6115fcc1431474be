"""MuViTSegmenter heads and segmentation_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_muvit.errors import InputError
from napari_muvit.model import MuViTEncoder, MuViTSegmenter, default_skips, segmentation_loss


S = 32


def tiny_encoder(levels=(1, 4), layers=2) -> MuViTEncoder:
    return MuViTEncoder(1, levels, dim=48, num_layers=layers, heads=2)


def bbox(batch=2, levels=(1, 4)):
    rows = [[[16 - lv * 16.0, 16 - lv * 16.0], [16 + lv * 16.0, 16 + lv * 16.0]] for lv in levels]
    return torch.tensor(rows)[None].repeat(batch, 1, 1, 1)


@pytest.mark.parametrize("head", ["unetr", "mask2former"])
def test_forward_shape_and_attributes(head):
    seg = MuViTSegmenter(tiny_encoder(), head=head, num_classes=3, head_dim=32)
    x = torch.rand(2, 2, 1, S, S)
    out = seg(x, bbox())
    assert out.shape == (2, 3, S, S) and torch.isfinite(out).all()
    assert seg.levels == (1, 4) and seg.patch_size == 8 and seg.in_channels == 1
    assert seg.num_classes == 3 and seg.class_names == ["class 0", "class 1", "class 2"]
    assert seg.label_values == [0, 1, 2] and seg.normalization is None and seg.meta == {}
    assert seg.head_options["skips"] == [0, 1]
    # Gradients reach the encoder, the head and the level-1 patch embedding.
    segmentation_loss(out, torch.randint(0, 3, (2, S, S))).backward()
    assert seg.encoder.proj[0][0].weight.grad.abs().sum() > 0
    assert seg.encoder.layers[-1].ff.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("head", ["unetr", "mask2former"])
def test_tapered_pixel_decoder(head, tmp_path):
    seg = MuViTSegmenter(
        tiny_encoder(), head=head, num_classes=2, head_dim=64, head_options={"taper": True}
    ).eval()
    assert seg.head.pixel_decoder.dims == [64, 32, 16, 16]
    x = torch.rand(1, 2, 1, S, S)
    seg.save(tmp_path / "m")
    back = MuViTSegmenter.from_pretrained(tmp_path / "m")
    assert back.head_config["taper"] is True
    with torch.no_grad():
        assert torch.equal(seg(x, bbox(1)), back(x, bbox(1)))


def test_default_skips():
    assert default_skips(12) == [0, 5, 11]
    assert default_skips(2) == [0, 1]
    assert default_skips(1) == [0]


@pytest.mark.parametrize("head", ["unetr", "mask2former"])
def test_context_level_changes_level1_logits(head):
    """Coarse levels reach the level-1 logits only through attention (and cross-attention)."""
    torch.manual_seed(0)
    seg = MuViTSegmenter(tiny_encoder(), head=head, num_classes=2, head_dim=32).eval()
    x = torch.rand(1, 2, 1, S, S)
    x2 = x.clone()
    x2[:, 1] = torch.rand_like(x2[:, 1])
    with torch.no_grad():
        a, b = seg(x, bbox(1)), seg(x2, bbox(1))
    assert (a - b).abs().max() > 1e-4


def test_segmenter_learns_tiny_task():
    """A few Adam steps overfit a 2-class pattern (sanity of the whole forward/backward)."""
    torch.manual_seed(0)
    seg = MuViTSegmenter(tiny_encoder(layers=1), num_classes=2, head_dim=16)
    x = torch.rand(2, 2, 1, S, S)
    target = (x[:, 0, 0] > 0.5).long()
    opt = torch.optim.Adam(seg.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = segmentation_loss(seg(x, bbox()), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.5 * first


def test_bad_segmenter_args():
    enc = tiny_encoder()
    with pytest.raises(InputError, match="head: expected one of"):
        MuViTSegmenter(enc, head="fcn")
    with pytest.raises(InputError, match="class_names: expected 3 entries"):
        MuViTSegmenter(enc, num_classes=3, class_names=["a"])
    with pytest.raises(InputError, match=r"head_options.skips"):
        MuViTSegmenter(enc, num_classes=2, head_options={"skips": [0, 7]})
    seg = MuViTSegmenter(enc, num_classes=2, head_dim=16)
    with pytest.raises(InputError, match="x: expected 2 levels"):
        seg(torch.rand(1, 3, 1, S, S))


def test_predict_labels_maps_label_values():
    seg = MuViTSegmenter(tiny_encoder(), num_classes=2, head_dim=16, label_values=[3, 9]).eval()
    lab = seg.predict_labels(torch.rand(1, 2, 1, S, S), bbox(1))
    assert lab.shape == (1, S, S) and set(lab.unique().tolist()) <= {3, 9}


# ---------------------------------------------------------------------------- loss
def test_loss_matches_manual_ce_plus_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, :] = -1
    valid = target != -1
    ce = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    p = torch.softmax(logits, 1).permute(0, 2, 3, 1)[valid]
    oh = F.one_hot(target[valid], 3).float()
    dice = [
        (2 * (p[:, c] * oh[:, c]).sum() + 1) / (p[:, c].sum() + oh[:, c].sum() + 1) for c in (1, 2)
    ]
    expected = ce + 0.1 * (1 - sum(dice) / 2)
    assert float(segmentation_loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    # dice_exclude=() includes the background class in the Dice term
    dice0 = (2 * (p[:, 0] * oh[:, 0]).sum() + 1) / (p[:, 0].sum() + oh[:, 0].sum() + 1)
    exp_all = ce + 0.1 * (1 - (sum(dice) + dice0) / 3)
    assert float(segmentation_loss(logits, target, dice_exclude=())) == pytest.approx(
        float(exp_all), rel=1e-6
    )


def test_loss_ignore_and_weights():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    none = torch.full((1, 4, 4), -1)
    zero = segmentation_loss(logits, none)
    assert float(zero.detach()) == 0.0
    zero.backward()  # still differentiable
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    # ignored pixels do not influence the loss
    t = torch.randint(0, 2, (1, 4, 4))
    t[0, :2] = -1
    other = logits.detach().clone()
    other[..., :2, :] = 100 * torch.randn_like(other[..., :2, :])
    logits = logits.detach()
    assert float(segmentation_loss(logits, t)) == pytest.approx(
        float(segmentation_loss(other, t)), rel=1e-6
    )
    w = segmentation_loss(logits, t, class_weights=[1.0, 2.0], dice_weight=0.0)
    valid = t != -1
    lg = logits.detach().permute(0, 2, 3, 1)[valid]
    tv = t[valid]
    manual = F.cross_entropy(lg, tv, weight=torch.tensor([1.0, 2.0]))
    assert float(w) == pytest.approx(float(manual), rel=1e-6)


def test_loss_bad_input():
    with pytest.raises(InputError, match="target: expected shape"):
        segmentation_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(
        InputError, match=r"target: expected class indices in \[0, 2\) or -1, got 5"
    ):
        segmentation_loss(torch.randn(1, 2, 4, 4), torch.full((1, 4, 4), 5))


def test_perfect_prediction_has_low_loss():
    t = torch.randint(0, 3, (1, 8, 8))
    logits = F.one_hot(t, 3).permute(0, 3, 1, 2).float() * 50
    assert float(segmentation_loss(logits, t)) < 1e-3
    assert math.isfinite(float(segmentation_loss(logits.half(), t)))
