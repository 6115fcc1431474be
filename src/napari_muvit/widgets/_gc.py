"""Short garbage collections in napari's process while a MuViT panel is open (issue 12).

With napari, torch, scipy and scikit-learn loaded, Python tracks about 580,000 container
objects, and a full (generation-2) collection visits all of them: 0.4 s on a small CPU, holding
the GIL, so the viewer freezes for that long whichever thread triggered it (measured by
``benchmarks/bench_ui.py --profile``: the longest stall of the training phase).  Almost all of
those objects live as long as the process (modules, classes, functions, napari's and Qt's
machinery), so the first panel moves everything alive at that moment into the permanent
generation (:func:`gc.freeze`), and so does every later panel; later collections visit only
what was created since (a full collection then takes a few ms).

Frozen objects are still freed by reference counting, but a frozen object that later becomes
part of unreachable cycles would never be collected.  The layers of the open viewers are the
frozen objects a user does discard, so removing one of them thaws everything and, one event-loop
turn later (when nothing refers to the layer any more), collects once and freezes again; the
last panel to close thaws everything (napari's own leak checks collect the viewer then).
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

log = logging.getLogger("napari_muvit.widgets")

_panels: weakref.WeakSet[Any] = weakref.WeakSet()  # open panels holding the freeze
_frozen_layers: weakref.WeakSet[Any] = weakref.WeakSet()  # viewer layers frozen by us
_state = {"frozen": False, "refreeze_pending": False}


def hold(panel: Any) -> None:
    """``panel`` opened: freeze what is alive (see the module docstring).  Again at every
    panel: a panel's first use imports more (the fine-tune panel: 120,000 objects of torch's
    lazily imported modules); freezing is O(1)."""
    _panels.add(panel)
    if gc.isenabled():
        _freeze()


def release(panel: Any = None) -> None:
    """``panel`` closed (None: one was destroyed): when no open panel is left, thaw
    everything."""
    if panel is not None:
        _panels.discard(panel)
    open_panels = [p for p in list(_panels)
                   if getattr(getattr(p, "lifeline", None), "alive", False)]
    if not open_panels and _state["frozen"]:
        _thaw()


def layer_removed(layer: Any) -> None:
    """A viewer layer was removed: if it was frozen, let it be collected (see the module)."""
    if not _state["frozen"] or layer not in _frozen_layers:
        return
    _thaw()
    if _state["refreeze_pending"]:
        return
    _state["refreeze_pending"] = True
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, _collect_and_refreeze)


def _collect_and_refreeze() -> None:
    _state["refreeze_pending"] = False
    if any(getattr(getattr(p, "lifeline", None), "alive", False) for p in list(_panels)) \
            and not _state["frozen"]:
        gc.collect()
        _freeze()


def _freeze() -> None:
    gc.freeze()
    _state["frozen"] = True
    try:
        from napari import Viewer

        for viewer in list(getattr(Viewer, "_instances", ())):
            for layer in viewer.layers:
                _frozen_layers.add(layer)
    except Exception as err:  # noqa: BLE001 - the freeze is an optimisation only
        log.debug("listing the viewers' layers failed (%s): not freezing", err)
        _thaw()


def _thaw() -> None:
    gc.unfreeze()
    _state["frozen"] = False
    _frozen_layers.clear()


def frozen() -> bool:
    """Whether the panels' freeze is in effect."""
    return bool(_state["frozen"])
