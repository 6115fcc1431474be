"""PNG/JPEG pictures in and one-file labels out: what a user with a camera snapshot meets.

A stained slide photographed by a microscope camera is a JPEG or PNG; strokes painted in
another program are a PNG. The CLI and the API read them as napari does and can write the
prediction of a small image as one .tif/.png/.npy file.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from _predict_support import rings, tiny_segmenter
from PIL import Image

from napari_muvit.cli import main
from napari_muvit.data import open_image
from napari_muvit.data.picture_files import (
    read_label_picture,
    read_picture,
    write_label_picture,
)
from napari_muvit.engine.api import predict
from napari_muvit.engine.trainer import open_labels
from napari_muvit.errors import InputError
from napari_muvit.metrics import mean_dice
from napari_muvit.model import load_model


def _stained_photo(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB picture: pink background, purple discs (class 2 inside, 1 outside)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.ones((size, size), np.int32)
    for cy, cx in rng.integers(10, size - 10, (8, 2)):
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 2
    rgb = np.where(truth[..., None] == 2, [90, 60, 150], [230, 170, 200]).astype(np.float64)
    rgb += rng.normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


# ---------------------------------------------------------------------------- reading
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_a_picture_opens_with_the_pixels_napari_shows(tmp_path: Path, suffix: str) -> None:
    rgb, _ = _stained_photo()
    path = tmp_path / f"slide{suffix}"
    iio.imwrite(path, rgb)
    source = open_image(path)
    assert source.shape == (96, 96) and source.channels == 3 and source.rgb
    np.testing.assert_array_equal(read_picture(path), iio.imread(path))  # napari's reader
    if suffix != ".jpg":
        np.testing.assert_array_equal(read_picture(path), rgb)
    grey = tmp_path / f"grey{suffix}"
    iio.imwrite(grey, rgb[..., 0])
    assert open_image(grey).channels == 1


def test_a_damaged_picture_or_an_animation_is_one_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(InputError, match=r"broken.png.*cannot read this .png file"):
        open_image(broken)
    frames = tmp_path / "movie.gif"
    moving = np.zeros((3, 16, 16, 3), np.uint8)
    for k in range(3):
        moving[k, :, 5 * k : 5 * k + 4] = 255  # distinct frames (identical ones are merged)
    iio.imwrite(frames, moving, extension=".gif")
    with pytest.raises(InputError, match="an animation or a stack"):
        open_image(frames)
    still = tmp_path / "still.gif"
    iio.imwrite(still, np.full((16, 24, 3), 200, np.uint8), extension=".gif")
    assert open_image(still).shape == (16, 24)  # one frame comes as a stack of one


def test_a_picture_too_large_for_pillow_says_what_to_convert_to(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from PIL import Image

    path = tmp_path / "huge.png"
    iio.imwrite(path, np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² is then a "bomb" (> 2×)
    with pytest.raises(InputError, match="too large for a picture reader.*tiled TIFF or an OME-Zarr"):
        open_image(path)


def test_label_pictures_give_class_values(tmp_path: Path) -> None:
    values = np.zeros((20, 30), np.uint8)
    values[2:5, 3:9], values[10:12, 4:20] = 1, 3
    palette = Image.fromarray(values, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_label_picture(tmp_path / "palette.png"), values)
    assert iio.imread(tmp_path / "palette.png").ndim == 3  # imageio would give colours
    iio.imwrite(tmp_path / "grey_as_rgb.png", np.repeat(values[..., None], 3, -1))
    np.testing.assert_array_equal(read_label_picture(tmp_path / "grey_as_rgb.png"), values)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255  # transparent white: what an unpainted pixel may hold
    rgba[values > 0] = np.c_[np.repeat(values[values > 0, None], 3, 1), np.full((values > 0).sum(), 255)]
    iio.imwrite(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(read_label_picture(tmp_path / "rgba.png"), values)
    wide = values.astype(np.uint16) * 300
    iio.imwrite(tmp_path / "sixteen.png", wide)
    np.testing.assert_array_equal(open_labels(tmp_path / "sixteen.png"), wide)


def test_colour_and_jpeg_labels_are_refused_with_what_to_do(tmp_path: Path) -> None:
    colours = np.zeros((20, 30, 3), np.uint8)
    colours[2:5, 3:9] = [255, 0, 0]
    iio.imwrite(tmp_path / "painted.png", colours)
    with pytest.raises(InputError, match="a colour picture, not a label image.*one-channel PNG"):
        open_labels(tmp_path / "painted.png")
    iio.imwrite(tmp_path / "labels.jpg", colours[..., 0])
    with pytest.raises(InputError, match="JPEG compression changes pixel values"):
        open_labels(tmp_path / "labels.jpg")


# ---------------------------------------------------------------------------- writing
@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy"])
def test_label_file_round_trip_in_the_smallest_type(tmp_path: Path, suffix: str) -> None:
    small = np.arange(12, dtype=np.int64).reshape(3, 4)
    path = write_label_picture(tmp_path / f"a{suffix}", small)
    back = np.load(path) if suffix == ".npy" else (
        tifffile.imread(path) if suffix == ".tif" else iio.imread(path))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, small)
    large = small * 1000
    path = write_label_picture(tmp_path / f"b{suffix}", large)
    back = np.load(path) if suffix == ".npy" else (
        tifffile.imread(path) if suffix == ".tif" else iio.imread(path))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, large)
    assert oct(os.stat(path).st_mode & 0o044) == oct(0o044 & ~_umask())  # not private


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_existing_file_is_kept_unless_overwrite_and_a_failure_leaves_it(tmp_path: Path,
                                                                         monkeypatch) -> None:
    path = tmp_path / "labels.tif"
    path.write_bytes(b"the user's file")
    with pytest.raises(InputError, match="the file exists; pass --overwrite"):
        write_label_picture(path, np.ones((4, 4), np.uint8))
    assert path.read_bytes() == b"the user's file"
    import tifffile as tf

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf, "imwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_label_picture(path, np.ones((4, 4), np.uint8), overwrite=True)
    assert path.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no temporary left
    monkeypatch.undo()
    write_label_picture(path, np.full((4, 4), 2, np.uint8), overwrite=True)
    np.testing.assert_array_equal(tifffile.imread(path), 2)


# ---------------------------------------------------------------------------- API and CLI
@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    model = tiny_segmenter()
    return model, model.save(root / "model"), root


def test_predict_writes_the_labels_it_would_return(segmenter, tmp_path: Path) -> None:
    model, _, _ = segmenter
    image = tmp_path / "rings.png"
    iio.imwrite(image, np.asarray(rings(96)[0]).astype(np.uint8))
    expected = predict(image, model=model, device="cpu", overlap=0, region=(8, 16, 72, 90))
    out = predict(image, model=model, device="cpu", overlap=0, region=(8, 16, 72, 90),
                  out=tmp_path / "pred.tif")
    assert out == tmp_path / "pred.tif"
    np.testing.assert_array_equal(tifffile.imread(out), expected)  # the region, not the image
    with pytest.raises(InputError, match="the file exists"):
        predict(image, model=model, device="cpu", out=out)
    with pytest.raises(InputError, match="is the input image"):
        predict(image, model=model, device="cpu", out=image, overwrite=True)
    with pytest.raises(InputError, match="write a .zarr store for Dask"):
        predict(image, model=model, device="cpu", out=tmp_path / "p.png", probabilities=True)
    with pytest.raises(InputError, match=r"not as \.jpg.*p\.zarr or p\.tif"):
        predict(image, model=model, device="cpu", out=tmp_path / "p.jpg")
    with pytest.raises(InputError, match="the folder .*missing.* does not exist"):
        predict(image, model=model, device="cpu", out=tmp_path / "missing" / "p.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.tif", "rings.png"]


def test_a_zarr_store_is_never_named_like_a_file(segmenter, tmp_path: Path) -> None:
    """The predict panel's whole-image store and Dask write folders: a .tif name is refused
    before anything is created, not turned into a folder called labels.tif."""
    from napari_muvit.engine.predictor import Predictor
    from napari_muvit.engine.stores import create_zarr_sink

    model, _, _ = segmenter
    source = open_image(np.asarray(rings(64)[0]))
    with pytest.raises(InputError, match=r"a zarr store is a folder, not a \.tif file.*labels\.zarr"):
        create_zarr_sink(Predictor(model, device="cpu"), source, tmp_path / "labels.tif")
    assert not (tmp_path / "labels.tif").exists()


def test_a_one_file_output_refuses_an_image_too_large_for_memory(segmenter, tmp_path: Path,
                                                               monkeypatch) -> None:
    from napari_muvit.engine import stores

    model, _, _ = segmenter
    monkeypatch.setattr(stores, "LABEL_FILE_MAX_PIXELS", 64 * 64)
    image = tmp_path / "big.npy"
    np.save(image, np.zeros((96, 96), np.float32))
    with pytest.raises(InputError, match=r"holds all 0.0 Mpx in memory.*resumable \.zarr"):
        predict(image, model=model, device="cpu", out=tmp_path / "big.png")
    assert predict(image, model=model, device="cpu", out=tmp_path / "crop.png",
                   region=(0, 0, 64, 64)).is_file()


def test_cli_trains_on_a_jpeg_with_png_strokes_and_writes_a_png(tmp_path: Path, capsys) -> None:
    """The camera-snapshot loop end to end: JPEG in, PNG strokes, a forest, a PNG out."""
    rgb, truth = _stained_photo(128, seed=1)
    iio.imwrite(tmp_path / "slide.jpg", rgb, quality=92)
    strokes = np.zeros_like(truth, np.uint8)
    strokes[5:8, 5:60] = 1
    for cy, cx in np.argwhere(truth == 2)[::40][:6]:
        strokes[cy, cx] = 2
    iio.imwrite(tmp_path / "strokes.png", strokes)
    model = tmp_path / "model"
    assert main(["train", str(tmp_path / "slide.jpg"), "--labels", str(tmp_path / "strokes.png"),
                 "--out", str(model), "--preset", "tiny", "--crop", "32", "--device", "cpu",
                 "--quiet"]) == 0
    assert load_model(model).in_channels == 3
    out = tmp_path / "labels.png"
    assert main(["predict", str(tmp_path / "slide.jpg"), "--model", str(model), "--out",
                 str(out), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("labels.png")
    labels = iio.imread(out)
    assert labels.shape == truth.shape and labels.dtype == np.uint8
    assert mean_dice(labels, truth) > 0.9
