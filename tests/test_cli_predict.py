"""`napari-muvit predict`: happy path, progress bar, one-line errors, resume."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr
from _predict_support import reference_labels, rings, rings_source, tiny_segmenter

from napari_muvit.cli import main
from napari_muvit.cli.predict import ProgressBar, parse_region
from napari_muvit.engine.sinks import read_store_info
from napari_muvit.errors import InputError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_segmenter()
    folder = model.save(root / "model")
    image = root / "image.npy"
    np.save(image, np.asarray(rings(192)[0]))
    rgb = root / "rgb.npy"
    np.save(rgb, np.zeros((96, 96, 3), np.uint8))
    return {"root": root, "model": folder, "image": image, "rgb": rgb, "segmenter": model}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_cli_predicts_region_with_progress(files, capsys) -> None:
    out = files["root"] / "a.zarr"
    code = main(["predict", str(files["image"]), "--model", str(files["model"]), "--out", str(out),
                 "--region", "10,20,100,120", "--device", "cpu", "--batch", "4",
                 "--overlap", "0"])  # compared with unblended tiles below
    assert code == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == str(out.absolute())
    assert "100.0%" in cap.err and "tiles" in cap.err  # progress bar on stderr
    labels = zarr.open_group(str(out), mode="r")["0"][:]
    region = np.array([[10, 20], [100, 120]])
    ref = reference_labels(files["segmenter"], rings_source(192), region)
    np.testing.assert_array_equal(labels[10:100, 20:120], ref)
    assert read_store_info(out)["status"] == "complete"


def test_cli_refuses_existing_output_then_overwrites(files, capsys) -> None:
    out = files["root"] / "b.zarr"
    args = ["predict", str(files["image"]), "--model", str(files["model"]), "--out", str(out),
            "--region", "0,0,32,32", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in _one_line_error(capsys)
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--region", "5,5,5,9"], "empty region"),
        (["--region", "a,b,c"], "four numbers"),
        (["--region", "900,900,990,990"], "outside the image"),
        (["--device", "tpu"], "device must be"),
    ],
)
def test_cli_bad_options_are_one_line(files, capsys, extra, needle) -> None:
    out = files["root"] / "c.zarr"
    code = main(["predict", str(files["image"]), "--model", str(files["model"]), "--out",
                 str(out), "--quiet", *extra])
    assert code == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()  # nothing written before the input was validated


def test_cli_channel_mismatch_and_missing_inputs(files, capsys) -> None:
    out = files["root"] / "d.zarr"
    base = ["--model", str(files["model"]), "--out", str(out), "--quiet"]
    assert main(["predict", str(files["rgb"]), *base]) == 2
    assert "channel" in _one_line_error(capsys)
    assert main(["predict", str(files["root"] / "nope.npy"), *base]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["predict", str(files["image"]), "--model", str(files["root"] / "none"),
                 "--out", str(out), "--quiet"]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert not out.exists()


def test_cli_subprocess_failure_has_no_traceback(files, tmp_path) -> None:
    blocker = tmp_path / "taken.zarr"
    blocker.mkdir()
    (blocker / "data.txt").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "napari_muvit", "predict", str(files["image"]), "--model",
         str(files["model"]), "--out", str(blocker), "--overwrite", "--quiet"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a napari-muvit prediction" in lines[0]
    assert (blocker / "data.txt").read_text() == "keep me"


def test_parse_region_and_progress_bar() -> None:
    assert parse_region("1, 2,30,40") == [[1, 2], [30, 40]]
    with pytest.raises(InputError):
        parse_region("3,3,1,9")

    class Stream:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    s = Stream()
    bar = ProgressBar(s, width=10, interval=0.0)
    bar(5, 10, "")
    bar(10, 10, "")
    bar.close()
    assert "[#####.....]  50.0% 5/10" in s.text and "[##########] 100.0% 10/10" in s.text
    assert s.text.endswith("\n")


@pytest.mark.parametrize("kind", ["zarr", "tiff"])
def test_cli_reads_zarr_and_tiff_images(files, kind, capsys) -> None:
    img = np.asarray(rings(192)[0])
    if kind == "zarr":
        path = files["root"] / "image.zarr"
        if not path.exists():
            group = zarr.open_group(str(path), mode="w")
            group.create_array("0", data=img, chunks=(64, 64))
    else:
        import tifffile

        path = files["root"] / "image.tif"
        tifffile.imwrite(path, img)
    out = files["root"] / f"from_{kind}.zarr"
    code = main(["predict", str(path), "--model", str(files["model"]), "--out", str(out),
                 "--region", "0,0,64,96", "--device", "cpu", "--quiet", "--overwrite",
                 "--overlap", "0"])
    assert code == 0, capsys.readouterr().err
    labels = zarr.open_group(str(out), mode="r")["0"][:64, :96]
    ref = reference_labels(files["segmenter"], rings_source(192), np.array([[0, 0], [64, 96]]))
    np.testing.assert_array_equal(labels, ref)


@pytest.mark.parametrize("name", ["pred.jpg", "pred.NPZ", "pred.h5"])
def test_cli_refuses_a_file_format_it_cannot_write(files, capsys, name) -> None:
    out = files["root"] / name
    code = main(["predict", str(files["image"]), "--model", str(files["model"]), "--out",
                 str(out), "--quiet"])
    assert code == 2
    err = _one_line_error(capsys)
    assert name in err and ".zarr" in err
    assert not out.exists()
