"""Fine-tuning engine: loss, optimisation, checkpoints, resume, cancel, NaN guard, bad input.

Everything runs tiny models (dim 48, 2 heads, 1-2 layers) on 32² crops of small images so the
whole file stays within a few seconds per test on a shared 2-core CPU.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.api import train
from napari_muvit.engine.trainer import (
    TrainConfig,
    Trainer,
    TrainingDivergedError,
)
from napari_muvit.errors import InputError
from napari_muvit.model import MuViTEncoder, MuViTSegmenter, load_model


def tiny_encoder(channels: int = 1, levels=(1, 4), layers: int = 1) -> MuViTEncoder:
    torch.manual_seed(0)
    return MuViTEncoder(channels, levels, patch_size=8, dim=48, num_layers=layers, heads=2)


def blobs_image(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on a dark background (+ noise) and the dense ground truth (0/1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.uint8)
    for cy, cx in rng.integers(12, size - 12, (6, 2)):
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < 60] = 1
    image = (truth * 0.8 + rng.normal(0.1, 0.1, truth.shape)).astype(np.float32)
    return image, truth


def scribbles(truth: np.ndarray, per_class: int = 40, seed: int = 0) -> np.ndarray:
    """Sparse napari-style labels: value k+1 on ``per_class`` random pixels of class k."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(truth.shape, np.uint8)
    for k in np.unique(truth):
        ys, xs = np.nonzero(truth == k)
        pick = rng.choice(len(ys), min(per_class, len(ys)), replace=False)
        labels[ys[pick], xs[pick]] = k + 1
    return labels


def config(**kw) -> TrainConfig:
    base = {"steps": 6, "batch_size": 2, "crop_size": 32, "lr": 1e-3, "device": "cpu", "seed": 0}
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def pair() -> tuple[PyramidSource, np.ndarray]:
    image, truth = blobs_image()
    return PyramidSource([image]), scribbles(truth)


# ------------------------------------------------------------------------------ learning
def test_loss_decreases_on_tiny_overfit(pair) -> None:
    source, labels = pair
    trainer = Trainer(tiny_encoder(), [(source, labels)], config(steps=40, batch_size=4))
    history = trainer.run()
    loss = np.array(history["loss"])
    assert history["status"] == "finished" and len(loss) == 40
    assert loss[-8:].mean() < 0.6 * loss[:8].mean(), loss
    # the painted pixels themselves are learnt
    model = trainer.model.eval()
    bboxes = np.array([[[0, 0], [32, 32]], [[0, 0], [128, 128]]], np.float64)
    crops, _ = source.read_nested(bboxes, (1, 4), 32)
    with torch.no_grad():
        pred = model.predict_labels(torch.from_numpy(crops)[None], bboxes[None])[0].numpy()
    painted = labels[:32, :32] > 0
    assert (pred[painted] == labels[:32, :32][painted]).mean() > 0.8


def test_a_tuned_training_tries_each_thread_count_and_restores_the_callers(pair) -> None:
    """With ``tune_threads`` each step's count is chosen by speed within the budget; the
    calling thread's count is back when the run ends; without it the count stays fixed."""
    from napari_muvit.engine import trainer as trainer_module

    source, labels = pair
    before = torch.get_num_threads()
    seen: list[int] = []
    validations: list[tuple] = []

    class Recorded(trainer_module.Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            validations.append((kwargs.get("threads"), self._adaptive()))

    trainer = Trainer(tiny_encoder(), [(source, labels)],
                      config(steps=8, val_region=[[0, 0], [64, 64]], val_every=4))
    trainer.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    trainer.tune_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "Predictor", Recorded)
        history = trainer.run()
    assert history["status"] == "finished" and np.isfinite(history["loss"]).all()
    assert set(trainer.thread_tuner.seconds_per_item) == {1, 2} and {1, 2} <= set(seen)
    assert torch.get_num_threads() == before
    # validation predicts at the run's budget, never tuned (it is no training step)
    assert validations and set(validations) == {(2, False)}
    seen.clear()
    fixed = Trainer(tiny_encoder(), [(source, labels)], config(steps=3))
    fixed.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    fixed.run()
    assert fixed.thread_tuner is None and set(seen) == {before}


