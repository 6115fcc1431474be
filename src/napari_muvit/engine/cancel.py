"""Cooperative cancellation shared by the engines, the widgets and the CLI.

A :class:`CancelToken` is a thread-safe flag: the UI thread calls :meth:`CancelToken.cancel`,
the worker checks :attr:`CancelToken.cancelled` (or calls
:meth:`CancelToken.raise_if_cancelled`) between batches, so work stops at a point where
everything already written is complete and valid.
"""

from __future__ import annotations

import threading

from napari_muvit.errors import CancelledError


class CancelToken:
    """A one-way, thread-safe "please stop" flag."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Request cancellation (idempotent, callable from any thread)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` has been called."""
        return self._event.is_set()

    def raise_if_cancelled(self, message: str = "cancelled by the user") -> None:
        """Raise :class:`~napari_muvit.errors.CancelledError` if cancellation was requested."""
        if self._event.is_set():
            raise CancelledError(message)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled or ``timeout`` seconds passed; returns :attr:`cancelled`."""
        return self._event.wait(timeout)

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"
