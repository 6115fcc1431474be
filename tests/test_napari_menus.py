"""What napari shows of the plugin: the Plugins menu entries and the sample data."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def _titles(menu, depth: int = 0) -> list[tuple[int, str]]:
    out = []
    for action in menu.actions():
        if action.text():
            out.append((depth, action.text()))
        if action.menu() is not None:
            out.extend(_titles(action.menu(), depth + 1))
    return out


def test_plugins_menu_lists_both_panels_under_the_plugin(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    titles = _titles(viewer.window.plugins_menu)
    i = titles.index((0, "MuViT segmentation"))
    assert titles[i + 1 : i + 3] == [(1, "MuViT predict"), (1, "MuViT fine-tune")]


def test_sample_data_is_declared() -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-muvit")
    samples = {s.key: s.display_name for s in manifest.contributions.sample_data}
    assert "synthetic-rings" in samples
    widgets = [w.display_name for w in manifest.contributions.widgets]
    assert widgets == ["MuViT predict", "MuViT fine-tune"]
