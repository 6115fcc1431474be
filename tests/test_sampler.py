"""NestedCropDataset and annotated_points: determinism, anchoring, label mapping, augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_muvit.data import NestedCropDataset, Normalization, PyramidSource, annotated_points
from napari_muvit.errors import InputError

NONE = Normalization("none")


def _sparse(shape=(512, 512)):
    lab = np.zeros(shape, np.uint8)
    lab[100:110, 400:405] = 1  # 50 px of class 0
    lab[300:302, 50:60] = 2  # 20 px of class 1
    lab[10, 10] = 7  # a value outside the mapping
    return lab


def _source(shape=(512, 512), seed=0):
    rng = np.random.default_rng(seed)
    return PyramidSource((rng.random(shape) * 255).astype(np.uint8))


def test_sample_shapes_types_and_determinism():
    ds = NestedCropDataset(
        _source(),
        _sparse(),
        size=32,
        levels=(1, 4, 16),
        length=10,
        seed=3,
        label_mapping={1: 0, 2: 1},
    )
    d = ds[4]
    assert d["image"].shape == (3, 1, 32, 32) and d["image"].dtype == torch.float32
    assert d["bbox"].shape == (3, 2, 2) and d["bbox"].dtype == torch.float32
    assert d["target"].shape == (32, 32) and d["target"].dtype == torch.int64
    assert d["valid"].shape == (3, 32, 32) and d["valid"].dtype == torch.bool
    e = ds[4]
    for k in d:
        assert torch.equal(d[k], e[k])
    assert not torch.equal(ds[5]["image"], d["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[4]["image"], d["image"])
    with pytest.raises(IndexError):
        ds[10]


def test_dataloader_workers_match_direct_access():
    ds = NestedCropDataset(_source(), _sparse(), size=16, levels=(1, 4), length=8, seed=1)
    direct = torch.stack([ds[i]["image"] for i in range(8)])
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batched = torch.cat([b["image"] for b in dl])
    assert torch.equal(direct, batched)


def test_weighted_sampling_hits_sparse_annotations_and_mapping():
    lab = _sparse()
    ds = NestedCropDataset(
        _source(),
        lab,
        size=32,
        levels=(1, 4),
        length=200,
        weighted=True,
        anchor_prob=1.0,
        augment=False,
    )
    assert ds.num_classes == 7  # default sparse mapping: value v -> class v-1 (7 -> 6)
    hits = 0
    classes = set()
    for i in range(60):
        t = ds[i]["target"].numpy()
        hits += bool((t >= 0).any())
        classes |= set(np.unique(t[t >= 0]).tolist())
    assert hits == 60  # every crop is anchored on an annotated pixel
    assert classes == {0, 1, 6}
    # uniform sampling almost never sees 71 annotated pixels out of 262k
    uni = NestedCropDataset(
        _source(), lab, size=32, levels=(1, 4), length=60, weighted=False, augment=False
    )
    assert sum(bool((uni[i]["target"] >= 0).any()) for i in range(60)) < 20
    # explicit mapping: unmapped value 7 is ignored, 2 -> 0
    m = NestedCropDataset(
        _source(),
        lab,
        size=32,
        levels=(1, 4),
        length=60,
        anchor_prob=1.0,
        augment=False,
        label_mapping={2: 0},
    )
    seen = set()
    for i in range(20):
        t = m[i]["target"].numpy()
        seen |= set(np.unique(t).tolist())
    assert seen == {-1, 0}


def test_target_matches_labels_and_padding_is_ignored():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, (200, 150)).astype(np.uint8)
    ds = NestedCropDataset(
        _source((200, 150)),
        lab,
        size=64,
        levels=(1, 8),
        length=20,
        augment=False,
        label_mapping={0: 0, 1: 1, 2: 2},
    )
    for i in range(5):
        d = ds.sample(i)
        (y0, x0) = d["bbox_read"][0, 0].astype(int)
        np.testing.assert_array_equal(d["target"], lab[y0 : y0 + 64, x0 : x0 + 64])
        # context padding is marked invalid and zero
        assert (~d["valid"][1]).any()
        np.testing.assert_array_equal(d["image"][1, 0][~d["valid"][1]], 0)
    small = NestedCropDataset(
        _source((20, 24)),
        np.ones((20, 24), np.uint8),
        size=32,
        levels=(1,),
        length=2,
        augment=False,
    )
    d = small.sample(0)
    assert (d["target"] == -1).sum() == 32 * 32 - 20 * 24


def test_flips_keep_world_coordinates_consistent():
    # image value = world x index: after any flip, pixel value + 0.5 (its true centre) must be
    # either the reported pixel centre (no flip) or its mirror about one common centre c
    x = np.tile(np.arange(600, dtype=np.float32), (600, 1))
    src = PyramidSource(x, normalization=NONE)
    ds = NestedCropDataset(
        src,
        None,
        size=16,
        levels=(1, 4, 16),
        length=40,
        augment=True,
        bbox_shift=0,
        bbox_scale=0,
        intensity_gain=0,
        intensity_offset=0,
    )
    flipped = 0
    for i in range(40):
        d = ds.sample(i)
        c = (d["bbox"][0, 0, 1] + d["bbox"][0, 1, 1]) / 2
        flips = set()
        for lv, f in enumerate((1, 4, 16)):
            u = d["bbox"][lv, 0, 1] + (np.arange(16) + 0.5) * f  # reported pixel centres
            v = d["image"][lv, 0, 8] + 0.5  # actual world centres (row 8)
            ok = d["valid"][lv, 8]
            if ok.sum() < 2:
                continue
            if np.allclose(v[ok], u[ok], atol=1e-3):
                flips.add(False)
            elif np.allclose(v[ok], 2 * c - u[ok], atol=1e-3):
                flips.add(True)
            else:
                raise AssertionError(f"sample {i} level {f}: pixels do not match the bbox")
        assert len(flips) == 1  # the whole nest is flipped together
        flipped += flips.pop()
    assert 8 < flipped < 32


def test_augmentation_jitter_magnitudes_and_naive():
    ds = NestedCropDataset(
        _source(),
        None,
        size=32,
        levels=(1, 8),
        length=50,
        augment=True,
        bbox_shift=0.01,
        bbox_scale=0.02,
        flips=False,
    )
    shifts, scales = [], []
    for i in range(50):
        d = ds.sample(i)
        ext = d["bbox"][:, 1] - d["bbox"][:, 0]
        ext_read = d["bbox_read"][:, 1] - d["bbox_read"][:, 0]
        scales.append(np.log(ext / ext_read).ravel())
        shifts.append(
            (
                (
                    (d["bbox"][:, 1] + d["bbox"][:, 0])
                    - (d["bbox_read"][:, 1] + d["bbox_read"][:, 0])
                )
                / 2
                / ext_read
            ).ravel()
        )
    shifts, scales = np.concatenate(shifts), np.concatenate(scales)
    assert 0.005 < shifts.std() < 0.02 and 0.01 < scales.std() < 0.04
    naive = NestedCropDataset(
        _source(), None, size=32, levels=(1, 8), length=5, augment=False, naive=True
    )
    d = naive.sample(0)
    np.testing.assert_allclose(d["bbox"].mean(axis=1)[0], d["bbox"].mean(axis=1)[1])  # concentric
    assert not np.allclose(d["bbox"], d["bbox_read"])


def test_annotated_points_chunked_zarr_and_subsampling(tmp_path):
    lab = _sparse((700, 900))
    z = zarr.create_array(
        store=str(tmp_path / "l.zarr"), shape=lab.shape, chunks=(128, 128), dtype="uint8"
    )
    z[:] = lab
    pts = annotated_points(z)
    ref = np.argwhere(lab > 0)
    np.testing.assert_array_equal(pts, ref)
    pts, cls = annotated_points(lab, label_mapping={1: 0, 2: 1}, return_classes=True)
    assert len(pts) == 70 and set(cls.tolist()) == {0, 1}
    sub = annotated_points(lab, max_points=10, seed=1)
    assert len(sub) == 10 and all(lab[y, x] > 0 for y, x in sub)
    # precomputed points are accepted (no scan of the labels)
    ds = NestedCropDataset(
        _source((700, 900)),
        z,
        size=16,
        levels=(1, 4),
        length=5,
        points=[ref[:5]],
        anchor_prob=1.0,
        augment=False,
    )
    assert len(ds.points[0]) == 5
    with pytest.raises(InputError, match="labels"):
        NestedCropDataset(_source((700, 900)), lab[:100], size=16, levels=(1, 4), length=5)