def test_fresh_head_classes_and_metadata(pair) -> None:
    source, labels = pair
    trainer = Trainer(
        tiny_encoder(),
        [(source, labels)],
        config(steps=1),
        class_names={1: "background", 2: "disc"},
    )
    model = trainer.model
    assert isinstance(model, MuViTSegmenter)
    assert model.label_values == [1, 2]
    assert model.class_names == ["background", "disc"]
    assert model.normalization == source.normalization.to_dict()
    assert trainer.label_mapping == {1: 0, 2: 1}


def test_dense_labels_treat_zero_as_a_class(pair) -> None:
    source, _ = pair
    _, truth = blobs_image()
    trainer = Trainer(tiny_encoder(), [(source, truth)], config(steps=1, dense=True))
    assert trainer.model.label_values == [0, 1]
    assert trainer.model.class_names[0] == "background"
    batch = trainer._batch(0)
    assert (batch["target"] >= 0).float().mean() > 0.9  # everything in-image is annotated


def test_unannotated_pixels_contribute_zero_gradient(pair) -> None:
    source, labels = pair
    trainer = Trainer(tiny_encoder(), [(source, labels)], config(steps=1))
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    target = torch.full((2, 16, 16), -1)
    target[0, 3, 4], target[1, 10, 2], target[1, 5, 5] = 0, 1, 0
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    loss, _ = trainer.compute_loss(logits, target, valid)
    loss.backward()
    grad_norm = logits.grad.abs().sum(1)  # (B, H, W)
    assert torch.all(grad_norm[target < 0] == 0)
    assert torch.all(grad_norm[target >= 0] > 0)


def test_pseudo_labels_only_on_confident_unlabelled_in_image_pixels(pair) -> None:
    source, labels = pair
    cfg = config(steps=1, pseudo_labels=True, pseudo_threshold=0.9, pseudo_ramp_steps=10)
    trainer = Trainer(tiny_encoder(), [(source, labels)], cfg)
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), -1)
    target[0, 0, 0] = 1
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 3] = False  # padding row
    teacher = torch.zeros(1, 2, 4, 4)
    teacher[0, 1, :2] = 10.0  # confident class 1 on rows 0-1
    # weight ramps from exactly 0 at step 0
    _, parts0 = trainer.compute_loss(logits, target, valid, teacher, step=0)
    assert "loss_pseudo" not in parts0
    loss, parts = trainer.compute_loss(logits, target, valid, teacher, step=10)
    loss.backward()
    touched = logits.grad.abs().sum(1)[0] > 0
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2] = True  # confident rows (incl. the annotated pixel, via the supervised term)
    assert torch.equal(touched, expected)
    assert parts["pseudo_fraction"] == pytest.approx(7 / 16)


