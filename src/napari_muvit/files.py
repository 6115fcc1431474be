"""Writing one file so that readers see the previous file or the complete new one.

Pure file I/O (no torch), shared by every layer: the one-file label outputs and points tables
of ``data/``, the bioimage.io zips of ``export/``, and the journal of
:mod:`napari_muvit.model._atomic` (which replaces a *set* of files as one step).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "process_umask", "replace_file"]


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def process_umask() -> int:
    """The process's umask, read once: reading it means setting it, which would race with
    files created meanwhile by other threads (jobs run in worker threads)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_file(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write one file atomically: ``write(handle)`` fills a hidden temporary sibling, which is
    fsync'ed and renamed over ``path``.

    Readers see the previous file or the complete new one, never a part; on any failure the
    temporary is removed and ``path`` is as it was. (A set of files that must change together
    goes through :func:`napari_muvit.model._atomic.commit_files`.)
    """
    path = Path(path)
    umask = process_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name: writers such as tifffile want a handle with a file name
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the output private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
