"""A worker killed with SIGKILL at any point: the spec resumes on a new worker.

Completed model turns are not sent to the model again (they are served from
Temporal history or the registry); only the turn that was in flight at the
kill is retried.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from relay.client import RelayClient
from relay.models import Role
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    BACKENDS,
    RELAY_CMD,
    approve_when_asked,
    cli_env,
    spec_id,
    until,
    wait_for_questions,
)


async def start_worker(settings, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *RELAY_CMD, "worker", env=cli_env(settings), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab"))


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_spec_survives_sigkilled_workers(client, settings, registry, model_server, tmp_path):
    """Kill the worker while the spec waits for a human and again mid model call; it completes."""
    rc = RelayClient(client, settings, registry)
    log = tmp_path / "workers.log"
    limits = settings.limits().model_copy(update={"heartbeat_timeout_s": 2})
    first = await start_worker(settings, log)
    try:
        sid = await rc.run("Write a greeting module", spec_id=spec_id("crash"), limits=limits)
        await wait_for_questions(rc, sid, timeout=90)
        # Killed while the spec waits for the human: after the registry was told so, since a
        # kill during that bookkeeping activity would be retried only at its timeout.
        await until(lambda: registry.find_session(sid, Role.clarifier).status == "waiting")
        await kill(first)

        second = await start_worker(settings, log)
        model_server.add_fault(Fault(kind="slow", role="planner", delay_s=4))
        await rc.answer(sid, ANSWERS)
        await until(lambda: model_server.arrived("planner") == 1, timeout=90)
        await kill(second)  # killed while the planner's model call is in flight

        third = await start_worker(settings, log)
        result = await approve_when_asked(rc, sid, timeout=120)
        assert result.outcome == "delivered"
    finally:
        for proc in (first, locals().get("second"), locals().get("third")):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()

    # The killed planner call is recorded when its held answer is sent, so await it.
    await until(lambda: len(model_server.recorded("planner")) >= 2)
    bodies = Counter(json.dumps(r.body, sort_keys=True) for r in model_server.recorded())
    repeated = [json.loads(b) for b, n in bodies.items() if n > 1]
    # Only the planner's first turn, in flight at the kill, reached the model twice.
    assert len(repeated) == 1
    for body in repeated:
        assert "submit_plan" in [t["name"] for t in body["tools"]] and len(body["messages"]) == 1
    assert len(model_server.recorded("clarifier")) == 2
    for session in registry.sessions(sid):
        keys = [(m.turn, m.step, m.role) for m in registry.messages(session.id)]
        assert len(keys) == len(set(keys)), session.role
