"""The user's choices for the quick fit of a pixel head, shared by the engine
(:class:`~napari_muvit.engine.trainer.TrainConfig`), the CLI and the fine-tune panel.

No torch here: the CLI lists them in its help without importing the engine.
"""

from __future__ import annotations

#: what the forest of a pixel head reads (``TrainConfig.forest_levels``): ``auto`` (chosen on
#: held-out strokes), ``level1`` (level 1 alone), ``all`` (every level), ``mix`` (sub-forests on
#: the first 1, 2, … all levels, their probabilities averaged)
FOREST_LEVEL_CHOICES = ("auto", "level1", "all", "mix")
#: what a pixel head's filters see of an RGB image (``TrainConfig.color_space``): ``auto``
#: (for a new forest head CIELAB or the stain densities, whichever predicts held-out strokes
#: better; else what the head had), ``rgb`` (R, G, B as they come), ``lab`` (CIELAB: lightness
#: and two colour axes), ``hed`` (haematoxylin, eosin and DAB densities: colour deconvolution)
COLOR_SPACE_CHOICES = ("auto", "rgb", "lab", "hed")
