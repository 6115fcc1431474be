"""napari sample-data contribution: the Synthetic rings task (no napari import needed).

napari calls :func:`synthetic_sample` and adds the returned ``(data, kwargs, layer_type)``
tuples as layers: a multiscale image and its ground-truth labels (hidden at first so users see
the task before the answer).
"""

from __future__ import annotations

from typing import Any

from napari_muvit.data.synthetic import SyntheticImage, synthetic_field

__all__ = ["synthetic_sample"]

# Colours of the ground-truth classes (1 = outer, 2 = inner), RGBA.
# napari turns this dict into a DirectLabelColormap (None = any other value).
_COLORS = {
    0: "transparent",
    1: (1.0, 0.6, 0.1, 1.0),
    2: (0.2, 0.8, 1.0, 1.0),
    None: "transparent",
}


SYSTEM_SIZE = 512  # the ring-system scale the bundled model was trained on (docs/model-card.md)


def synthetic_sample_image(size: int = 4096, seed: int = 0) -> SyntheticImage:
    """The sample's image: a ``size``² field of 512² ring systems (at least one system).

    The bundled model knows rings of the scale it was trained on, so larger samples tile more
    systems rather than enlarging one.
    """
    grid = max(1, int(size) // SYSTEM_SIZE)
    return synthetic_field(grid=grid, system_size=SYSTEM_SIZE, seed=seed)


def synthetic_sample(size: int = 4096, seed: int = 0) -> list[tuple[Any, dict, str]]:
    """Layer data for the Synthetic rings field (default 4096², multiscale) and ground truth."""
    syn = synthetic_sample_image(size=size, seed=seed)
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
            # marked so that the training panel never offers it as annotations
            "metadata": {
                "class_names": list(syn.class_names),
                "napari_muvit": {"ground_truth": True},
            },
        },
        "labels",
    )
    return [image, labels]
