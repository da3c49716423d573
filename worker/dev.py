"""The embedded stack behind `relay dev` and `relay demo`: a Temporal dev server and a worker.

Process layout::

    relay dev | relay demo       the terminal: output, prompts, signals; supervises the two below
     ├─ temporal server start-dev     own session; SIGTERM when relay dies (PR_SET_PDEATHSIG)
     └─ python -m worker.dev          the worker and the scripted model; same arrangement

Why the worker is a process of its own, not a task beside the prompts (nor a thread):
the demo once ran the worker in the event loop that also waited for typed answers, and a
waiting prompt froze it: workflow tasks timed out, `relay status` from another terminal
timed out, updates failed. Reading the prompts in a thread (asyncio.to_thread) would have
cured that symptom, but the worker would still share its fate with the terminal: the GIL,
a terminal that stops reading (Ctrl-S, a paused pager), a crash in display code, and a
thread that cannot be stopped from outside. As a child process it shares nothing: it serves
queries, updates and the Web UI whatever the terminal does, and every way out (Ctrl-C,
SIGTERM, a closed terminal, SIGKILL) ends with the same mechanism: SIGTERM to its process
group, SIGKILL if it lingers, and the kernel's parent-death signal when relay itself is
killed. It is also the production layout (a worker process next to a server), so the demo
exercises what users deploy. The price is a second Python start-up, about a second.

The prompts are read asynchronously as well (relay.cli), so that relay's own loop keeps
handling signals while it asks, and notices an answer given from another terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from relay.client import RelayError, connect_temporal, dev_file, running_dev, write_dev_file
from relay.settings import RelaySettings
from worker.devserver import DevServer, die_with_parent

WORKER_STOP_TIMEOUT_S = 15.0  # the worker's graceful shutdown is 5 s; then it is killed


class WorkerDied(RelayError):
    """The embedded worker exited on its own."""


class DevStack:
    """Start, watch and stop the dev server and its worker; publish them in the data dir."""

    def __init__(self, settings: RelaySettings, *, port: int | None = None,
                 ui_port: int | None = None, ui: bool = True, worker_log: Path | None = None) -> None:
        self.settings = settings
        self.server = DevServer(settings.data_dir / "temporal", port=port or 7233,
                                ui_port=ui_port or 8233, ui=ui)
        self.worker_log = worker_log  # None: the worker writes to relay's own stderr
        self.worker: asyncio.subprocess.Process | None = None
        self.client: Client | None = None
        self._published = False

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def ui_url(self) -> str | None:
        return self.server.ui_url

    def pids(self) -> dict[str, int]:
        pids = {"pid": os.getpid()}
        if self.server.process is not None:
            pids["server_pid"] = self.server.process.pid
        if self.worker is not None:
            pids["worker_pid"] = self.worker.pid
        return pids

    async def start(self) -> None:
        """Server, then worker; returns once the worker polls its task queue."""
        if (other := running_dev(self.settings.data_dir)) is not None:
            raise RelayError(f"a relay dev (pid {other['pid']}) already serves "
                             f"{self.settings.data_dir} at {other['address']}; stop it first, or "
                             "use it: relay run ... / relay status ...")
        await self.server.start()
        # the stack's own server, whatever TEMPORAL_* or a temporal.toml profile say
        self.client = await connect_temporal(self.address, self.settings.namespace)
        self.worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.dev", "--address", self.address,
            "--namespace", self.settings.namespace, "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, **self._worker_output(),
            start_new_session=True, preexec_fn=die_with_parent)
        self._publish()
        await self._until_polling()

    def _worker_output(self) -> dict[str, Any]:
        if self.worker_log is None:
            return {}
        self.worker_log.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.worker_log, "ab")  # the child keeps its own copy of the descriptor
        self._log_file = log
        return {"stdout": log, "stderr": log}

    def _publish(self) -> None:
        write_dev_file(self.settings.data_dir, address=self.address, ui=self.ui_url,
                       namespace=self.settings.namespace, **self.pids())
        self._published = True

    async def _until_polling(self, timeout: float = 120.0) -> None:
        """The worker is ready when the server sees it poll (its identity starts with its pid)."""
        assert self.client is not None and self.worker is not None
        request = DescribeTaskQueueRequest(
            namespace=self.client.namespace, task_queue=TaskQueue(name=self.settings.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
        deadline = asyncio.get_running_loop().time() + timeout
        exited = asyncio.ensure_future(self.worker.wait())
        try:
            while True:
                pollers = (await self.client.workflow_service.describe_task_queue(request)).pollers
                if any(p.identity.startswith(f"{self.worker.pid}@") for p in pollers):
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise RelayError(f"the relay worker did not start within {timeout:g}s"
                                     + self._log_hint())
                done, _ = await asyncio.wait({exited}, timeout=0.1)
                if done:
                    raise self._died()
        finally:
            exited.cancel()

    def _log_hint(self) -> str:
        if self.worker_log is None:
            return ""
        try:
            lines = self.worker_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = f": {lines[-1][:300]}" if lines else ""
        return f"; its log is {self.worker_log}{last}"

    def _died(self) -> WorkerDied:
        code = self.worker.returncode if self.worker is not None else None
        return WorkerDied(f"the relay worker stopped unexpectedly (exit code {code})"
                          + self._log_hint())

    async def watch(self) -> None:
        """Returns never; raises WorkerDied if the worker exits while the stack runs."""
        assert self.worker is not None
        await self.worker.wait()
        raise self._died()

    async def stop(self) -> None:
        """Stop everything this stack started (idempotent): the worker, the server, dev.json."""
        worker, self.worker = self.worker, None
        if worker is not None and worker.returncode is None:
            await _stop_group(worker)
        await asyncio.to_thread(self.server.stop)
        if self._published and _owner(self.settings.data_dir) == os.getpid():
            dev_file(self.settings.data_dir).unlink(missing_ok=True)
            self._published = False
        if (log := getattr(self, "_log_file", None)) is not None:
            log.close()


def _owner(data_dir: Path) -> int | None:
    """The pid in dev.json: ours to remove only if we wrote it."""
    try:
        return int(json.loads(dev_file(data_dir).read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the child's process group (it leads one), SIGKILL if it does not end in time."""
    for sig, wait in ((signal.SIGTERM, WORKER_STOP_TIMEOUT_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except asyncio.TimeoutError:
            continue


# --- the worker child: python -m worker.dev --address A --namespace N --parent PID ----------


async def _serve(address: str, namespace: str) -> None:
    from relay import logs
    from relay.settings import load_settings
    from worker.main import run_worker

    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    client = await connect_temporal(address, namespace)  # the stack's server, nothing else
    await run_worker(settings, stop, client=client)


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(prog="python -m worker.dev")
    args.add_argument("--address", required=True)
    args.add_argument("--namespace", default="default")
    args.add_argument("--parent", type=int, required=True)
    opts = args.parse_args(argv)
    code = 0
    try:
        # the parent may have died between fork and PR_SET_PDEATHSIG: then nobody would stop us
        if os.getppid() != opts.parent:
            code = 1
        else:
            asyncio.run(_serve(opts.address, opts.namespace))
    except RelayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except BaseException as exc:  # noqa: BLE001 - the log says why, the exit code that it failed
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a process that used a Temporal client can abort at exit (sdk-python#300)


if __name__ == "__main__":
    main()