def test_lr_schedule_asymmetric_warmup_cosine(pair) -> None:
    source, labels = pair
    cfg = config(steps=20, warmup_steps=4, lr=1e-3, encoder_lr_factor=0.1, min_lr_factor=0.0)
    trainer = Trainer(tiny_encoder(), [(source, labels)], cfg)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["head"]["lr"] == pytest.approx(1e-3 / 4)  # first warm-up step
    assert groups["encoder"]["lr"] == pytest.approx(1e-4 / 4)
    lrs = []
    for _ in range(20):
        trainer.optimizer.step()  # no gradients: a no-op that keeps torch's order check happy
        trainer.scheduler.step()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs[2] == pytest.approx(1e-3)  # end of warm-up: the peak
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs[2:]))  # cosine decay
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_freeze_encoder_leaves_encoder_unchanged(pair) -> None:
    source, labels = pair
    trainer = Trainer(tiny_encoder(), [(source, labels)], config(steps=2, freeze_encoder=True))
    before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    head_before = trainer.model.head.out.weight.clone()
    trainer.run()
    after = trainer.model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, trainer.model.head.out.weight)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["head"]


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip_identical(pair, tmp_path: Path) -> None:
    source, labels = pair
    out = tmp_path / "run"
    trainer = Trainer(
        tiny_encoder(),
        [(source, labels)],
        config(steps=3),
        out=out,
        provenance={"images": ["blobs"]},
    )
    trainer.run()
    loaded = load_model(out)
    ref = trainer.model.state_dict()
    assert all(torch.equal(ref[k].cpu(), v) for k, v in loaded.state_dict().items())
    assert loaded.label_values == [1, 2] and loaded.class_names == trainer.model.class_names
    assert loaded.normalization == source.normalization.to_dict()
    meta = loaded.meta
    assert meta["crop_size"] == 32 and meta["train_config"]["steps"] == 3
    assert "history" not in meta and "provenance" not in meta  # history.json holds those
    record = ckpt.load_history(out)
    assert record["status"] == "finished" and len(record["loss"]) == 3
    assert record["provenance"]["images"] == ["blobs"]
    assert list(loaded.levels) == [1, 4]
    history = json.loads((out / "history.json").read_text())
    assert history["loss"] == trainer.history["loss"]
    state = torch.load(out / "train_state.pt", weights_only=True)  # plain containers only
    assert state["step"] == 3
    assert not list(tmp_path.glob(".run.*"))  # no temporary folders left behind


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cancel_then_resume_matches_uninterrupted_run(pair, tmp_path: Path) -> None:
    source, labels = pair
    full = Trainer(tiny_encoder(), [(source, labels)], config(steps=5))
    full.run()

    cancel = CancelToken()

    def stop_after_two(info: dict) -> None:
        if info["step"] == 2:
            cancel.cancel()

    out = tmp_path / "run"
    first = Trainer(
        tiny_encoder(), [(source, labels)], config(steps=5), stop_after_two, cancel, out=out
    )
    history = first.run()
    assert history["status"] == "cancelled" and history["step"] == 2
    # the cancelled run left a valid checkpoint at step 2
    assert ckpt.load_train_state(out)["step"] == 2
    assert isinstance(load_model(out), MuViTSegmenter)

    resumed = Trainer(load_model(out), [(source, labels)], config(steps=5), out=out, resume=True)
    assert resumed.step == 2
    saved = first.optimizer.state_dict()
    restored = resumed.optimizer.state_dict()
    for pid, st in saved["state"].items():
        for key, value in st.items():
            assert torch.equal(value, restored["state"][pid][key]), key
    assert resumed.scheduler.last_epoch == first.scheduler.last_epoch
    resumed.run()
    assert resumed.history["steps"] == [1, 2, 3, 4, 5]
    a, b = _weights(full.model), _weights(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_periodic_checkpoints_by_steps(pair, tmp_path: Path, monkeypatch) -> None:
    source, labels = pair
    written = []
    original = Trainer.checkpoint

    def spy(self):
        written.append(self.step)
        return original(self)

    monkeypatch.setattr(Trainer, "checkpoint", spy)
    cfg = config(steps=5, checkpoint_every=2, checkpoint_unit="steps")
    Trainer(tiny_encoder(), [(source, labels)], cfg, out=tmp_path / "run").run()
    assert written == [2, 4, 5]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pair, tmp_path: Path, monkeypatch) -> None:
    source, labels = pair
    out = tmp_path / "run"
    cfg = config(steps=6, checkpoint_every=1, checkpoint_unit="steps")
    trainer = Trainer(tiny_encoder(), [(source, labels)], cfg, out=out)
    original = Trainer.compute_loss

    def poisoned(self, logits, *args, **kw):
        loss, parts = original(self, logits, *args, **kw)
        return (loss * float("nan") if self.step == 3 else loss), parts

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="step 4: the loss is nan") as info:
        trainer.run()
    assert "last good checkpoint (step 3)" in str(info.value)
    assert ckpt.load_train_state(out)["step"] == 3
    on_disk = load_model(out).state_dict()
    live = trainer.model.state_dict()
    assert all(torch.equal(on_disk[k], live[k].cpu()) for k in on_disk)  # no NaN step applied
    assert trainer.history["status"] == "diverged"


# ------------------------------------------------------------------------------ bad input
def test_no_annotations_is_a_clear_error(pair) -> None:
    source, _ = pair
    with pytest.raises(InputError, match="no annotated painted pixels"):
        Trainer(tiny_encoder(), [(source, np.zeros(source.shape, np.uint8))], config())


def test_labels_shape_mismatch(pair) -> None:
    source, labels = pair
    with pytest.raises(InputError, match=r"expected the image's level-1 shape \(96, 96\)"):
        Trainer(tiny_encoder(), [(source, labels[:50])], config())


