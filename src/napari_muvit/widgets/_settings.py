"""Persisted widget state (model folder, device, options) as a small JSON file.

A JSON file (rather than ``QSettings``) keeps the state readable, easy to reset and testable:
the directory is ``$NAPARI_MUVIT_SETTINGS_DIR`` when set (the test-suite points it at a scratch
folder so tests never touch the user's settings), else ``napari-muvit`` in the platform's user
config directory.  Reading never raises: a missing or corrupt file gives the defaults, because a
broken settings file must not stop the widget from opening.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SETTINGS_ENV = "NAPARI_MUVIT_SETTINGS_DIR"
SETTINGS_FILE = "widgets.json"

log = logging.getLogger(__name__)


def settings_dir() -> Path:
    """Directory holding the widget settings (honours ``$NAPARI_MUVIT_SETTINGS_DIR``)."""
    override = os.environ.get(SETTINGS_ENV)
    if override:
        return Path(override).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_config_dir("napari-muvit", appauthor=False))
    except ImportError:  # platformdirs comes with napari; this is only a fallback
        return Path.home() / ".config" / "napari-muvit"


def settings_path() -> Path:
    """The JSON file holding every widget's section."""
    return settings_dir() / SETTINGS_FILE


def _read_all() -> dict[str, Any]:
    path = settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable napari-muvit settings %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def load_section(section: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The stored values of ``section`` merged over ``defaults``.

    Only keys present in ``defaults`` are returned and a stored value must have the default's
    JSON type (ints may stand for floats), so that a stale or hand-edited file cannot put a
    wrong type into a widget.
    """
    stored = _read_all().get(section, {})
    result = dict(defaults)
    if not isinstance(stored, dict):
        return result
    for key, default in defaults.items():
        if key not in stored:
            continue
        value = stored[key]
        if default is None or value is None:
            result[key] = value
        elif isinstance(default, bool):
            if isinstance(value, bool):
                result[key] = value
        elif isinstance(default, float):
            if isinstance(value, int | float) and not isinstance(value, bool):
                result[key] = float(value)
        elif isinstance(value, type(default)) and not isinstance(value, bool):
            result[key] = value
    return result


def save_section(section: str, values: Mapping[str, Any]) -> Path | None:
    """Store ``values`` as ``section`` (other sections are kept); returns the file or None.

    Written atomically (temporary file + rename) so that two napari windows closing at the same
    time cannot leave a half-written file.  Failures are logged, never raised: losing a
    preference is better than an error dialog when napari closes.
    """
    path = settings_path()
    data = _read_all()
    data[section] = dict(values)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as err:
        log.warning("could not save napari-muvit settings to %s: %s", path, err)
        return None
    return path
