"""Failpoints: kill the worker at a named point, so tests can crash it exactly there.

Configured only through RELAY_FAILPOINTS (e.g. "effect.after_act:git.commit"),
read when the worker starts; empty in production. A hit sends SIGKILL to the
worker's own process: no cleanup, no flush — a crash, as a machine would.
"""

from __future__ import annotations

import os
import signal


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self.points = {tuple(item.strip().split(":", 1)) if ":" in item else (item.strip(), "*")
                       for item in spec.split(",") if item.strip()}

    def hit(self, point: str, subject: str) -> None:
        if (point, subject) in self.points or (point, "*") in self.points:
            os.kill(os.getpid(), signal.SIGKILL)
