"""PyramidSource / open_image / Normalization: exact crops, padding, formats, lazy levels."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_muvit.data import Normalization, PyramidSource, compute_normalization, open_image
from napari_muvit.data import pyramid as pyramid_mod
from napari_muvit.data.geometry import centered_nested_bboxes
from napari_muvit.errors import InputError

NONE = Normalization("none")


def _img(shape=(512, 640), seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(dtype)


def _mean_pyramid(img, n=3):
    levels = [img]
    cur = img.astype(np.float64)
    for _ in range(n):
        h, w = cur.shape[0] // 2 * 2, cur.shape[1] // 2 * 2
        cur = cur[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
        levels.append(cur.astype(np.float32))
    return levels


def _ref_crop(img, bbox, f, size):
    """Reference: area average of the world window via explicit loops over output pixels."""
    out = np.zeros((size, size), np.float64)
    valid = np.zeros((size, size), bool)
    y0, x0 = (int(v) for v in bbox[0])
    for i in range(size):
        for j in range(size):
            ys, xs = y0 + i * f, x0 + j * f
            win = img[
                max(ys, 0) : max(min(ys + f, img.shape[0]), 0),
                max(xs, 0) : max(min(xs + f, img.shape[1]), 0),
            ]
            cy, cx = ys + f / 2, xs + f / 2
            if win.size and 0 <= cy < img.shape[0] and 0 <= cx < img.shape[1]:
                out[i, j] = win.mean()
                valid[i, j] = True
    return out, valid


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_read_matches_area_average(factor):
    img = _img()
    src = PyramidSource(_mean_pyramid(img), normalization=NONE)
    assert src.factors[:4] == (1, 2, 4, 8)
    bb = np.array([[64, 128], [64 + 16 * factor, 128 + 16 * factor]], float)
    crop, valid = src.read(bb, factor, 16, return_valid=True)
    ref, rvalid = _ref_crop(img.astype(np.float64), bb, factor, 16)
    assert crop.shape == (1, 16, 16) and crop.dtype == np.float32
    np.testing.assert_allclose(crop[0], ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(valid, rvalid)


def test_read_border_padding_and_true_bbox():
    img = _img((100, 120))
    src = PyramidSource(img, normalization=Normalization("divide", 0, 10.0))
    bb = np.array([[-24, 80], [40, 144]], float)  # 8x8 crop at factor 8, sticks out top/right
    crop, valid = src.read(bb, 8, 8, return_valid=True)
    ref, rvalid = _ref_crop(img.astype(np.float64), bb, 8, 8)
    np.testing.assert_array_equal(valid, rvalid)
    assert valid[:3].sum() == 0 and valid[3:, :5].all() and not valid[:, 5:].any()
    np.testing.assert_allclose(crop[0][valid], ref[valid] / 10.0, rtol=1e-5)
    np.testing.assert_array_equal(crop[0][~valid], 0.0)  # zeros after normalisation


def test_read_non_aligned_exact_area_resampling():
    img = _img((64, 64)).astype(np.float64)
    src = PyramidSource(img, normalization=NONE, lazy_levels=False)
    # factor 2 crop starting at world 1.5: compare to a 2x-upsampled image (exact for areas)
    up = np.kron(img, np.ones((2, 2)))
    bb = np.array([[1.5, 3.5], [1.5 + 16, 3.5 + 16]])
    crop = src.read(bb, 2, 8)[0]
    ref = up[3 : 3 + 32, 7 : 7 + 32].reshape(8, 4, 8, 4).mean((1, 3))
    np.testing.assert_allclose(crop, ref, rtol=1e-6)
    # non-integer factor 1.5 at origin 0: pixel (0,0) covers [0,1.5)² = 1 + half + half + quarter
    c = src.read([[0, 0], [12, 12]], 1.5, 8)[0]
    w = np.array([1.0, 0.5])
    expect = (w[:, None] * w[None, :] * img[:2, :2]).sum() / 2.25
    np.testing.assert_allclose(c[0, 0], expect, rtol=1e-6)


def test_lazy_levels_built_once_and_reads_are_o_crop():
    img = _img((1024, 1024))
    src = PyramidSource(img, normalization=NONE)
    assert src.factors == (1.0,)
    src.prepare((1, 8, 32))
    assert src.factors == (1.0, 8.0, 32.0)
    # building read level 1 once, and 32 came from 8 (not another full scan)
    assert src.pixels_read == 1024 * 1024 + 128 * 128
    before = src.pixels_read
    bb = centered_nested_bboxes((512, 512), 16, (1, 8, 32))
    crops, valid = src.read_nested(bb, (1, 8, 32), 16)
    assert src.pixels_read - before <= 3 * 16 * 16  # O(crop): 16² pixels per level
    ref, _ = _ref_crop(img.astype(np.float64), bb[2], 32, 16)
    np.testing.assert_allclose(crops[2, 0][valid[2]], ref[valid[2]], rtol=1e-5)
    assert src.factors == (1.0, 8.0, 32.0)  # nothing rebuilt


def test_lazy_level_on_disk_matches_memory(tmp_path):
    img = _img((300, 260))
    mem = PyramidSource(img, normalization=NONE)
    disk = PyramidSource(img, normalization=NONE, cache_bytes=0, cache_dir=tmp_path)
    bb = np.array([[-48, 16], [208, 272]], float)  # on the 16x grid (as geometry snaps)
    a = mem.read(bb, 16, 16)
    b = disk.read(bb, 16, 16)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert any(p.name.endswith(".zarr") for p in tmp_path.iterdir())
    ref, v = _ref_crop(img.astype(np.float64), bb, 16, 16)
    np.testing.assert_allclose(a[0][v], ref[v], rtol=1e-5)


def test_multichannel_and_rgb():
    rng = np.random.default_rng(1)
    cyx = (
        rng.random((3, 64, 80)).astype(np.float32)
        * np.array([1, 10, 100], np.float32)[:, None, None]
    )
    src = PyramidSource(cyx, channel_axis=0)
    assert src.channels == 3 and src.shape == (64, 80)
    norm = src.normalization
    assert norm.kind == "percentile" and np.shape(norm.low) == (3,)
    crop = src.read([[0, 0], [32, 32]], 1, 32)
    for c in range(3):  # per-channel percentiles put every channel on the same scale
        assert 0.3 < crop[c].mean() < 0.7
    rgb = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    s = PyramidSource(rgb)  # inferred like napari
    assert s.rgb and s.channels == 3
    assert s.normalization == Normalization("divide", 0.0, 255.0)
    crop = s.read([[0, 0], [32, 32]], 1, 32)
    np.testing.assert_allclose(crop, np.moveaxis(rgb[:32, :32], -1, 0) / 255.0, rtol=1e-6)
    rgba = np.concatenate([rgb, np.full((64, 80, 1), 255, np.uint8)], axis=-1)
    assert PyramidSource(rgba, rgb=True).channels == 3  # alpha dropped
    yxc = np.moveaxis(cyx, 0, -1)
    a = PyramidSource(yxc, channel_axis=-1, normalization=NONE).read([[8, 8], [24, 24]], 2, 8)
    b = PyramidSource(cyx, channel_axis=0, normalization=NONE).read([[8, 8], [24, 24]], 2, 8)
    np.testing.assert_allclose(a, b)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="2-D"):
        PyramidSource(np.zeros(10))
    with pytest.raises(InputError, match="channel_axis"):
        PyramidSource(np.zeros((2, 3, 64, 64)))
    with pytest.raises(InputError, match="channel_axis"):
        PyramidSource(np.zeros((5, 64, 64)))
    PyramidSource(np.zeros((1, 1, 64, 64)))  # singleton axes are fine
    with pytest.raises(InputError, match="consistent downsampling"):
        PyramidSource([np.zeros((64, 64)), np.zeros((32, 20))])
    with pytest.raises(InputError, match="downsample_factors"):
        PyramidSource([np.zeros((64, 64)), np.zeros((32, 32))], downsample_factors=[1, 4])
    with pytest.raises(InputError, match="finest first"):
        PyramidSource([np.zeros((32, 32)), np.zeros((64, 64))])
    src = PyramidSource(np.zeros((64, 64), np.uint8), normalization=NONE)
    with pytest.raises(InputError, match="outside"):
        src.read([[64, 0], [80, 16]], 1, 16)
    with pytest.raises(InputError, match="extent"):
        src.read([[0, 0], [16, 16]], 2, 16)
    with pytest.raises(InputError, match="upsampling"):
        src.read([[0, 0], [8, 8]], 0.5, 16)
    with pytest.raises(InputError, match="levels"):
        src.check_levels((1, 0.5))
    assert src.can_serve((1, 8, 32)) and not src.can_serve((4, 1))
    with pytest.raises(InputError, match="bboxes"):
        src.read_nested(np.zeros((2, 2, 2)), (1, 4, 16), 8)


def test_factors_from_metadata_and_shapes():
    img = np.zeros((1001, 999), np.uint8)
    lv = [img, img[::3, ::3], img[::9, ::9]]
    assert PyramidSource(lv).factors == (1, 3, 9)
    # napari-style per-axis factors (rgb layers carry the channel axis too)
    s = PyramidSource(
        [np.zeros((64, 64, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)],
        downsample_factors=[(1, 1, 1), (4, 4, 1)],
        rgb=True,
    )
    assert s.factors == (1, 4)
    with pytest.raises(InputError, match="isotropic"):
        PyramidSource([np.zeros((64, 64)), np.zeros((32, 16))], downsample_factors=[(1, 1), (2, 4)])


def test_from_layer_data_multiscale():
    img = _img((256, 256))
    pyr = _mean_pyramid(img, 2)
    s = PyramidSource.from_layer_data(pyr, multiscale=True, rgb=False, normalization=NONE)
    assert s.factors == (1, 2, 4) and s.shape == (256, 256)
    s1 = PyramidSource.from_layer_data(img, multiscale=False, rgb=False, normalization=NONE)
    np.testing.assert_allclose(
        s.read([[0, 0], [64, 64]], 4, 16), s1.read([[0, 0], [64, 64]], 4, 16), rtol=1e-5
    )


@pytest.mark.parametrize("fmt", [2, 3])
def test_open_zarr_and_ome_zarr(tmp_path, fmt):
    img = _img((256, 192))
    pyr = _mean_pyramid(img, 2)
    # plain zarr array
    z = zarr.create_array(
        store=str(tmp_path / "a.zarr"),
        shape=img.shape,
        chunks=(64, 64),
        dtype=img.dtype,
        zarr_format=fmt,
    )
    z[:] = img
    s = open_image(tmp_path / "a.zarr", normalization=NONE)
    np.testing.assert_array_equal(s.read([[0, 0], [32, 32]], 1, 32)[0], img[:32, :32])
    # OME-Zarr multiscales with (c, y, x) axes and scale transforms in physical units
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", zarr_format=fmt)
    datasets = []
    for i, a in enumerate(pyr):
        arr = g.create_array(str(i), shape=(1, *a.shape), chunks=(1, 64, 64), dtype=a.dtype)
        arr[:] = a[None]
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 0.25 * 2**i, 0.25 * 2**i]}
                ],
            }
        )
    ms = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space"},
                {"name": "x", "type": "space"},
            ],
            "datasets": datasets,
        }
    ]
    if fmt == 3:
        g.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    else:
        g.attrs["multiscales"] = ms
    s = open_image(tmp_path / "ome.zarr", normalization=NONE)
    assert s.factors == (1, 2, 4) and s.channels == 1 and s.shape == (256, 192)
    bb = np.array([[32, 64], [96, 128]], float)
    ref, _ = _ref_crop(img.astype(np.float64), bb, 4, 16)
    np.testing.assert_allclose(s.read(bb, 4, 16)[0], ref, rtol=1e-5)
    assert s.pixels_read == 16 * 16  # served from the stored 4x level, not full resolution


@pytest.mark.parametrize("eager", [True, False])
def test_open_pyramidal_tiff(tmp_path, monkeypatch, eager):
    if not eager:
        monkeypatch.setattr(pyramid_mod, "TIFF_EAGER_BYTES", 0)
    img = _img((512, 384), dtype=np.uint16)
    pyr = [img, img.reshape(256, 2, 192, 2).mean((1, 3)).astype(np.uint16)]
    p = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(pyr[0], subifds=1, tile=(128, 128))
        tw.write(pyr[1], subfiletype=1, tile=(128, 128))
    s = open_image(p, normalization=NONE)
    assert s.factors == (1, 2) and s.shape == (512, 384)
    np.testing.assert_array_equal(s.read([[128, 128], [192, 192]], 1, 64)[0], img[128:192, 128:192])
    np.testing.assert_allclose(s.read([[0, 0], [64, 64]], 2, 32)[0], pyr[1][:32, :32])


def test_open_npy_dask_and_errors(tmp_path):
    img = _img((128, 128))
    np.save(tmp_path / "x.npy", img)
    s = open_image(tmp_path / "x.npy", normalization=NONE)
    assert isinstance(s.arrays[0], np.memmap)
    np.testing.assert_array_equal(s.read([[0, 0], [16, 16]], 1, 16)[0], img[:16, :16])
    d = open_image(da.from_array(img, chunks=32), normalization=NONE)
    np.testing.assert_allclose(d.read([[0, 0], [64, 64]], 4, 16), s.read([[0, 0], [64, 64]], 4, 16))
    assert open_image(s) is s
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "missing.tif")


def test_normalization_roundtrip_and_compute():
    n = Normalization("percentile", [1.0, 2.0], [11.0, 22.0])
    d = n.to_dict()
    assert d == {
        "kind": "percentile",
        "low": [1.0, 2.0],
        "high": [11.0, 22.0],
        "pmin": 1.0,
        "pmax": 99.8,
    }
    assert Normalization.from_dict(d) == n
    x = np.stack([np.full((2, 2), 6.0), np.full((2, 2), 12.0)])
    np.testing.assert_allclose(n.apply(x), 0.5)
    np.testing.assert_allclose(n.apply(np.stack([x, x])), 0.5)  # (L, C, Y, X)
    np.testing.assert_allclose(n.invert(n.apply(x)), x)
    assert Normalization.from_dict(None).kind == "none"
    with pytest.raises(InputError, match="kind"):
        Normalization("zscore")
    img = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    norm = compute_normalization(PyramidSource(img))
    np.testing.assert_allclose([norm.low, norm.high], np.percentile(img, [1, 99.8]), rtol=1e-5)
    # a large chunked level is sampled (windows), never scanned whole
    big = da.zeros((4096, 4096), chunks=1024, dtype=np.uint16) + 7
    src = PyramidSource(big)
    sample = src.sample_for_statistics(max_pixels=100_000)
    assert sample.shape[0] == 1 and sample.shape[1] <= 100_000 and np.all(sample == 7)


def test_source_pickles_for_workers():
    src = PyramidSource(_img((128, 128)))
    src.prepare((1, 4))
    _ = src.normalization
    clone = pickle.loads(pickle.dumps(src))
    bb = [[0, 0], [64, 64]]
    np.testing.assert_array_equal(clone.read(bb, 4, 16), src.read(bb, 4, 16))
    assert clone.factors == src.factors
