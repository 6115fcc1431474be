"""Model folders: our format round trips, atomic/overwrite rules, official folders, safety."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_muvit.errors import CheckpointError
from napari_muvit.model import (
    MuViTEncoder,
    MuViTMAE,
    MuViTSegmenter,
    load_encoder,
    load_history,
    load_model,
    read_config,
    save_official,
)


S = 32


def tiny_encoder(**kw) -> MuViTEncoder:
    return MuViTEncoder(1, (1, 4), dim=48, num_layers=2, heads=2, **kw).eval()


def inputs(batch=1):
    x = torch.rand(batch, 2, 1, S, S)
    bb = torch.tensor([[[0.0, 0.0], [32.0, 32.0]], [[-48.0, -48.0], [80.0, 80.0]]])
    return x, bb[None].repeat(batch, 1, 1, 1)


def test_encoder_roundtrip(tmp_path):
    enc = tiny_encoder()
    out = enc.save(tmp_path / "enc", meta={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["format"] == "napari-muvit" and cfg["format_version"] == 1
    assert (
        cfg["kind"] == "encoder"
        and cfg["encoder"] == enc.config
        and cfg["meta"] == {"note": "test"}
    )
    back = MuViTEncoder.from_pretrained(out)
    x, bb = inputs()
    with torch.no_grad():
        assert torch.equal(enc(x, bb), back(x, bb))
    assert back.meta == {"note": "test"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.parametrize("head", ["unetr", "mask2former"])
def test_segmenter_roundtrip(tmp_path, head):
    seg = MuViTSegmenter(
        tiny_encoder(),
        head=head,
        num_classes=3,
        head_dim=32,
        class_names=["bg", "a", "b"],
        label_values=[0, 5, 7],
        normalization={"kind": "percentile", "low": 1.0, "high": 99.8},
        meta={"note": "test", "history": {"step": 1, "loss": [0.5]}, "provenance": {"a": 1}},
        class_colors=[[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 1]],
    ).eval()
    seg.save(tmp_path / "seg")
    back = load_model(tmp_path / "seg")
    assert isinstance(back, MuViTSegmenter) and not back.training
    assert back.class_names == ["bg", "a", "b"] and back.label_values == [0, 5, 7]
    assert back.normalization == seg.normalization and back.meta == {"note": "test"}
    # the training record lives in history.json, read only when asked
    assert "history" not in read_config(tmp_path / "seg")["meta"]
    assert load_history(tmp_path / "seg") == {"step": 1, "loss": [0.5], "provenance": {"a": 1}}
    assert back.class_colors == seg.class_colors and back.head_config == seg.head_config
    x, bb = inputs()
    with torch.no_grad():
        assert torch.equal(seg(x, bb), back(x, bb))
        assert torch.equal(
            back.predict_labels(x, bb).unique().sort().values,
            back.predict_labels(x, bb).unique().sort().values,
        )
    # The encoder of a segmenter folder loads on its own too.
    enc = MuViTEncoder.from_pretrained(tmp_path / "seg")
    assert torch.equal(enc.proj[0][0].weight, seg.encoder.proj[0][0].weight)


def test_mae_roundtrip(tmp_path):
    mae = MuViTMAE(tiny_encoder(), decoder_dim=40, decoder_layers=1).eval()
    mae.save(tmp_path / "mae")
    back = MuViTMAE.from_pretrained(tmp_path / "mae")
    x, bb = inputs(2)
    keep, mask = mae.sample_masks(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = mae(x, bb, idx_keep=keep, idx_mask=mask)
        b = back(x, bb, idx_keep=keep, idx_mask=mask)
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["loss"], b["loss"])
    with pytest.raises(CheckpointError, match="expected a segmenter"):
        MuViTSegmenter.from_pretrained(tmp_path / "mae")


def test_selected_levels_roundtrip(tmp_path):
    enc = MuViTEncoder(1, (1, 4, 16), dim=48, num_layers=2, heads=2).eval()
    sub = enc.select_levels([1, 16])
    sub.save(tmp_path / "sub")
    back = load_model(tmp_path / "sub")
    assert back.levels == (1, 16) and back.config == sub.config
    x = torch.rand(1, 2, 1, S, S)
    with torch.no_grad():
        assert torch.equal(sub(x), back(x))


def test_no_silent_overwrite_and_atomic_replace(tmp_path):
    enc = tiny_encoder()
    enc.save(tmp_path / "m")
    other = tiny_encoder()
    with pytest.raises(CheckpointError, match="already exists"):
        other.save(tmp_path / "m")
    back = MuViTEncoder.from_pretrained(tmp_path / "m")
    assert torch.equal(back.level_embed, enc.level_embed)  # untouched
    other.save(tmp_path / "m", overwrite=True)
    back = MuViTEncoder.from_pretrained(tmp_path / "m")
    assert torch.equal(back.level_embed, other.level_embed)
    (tmp_path / "empty").mkdir()
    enc.save(tmp_path / "empty")  # an existing empty folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]


def test_failed_write_leaves_old_folder(tmp_path, monkeypatch):
    enc = tiny_encoder()
    enc.save(tmp_path / "m")
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_encoder().save(tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.equal(MuViTEncoder.from_pretrained(tmp_path / "m").level_embed, enc.level_embed)


def test_missing_and_malformed(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match=r"config.yaml: missing"):
        load_model(tmp_path / "a")
    tiny_encoder().save(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing"):
        load_model(tmp_path / "b")
    tiny_encoder().save(tmp_path / "c")
    (tmp_path / "c" / "config.yaml").write_text("format: napari-muvit\nkind: [unclosed\n")
    with pytest.raises(CheckpointError, match=r"config.yaml: not valid YAML"):
        load_model(tmp_path / "c")
    cfg = {
        "format": "napari-muvit",
        "format_version": 1,
        "kind": "encoder",
        "encoder": {
            "in_channels": 1,
            "levels": [1, 4],
            "dim": 48,
            "heads": 2,
            "num_layers": 2,
            "bogus": 3,
        },
    }
    (tmp_path / "c" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"config.yaml: bad encoder config .*bogus"):
        load_model(tmp_path / "c")
    cfg["encoder"].pop("bogus")
    cfg["format_version"] = 7
    (tmp_path / "c" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="format_version 7"):
        load_model(tmp_path / "c")
    cfg["format_version"] = 1
    del cfg["encoder"]
    (tmp_path / "c" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"config.yaml: missing key 'encoder'"):
        load_model(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    cfg["encoder"] = tiny_encoder().config
    (tmp_path / "c" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable"):
        load_model(tmp_path / "c")


def test_shape_mismatch_names_file_and_key(tmp_path):
    tiny_encoder().save(tmp_path / "m")
    cfg = read_config(tmp_path / "m")
    cfg["encoder"]["dim"] = 64
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: key 'level_embed' has shape \(2, 1, 1, 48\)"
    ):
        load_model(tmp_path / "m")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _official_config_text():
    return (
        "attention_mode: all\ndim: 48\ndropout: 0.0\nheads: 2\nin_channels: 1\n"
        "input_space: real\nlevels: !!python/tuple\n- 1\n- 4\nndim: 2\nnum_layers: 2\n"
        "patch_size: 8\nrotary_base: 10000\nrotary_mode: per_layer\nuse_level_embed: true\n"
    )


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.yaml").write_text(_official_config_text())
    marker = tmp_path / "PWNED"
    payload = {"level_embed": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, folder / "model.pth")
    else:
        with open(folder / "model.pth", "wb") as fh:
            pickle.dump(payload, fh)
    # sanity: the payload really would create the marker if unpickled unsafely
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"model.pth: refused to load"):
        load_model(folder)
    with pytest.raises(CheckpointError, match=r"model.pth: refused to load"):
        MuViTEncoder.from_pretrained(folder)
    assert not marker.exists()
    # control: the plain pickle module does execute it (proves the test is meaningful)
    if writer == "raw pickle":
        with open(folder / "model.pth", "rb") as fh:
            pickle.load(fh)
        assert marker.exists()


def test_official_export_roundtrip(tmp_path):
    enc = tiny_encoder(coord_mode="linspace")
    save_official(enc, tmp_path / "off")
    text = (tmp_path / "off" / "config.yaml").read_text()
    assert "!!python/tuple" in text
    sd = torch.load(tmp_path / "off" / "model.pth", weights_only=True)
    assert "layers.0.attn.to_q.weight" in sd and "layers.1.ff.ff.0.0.weight" in sd
    assert "layers.0.rotary_pos_embs.1.inv_freq" in sd
    back = load_model(tmp_path / "off")
    assert back.coord_mode == "linspace"
    x, bb = inputs()
    with torch.no_grad():
        assert torch.equal(enc(x, bb), back(x, bb))
    mae = MuViTMAE(
        tiny_encoder(coord_mode="linspace"),
        decoder_dim=40,
        decoder_layers=2,
        loss_mode="token_mean",
    )
    save_official(mae, tmp_path / "offmae")
    back = load_model(tmp_path / "offmae")
    assert isinstance(back, MuViTMAE)
    keep, mask = mae.sample_masks(1, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = mae.eval()(x, bb, idx_keep=keep, idx_mask=mask)
        b = back(x, bb, idx_keep=keep, idx_mask=mask)
    assert torch.equal(a["pred"], b["pred"])
    enc_only = load_encoder(tmp_path / "offmae")
    assert isinstance(enc_only, MuViTEncoder)


@pytest.mark.parametrize("rotary_mode", ["none", "fixed", "shared"])
def test_official_rotary_modes_and_legacy_key(tmp_path, rotary_mode):
    enc = tiny_encoder(coord_mode="linspace", rotary_mode=rotary_mode)
    save_official(enc, tmp_path / "o")
    sd = torch.load(tmp_path / "o" / "model.pth", weights_only=True)
    if rotary_mode == "none":
        assert not any("inv_freq" in k for k in sd)
        # legacy configs say use_rotary_embed: false instead of rotary_mode: none
        text = (
            (tmp_path / "o" / "config.yaml")
            .read_text()
            .replace("rotary_mode: none", "use_rotary_embed: false")
        )
        (tmp_path / "o" / "config.yaml").write_text(text)
    else:
        assert "rotary_pos_embs.0.inv_freq" in sd and "layers.1.rotary_pos_embs.0.inv_freq" in sd
    back = load_model(tmp_path / "o")
    assert back.rotary_mode == rotary_mode
    x, bb = inputs()
    with torch.no_grad():
        assert torch.equal(enc(x, bb), back(x, bb))


def test_heads_one_official(tmp_path):
    enc = MuViTEncoder(1, (1,), dim=24, num_layers=1, heads=1, coord_mode="linspace")
    save_official(enc, tmp_path / "h1")
    sd = torch.load(tmp_path / "h1" / "model.pth", weights_only=True)
    assert "layers.0.attn.to_out.weight" not in sd
    assert load_model(tmp_path / "h1").heads == 1


def test_official_bad_keys(tmp_path):
    enc = tiny_encoder(coord_mode="linspace")
    save_official(enc, tmp_path / "o")
    sd = torch.load(tmp_path / "o" / "model.pth", weights_only=True)
    sd["layers.0.attn.to_k.weight"] = torch.zeros(48, 40)
    torch.save(sd, tmp_path / "o" / "model.pth")
    with pytest.raises(
        CheckpointError, match=r"model.pth: key 'layers.0.attn.to_k.weight' has shape \(48, 40\)"
    ):
        load_model(tmp_path / "o")
    sd.pop("layers.0.attn.to_k.weight")
    torch.save(sd, tmp_path / "o" / "model.pth")
    with pytest.raises(
        CheckpointError, match=r"model.pth: missing key 'layers.0.attn.to_k.weight'"
    ):
        load_model(tmp_path / "o")
    text = _official_config_text().replace("ndim: 2", "ndim: 3")
    (tmp_path / "o" / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"config.yaml: key 'ndim' is 3"):
        load_model(tmp_path / "o")
    torch.save([1, 2], tmp_path / "o" / "model.pth")
    (tmp_path / "o" / "config.yaml").write_text(_official_config_text())
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_model(tmp_path / "o")


def test_numpy_types_in_meta_are_stored_plain(tmp_path):
    seg = MuViTSegmenter(
        tiny_encoder(),
        num_classes=2,
        head_dim=32,
        meta={"loss": np.float32(0.5), "steps": np.int64(3), "t": (1, 2)},
    )
    seg.save(tmp_path / "s")
    assert load_model(tmp_path / "s").meta == {"loss": 0.5, "steps": 3, "t": [1, 2]}


# ----------------------------------------------------------------------------- hostile folders
def _bomb_lines(levels: int = 9) -> list[str]:
    """A ~1 KB YAML "billion laughs": 10**levels values once its aliases are expanded."""
    lines = ["  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return lines


def test_yaml_alias_bomb_in_meta_is_refused_at_once(tmp_path):
    tiny_encoder().save(tmp_path / "m")
    text = (tmp_path / "m" / "config.yaml").read_text()
    text = text.replace("meta: {}", "meta:\n" + "\n".join(_bomb_lines()))
    assert "&l8" in text and len(text.encode()) < 4000
    (tmp_path / "m" / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"config.yaml: YAML aliases expand to more than"):
        load_model(tmp_path / "m")
    # a few aliases (as yaml.safe_dump writes for a shared list) still load
    tiny_encoder().save(tmp_path / "ok")
    text = (tmp_path / "ok" / "config.yaml").read_text()
    text = text.replace("meta: {}", "meta:\n  a: &s [1, 4]\n  b: *s\n  c: *s")
    (tmp_path / "ok" / "config.yaml").write_text(text)
    assert load_model(tmp_path / "ok").meta == {"a": [1, 4], "b": [1, 4], "c": [1, 4]}


def test_deep_nesting_recursive_alias_and_huge_config_are_refused(tmp_path):
    tiny_encoder().save(tmp_path / "m")
    config = tmp_path / "m" / "config.yaml"
    good = config.read_text()
    # 100k nested lists crash libyaml's composer (a segfault): refused from the event stream
    config.write_text(good.replace("meta: {}", "meta: " + "[" * 100_000 + "]" * 100_000))
    # our event-stream bound, or (PyYAML >= 6.0.4) libyaml's own flow-level limit: refused either way
    with pytest.raises(CheckpointError, match="nested deeper than 32 levels|not valid YAML"):
        load_model(tmp_path / "m")
    config.write_text(good.replace("meta: {}", "meta: &r [1, *r]"))
    with pytest.raises(CheckpointError, match="recursive or undefined YAML alias"):
        load_model(tmp_path / "m")
    config.write_text(good + "#" * (2 << 20))
    with pytest.raises(CheckpointError, match="more than a model config can be"):
        load_model(tmp_path / "m")


def _mem_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_implausible_dimensions_are_refused_before_allocating(tmp_path):
    tiny_encoder().save(tmp_path / "m")
    cfg = read_config(tmp_path / "m")
    before = _mem_peak_mb()
    for dim, layers, match in [
        (65536, 64, r"key 'dim' is 65536, outside the plausible range 1..16384"),
        (8192, 64, r"num_layers 64 x dim 8192 needs at least .* weights, the weights file holds"),
        (48, 100_000, r"key 'num_layers' is 100000, outside the plausible range"),
        (4096, 2, r"num_layers 2 x dim 4096 needs at least"),
    ]:
        cfg["encoder"].update(dim=dim, num_layers=layers, heads=2)
        (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(CheckpointError, match=match):
            load_model(tmp_path / "m")
    # within the plausible range and the file's size, but a different shape
    cfg["encoder"].update(dim=64, num_layers=2, heads=2)
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"key 'level_embed' has shape \(2, 1, 1, 48\)"):
        load_model(tmp_path / "m")
    assert _mem_peak_mb() - before < 500  # 65536 x 64 layers would be ~51 GB


def test_large_files_are_shape_checked_on_the_meta_device(tmp_path, monkeypatch):
    from napari_muvit.model import checkpoint

    tiny_encoder().save(tmp_path / "m")
    cfg = read_config(tmp_path / "m")
    cfg["encoder"].update(dim=64)
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
    built = []
    real_build = checkpoint._build

    def recording_build(kind, path, fn):
        built.append(torch.empty(0).device.type)  # the device new tensors land on
        return real_build(kind, path, fn)

    monkeypatch.setattr(checkpoint, "_build", recording_build)
    monkeypatch.setattr(checkpoint, "_META_PROBE_ABOVE", 0)  # as if the file were large
    with pytest.raises(CheckpointError, match=r"key 'level_embed' has shape \(2, 1, 1, 48\)"):
        load_model(tmp_path / "m")
    assert built == ["meta"]  # refused before any real tensor was allocated
    cfg["encoder"].update(dim=48)
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert isinstance(load_model(tmp_path / "m"), MuViTEncoder) and built[1:] == ["meta", "cpu"]


def test_hostile_head_dim_is_refused_before_building(tmp_path):
    seg = MuViTSegmenter(tiny_encoder(), num_classes=2, head_dim=32)
    seg.save(tmp_path / "s")
    cfg = read_config(tmp_path / "s")
    cfg["head"]["head_dim"] = 16000
    (tmp_path / "s" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="head_dim 16000 needs at least"):
        load_model(tmp_path / "s")


def test_official_folder_with_implausible_dimensions(tmp_path):
    enc = tiny_encoder(coord_mode="linspace")
    save_official(enc, tmp_path / "o")
    text = (tmp_path / "o" / "config.yaml").read_text()
    (tmp_path / "o" / "config.yaml").write_text(
        text.replace("dim: 48", "dim: 65536").replace("num_layers: 2", "num_layers: 64")
    )
    with pytest.raises(CheckpointError, match="'dim' is 65536, outside the plausible range"):
        load_model(tmp_path / "o")
    (tmp_path / "o" / "config.yaml").write_text(text.replace("dim: 48", "dim: 4096"))
    with pytest.raises(CheckpointError, match="num_layers 2 x dim 4096 needs at least"):
        load_encoder(tmp_path / "o")


def test_c_and_python_safe_loaders_agree():
    from napari_muvit.model.checkpoint import TupleSafeLoader, _FastTupleSafeLoader
    from napari_muvit.weights import WEIGHTS_DIR

    fixtures = Path(__file__).parent / "fixtures" / "muvit-official"
    files = sorted(WEIGHTS_DIR.glob("*/config.yaml")) + sorted(fixtures.glob("*/config.yaml"))
    assert len(files) >= 4
    for path in files:
        text = path.read_text()
        assert yaml.load(text, Loader=_FastTupleSafeLoader) == yaml.load(
            text, Loader=TupleSafeLoader
        ), path
    assert yaml.__with_libyaml__ is False or _FastTupleSafeLoader.__mro__[1] is yaml.CSafeLoader


def test_load_model_names_a_wrong_argument():
    with pytest.raises(CheckpointError, match=r"model folder: expected a path .* got NoneType"):
        load_model(None)


def test_save_keeps_the_users_files_and_replaces_only_model_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "NOTES.txt").write_text("mine")
    enc = tiny_encoder(coord_mode="linspace")
    enc.save(folder, overwrite=True)
    save_official(enc, folder, overwrite=True)  # official files replace ours, notes stay
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.txt", "config.yaml", "model.pth"]
    assert (folder / "NOTES.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_old_layout_keeps_loading_and_splits_without_touching_weights(tmp_path):
    from napari_muvit.model.checkpoint import split_history

    seg = MuViTSegmenter(tiny_encoder(), num_classes=2, head_dim=32, meta={"crop_size": 32})
    seg.save(tmp_path / "old")
    # the layout before history.json: history and provenance inside config.yaml's meta
    cfg = read_config(tmp_path / "old")
    cfg["meta"]["history"] = {"status": "finished", "step": 2, "loss": [0.9, 0.5]}
    cfg["meta"]["provenance"] = {"images": ["/home/someone/data/a.npy"], "steps": 2}
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    weights = (tmp_path / "old" / "model.safetensors").read_bytes()
    old = load_model(tmp_path / "old")
    assert old.meta["history"]["loss"] == [0.9, 0.5] and old.meta["crop_size"] == 32
    assert load_history(tmp_path / "old") == {
        "status": "finished", "step": 2, "loss": [0.9, 0.5],
        "provenance": {"images": ["/home/someone/data/a.npy"], "steps": 2},
    }
    assert split_history(tmp_path / "old") is True
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == weights
    assert load_model(tmp_path / "old").meta == {"crop_size": 32}
    record = load_history(tmp_path / "old")
    assert record["loss"] == [0.9, 0.5] and record["provenance"]["images"] == ["a.npy"]
    assert "/home/someone" not in "".join(p.read_text() for p in (tmp_path / "old").glob("*.*")
                                          if p.suffix in (".yaml", ".json"))
    assert split_history(tmp_path / "old") is False  # already split


def test_load_predictor_model_is_the_one_resolver_of_a_users_model_choice(
    tmp_path, official_fixtures
):
    from napari_muvit.model import load_predictor_model
    from napari_muvit.weights import default_model_path

    bundled = load_predictor_model(None)
    assert bundled.num_classes == 3 and list(bundled.class_names) == ["background", "outer", "inner"]
    # a config.yaml chosen in a file dialog means its folder
    again = load_predictor_model(default_model_path() / "config.yaml")
    assert torch.equal(next(again.parameters()), next(bundled.parameters()))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_predictor_model(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; choose the model"):
        load_predictor_model(tmp_path / "weights.bin")
    tiny_encoder().save(tmp_path / "enc")
    with pytest.raises(CheckpointError, match="a MuViT encoder .* not a segmenter"):
        load_predictor_model(tmp_path / "enc")
    with pytest.raises(CheckpointError, match="an official muvit encoder .* not a segmenter"):
        load_predictor_model(official_fixtures / "encoder")
    with pytest.raises(CheckpointError, match="expected a path"):
        load_predictor_model(5)
