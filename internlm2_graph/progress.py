"""Progress for long work: a bar on a terminal, plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator


class Progress:
    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr

    @contextlib.contextmanager
    def task(self, label: str) -> Iterator[Callable[[object, int, int], None]]:
        """Yields `update(item, index, total)`; draws a bar (TTY) or a line every ~10%."""
        if self.quiet:
            yield lambda item, index, total: None
            return
        tty = self.stream.isatty()
        start = time.perf_counter()
        last_decile = -1

        def update(item, index: int, total: int) -> None:
            nonlocal last_decile
            done = index + 1
            name = getattr(item, "name", "") or ""
            elapsed = time.perf_counter() - start
            if tty:
                width = 30
                filled = int(width * done / max(total, 1))
                bar = "#" * filled + "-" * (width - filled)
                self.stream.write(
                    f"\r{label} [{bar}] {done}/{total} {elapsed:5.1f}s {name[:40]:<40}"
                )
                self.stream.flush()
            else:
                decile = 10 * done // max(total, 1)
                if decile != last_decile:
                    last_decile = decile
                    self.stream.write(f"{label}: {done}/{total} tensors, {elapsed:.1f}s\n")
                    self.stream.flush()

        yield update
        if tty:
            self.stream.write("\n")
        self.stream.flush()
