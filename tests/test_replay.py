"""Determinism: recorded histories replay with the current workflow code.

tests/histories/ keeps histories recorded by earlier versions; a workflow change
that would break running specs fails here. Record a new one with
`python -m tests.record_history tests/histories/NAME.json` after a deliberate, patched change.
v0.1 and v0.2 ran each agent turn as one `agent_turn` activity; v0.3 runs the loop in the
workflow (LOOP_PATCH), one `model_step` activity per model call and one `agent_tool` per tool call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from relay.converter import data_converter as pydantic_data_converter
from temporalio.worker import Replayer

from tests.conftest import run_spec
from workflows.pipeline import SpecPipeline

HISTORIES = Path(__file__).parent / "histories"


def replayer() -> Replayer:
    return Replayer(workflows=[SpecPipeline], data_converter=pydantic_data_converter)


async def test_a_fresh_full_run_replays(relay, client):
    """A full run (questions, answers, an audit rejection, an iteration) replays cleanly."""
    result = await run_spec(relay, "Write a greeting module [reject-once]")
    await relay.iterate(result.spec_id, "Greet in Italian too", auto_approve=True)
    await relay.result(result.spec_id)
    async for execution in client.list_workflows(f'WorkflowId = "{result.spec_id}"'):
        history = await client.get_workflow_handle(
            execution.id, run_id=execution.run_id).fetch_history()
        await replayer().replay_workflow(history)


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.json")), ids=lambda p: p.name)
async def test_recorded_histories_replay(path: Path):
    """Histories recorded by earlier versions of relay still replay."""
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await replayer().replay_workflow(history)
