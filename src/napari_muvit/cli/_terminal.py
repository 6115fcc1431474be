"""One status line on stderr: redrawn in place on a terminal, appended in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """``75`` -> ``"01:15"``; ``3725`` -> ``"1:02:05"``."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class StatusLine:
    """Throttled status output: at most every ``interval`` s on a terminal, every
    ``log_interval`` s when stderr is a file (so CI logs stay short)."""

    def __init__(
        self, stream: TextIO | None = None, interval: float = 0.2, log_interval: float = 10.0
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self._last = -1e9
        self._drawn = False

    def due(self, final: bool = False) -> bool:
        """Whether a line should be drawn now (always for the final one)."""
        now = time.monotonic()
        if now - self._last < self.interval and not final:
            return False
        self._last = now
        return True

    def write(self, line: str) -> None:
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the line on a terminal."""
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
