"""Model faults: capacity errors are retried by Temporal, bad output gets one repair turn."""

from __future__ import annotations

import time

import pytest

from relay.client import SpecFailed
from relay.models import Phase
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    approve_when_asked,
    run_spec,
    spec_id,
    wait_for,
    wait_for_questions,
)


async def test_rate_limit_is_retried_after_the_providers_delay(relay, model_server, registry):
    """A 429 with retry-after is retried after that delay and the spec completes."""
    model_server.add_fault(Fault(kind="rate_limit", role="planner", retry_after=0.5))
    result = await run_spec(relay, "Write a greeting module")
    assert result.outcome == "delivered"
    planner = model_server.recorded("planner")
    assert [r.status for r in planner[:2]] == [429, 200]
    assert planner[0].body == planner[1].body  # the same turn, retried
    # the 429 was not paid for and not recorded: the planner's session holds 2 turns
    assert registry.find_session(result.spec_id, "planner").turns == 2


async def test_retry_after_is_honoured(relay, model_server):
    """The retry waits at least what the provider asked for."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    model_server.add_fault(Fault(kind="rate_limit", role="clarifier", retry_after=1.5))
    started = time.monotonic()
    await relay.answer(sid, ANSWERS)
    await wait_for(relay, sid, lambda s: s.current_role is not None and s.current_role.value == "planner"
                   or s.phase in (Phase.completed, Phase.waiting_for_approval))
    assert time.monotonic() - started >= 1.5
    assert (await approve_when_asked(relay, sid)).outcome == "delivered"


async def test_overloaded_529_and_500_are_retried(relay, model_server):
    """529 (overloaded) and 500 are capacity errors: retried, and the spec completes."""
    model_server.add_fault(Fault(kind="overloaded", role="auditor", retry_after=0.1))
    model_server.add_fault(Fault(kind="server_error", role="validator", retry_after=0.1))
    result = await run_spec(relay, "Write a greeting module")
    assert result.outcome == "delivered"
    assert [r.status for r in model_server.recorded("auditor")][:2] == [529, 200]
    assert [r.status for r in model_server.recorded("validator")][:2] == [500, 200]


async def test_invalid_output_gets_one_repair_turn_in_the_same_session(relay, model_server, registry):
    """The validation error goes back to the model as a tool_result; the repaired output is used."""
    model_server.add_fault(Fault(kind="invalid_output", role="planner"))
    result = await run_spec(relay, "Write a greeting module")
    assert result.outcome == "delivered"
    assert "planner_output_repaired" in result.flags
    first, repair = model_server.recorded("planner")[:2]
    assert repair.body["messages"][: len(first.body["messages"]) - 1] == first.body["messages"][:-1]
    feedback = repair.body["messages"][-1]["content"][0]
    assert feedback["type"] == "tool_result" and feedback["is_error"] is True
    assert "did not validate" in feedback["content"] and "summary" in feedback["content"]
    messages = registry.messages(registry.find_session(result.spec_id, "planner").id)
    assert [m.valid for m in messages if m.role == "assistant"][:2] == [False, True]


async def test_two_invalid_outputs_fail_the_spec_with_a_clear_reason(relay, model_server, registry):
    """Invalid output twice in a row: the spec fails (not retried forever) and says why."""
    model_server.add_fault(Fault(kind="invalid_output", role="auditor", count=2))
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    with pytest.raises(SpecFailed, match="auditor gave invalid output twice"):
        await approve_when_asked(relay, sid)
    assert len(model_server.recorded("auditor")) == 2  # non-retryable: no third call
    st = await relay.status(sid)
    assert st.phase == Phase.failed and "invalid output twice" in st.error
    assert registry.find_session(sid, "auditor").status == "failed"
    assert registry.find_session(sid, "auditor").lease_owner is None  # a failed turn ends it
    assert registry.find_session(sid, "planner").status == "idle"
    assert registry.spec(sid).status == "failed"
    # what was recorded stays recorded: both bad answers are in the auditor's session
    assert len(registry.messages(registry.find_session(sid, "auditor").id)) == 4
