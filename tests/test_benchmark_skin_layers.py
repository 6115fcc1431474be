"""benchmarks/bench_scribbles.py: the skin section's derived layer map finds the layers.

The ``skin`` data set scores the annotation loop against a layer map derived from the image
(no expert map ships offline); on a drawn section whose layers are known, the derivation must
put every layer where it was drawn, rete ridges and nests of purple cells in the dermis
included.
"""

from __future__ import annotations

import numpy as np
from conftest import load_benchmark


def _script():
    return load_benchmark("bench_scribbles")


def _drawn_section(h: int = 240, w: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """White glass, a basket weave of keratin, a purple epidermis with ridges, pink dermis
    with a purple nest: RGB and the layers drawn (0 glass, 1 corneum, 2 epidermis, 3 dermis)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    surface = 50 + 10 * np.sin(xx / 40)
    granular = surface + 30
    ridges = granular + 40 + 25 * (np.sin(xx / 18) > 0.3)
    truth = np.full((h, w), 3)
    truth[yy < ridges] = 2
    truth[yy < granular] = 1
    truth[yy < surface] = 0
    colours = np.array([[235, 235, 232], [200, 150, 200], [150, 60, 150], [240, 190, 205]], float)
    image = colours[truth]
    weave = (truth == 1) & ((yy // 3 + xx // 7) % 3 == 0)
    image[weave] = colours[0]  # white gaps between keratin sheets
    nest = (yy - 200) ** 2 + (xx - 160) ** 2 < 15**2
    image[nest] = colours[2]  # dermis holds purple cells too
    image += rng.normal(0, 4, image.shape)
    return image.clip(0, 255).astype(np.uint8), truth


def test_the_derived_layer_map_finds_drawn_layers() -> None:
    image, truth = _drawn_section()
    derived = _script().skin_layers(image)
    assert set(np.unique(derived)) == {0, 1, 2, 3}
    for k in range(4):
        agree = (derived[truth == k] == k).mean()
        assert agree > 0.9, (k, agree)
    assert (derived == truth).mean() > 0.95
    yy, xx = np.mgrid[0 : truth.shape[0], 0 : truth.shape[1]]
    nest = (yy - 200) ** 2 + (xx - 160) ** 2 < 15**2
    assert (derived[nest] == 3).mean() > 0.95  # purple cells deep in the dermis stay dermis
