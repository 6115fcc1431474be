"""The Synthetic rings task: determinism, class geometry, local ambiguity, lazy == eager."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_muvit.data import PyramidSource, synthetic_rings, synthetic_rings_lazy
from napari_muvit.data.samples import synthetic_sample
from napari_muvit.errors import InputError


@pytest.fixture(scope="module")
def syn():
    return synthetic_rings(1024, seed=0)


def test_deterministic_per_seed(syn):
    again = synthetic_rings(1024, seed=0)
    np.testing.assert_array_equal(again.image, syn.image)
    np.testing.assert_array_equal(again.labels, syn.labels)
    other = synthetic_rings(1024, seed=1)
    assert (other.image != syn.image).mean() > 0.5


def test_fields_and_pyramid(syn):
    assert syn.image.shape == (1024, 1024) and syn.image.dtype == np.uint8
    assert syn.labels.dtype == np.uint8 and set(np.unique(syn.labels)) == {0, 1, 2}
    assert syn.class_names == ("background", "outer", "inner")
    assert syn.factors == (1, 2, 4)
    assert [a.shape for a in syn.pyramid] == [(1024, 1024), (512, 512), (256, 256)]
    np.testing.assert_allclose(
        syn.pyramid[2].astype(float), syn.image.reshape(256, 4, 256, 4).mean((1, 3)), atol=1.0
    )
    src = PyramidSource(syn.pyramid)
    assert src.factors == (1, 2, 4)
    u16 = synthetic_rings(256, seed=0, dtype=np.uint16)
    assert u16.image.dtype == np.uint16 and u16.image.max() > 255


def test_classes_follow_ring_geometry_and_cells_have_fixed_size(syn):
    comp, n = ndimage.label(syn.labels > 0)
    assert 150 < n < 1500
    areas = np.bincount(comp.ravel())[1:]
    # radii 4..9 px: areas between ~pi*4*4 and pi*9*9 (a few clipped at nothing: cells avoid edges)
    assert areas.min() >= 40 and areas.max() <= 260
    # each cell has exactly one class
    for cls in (1, 2):
        per = ndimage.maximum(syn.labels, comp, np.arange(1, n + 1))
        mins = ndimage.minimum(np.where(syn.labels > 0, syn.labels, 255), comp, np.arange(1, n + 1))
        assert np.all(per == mins)
    # radial position relative to the (jittered) centre separates the classes
    cy, cx = syn.meta["centre"]
    yy, xx = np.nonzero(syn.labels)
    r = np.hypot(yy + 0.5 - cy, xx + 0.5 - cx) / 1024
    cls = syn.labels[yy, xx]
    assert r[cls == 2].max() < r[cls == 1].min() + 0.02  # inner below outer (deformed rings)
    assert 0.09 < np.median(r[cls == 2]) < 0.28 and 0.28 < np.median(r[cls == 1]) < 0.5
    # cell size does not scale with the image
    big = synthetic_rings(2048, seed=0)
    c2, n2 = ndimage.label(big.labels > 0)
    assert abs(np.median(np.bincount(c2.ravel())[1:]) - np.median(areas)) < 25
    assert n2 > 3 * n


def test_classes_look_the_same_locally(syn):
    img, lab = syn.image.astype(float), syn.labels
    m1, m2 = img[lab == 1].mean(), img[lab == 2].mean()
    assert abs(m1 - m2) / m1 < 0.05
    s1, s2 = img[lab == 1].std(), img[lab == 2].std()
    assert abs(s1 - s2) / s1 < 0.15
    # the band background around cells is the same texture in both bands
    ring1 = ndimage.binary_dilation(lab == 1, iterations=4) & (lab == 0)
    ring2 = ndimage.binary_dilation(lab == 2, iterations=4) & (lab == 0)
    assert abs(img[ring1].mean() - img[ring2].mean()) < 3.0


def test_lazy_equals_eager_across_chunk_borders():
    eager = synthetic_rings(300, seed=5, min_level_size=64)
    lazy = synthetic_rings_lazy(300, seed=5, chunk=70)  # chunks cut through cells
    np.testing.assert_array_equal(lazy.image.compute(), eager.image)
    np.testing.assert_array_equal(lazy.labels.compute(), eager.labels)
    assert lazy.image.chunksize == (70, 70) and lazy.factors == (1,)
    huge = synthetic_rings_lazy(65536, seed=0)
    assert huge.image.shape == (65536, 65536)
    block = np.asarray(huge.image[30000:30100, 40000:40100])
    assert block.shape == (100, 100) and block.std() > 0
    with pytest.raises(InputError, match="size"):
        synthetic_rings(10)


def test_sample_layer_data():
    layers = synthetic_sample(size=512)
    (img, ikw, itype), (lab, lkw, ltype) = layers
    assert itype == "image" and ltype == "labels"
    assert ikw["name"] == "synthetic rings" and ikw["multiscale"] is True
    assert [a.shape for a in img] == [(512, 512), (256, 256)]
    assert tuple(ikw["contrast_limits"]) == (0, 255)
    assert lkw["name"] == "ground truth" and lab.shape == (512, 512)
    assert lkw["visible"] is False or lkw["opacity"] <= 0.5


def test_synthetic_field_tiles_independent_systems_and_lazy_matches() -> None:
    from napari_muvit.data import synthetic_field, synthetic_rings

    field = synthetic_field(grid=(2, 3), system_size=256, seed=1)
    assert field.image.shape == (512, 768)
    assert field.labels.shape == (512, 768)
    # Each tile is exactly the stand-alone system with its derived seed.
    one = synthetic_rings(256, seed=1 * 10007 + 1 * 3 + 2, min_level_size=256)
    np.testing.assert_array_equal(field.image[256:, 512:], one.image)
    np.testing.assert_array_equal(field.labels[256:, 512:], one.labels)
    assert set(np.unique(field.labels)) == {0, 1, 2}
    assert field.factors[:2] == (1, 2)
    lazy = synthetic_field(grid=(2, 3), system_size=256, seed=1, lazy=True)
    np.testing.assert_array_equal(np.asarray(lazy.image[:, 256:512]), field.image[:, 256:512])
    np.testing.assert_array_equal(np.asarray(lazy.labels), field.labels)
