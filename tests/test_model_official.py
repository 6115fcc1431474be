"""Parity with the official muvit 0.1.0 package on the shared fixtures (see their README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_muvit.model import MuViTEncoder, MuViTMAE, is_official_folder, load_model
from napari_muvit.model.rope import patch_coords


RTOL, ATOL = 1e-4, 1e-5


def _close(actual: torch.Tensor, expected: np.ndarray, rtol=RTOL, atol=ATOL) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["encoder", "encoder3l"])
def test_encoder_parity(official_fixtures, name):
    folder = official_fixtures / name
    assert is_official_folder(folder)
    enc = load_model(folder)
    assert isinstance(enc, MuViTEncoder) and enc.coord_mode == "linspace"
    io = np.load(folder / "io.npz")
    x, bb = torch.from_numpy(io["x"]), torch.from_numpy(io["bbox"])
    with torch.no_grad():
        tokens0, _ = enc.embed(x)
        feats, inter = enc(x, bb, return_layers=(0, 1))
        nobbox = enc(x, None)
        maps = enc.feature_maps(x, bb)
    _close(tokens0, io["tokens0"])
    _close(inter[0], io["interm_0"])
    _close(inter[1], io["interm_1"])
    _close(feats, io["feats"])
    _close(nobbox, io["feats_nobbox"])
    assert tuple(maps.shape) == tuple(io["feats_spatial_shape"])
    B, L, D, h, w = maps.shape
    _close(maps, io["feats"].reshape(B, L, h, w, D).transpose(0, 1, 4, 2, 3))
    # Our coordinates are the official ones minus the level-1 bbox centre (RoPE sees only
    # differences, so the features above are unaffected).
    P = enc.patch_size
    coords = patch_coords(bb, (x.shape[3] // P, x.shape[4] // P), "linspace")
    centre = io["bbox"][:, 0].mean(axis=1)[:, None, :]
    np.testing.assert_allclose(coords.numpy(), io["coords"] - centre, atol=1e-4)


def test_encoder_parity_float64_bbox_and_layer0_rope(official_fixtures):
    folder = official_fixtures / "encoder"
    enc = MuViTEncoder.from_pretrained(folder)
    io = np.load(folder / "io.npz")
    x = torch.from_numpy(io["x"])
    with torch.no_grad():
        feats = enc(x, io["bbox"].astype(np.float64))  # numpy bbox accepted too
        coords = enc.token_coords(io["bbox"], x.shape, x.device)
        cos, sin = enc.layers[0].rope(coords)
    _close(feats, io["feats"])
    # Official angles are absolute; ours are centred, so compare rotations of differences:
    # angle(token i) - angle(token 0) must agree.
    ang_off = io["rope_angles_layer0"][..., ::2]  # pairs are repeated twice (interleaved)
    ang = torch.atan2(sin, cos).numpy()
    d_off = np.angle(np.exp(1j * (ang_off - ang_off[:, :1])))
    d_our = np.angle(np.exp(1j * (ang - ang[:, :1])))
    np.testing.assert_allclose(d_our, d_off, atol=1e-4)


def test_mae_parity_replayed_masks(official_fixtures):
    folder = official_fixtures / "mae"
    mae = load_model(folder)
    assert isinstance(mae, MuViTMAE)
    assert mae.loss_mode == "token_mean" and mae.decoder_dim == 40 and mae.decoder_layers == 1
    io = np.load(folder / "io.npz")
    x, bb = torch.from_numpy(io["x"]), torch.from_numpy(io["bbox"])
    with torch.no_grad():
        out = mae(
            x,
            bb,
            idx_keep=torch.from_numpy(io["idx_retain"]),
            idx_mask=torch.from_numpy(io["idx_mask"]),
        )
        enc_feats = mae.encoder(x, bb)
    _close(out["encoded"], io["encoded"])
    _close(out["pred"], io["decoded"])
    assert float(out["loss"]) == pytest.approx(float(io["loss"]), abs=1e-6)
    _close(out["loss_per_level"], io["loss_per_level"], rtol=1e-5, atol=1e-6)
    _close(enc_feats, io["encoder_feats"])
    # Our training loss averages per level first; for this draw it differs from the official.
    lvl_mean, per_level, _ = mae.reconstruction_loss(
        out["pred"], out["patches"], out["idx_mask"], 64, loss_mode="level_mean"
    )
    assert float(lvl_mean) == pytest.approx(float(per_level.mean()), rel=1e-6)


def test_encoder_from_mae_folder(official_fixtures):
    folder = official_fixtures / "mae"
    enc = MuViTEncoder.from_pretrained(folder)
    assert isinstance(enc, MuViTEncoder) and enc.dim == 48
    io = np.load(folder / "io.npz")
    with torch.no_grad():
        feats = enc(torch.from_numpy(io["x"]), torch.from_numpy(io["bbox"]))
    _close(feats, io["encoder_feats"])


def test_official_features_under_bf16_autocast(official_fixtures):
    enc = load_model(official_fixtures / "encoder")
    io = np.load(official_fixtures / "encoder" / "io.npz")
    x, bb = torch.from_numpy(io["x"]), torch.from_numpy(io["bbox"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = enc(x, bb).float().numpy()
    ref = io["feats"]
    assert np.abs(feats - ref).max() / np.abs(ref).max() < 2e-2
