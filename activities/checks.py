"""Running a workspace's check command: in a subprocess, bounded in time and output, without
the worker's secrets (the command runs code the model wrote).

The validator's `run_checks` tool and delivery's re-check of a merge both run checks here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_CHECK_OUTPUT = 12_000

_SECRET_NAMES = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


@dataclass(frozen=True)
class CheckRun:
    command: str
    exit_code: int | None  # None: killed at its timeout
    output: str  # the tail, capped
    timeout_s: float

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def report(self) -> str:
        status = (f"timed out after {self.timeout_s:g}s" if self.exit_code is None
                  else f"exit code: {self.exit_code}")
        return f"$ {self.command}\n{status}\n{self.output}"


def run_check(command: str, cwd: str | Path, timeout_s: float) -> CheckRun:
    env = {**check_environment(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    # Its own process group, so a timeout kills whatever the command started as well.
    proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return CheckRun(command, None, _tail(out), timeout_s)
    return CheckRun(command, proc.returncode, _tail(out), timeout_s)


def check_environment() -> dict[str, str]:
    """The worker's environment minus its secrets."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("ANTHROPIC_", "RELAY_"))
            and not any(word in name.upper() for word in _SECRET_NAMES)}


def _tail(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    if len(text) > MAX_CHECK_OUTPUT:
        return f"... ({len(text) - MAX_CHECK_OUTPUT} characters cut)\n" + text[-MAX_CHECK_OUTPUT:]
    return text
