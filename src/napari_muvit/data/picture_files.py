"""Plain picture files: PNG, JPEG, BMP, GIF and WebP images and label images.

Camera snapshots of stained slides (H&E and the like) usually arrive as JPEG or PNG, and a
user who paints strokes in another program saves them as PNG. napari opens these files with
``imageio.v3.imread``; :func:`read_picture` uses the same call, so the CLI and the API see the
very pixels the user painted on in napari.

Label pictures are read by Pillow, not imageio: imageio applies a PNG's palette (returning
colours), while the class of a pixel is its palette index. JPEG labels are refused because
lossy compression changes the class values along every stroke.

:func:`write_label_picture` is the small-image output of ``napari-muvit predict --out
labels.png|.tif|.npy``: one file, written atomically, never over an existing file unless asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from napari_muvit.errors import InputError
from napari_muvit.files import replace_file

__all__ = [
    "LABEL_FILE_SUFFIXES",
    "PICTURE_SUFFIXES",
    "check_label_file_target",
    "is_label_file",
    "is_picture",
    "read_label_picture",
    "read_picture",
    "write_label_picture",
]

#: formats read by :func:`read_picture` (2-D, grey or RGB/RGBA)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_LOSSY = (".jpg", ".jpeg")
#: formats written by :func:`write_label_picture`
LABEL_FILE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def is_picture(path: str | os.PathLike[str]) -> bool:
    """True for a file name with one of :data:`PICTURE_SUFFIXES`."""
    return Path(path).suffix.lower() in PICTURE_SUFFIXES


def read_picture(path: str | os.PathLike[str]) -> np.ndarray:
    """The pixels of a picture file as napari shows them: ``(H, W)`` or ``(H, W, 3|4)``."""
    import imageio.v3 as iio

    path = Path(path)
    try:
        array = np.asarray(iio.imread(path))
    except Exception as err:  # noqa: BLE001 - imageio/Pillow raise many types for damaged files
        if type(err).__name__ == "DecompressionBombError":  # Pillow's guard, above ~179 Mpx
            raise InputError(
                f"image {str(path)!r}: too large for a picture reader ({err}); convert it to a "
                "tiled TIFF or an OME-Zarr, which are read tile by tile"
            ) from None
        raise InputError(
            f"image {str(path)!r}: cannot read this {path.suffix} file ({type(err).__name__}: "
            f"{err}); it is damaged or not a {path.suffix.lstrip('.').upper()} picture"
        ) from None
    if array.ndim in (3, 4) and array.shape[0] == 1 and array.shape[-1] in (3, 4):
        array = array[0]  # a one-frame GIF comes as a stack of one
    if array.ndim == 3 and array.shape[-1] in (3, 4) or array.ndim == 2:
        return array
    raise InputError(
        f"image {str(path)!r}: expected one 2-D picture (grey, RGB or RGBA), got shape "
        f"{array.shape} (an animation or a stack: save the frame to segment as PNG or TIFF)"
    )


def read_label_picture(path: str | os.PathLike[str]) -> np.ndarray:
    """A label picture's class values (0 = not annotated) as a 2-D integer array.

    A palette PNG gives its palette indices; a grey picture its grey values; an RGB picture
    whose three channels are equal (grey saved as colour) its first channel; fully transparent
    pixels count as not annotated. Coloured RGB and JPEG files are refused with a message
    saying how to save labels.
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() in _LOSSY:
        raise InputError(
            f"labels {str(path)!r}: JPEG compression changes pixel values, so the class of "
            "pixels along every stroke would be wrong; save the labels as PNG or TIFF"
        )
    try:
        with Image.open(path) as picture:
            array = np.asarray(picture)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for damaged files
        raise InputError(
            f"labels {str(path)!r}: cannot read this {path.suffix} file ({type(err).__name__}: "
            f"{err})"
        ) from None
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # grey+alpha, RGBA
        transparent = array[..., -1] == 0  # an unpainted pixel of a layer saved with alpha
        array = np.where(transparent[..., None], 0, array[..., :-1])
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 3:
        if not (np.array_equal(array[..., 0], array[..., 1])
                and np.array_equal(array[..., 0], array[..., 2])):
            raise InputError(
                f"labels {str(path)!r}: a colour picture, not a label image; save the class "
                "values (0 = not annotated, 1, 2, ...) as a one-channel PNG or TIFF (in napari: "
                "select the Labels layer, File > Save Selected Layers)"
            )
        array = array[..., 0]
    if array.ndim != 2:
        raise InputError(f"labels {str(path)!r}: expected a 2-D label picture, got shape "
                         f"{array.shape}")
    return array.astype(np.uint8) if array.dtype == bool else array


def write_label_picture(path: str | os.PathLike[str], labels: np.ndarray,
                        overwrite: bool = False) -> Path:
    """Write ``labels`` to ``path`` (.png, .tif/.tiff or .npy) in the smallest unsigned type.

    The file appears complete or not at all (a temporary sibling renamed into place). An
    existing file is replaced only with ``overwrite``; a folder never.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LABEL_FILE_SUFFIXES:
        raise InputError(f"out {str(path)!r}: expected a .zarr store or a "
                         f"{', '.join(LABEL_FILE_SUFFIXES)} file")
    check_label_file_target(path, overwrite)
    array = _smallest_unsigned(np.asarray(labels), path)
    replace_file(path, _writer(suffix, array))
    return path


def is_label_file(out: Any) -> bool:
    """True if ``out`` names a one-file labels output (:data:`LABEL_FILE_SUFFIXES`)."""
    return (isinstance(out, (str, os.PathLike)) and bool(str(out).strip())
            and Path(out).suffix.lower() in LABEL_FILE_SUFFIXES)


def check_label_file_target(path: Path, overwrite: bool) -> None:
    """Refuse writing a label file at ``path``: a folder of that name, an existing file
    without ``overwrite``, a folder to write in that is missing or not writable."""
    if path.is_dir():
        raise InputError(f"out {str(path)!r}: a folder of that name exists; choose a file name")
    if path.exists() and not overwrite:
        raise InputError(f"out {str(path)!r}: the file exists; pass --overwrite "
                         "(overwrite=True) to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"out {str(path)!r}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"out {str(path)!r}: the folder {str(folder)!r} is not writable")


def _smallest_unsigned(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.ndim != 2:
        raise InputError(f"out {str(path)!r}: expected 2-D labels, got shape {labels.shape}")
    top = int(labels.max(initial=0))
    if labels.size and int(labels.min()) < 0:
        raise InputError(f"out {str(path)!r}: negative label values cannot be stored")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            if dtype is np.uint32 and path.suffix.lower() == ".png":
                raise InputError(f"out {str(path)!r}: {top} classes do not fit a PNG; write "
                                 "a .tif instead")
            return labels.astype(dtype, copy=False)
    raise InputError(f"out {str(path)!r}: label value {top} does not fit 32 bits")


def _writer(suffix: str, array: np.ndarray) -> Any:
    def write(handle: BinaryIO) -> None:
        if suffix == ".npy":
            np.save(handle, array)
        elif suffix == ".png":
            import imageio.v3 as iio

            iio.imwrite(handle, array, extension=".png")
        else:
            import tifffile

            tifffile.imwrite(handle, array, compression="zlib", photometric="minisblack")

    return write
