"""Recovery time: how long a spec stalls when its worker, or the Temporal server, dies mid-turn.

A planner turn is held in flight at the scripted model (a slow answer), then:
- worker: the worker process is SIGKILLed and a new one started at once; measured from the
  kill to the moment the turn's retry reaches the model (the heartbeat timeout decides it);
- server: the dev server is SIGKILLed and restarted on the same port and database while the
  worker lives; measured from the kill to the next agent's call reaching the model.
With the default settings (heartbeat timeout 15 s), as a user runs relay.

    python -m bench.recovery [--runs 3] [--heartbeat 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from relay.client import RelayClient
from relay.models import Role
from relay.registry import Registry
from relay.scripted_model import Fault, ScriptedModel
from relay.settings import RelaySettings
from worker.devserver import DevServer
from worker.main import SCRIPTED_MODEL, connect, ensure_search_attributes

ANSWERS = {"q1": "developers", "q2": "tests pass"}


def worker_env(settings: RelaySettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RELAY_"))}
    env.update(RELAY_TEMPORAL_ADDRESS=settings.temporal_address,
               RELAY_TASK_QUEUE=settings.task_queue, RELAY_DATABASE_URL=settings.registry_url(),
               RELAY_DATA_DIR=str(settings.data_dir),
               ANTHROPIC_BASE_URL=settings.anthropic_base_url or "", RELAY_MODEL=settings.model,
               RELAY_HEARTBEAT_TIMEOUT_S=str(settings.heartbeat_timeout_s),
               RELAY_LOG_FORMAT="json", RELAY_LOG_LEVEL="warning")
    return env


async def start_worker(settings: RelaySettings, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "worker", env=worker_env(settings),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("ab"))


async def until(predicate, timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def one(kind: str, server: DevServer, settings: RelaySettings, registry: Registry,
              model: ScriptedModel, log: Path) -> float:
    model.reset()
    rc = RelayClient(await connect(server.address), settings, registry)
    worker = await start_worker(settings, log)
    spare: asyncio.subprocess.Process | None = None
    try:
        sid = await rc.run("Write a greeting module", spec_id=f"rec-{uuid.uuid4().hex[:8]}")
        while (await rc.status(sid)).pending is None:
            await asyncio.sleep(0.02)
        model.add_fault(Fault(kind="slow", role="planner", delay_s=3))
        await rc.answer(sid, ANSWERS)
        await until(lambda: model.arrived("planner") == 1)
        if kind == "worker":
            worker.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await worker.wait()
            spare = await start_worker(settings, log)
            resumed = await until(lambda: model.arrived("planner") == 2)
        else:
            assert server.process is not None
            os.killpg(server.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            server.process.wait()
            server.process = None
            await server.start()
            resumed = await until(lambda: model.arrived("auditor") >= 1)
        await rc.cancel(sid)
        return resumed - killed
    finally:
        for proc in (worker, spare):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def main(runs: int, heartbeat: float) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp, \
            ScriptedModel(model_name=SCRIPTED_MODEL) as model:
        data = Path(tmp)
        server = await DevServer(data / "temporal", ui=False, persist=True).start()
        try:
            await ensure_search_attributes(await connect(server.address))
            settings = RelaySettings(
                data_dir=data, temporal_address=server.address, anthropic_api_key=None,
                anthropic_base_url=model.url, model=SCRIPTED_MODEL,
                task_queue=f"bench-{uuid.uuid4().hex[:6]}", heartbeat_timeout_s=heartbeat)
            registry = Registry.from_url(settings.registry_url())
            for kind in ("worker", "server"):
                took = [await one(kind, server, settings, registry, model, data / "workers.log")
                        for _ in range(runs)]
                print(f"{kind} killed mid-turn: resumed after median {statistics.median(took):.1f} s"
                      f" (runs: {', '.join(f'{t:.1f}' for t in took)}; heartbeat timeout "
                      f"{heartbeat:g} s)", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=RelaySettings().heartbeat_timeout_s)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.heartbeat))
