"""Starting worker threads safely from the widgets.

* Workers are superqt ``GeneratorWorker``/``FunctionWorker`` objects (napari's
  ``thread_worker`` is a thin layer over them) created with ``_ignore_errors=True``: errors are
  delivered to our handler, which shows the cause as a napari notification instead of napari's
  default traceback dialog.
* Callbacks go through :class:`Lifeline`: once a widget is closed (or its viewer), results that
  are still in flight are dropped instead of touching deleted Qt objects.
* Qt's global thread pool is sized to the CPU count, i.e. 2 threads on small machines: a
  training run plus a live prediction plus a cancelled-but-not-yet-finished stale prediction
  would queue behind each other.  We make sure it has room for a few concurrent workers
  (they mostly wait on torch kernels, which release the GIL).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QThreadPool
from superqt.utils import WorkerBase, create_worker

from napari_muvit.errors import CancelledError, MuViTError

log = logging.getLogger("napari_muvit.widgets")

MIN_POOL_THREADS = 6


class Lifeline:
    """A flag shared by a widget and the callbacks of its workers.

    Callbacks are plain closures over the lifeline (never bound methods of the widget), so a
    worker finishing after its widget was deleted neither keeps the widget alive nor calls
    into a deleted C++ object.
    """

    def __init__(self) -> None:
        self.alive = True

    def guard(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` wrapped to do nothing once the lifeline is cut."""

        def call(*args: Any) -> Any:
            if not self.alive:
                return None
            try:
                return func(*args)
            except RuntimeError as err:  # "wrapped C/C++ object ... has been deleted"
                if "deleted" in str(err):
                    self.alive = False
                    return None
                raise

        return call


def start_worker(
    func: Callable[..., Any],
    *args: Any,
    lifeline: Lifeline,
    on_yield: Callable[[Any], Any] | None = None,
    on_return: Callable[[Any], Any] | None = None,
    on_error: Callable[[BaseException], Any] | None = None,
    on_finish: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> WorkerBase:
    """Run ``func(*args, **kwargs)`` in a worker thread with lifeline-guarded callbacks."""
    pool = QThreadPool.globalInstance()
    if pool.maxThreadCount() < MIN_POOL_THREADS:
        pool.setMaxThreadCount(MIN_POOL_THREADS)
    worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    if on_yield is not None and hasattr(worker, "yielded"):
        worker.yielded.connect(lifeline.guard(on_yield))
    if on_return is not None:
        worker.returned.connect(lifeline.guard(on_return))
    worker.errored.connect(lifeline.guard(on_error or report_error))
    if on_finish is not None:
        worker.finished.connect(lifeline.guard(on_finish))
    worker.start()
    return worker


def error_message(err: BaseException) -> str:
    """The user-facing text of an exception: our errors verbatim, others with their type."""
    if isinstance(err, MuViTError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def report_error(err: BaseException, context: str = "napari-muvit") -> None:
    """Show ``err`` as a napari error notification (cancellations are not errors)."""
    if isinstance(err, CancelledError):
        return
    if not isinstance(err, MuViTError):
        # Unexpected: keep the traceback in the log for bug reports, show only the cause.
        log.warning("%s failed:\n%s", context, "".join(traceback.format_exception(err)))
    from napari.utils.notifications import show_error

    show_error(f"{context}: {error_message(err)}")
