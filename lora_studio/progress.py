"""One progress type for all long work.

Core functions take ``progress: ProgressCallback | None`` and call it with a
``ProgressEvent``. The CLI turns events into a text bar (``text_progress``);
the GUI forwards them to ``gr.Progress``. A ``StopFlag`` lets a caller ask long
work to stop at the next safe point.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO


@dataclass(frozen=True)
class ProgressEvent:
    stage: str                      # short name of what is running: "train", "merge", "render", ...
    current: int                    # units done
    total: int | None = None        # units in all, None when unknown
    message: str = ""               # a human line ("step 10/100 loss 0.12")
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, max(0.0, self.current / self.total))


ProgressCallback = Callable[[ProgressEvent], None]


def report(progress: ProgressCallback | None, stage: str, current: int, total: int | None = None,
           message: str = "", **metrics: float) -> None:
    """Send one event if anyone listens; a helper so callers need no ``if progress`` lines."""
    if progress is not None:
        progress(ProgressEvent(stage, current, total, message, dict(metrics)))


class StopFlag:
    """Thread-safe request to stop long work at its next safe point (e.g. after a training step)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def text_progress(stream: TextIO | None = None, width: int = 30) -> ProgressCallback:
    """A progress callback that draws a one-line text bar with rate and ETA (for the CLI)."""
    out = stream or sys.stderr
    started: dict[str, tuple[float, int]] = {}  # stage -> (time, units done) at its first event

    def show(ev: ProgressEvent) -> None:
        t0, c0 = started.setdefault(ev.stage, (time.monotonic(), ev.current))
        elapsed = time.monotonic() - t0
        frac = ev.fraction
        if frac is None:
            line = f"{ev.stage}: {ev.current} {ev.message}"
        else:
            filled = int(frac * width)
            # the rate counts only units done since the first event, so a late start shows no absurd rate
            rate = (ev.current - c0) / elapsed if elapsed > 0 and ev.current > c0 else 0.0
            speed = f"{rate:.2f}/s eta {(ev.total - ev.current) / rate:.0f}s" if rate > 0 else "-/s eta ?"
            line = (f"{ev.stage} [{'#' * filled}{'.' * (width - filled)}] {ev.current}/{ev.total} "
                    f"{speed} {ev.message}")
        end = "\n" if (ev.total is not None and ev.current >= ev.total) else "\r"
        out.write(line[:160].ljust(80) + end)
        out.flush()

    return show