def test_labels_painted_only_in_padding(pair) -> None:
    source, _ = pair
    big = np.zeros((128, 128), np.uint8)
    big[100:110, 100:110] = 1  # outside the 96x96 image
    with pytest.raises(InputError, match="outside the image, in the padding"):
        Trainer(tiny_encoder(), [(source, big)], config())


def test_levels_the_image_cannot_serve(pair) -> None:
    source, labels = pair
    with pytest.raises(InputError, match="coarsest level 128"):
        Trainer(tiny_encoder(levels=(1, 128)), [(source, labels)], config())
    trainer = Trainer(tiny_encoder(levels=(1, 32)), [(source, labels)], config(steps=1))
    assert any("mostly padding" in w for w in trainer.history["warnings"])


def test_unpainted_model_class_is_kept_with_warning(pair) -> None:
    source, labels = pair
    seg = MuViTSegmenter(tiny_encoder(), num_classes=3, head_dim=32, label_values=[1, 2, 3])
    trainer = Trainer(seg, [(source, labels)], config(steps=1))
    assert trainer.model.label_values == [1, 2, 3]
    assert trainer.model.head is seg.head  # head kept
    assert any("[3]" in w and "never painted" in w for w in trainer.history["warnings"])


def test_new_class_gives_new_head_with_warning(pair) -> None:
    source, labels = pair
    seg = MuViTSegmenter(tiny_encoder(), num_classes=1, head_dim=32, label_values=[1])
    trainer = Trainer(seg, [(source, labels)], config(steps=1))
    assert trainer.model.label_values == [1, 2]
    assert trainer.model.encoder is seg.encoder
    assert any("head was replaced" in w for w in trainer.history["warnings"])


def test_channel_adaptation_is_explicit_and_exact_for_grey_rgb(pair) -> None:
    _, labels = pair
    image, _ = blobs_image()
    rgb = PyramidSource([np.stack([image] * 3)], channel_axis=0, normalization={"kind": "none"})
    grey = PyramidSource([image], normalization={"kind": "none"})
    encoder = tiny_encoder(channels=1)
    trainer = Trainer(encoder, [(rgb, labels)], config(steps=1))
    assert trainer.model.in_channels == 3
    assert any("channel adaptation" in w for w in trainer.history["warnings"])
    bboxes = np.array([[[0, 0], [32, 32]], [[0, 0], [128, 128]]], np.float64)[None]
    x1 = torch.from_numpy(grey.read_nested(bboxes[0], (1, 4), 32)[0])[None]
    x3 = torch.from_numpy(rgb.read_nested(bboxes[0], (1, 4), 32)[0])[None]
    with torch.no_grad():
        ref = encoder.eval()(x1, bboxes)
        new = trainer.model.encoder.eval()(x3, bboxes)
    assert torch.allclose(ref, new, atol=1e-5)


# ------------------------------------------------------------------------------ live labels
def test_update_labels_uses_new_strokes(pair) -> None:
    source, labels = pair
    labels = labels.copy()
    trainer = Trainer(tiny_encoder(), [(source, labels)], config(steps=2))
    labels[90:93, 90:93] = 2  # a new stroke in the corner, painted after the start
    assert trainer.annotated_counts()[2] < int(np.sum(labels == 2))
    trainer.update_labels([[[90, 90], [93, 93]]])
    trainer.run()
    assert trainer.annotated_counts() == {1: int(np.sum(labels == 1)), 2: int(np.sum(labels == 2))}
    anchors = np.concatenate([p for _, p in trainer.dataset.anchor_table[1]])
    assert any((anchors == [91, 91]).all(1))
    assert any(e["kind"] == "labels_updated" for e in trainer.history["events"])


def test_validation_region_is_held_out_and_scored(pair) -> None:
    source, labels = pair
    region = [[0, 0], [48, 96]]
    reports = []
    cfg = config(steps=4, val_region=region, val_every=2)
    trainer = Trainer(tiny_encoder(), [(source, labels)], cfg, progress=reports.append)
    points = np.concatenate([p for cls in trainer.dataset.anchor_table for _, p in cls])
    assert points[:, 0].min() >= 48  # no training anchor inside the validation region
    trainer.run()
    assert [v["step"] for v in trainer.history["val"]] == [2, 4]
    assert 0.0 <= reports[-1]["val_dice"] <= 1.0


