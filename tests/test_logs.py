"""Worker logs: JSON records bound to spec, run, role and session; replay-safe; never a key."""

from __future__ import annotations

import asyncio
import json

from relay.client import RelayClient
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    approve_when_asked,
    cli_env,
    spec_id,
    wait_for_questions,
)

SECRET = "sk-ant-api03-test-secret-value-0123456789"


async def test_worker_logs_are_bound_replay_safe_and_secret_free(client, settings, registry, tmp_path):
    """A real worker process with an API key set, replaying every workflow task (no cache)."""
    env = cli_env(settings) | {"ANTHROPIC_API_KEY": SECRET, "RELAY_MAX_CACHED_WORKFLOWS": "0"}
    log_path = tmp_path / "worker.log"
    worker = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "worker", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=log_path.open("wb"))
    try:
        rc = RelayClient(client, settings, registry)
        sid = await rc.run("Write a greeting module", spec_id=spec_id("logs"))
        # Budgets include the worker's start and its replay of every task (no cache).
        await wait_for_questions(rc, sid, timeout=90)
        await rc.answer(sid, ANSWERS)
        assert (await approve_when_asked(rc, sid, timeout=120)).outcome == "delivered"
        history = await client.get_workflow_handle(sid).fetch_history()
    finally:
        worker.terminate()
        await worker.wait()

    text = log_path.read_text()
    assert SECRET not in text and SECRET not in history.to_json()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("spec_id") == sid]
    turns = [r for r in mine if r["event"] == "agent_turn.done"]
    assert len(turns) == 8
    for record in turns:
        assert {"spec_id", "workflow_id", "run_id", "role", "session_id", "timestamp"} <= record.keys()
    assert {r["role"] for r in turns} == {"clarifier", "planner", "auditor", "constructor", "validator"}
    # The workflow replays its history on every task here; its log line is still emitted once.
    assert [r["event"] for r in mine].count("spec.opened") == 1
    started = next(r for r in records if r["event"] == "worker.started")
    assert "relay-scripted-1" in started["model"]
