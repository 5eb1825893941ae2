"""Progress for long work: a bar on a terminal, plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

BAR_WIDTH = 30


class Progress:
    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr

    @contextlib.contextmanager
    def task(
        self, label: str, unit: str = "tensors", each: bool = False
    ) -> Iterator[Callable[[object, int, int], None]]:
        """Yields `update(item, index, total)`; draws a bar (TTY) or a line every ~10%.

        Redrawing one line only works on a terminal: in a log file or CI output each redraw
        would be a new line, so there a line is written per tenth of the work instead (per
        item with `each`, for a few slow items). Both show the time left, assuming the
        remaining items take as long as the done ones did on average.
        """
        if self.quiet:
            yield lambda item, index, total: None
            return
        tty = self.stream.isatty()
        start = time.perf_counter()
        last_decile = -1

        def update(item, index: int, total: int) -> None:
            nonlocal last_decile
            done = index + 1
            elapsed = time.perf_counter() - start
            left = f", {elapsed / done * (total - done):.0f}s left" if done < total else ""
            if tty:
                name = getattr(item, "name", "") or ""
                filled = BAR_WIDTH * done // max(total, 1)
                bar = "#" * filled + "-" * (BAR_WIDTH - filled)
                self.stream.write(
                    f"\r{label} [{bar}] {done}/{total} {elapsed:5.1f}s{left} {name[:40]:<40}"
                )
            else:
                decile = 10 * done // max(total, 1)
                if decile == last_decile and not each:
                    return
                last_decile = decile
                self.stream.write(f"{label}: {done}/{total} {unit}, {elapsed:.1f}s{left}\n")
            self.stream.flush()

        try:
            yield update
        finally:
            # End the bar's line even on failure, so an error message starts on its own line.
            if tty:
                self.stream.write("\n")
            self.stream.flush()


def human_bytes(nbytes: float) -> str:
    """Bytes for people: 1.5 GB, 870 kB (decimal units, as df -H and file managers show)."""
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def human_count(n: int) -> str:
    """217k, 1.89B: parameter counts as model cards write them."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
