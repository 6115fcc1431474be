"""The trainer's dataset crosses process boundaries: DataLoader workers started with *spawn*
(the default on macOS and Windows) unpickle it, so ``TrainConfig(num_workers>0)`` works there."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.engine.trainer import TrainConfig, Trainer
from napari_muvit.model import MuViTEncoder


def _trainer() -> Trainer:
    torch.manual_seed(0)
    encoder = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2)
    rng = np.random.default_rng(0)
    image = rng.random((96, 96), dtype=np.float32)
    labels = np.zeros((96, 96), np.uint8)
    labels[10:20, 10:20], labels[60:70, 50:60] = 1, 2
    cfg = TrainConfig(steps=2, batch_size=2, crop_size=32, device="cpu", seed=0, num_workers=1)
    return Trainer(encoder, [(PyramidSource([image]), labels)], cfg)


def _as_list(samples: list) -> list:
    return samples


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_trainer_dataset_pickles_with_its_anchors():
    trainer = _trainer()
    dataset = trainer.dataset
    assert type(dataset).__module__ == "napari_muvit.engine._anchored"
    assert dataset.anchor_table  # painted pixels are indexed
    copy = pickle.loads(pickle.dumps(dataset))
    assert type(copy) is type(dataset)
    for i in range(4):  # the same samples (anchors included) on both sides
        _same(copy[i], dataset[i])


def test_spawned_dataloader_worker_reads_the_trainers_samples():
    trainer = _trainer()
    loader = torch.utils.data.DataLoader(
        trainer.dataset, batch_size=2, sampler=range(0, 2), num_workers=1,
        collate_fn=_as_list, multiprocessing_context="spawn",
    )
    batch = next(iter(loader))
    for i, sample in enumerate(batch):
        _same(sample, trainer.dataset[i])
