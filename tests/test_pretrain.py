"""MAE pre-training engine: learning, checkpoints, resume, and hand-over to fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.pretrainer import PretrainConfig, Pretrainer, pretrain
from napari_muvit.engine.api import train
from napari_muvit.engine.trainer import TrainConfig
from napari_muvit.errors import InputError
from napari_muvit.model import MuViTEncoder, MuViTMAE, MuViTSegmenter, load_model


def tiny_encoder(levels=(1, 4)) -> MuViTEncoder:
    torch.manual_seed(0)
    return MuViTEncoder(1, levels, patch_size=8, dim=48, num_layers=1, heads=2)


def stripes(size: int = 96) -> PyramidSource:
    """A smooth, learnable texture (reconstruction improves within a few steps)."""
    yy, xx = np.mgrid[:size, :size]
    image = np.sin(yy / 5.0) + np.cos(xx / 7.0)
    return PyramidSource([image.astype(np.float32)])


def config(**kw) -> PretrainConfig:
    base = {"steps": 6, "batch_size": 4, "crop_size": 32, "device": "cpu", "decoder_dim": 32}
    return PretrainConfig(**{**base, **kw})


def test_mae_loss_decreases_and_lr_scales_with_width() -> None:
    trainer = Pretrainer(tiny_encoder(), [stripes()], config(steps=30, lr=2e-3))
    history = trainer.run()
    loss = np.array(history["loss"])
    assert history["status"] == "finished"
    assert loss[-6:].mean() < 0.7 * loss[:6].mean(), loss
    default = Pretrainer(tiny_encoder(), [stripes()], config())
    assert default.history["lr_base"] == pytest.approx(5e-4)  # 6e-5·512/48 capped at 5e-4
    assert isinstance(default.model, MuViTMAE) and default.model.masking_ratio == 0.75


def test_pretrain_folder_roundtrip_and_encoder_for_finetuning(tmp_path: Path) -> None:
    out = tmp_path / "mae"
    mae = pretrain(stripes(), levels="1,4", out=out, init=tiny_encoder(), config=config(steps=3))
    loaded = load_model(out)
    assert isinstance(loaded, MuViTMAE)
    ref = mae.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    assert loaded.meta["crop_size"] == 32 and ckpt.load_history(out)["step"] == 3
    assert ckpt.load_train_state(out)["step"] == 3
    encoder = MuViTEncoder.from_pretrained(out)
    assert list(encoder.levels) == [1, 4]
    # the MAE folder is a valid --init for fine-tuning (its encoder is taken)
    labels = np.zeros((96, 96), np.uint8)
    labels[10:14, 10:14], labels[50:54, 50:54] = 1, 2
    seg = train(
        stripes(),
        labels,
        init=out,
        config=TrainConfig(steps=1, batch_size=2, crop_size=32, device="cpu", freeze_encoder=True),
    )
    assert isinstance(seg, MuViTSegmenter)
    assert torch.equal(seg.encoder.proj[0][0].weight, encoder.proj[0][0].weight)
    assert "MAE" in " ".join(e["message"] for e in seg.meta["history"]["events"])


def test_pretrain_cancel_and_resume_is_exact(tmp_path: Path) -> None:
    full = Pretrainer(tiny_encoder(), [stripes()], config(steps=4))
    full.run()
    cancel = CancelToken()
    out = tmp_path / "mae"

    def stop(info: dict) -> None:
        if info["step"] == 2:
            cancel.cancel()

    first = Pretrainer(tiny_encoder(), [stripes()], config(steps=4), stop, cancel, out=out)
    assert first.run()["status"] == "cancelled"
    resumed = Pretrainer(load_model(out), [stripes()], config(steps=4), out=out, resume=True)
    assert resumed.step == 2
    resumed.run()
    assert resumed.history["loss"][:2] == first.history["loss"]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert np.allclose(full.history["loss"], resumed.history["loss"], atol=1e-5)


def test_pretrain_level_subset_and_bad_input(tmp_path: Path) -> None:
    mae = pretrain(
        stripes(), levels=[1, 4], init=tiny_encoder(levels=(1, 4, 16)), config=config(steps=1)
    )
    assert list(mae.levels) == [1, 4]
    with pytest.raises(InputError, match="subset of the encoder levels"):
        pretrain(stripes(), levels=[1, 8], init=tiny_encoder(), config=config(steps=1))
    with pytest.raises(InputError, match="at least one image"):
        Pretrainer(tiny_encoder(), [], config())
    with pytest.raises(InputError, match="masking_ratio"):
        PretrainConfig(masking_ratio=1.0)
