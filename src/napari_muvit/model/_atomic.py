"""The one atomic writer of napari-muvit: replace a set of files inside a folder as one step.

A model folder (or a training run folder) holds files that napari-muvit owns (``config.yaml``,
``model.safetensors``, ``history.json``, ``train_state.pt``, ``model.pth``) and, possibly, files
of the user's (notes, predictions). :func:`commit_files` replaces the owned files and never
touches anything else in the folder. A kill at any moment leaves either the previous complete set
or the new one, never a mix:

1. every new file is written to a hidden temporary name in the folder (``.NAME.tmp-PID-HEX``)
   and fsync'ed; a failure here deletes the temporaries and the folder is unchanged;
2. a journal ``.napari-muvit-commit.json`` naming the temporaries and the owned files to delete
   is written atomically (temporary + ``os.replace`` + directory fsync): this is the commit point;
3. the temporaries are renamed over the final names and stale owned files are deleted;
4. the journal is removed.

:func:`recover_files` (run by the next writer, which holds the folder's advisory lock) rolls a
commit with a journal forward and deletes temporaries without one (the previous set is intact).
Readers that must not write (:func:`committed_path`) read through a pending journal, so even a
folder whose writer was killed between steps 2 and 4 loads the new set, consistently.

Everything here is pure file I/O (no torch), so the model layer, the training engine and the
exporters share one implementation with one crash guarantee.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from napari_muvit.errors import CheckpointError
from napari_muvit.files import fsync_dir as _fsync_dir
from napari_muvit.files import process_umask

__all__ = [
    "JOURNAL",
    "commit_files",
    "committed_path",
    "is_temporary",
    "no_space_error",
    "recover_files",
]

JOURNAL = ".napari-muvit-commit.json"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def is_temporary(name: str) -> bool:
    """True for the hidden temporary name of a file being written by :func:`commit_files`."""
    return bool(_TMP.match(name)) or name.startswith(f"{JOURNAL}.tmp-")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# Free space below which a failed write is taken for a full disk: libraries wrap ENOSPC in
# their own errors (torch.save raises "[enforce fail at inline_container.cc:...] unexpected
# pos ..." or "... file write failed"), so the file system is asked as well.
_NEARLY_FULL_BYTES = 1 << 20


def _is_no_space(exc: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT, also when a library wrapped it, or any write error on a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    text = str(exc).lower()
    if "no space left" in text or "file write failed" in text or "quota exceeded" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def no_space_error(folder: Path, exc: BaseException) -> CheckpointError | None:
    """The one-line error for a full disk while writing into ``folder`` (``None`` otherwise);
    call it before deleting what the failed write left, which may be what filled the disk."""
    if not _is_no_space(exc, folder):
        return None
    return CheckpointError(
        f"no space left on {folder} (the device or your quota is full); free some space and "
        "run again; the previous files in the folder were kept"
    )


def _read_journal(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / JOURNAL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # it is renamed into place complete, so a damaged journal means a damaged disk
        raise CheckpointError(
            f"{folder / JOURNAL}: unreadable commit record; remove it to keep the files as "
            "they are"
        ) from None
    replace, remove = data.get("replace"), data.get("remove")
    if not isinstance(replace, dict) or not isinstance(remove, list):
        raise CheckpointError(f"{folder / JOURNAL}: malformed commit record")
    for name in [*replace, *replace.values(), *remove]:
        if not isinstance(name, str) or "/" in name or os.sep in name or name in ("", ".", ".."):
            raise CheckpointError(f"{folder / JOURNAL}: malformed commit record")
    return data


def committed_path(folder: str | os.PathLike[str], name: str) -> Path | None:
    """Where the committed version of ``folder/name`` is now, for a reader that does not write.

    Normally ``folder/name`` itself (``None`` if it does not exist). While a commit is pending
    (its writer was killed after the commit point) the journal decides: the new file may still
    sit under its temporary name, and a file the commit deletes no longer counts.
    """
    folder = Path(folder)
    journal = _read_journal(folder) if (folder / JOURNAL).exists() else None
    if journal is not None:
        if name in journal["remove"]:
            return None
        tmp = journal["replace"].get(name)
        if tmp is not None and (folder / tmp).is_file():
            return folder / tmp
    path = folder / name
    return path if path.exists() else None


def recover_files(folder: str | os.PathLike[str]) -> None:
    """Finish or undo an interrupted :func:`commit_files` in ``folder``.

    With a journal the commit had passed its commit point: it is completed. Temporaries without
    a journal belong to a commit that never reached it: they are deleted (the previous files were
    never touched). The caller holds the folder's advisory lock, so no live writer owns them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    journal = _read_journal(folder)
    if journal is not None:
        for name, tmp in journal["replace"].items():
            if (folder / tmp).is_file():
                os.replace(folder / tmp, folder / name)
        for name in journal["remove"]:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        _fsync_dir(folder)
        (folder / JOURNAL).unlink()
        _fsync_dir(folder)
    for entry in folder.iterdir():
        if is_temporary(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def commit_files(
    folder: str | os.PathLike[str],
    writers: Mapping[str, Callable[[Path], None]],
    owned: Collection[str],
) -> Path:
    """Replace the files napari-muvit owns in ``folder`` by new ones, atomically as a set.

    ``writers`` maps each file name to a function writing that file at the path it is given.
    Files in ``owned`` that ``writers`` does not produce are deleted in the same step (saving a
    plain model over a training run removes its ``train_state.pt``); every other file of the
    folder is left alone. The caller holds the folder's advisory lock. A full disk raises a
    one-line :class:`CheckpointError` ("no space left on ..."); any failure before the commit
    point leaves the folder exactly as it was.
    """
    folder = Path(folder)
    unknown = set(writers) - set(owned)
    if unknown:
        raise ValueError(f"commit_files: {sorted(unknown)} are not owned files")
    folder.mkdir(parents=True, exist_ok=True)
    recover_files(folder)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps = {name: f".{name}.tmp-{token}" for name in writers}
    umask = process_umask()
    try:
        for name, write in writers.items():
            path = folder / temps[name]
            write(path)
            os.chmod(path, 0o666 & ~umask)  # like a plain open(): a model folder is shareable
            _fsync_file(path)
        remove = sorted(n for n in owned if n not in writers and (folder / n).exists())
        record = json.dumps({"token": token, "replace": temps, "remove": remove})
        pending = folder / f"{JOURNAL}.tmp-{token}"
        pending.write_text(record, encoding="utf-8")
        _fsync_file(pending)
    except BaseException as exc:
        full = no_space_error(folder, exc)
        for tmp in [*temps.values(), f"{JOURNAL}.tmp-{token}"]:
            with contextlib.suppress(OSError):
                (folder / tmp).unlink()
        if full is not None:
            raise full from None
        raise
    os.replace(pending, folder / JOURNAL)  # the commit point
    _fsync_dir(folder)
    recover_files(folder)  # rolls the journal forward, as a later writer would
    return folder
