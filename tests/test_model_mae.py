"""MuViTMAE: masking, loss modes, training step."""

from __future__ import annotations

import pytest
import torch

from napari_muvit.errors import InputError
from napari_muvit.model import MuViTEncoder, MuViTMAE


S = 32


def tiny_mae(**kw) -> MuViTMAE:
    enc = MuViTEncoder(1, (1, 4), dim=48, num_layers=2, heads=2)
    return MuViTMAE(enc, **{"decoder_dim": 40, "decoder_layers": 2, **kw})


def bbox(batch=2):
    rows = [[[16 - lv * 16.0, 16 - lv * 16.0], [16 + lv * 16.0, 16 + lv * 16.0]] for lv in (1, 4)]
    return torch.tensor(rows)[None].repeat(batch, 1, 1, 1)


def test_forward_outputs_and_partition():
    mae = tiny_mae()
    x = torch.rand(3, 2, 1, S, S)
    out = mae(x, bbox(3))
    N = 32
    keep = int(N * 0.25)
    assert out["pred"].shape == (3, N, 64) and out["encoded"].shape == (3, keep, 48)
    assert out["idx_keep"].shape == (3, keep) and out["idx_mask"].shape == (3, N - keep)
    allidx = torch.cat([out["idx_keep"], out["idx_mask"]], 1).sort(1).values
    assert torch.equal(allidx, torch.arange(N).expand(3, -1))
    assert out["mask"].sum() == 3 * (N - keep) and out["loss_per_level"].shape == (2,)
    out["loss"].backward()
    assert mae.encoder.layers[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.mask_token.grad.abs().sum() > 0
    # patches are the raw pixels in (p1, p2, c) order
    assert torch.equal(mae.unpatchify(out["patches"], S, S), x)


def test_sampling_is_cpu_generator_deterministic():
    mae = tiny_mae()
    a = mae.sample_masks(4, 16, generator=torch.Generator().manual_seed(7))
    b = mae.sample_masks(4, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    state = torch.random.get_rng_state()
    mae.sample_masks(4, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_level_weights_bias_kept_tokens():
    mae = tiny_mae(masking_mode=[1.0, 1e-6])
    keep, _ = mae.sample_masks(8, 16, generator=torch.Generator().manual_seed(0))
    # all 8 kept tokens come from level 0 (indices < 16) when level 1 has ~zero weight
    assert bool((keep < 16).all())
    mae = tiny_mae()  # Dirichlet(0.5): per-sample level shares vary a lot
    keep, _ = mae.sample_masks(64, 16, generator=torch.Generator().manual_seed(0))
    share = (keep < 16).float().mean(1)
    assert share.min() < 0.2 and share.max() > 0.8


def test_loss_modes():
    mae = tiny_mae()
    pred = torch.zeros(1, 32, 64)
    patches = torch.zeros(1, 32, 64)
    patches[:, :16] = 1.0  # level 0 error 1, level 1 error 0
    idx_mask = torch.tensor([[0, 16, 17, 18]])  # 1 masked token on level 0, 3 on level 1
    lvl, per, _ = mae.reconstruction_loss(pred, patches, idx_mask, 16)
    assert per.tolist() == [1.0, 0.0] and float(lvl) == 0.5
    tok, _, _ = mae.reconstruction_loss(pred, patches, idx_mask, 16, loss_mode="token_mean")
    assert float(tok) == 0.25
    # a level without masked tokens is left out of the level mean
    lvl, per, _ = mae.reconstruction_loss(pred, patches, torch.tensor([[16, 17]]), 16)
    assert per.tolist() == [0.0, 0.0] and float(lvl) == 0.0
    lvl, per, _ = mae.reconstruction_loss(pred, patches, torch.tensor([[0, 1]]), 16)
    assert float(lvl) == 1.0


def test_idx_keep_only_and_validation():
    mae = tiny_mae().eval()
    x = torch.rand(1, 2, 1, S, S)
    keep = torch.tensor([[0, 5, 20, 31]])
    out = mae(x, bbox(1), idx_keep=keep)
    assert sorted(out["idx_mask"][0].tolist()) == sorted(set(range(32)) - {0, 5, 20, 31})
    with pytest.raises(InputError, match="idx_keep/idx_mask: expected a partition"):
        mae(x, bbox(1), idx_keep=keep, idx_mask=torch.arange(28)[None])
    with pytest.raises(InputError, match="idx_keep: expected token indices"):
        mae(x, bbox(1), idx_keep=torch.tensor([[0, 40]]))
    with pytest.raises(InputError, match="masking_ratio"):
        tiny_mae(masking_ratio=1.0)


def test_pretraining_steps_reduce_loss():
    torch.manual_seed(0)
    mae = tiny_mae(decoder_layers=1)
    x = torch.rand(2, 2, 1, S, S)
    keep, mask = mae.sample_masks(2, 16, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = mae(x, bbox(), idx_keep=keep, idx_mask=mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
