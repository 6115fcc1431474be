"""Exceptions shown to users.

Every error a user can cause (bad input, bad file, bad option) is raised as a subclass of
:class:`MuViTError` with a message that names the argument, the expected and the actual value.
The CLI prints these as one line; the widgets show them as napari notifications.
"""

from __future__ import annotations


class MuViTError(Exception):
    """Base class of all user-facing napari-muvit errors."""


class InputError(MuViTError, ValueError):
    """An argument (image, bbox, option) has the wrong shape, type or value."""


class IncompatibleModelError(InputError):
    """The model cannot run on this image (its channels or its coarsest level do not fit)."""


class CheckpointError(MuViTError, ValueError):
    """A model folder is missing files, is malformed or does not fit the model."""


class CancelledError(MuViTError):
    """Work was cancelled by the user; everything written before is valid."""
