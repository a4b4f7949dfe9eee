"""A one-line progress bar on a terminal, or a line every few seconds in logs (CI)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_s: float, stream=sys.stderr, width: int = 28, log_every_s: float = 15.0):
        self.total_s = max(total_s, 1e-9)
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.log_every_s = log_every_s
        self._last_log = 0.0
        self._shown = False

    def update(self, elapsed_s: float, text: str) -> None:
        frac = min(1.0, elapsed_s / self.total_s)
        filled = int(frac * self.width)
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}]"
        line = f"{bar} {frac:4.0%} {_mmss(elapsed_s)}/{_mmss(self.total_s)} {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._shown = True
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self.stream.write(line + "\n")
            self._last_log = time.monotonic()
        self.stream.flush()

    def println(self, text: str, out=None) -> None:
        """Print a line (to stdout by default) above the bar; the bar redraws on the next update."""
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
        out = out or sys.stdout
        out.write(text + "\n")
        out.flush()

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _mmss(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}"
