"""Time-sliced painting of worker results on the GUI thread (no Qt here).

A view job streams its tiles from a worker thread.  Painting one tile into a layer is cheap,
but tiles arrive in bursts (a batch, or a run of cached tiles), and Qt delivers a burst of
queued signals in one go: painting and refreshing each on arrival kept the event loop busy for
the whole burst.  Instead, the panel pushes every message of a job (handshake, tiles, the end)
into a :class:`PaintQueue` on arrival, and a zero-interval timer calls :meth:`PaintQueue.run`,
which applies the messages *in arrival order* until a time budget is spent, then refreshes
each touched layer once (the texture regions of all tiles of the slice in one upload) and
returns to the event loop.  Nothing is dropped or reordered, so the final layers equal those of
painting each tile on arrival; only the refreshes are coalesced.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PaintBatch:
    """What the messages applied in one slice changed.

    ``regions``: per layer (keyed by ``id``), the layer and the slice keys of its data that
    were written (refreshed region by region); ``dirty``: layers to refresh as a whole (by the
    panel's rate-limited refresh).
    """

    regions: dict[int, tuple[Any, list[tuple]]] = field(default_factory=dict)
    dirty: dict[int, Any] = field(default_factory=dict)
    applied: int = 0

    def add(self, result: Any) -> None:
        """Merge what one applied message returned (``None``, or an object with ``regions``:
        ``[(layer, slice_key), ...]`` and ``dirty``: ``[layer, ...]``)."""
        self.applied += 1
        if result is None:
            return
        for layer, key in getattr(result, "regions", ()) or ():
            self.regions.setdefault(id(layer), (layer, []))[1].append(key)
        for layer in getattr(result, "dirty", ()) or ():
            if layer is not None:
                self.dirty[id(layer)] = layer

    def __bool__(self) -> bool:
        return bool(self.regions or self.dirty)


class PaintQueue:
    """Messages from workers, applied on the GUI thread in slices of bounded time.

    ``apply(message)`` paints one message and returns what it changed (see
    :meth:`PaintBatch.add`); ``flush(batch)`` refreshes the layers once per slice.
    """

    def __init__(self, apply: Callable[[Any], Any], flush: Callable[[PaintBatch], None],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._apply = apply
        self._flush = flush
        self._clock = clock
        self._items: deque[Any] = deque()

    def push(self, message: Any) -> None:
        """Queue ``message`` (after everything queued before)."""
        self._items.append(message)

    @property
    def pending(self) -> int:
        """Messages not applied yet."""
        return len(self._items)

    def run(self, budget_s: float | None) -> int:
        """Apply queued messages in order until ``budget_s`` seconds are spent (at least one
        message per call, so a slow message cannot stall the queue; ``None``: all of them),
        then flush what they changed.  Returns how many were applied."""
        batch = PaintBatch()
        start = self._clock()
        try:
            while self._items:
                batch.add(self._apply(self._items.popleft()))
                if budget_s is not None and self._clock() - start >= budget_s:
                    break
        finally:
            # also after an error in one message: what was painted before is shown
            if batch:
                self._flush(batch)
        return batch.applied