def test_validation_scores_what_the_predictor_predicts(pair) -> None:
    """Validation is the Predictor's labels of the region against the painted pixels: painting
    the Predictor's own output scores exactly 1, every changed pixel costs what Dice says, and
    unpainted pixels (value 0) are not scored."""
    from napari_muvit.engine.predictor import Predictor
    from napari_muvit.metrics import mean_dice

    source, labels = pair
    region = [[8.5, 0], [56, 90.2]]  # fractional: clipped outward like any prediction region
    trainer = Trainer(tiny_encoder(), [(source, labels)], config(steps=1, val_region=region))
    seen = trainer.pairs[0][1]
    predicted = Predictor(trainer.model, device="cpu", tile_size=trainer.crop_size).predict(
        source, region
    ).labels
    assert predicted.shape == (48, 91)
    window = seen[8:56, 0:91]
    window[:] = predicted
    window[::3, ::3] = 0  # not annotated
    assert trainer.validate() == 1.0

    other = {1: 2, 2: 1}
    window[1::4, 1::4] = np.vectorize(other.get)(predicted[1::4, 1::4])
    painted = window > 0
    expected = mean_dice(predicted[painted], window[painted])
    assert expected < 0.95
    assert trainer.validate() == pytest.approx(expected)
    assert [v["dice"] for v in trainer.history["val"]] == [1.0, pytest.approx(expected)]


# ------------------------------------------------------------------------------ train()
def test_train_convenience_and_out_folder_protection(pair, tmp_path: Path) -> None:
    source, labels = pair
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not a napari-muvit model folder"):
        train(source, labels, out=foreign, init=tiny_encoder(), config=config(), overwrite=True)
    assert (foreign / "holiday.jpg").read_bytes() == b"x"

    out = tmp_path / "model"
    model = train(source, labels, out=out, init=tiny_encoder(), config=config(steps=2))
    assert isinstance(model, MuViTSegmenter) and model.meta["history"]["step"] == 2
    with pytest.raises(InputError, match="finished, step 2.*--resume.*--overwrite"):
        train(source, labels, out=out, init=tiny_encoder(), config=config(steps=2))
    more = train(source, labels, out=out, config=config(steps=3), resume=True)
    assert more.meta["history"]["steps"] == [1, 2, 3]
    fresh = train(
        source, labels, out=out, init=tiny_encoder(), config=config(steps=1), overwrite=True
    )
    assert fresh.meta["history"]["steps"] == [1]


def test_worker_batches_equal_in_process_batches(pair) -> None:
    source, labels = pair
    local = Trainer(tiny_encoder(), [(source, labels)], config(steps=3))
    workers = Trainer(tiny_encoder(), [(source, labels)], config(steps=3, num_workers=1))
    for step in (0, 1, 2):
        a, b = local._batch(step), workers._batch(step)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_snapshot_is_an_independent_eval_copy(pair) -> None:
    source, labels = pair
    trainer = Trainer(tiny_encoder(), [(source, labels)], config(steps=2))
    copy = trainer.snapshot()
    assert copy.meta["crop_size"] == 32 and copy.meta["history"]["step"] == 0
    trainer.run()
    assert not copy.training
    assert not torch.equal(copy.head.out.weight, trainer.model.head.out.weight)


def test_start_from_official_folder_with_channel_and_level_selection(
    pair, official_fixtures: Path
) -> None:
    from napari_muvit.engine.trainer import prepare_start_model

    source, labels = pair
    folder = official_fixtures / "encoder3l"  # official encoder: 3 channels, levels 1,4,16
    model, notes = prepare_start_model(folder, levels="1,4")
    assert list(model.levels) == [1, 4] and model.coord_mode == "linspace"
    trainer = Trainer(model, [(source, labels)], config(steps=1), notes=notes)
    trainer.run()
    assert trainer.model.in_channels == 1
    assert any("3-channel starting model adapted to 1" in w for w in trainer.history["warnings"])
    messages = " ".join(e["message"] for e in trainer.history["events"])
    assert "select_levels" in messages
