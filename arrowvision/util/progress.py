"""Progress of long jobs: a tqdm bar on a terminal, plain lines where stderr is a file or a pipe
(a log gets no ``\\r`` redraws), nothing when there is nothing to do."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Silent:
    """Progress turned off; messages still reach stderr."""

    def update(self, count: int) -> None: ...

    def close(self) -> None: ...

    @staticmethod
    def write(message: str, file: TextIO | None = None) -> None:
        print(message, file=file or sys.stderr, flush=True)


class LineProgress:
    """``desc: done/total unit (pct%), rate unit/s``, one line per STEP of the total and at least
    one per INTERVAL seconds."""

    STEP = 0.05
    INTERVAL = 30.0

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.done = 0
        self.start = self.last_time = time.monotonic()
        self.last_step = 0

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        step = int(self.done / self.total / self.STEP)
        if step > self.last_step or now - self.last_time >= self.INTERVAL:
            self.last_step, self.last_time = step, now
            rate = self.done / max(now - self.start, 1e-9)
            self.write(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                       f"{rate:.1f} {self.unit}/s")

    def close(self) -> None: ...

    def write(self, message: str, file: TextIO | None = None) -> None:
        print(message, file=file or self.stream, flush=True)


def progress_bar(total: int, enabled: bool, desc: str, unit: str, stream: TextIO | None = None) -> Any:
    """A bar for ``total`` items on ``stream`` (stderr): ``update(n)``, ``close()``, and
    ``write(message, file=stream)`` for a line that does not land inside the bar."""
    stream = stream or sys.stderr
    if not enabled or total <= 0:
        return Silent()
    if not stream.isatty():
        return LineProgress(total, desc, unit, stream)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=stream)
