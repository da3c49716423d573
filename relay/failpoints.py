"""Failpoints: kill the worker at a named point, so tests can crash it exactly there.

Configured only through RELAY_FAILPOINTS (e.g. "effect.after_act:git.commit"),
read when the worker starts; empty in production. A hit sends SIGKILL to the
worker's own process: no cleanup, no flush — a crash, as a machine would.

A failpoint written `point:subject@DIR` pauses instead of killing: the hit
creates DIR/reached and waits until DIR/release exists, so a test can change
the world (stop the database) at exactly that point, then let the work go on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self.points: set[tuple[str, str]] = set()
        self.pauses: dict[tuple[str, str], Path] = {}
        for item in (i.strip() for i in spec.split(",")):
            if not item:
                continue
            item, _, pause = item.partition("@")
            point = tuple(item.split(":", 1)) if ":" in item else (item, "*")
            if pause:
                self.pauses[point] = Path(pause)  # type: ignore[index]
            else:
                self.points.add(point)  # type: ignore[arg-type]

    def hit(self, point: str, subject: str) -> None:
        for key in ((point, subject), (point, "*")):
            if key in self.pauses:
                self._pause(self.pauses[key])
        if (point, subject) in self.points or (point, "*") in self.points:
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def _pause(folder: Path, timeout_s: float = 300.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "reached").touch()
        deadline = time.monotonic() + timeout_s
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
