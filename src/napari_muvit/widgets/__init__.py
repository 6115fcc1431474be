"""napari dock widgets of napari-muvit (the only Qt/napari code of the package besides samples).

* :class:`PredictWidget`: segment the view (once or live) or the whole image.
* :class:`TrainWidget`: fine-tune a model on painted labels with a live loss curve.

Layout (Qt only in the views and the base; compute only in the jobs):

* :mod:`.state`: evented models of what each panel chose and runs (no Qt; testable alone);
* :mod:`.jobs`: model/source caches and the worker functions that call the engine (no Qt);
* :mod:`.outputs`: the napari layers the panels create and write into (no Qt);
* :mod:`.base`: the dock base shared by both panels (state-bound controls, layer combos,
  settings, shutdown);
* :mod:`.predict`, :mod:`.train`: the thin views.

Heavy modules are imported when a widget class is first used, so that napari can list the
plugin's contributions without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "PredictWidget": "napari_muvit.widgets.predict",
    "TrainWidget": "napari_muvit.widgets.train",
    "LossPlot": "napari_muvit.widgets._loss_plot",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_muvit.widgets' has no attribute {name!r}")
