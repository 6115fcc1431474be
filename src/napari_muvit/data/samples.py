"""napari sample-data contribution: the Synthetic rings task (no napari import needed).

napari calls :func:`synthetic_sample` and adds the returned ``(data, kwargs, layer_type)``
tuples as layers: a multiscale image and its ground-truth labels (hidden at first so users see
the task before the answer).
"""

from __future__ import annotations

from typing import Any

from napari_muvit.data.synthetic import synthetic_rings

__all__ = ["synthetic_sample"]

# Colours of the ground-truth classes (1 = outer, 2 = inner), RGBA.
# napari turns this dict into a DirectLabelColormap (None = any other value).
_COLORS = {
    0: "transparent",
    1: (1.0, 0.6, 0.1, 1.0),
    2: (0.2, 0.8, 1.0, 1.0),
    None: "transparent",
}


def synthetic_sample(size: int = 4096, seed: int = 0) -> list[tuple[Any, dict, str]]:
    """Layer data for the Synthetic rings image (default 4096², multiscale) and ground truth."""
    syn = synthetic_rings(size=size, seed=seed)
    image = (
        syn.pyramid,
        {
            "name": "synthetic rings",
            "multiscale": True,
            "contrast_limits": (0, 255),
            "metadata": {"muvit_synthetic": {"seed": seed, "factors": list(syn.factors)}},
        },
        "image",
    )
    labels = (
        syn.labels,
        {
            "name": "ground truth",
            "opacity": 0.4,
            "visible": False,
            "colormap": dict(_COLORS),
            "metadata": {"class_names": list(syn.class_names)},
        },
        "labels",
    )
    return [image, labels]
