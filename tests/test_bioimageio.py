"""bioimage.io model packages: export, validation by bioimageio.spec, bioimageio.core's model
test, loading back (same predictions) and refusal of unsafe packages."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _predict_support import rings, tiny_segmenter

from napari_muvit.cli import main
from napari_muvit.data import PyramidSource
from napari_muvit.engine.api import predict
from napari_muvit.errors import CheckpointError, InputError
from napari_muvit.export import export_bioimageio
from napari_muvit.model import bioimageio as packaged_mod
from napari_muvit.model.loading import load_model


@pytest.fixture(scope="module")
def bundled_package(tmp_path_factory) -> Path:
    """The bundled model exported once for the module."""
    torch.set_num_threads(1)
    return export_bioimageio(None, tmp_path_factory.mktemp("pkg") / "muvit_rings.zip")


def read_member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


def rewrite(package: Path, out: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of ``package`` with members replaced (bytes), added, or removed (None)."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            if item.filename not in changes:
                dst.writestr(item, src.read(item.filename))
        for name, data in changes.items():
            if data is not None:
                dst.writestr(name, data)
    return out


def test_package_content(bundled_package) -> None:
    rdf = yaml.safe_load(read_member(bundled_package, "rdf.yaml"))
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5")
    assert [t["id"] for t in rdf["inputs"]] == ["crop_l1", "crop_l4", "bbox"]
    assert [a.get("size") for a in rdf["inputs"][1]["axes"]][2:] == [64, 64]
    assert rdf["inputs"][1]["axes"][2]["scale"] == 4.0
    # the normalisation of the model, (x - 8) / (200 - 8), as scale_linear
    scale = rdf["inputs"][0]["preprocessing"][-1]
    assert scale["id"] == "scale_linear"
    np.testing.assert_allclose([scale["kwargs"]["gain"], scale["kwargs"]["offset"]],
                               [1 / 192, -8 / 192])
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "outer", "inner"]
    assert "2602.24222" in rdf["cite"][0]["url"]
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert (arch["import_from"], arch["callable"]) == ("napari_muvit.model.bioimageio", "MuViTPackaged")
    doc = read_member(bundled_package, rdf["documentation"]).decode()
    assert "# Validation" in doc and "0.982" in doc and "outer" in doc
    assert read_member(bundled_package, rdf["covers"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    # every file named in the rdf is in the zip with its sha256
    import hashlib

    for tensor in rdf["inputs"] + rdf["outputs"]:
        member = tensor["test_tensor"]["source"]
        assert hashlib.sha256(read_member(bundled_package, member)).hexdigest() == tensor["test_tensor"]["sha256"]


def test_bioimageio_spec_validates(bundled_package) -> None:
    spec = pytest.importorskip("bioimageio.spec", reason="needs bioimageio.spec (the testing extra)")
    descr = spec.load_description(str(bundled_package))
    summary = descr.validation_summary
    assert type(descr).__name__ == "ModelDescr", summary.format()
    assert summary.status in ("valid-format", "passed"), summary.format()
    errors = [d for d in summary.details if d.status == "failed"]
    assert not errors


def test_bioimageio_core_model_test_passes(bundled_package) -> None:
    core = pytest.importorskip("bioimageio.core", reason="needs bioimageio.core (the testing extra)")
    summary = core.test_model(str(bundled_package))
    assert summary.status == "passed", summary.format()
    names = " ".join(d.name for d in summary.details)
    assert "pytorch_state_dict" in names and "torchscript" in names


def test_load_back_gives_the_same_predictions(bundled_package) -> None:
    loaded = load_model(bundled_package)
    original = load_model(__import__("napari_muvit.weights", fromlist=["x"]).default_model_path())
    assert loaded.class_names == original.class_names and loaded.label_values == original.label_values
    assert loaded.normalization == original.normalization and loaded.levels == original.levels
    source = PyramidSource(rings(256, seed=4))
    region = [[0, 0], [256, 256]]
    np.testing.assert_array_equal(
        predict(source, model=loaded, region=region, device="cpu"),
        predict(source, model=original, region=region, device="cpu"),
    )
    # the package's own test tensors: raw inputs -> normalise -> the stored probabilities
    rdf = yaml.safe_load(read_member(bundled_package, "rdf.yaml"))
    arrays = [np.load(io.BytesIO(read_member(bundled_package, t["test_tensor"]["source"])))
              for t in rdf["inputs"] + rdf["outputs"]]
    kw = rdf["inputs"][0]["preprocessing"][-1]["kwargs"]
    crops = [torch.from_numpy(a * kw["gain"] + kw["offset"]) for a in arrays[:2]]
    wrapped = packaged_mod.MuViTPackaged.wrap(loaded)
    with torch.no_grad():
        probs = wrapped(*crops, torch.from_numpy(arrays[2]))
    np.testing.assert_allclose(probs.numpy(), arrays[3], atol=1e-5)
    assert len(np.unique(arrays[3].argmax(1))) >= 2  # a real tile, with structure


def test_torchscript_weights_match(bundled_package) -> None:
    scripted = torch.jit.load(io.BytesIO(read_member(bundled_package, "weights_torchscript.pt")))
    rdf = yaml.safe_load(read_member(bundled_package, "rdf.yaml"))
    arrays = [np.load(io.BytesIO(read_member(bundled_package, t["test_tensor"]["source"])))
              for t in rdf["inputs"] + rdf["outputs"]]
    kw = rdf["inputs"][0]["preprocessing"][-1]["kwargs"]
    with torch.no_grad():
        probs = scripted(*(torch.from_numpy(a * kw["gain"] + kw["offset"]) for a in arrays[:2]),
                         torch.from_numpy(arrays[2]))
    np.testing.assert_allclose(probs.numpy(), arrays[3], atol=1e-5)


@pytest.fixture()
def tiny_package(tmp_path) -> Path:
    return export_bioimageio(tiny_segmenter(), tmp_path / "tiny.zip", torchscript=False)


class _Boom:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (Path.touch, (Path(__file__).with_name(".napari-muvit-pickle-ran"),))


def test_unsafe_packages_are_refused(tiny_package, tmp_path) -> None:
    # a pickle that would run code on load: refused by weights_only, nothing runs
    evil = Path(__file__).with_name(".napari-muvit-pickle-ran")
    evil.unlink(missing_ok=True)
    bad = rewrite(tiny_package, tmp_path / "pickle.zip", {"weights.pt": pickle.dumps({"x": _Boom()})})
    with pytest.raises(CheckpointError, match="not a plain PyTorch state dict"):
        load_model(bad)
    assert not evil.exists()

    rdf = yaml.safe_load(read_member(tiny_package, "rdf.yaml"))
    foreign = dict(rdf)
    foreign["weights"] = {"pytorch_state_dict": {**rdf["weights"]["pytorch_state_dict"],
                                                 "architecture": {"callable": "Net", "import_from": "os"}}}
    with pytest.raises(CheckpointError, match="napari-muvit only loads its own packages"):
        load_model(rewrite(tiny_package, tmp_path / "foreign.zip", {"rdf.yaml": yaml.safe_dump(foreign).encode()}))

    slip = dict(rdf)
    slip["weights"] = {"pytorch_state_dict": {**rdf["weights"]["pytorch_state_dict"], "source": "../weights.pt"}}
    with pytest.raises(CheckpointError, match="outside the package"):
        load_model(rewrite(tiny_package, tmp_path / "slip.zip", {"rdf.yaml": yaml.safe_dump(slip).encode()}))

    with pytest.raises(CheckpointError, match="not a readable zip"):
        (tmp_path / "notzip.zip").write_bytes(b"PK no zip")
        load_model(tmp_path / "notzip.zip")

    python_yaml = b"!!python/object/apply:os.system ['true']\n"
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_model(rewrite(tiny_package, tmp_path / "yaml.zip", {"rdf.yaml": python_yaml}))


def test_size_bounds(tiny_package, monkeypatch) -> None:
    monkeypatch.setattr(packaged_mod, "MAX_WEIGHTS_BYTES", 1024)
    with pytest.raises(CheckpointError, match="more than the 1024 allowed"):
        load_model(tiny_package)


def test_tiny_package_round_trip_and_validates(tiny_package) -> None:
    model = tiny_segmenter()
    loaded = load_model(tiny_package)
    source = PyramidSource(rings(192))
    np.testing.assert_array_equal(predict(source, model=loaded, device="cpu"),
                                  predict(source, model=model, device="cpu"))
    rdf = yaml.safe_load(read_member(tiny_package, "rdf.yaml"))
    assert set(rdf["weights"]) == {"pytorch_state_dict"}
    assert "No validation scores were recorded" in read_member(tiny_package, "README.md").decode()
    spec = pytest.importorskip("bioimageio.spec", reason="needs bioimageio.spec (the testing extra)")
    assert spec.load_description(str(tiny_package)).validation_summary.status in ("valid-format", "passed")


def test_cli_export(tmp_path, capsys) -> None:
    folder = tiny_segmenter().save(tmp_path / "model")
    (tmp_path / "scores.md").write_text("| metric | value |\n|---|---|\n| Dice | 0.5 |\n")
    out = tmp_path / "m.zip"
    args = ["export", str(folder), "--out", str(out), "--no-torchscript", "--name", "Tiny",
            "--author", "A. Person", "--validation", str(tmp_path / "scores.md")]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    rdf = yaml.safe_load(read_member(out, "rdf.yaml"))
    assert rdf["name"] == "Tiny" and rdf["authors"] == [{"name": "A. Person"}]
    assert "| Dice | 0.5 |" in read_member(out, "README.md").decode()
    assert main(args) == 2  # exists
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert main(["export", str(folder), "--out", str(tmp_path / "m.tar")]) == 2
    assert ".zip" in capsys.readouterr().err
    # a package works wherever a model folder does
    img = tmp_path / "img.npy"
    np.save(img, rings(192)[0])
    assert main(["predict", str(img), "--model", str(out), "--out", str(tmp_path / "p.zarr"),
                 "--device", "cpu", "--quiet"]) == 0


def test_export_refuses_bad_input(tmp_path) -> None:
    with pytest.raises(InputError, match="channels"):
        export_bioimageio(tiny_segmenter(in_channels=2), tmp_path / "x.zip")


def test_export_where_nothing_can_be_written_is_one_line(tmp_path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the package's folder would be")
    with pytest.raises(InputError, match="cannot write there"):
        export_bioimageio(tiny_segmenter(), blocker / "x.zip", torchscript=False)
    assert blocker.read_text().startswith("a file")


def test_a_stain_density_forest_exports_and_reloads_the_same(tmp_path) -> None:
    """A forest whose filters run on haematoxylin/eosin/DAB densities (RGB histology) keeps
    them in its package: the same labels after the round trip."""
    from test_quicktrain import _colour_discs, _quick_cfg, _tiny

    from napari_muvit.data.strokes import simulate_strokes
    from napari_muvit.engine.api import train

    image, truth = _colour_discs()
    strokes = simulate_strokes(truth, strokes_per_class=3, length=20, seed=0)
    model = train(image, strokes, init=_tiny(), head="pixel", config=_quick_cfg(color_space="hed"))
    package = export_bioimageio(model, tmp_path / "hed.zip", image=image, torchscript=False)
    back = load_model(package)
    assert back.head.color_space == "hed"
    np.testing.assert_array_equal(predict(image, back, device="cpu"),
                                  predict(image, model, device="cpu"))
