"""A spec runs through the five agents, with the human's answers, to a result."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata

from relay.models import ROLES, Phase, Role
from tests.conftest import (
    ANSWERS,
    BACKENDS,
    approve_when_asked,
    run_spec,
    spec_id,
    until,
    wait_for_questions,
)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_spec_runs_through_all_five_roles(relay, model_server, registry):
    """Clarifier asks, the answers resume it, the auditor rejects once, the validator approves."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    st = await wait_for_questions(relay, sid)
    assert st.phase == Phase.waiting_for_answers
    assert [q.id for q in st.pending.questions] == ["q1", "q2"]
    # The registry is told by an activity right after the phase changes, so await it.
    await until(lambda: registry.find_session(sid, Role.clarifier).status == "waiting")

    ack = await relay.answer(sid, ANSWERS)
    assert ack.accepted == ["q1", "q2"]
    result = await approve_when_asked(relay, sid)

    assert result.outcome == "delivered"
    assert result.iteration == 1
    assert "Developers on the team" in result.clarified_spec
    assert result.change is not None and "greeting.py" in result.change.summary
    assert result.models == ["relay-scripted-1"]
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0

    order = [r.role for r in model_server.recorded()]
    turns = [role for i, role in enumerate(order) if i == 0 or order[i - 1] != role or role in (
        "clarifier",)]  # consecutive requests of one role are the tool steps of one turn
    assert turns == ["clarifier", "clarifier", "planner", "auditor", "planner", "auditor",
                     "constructor", "validator"]

    sessions = registry.sessions(sid)
    assert [s.role for s in sessions] == [r.value for r in ROLES]
    assert all(s.status == "done" for s in sessions)
    assert all(s.lease_owner is None for s in sessions)  # every turn ended its lease
    assert {s.role: s.turns for s in sessions} == {
        "clarifier": 2, "planner": 2, "auditor": 2, "constructor": 1, "validator": 1}

    st = await relay.status(sid)
    assert st.phase == Phase.completed and st.outcome == "delivered"
    assert st.usage == result.usage
    assert sum(u.input_tokens for u in st.usage_by_role.values()) == st.usage.input_tokens


async def test_validator_rejection_sends_the_constructor_back(relay, model_server):
    """A rejected change goes back to the constructor, whose fix is validated again."""
    result = await run_spec(relay, "Write a greeting module [reject-once]")
    assert result.outcome == "delivered"
    roles = [r.role for r in model_server.recorded()]
    turns = [role for i, role in enumerate(roles) if i == 0 or roles[i - 1] != role]
    assert turns[-4:] == ["constructor", "validator", "constructor", "validator"]


async def test_bounded_rounds_end_with_a_flagged_outcome(relay, settings):
    """When the auditor's rounds run out, the spec ends plan_rejected and flagged, not stuck."""
    limits = settings.limits().model_copy(update={"max_audit_rounds": 1})
    result = await run_spec(relay, "Write a greeting module", limits=limits)
    assert result.outcome == "plan_rejected"
    assert "plan_not_approved" in result.flags
    assert result.change is None


async def test_clarifier_rounds_are_bounded(relay, settings, model_server):
    """A clarifier that keeps asking gets its bounded rounds, then the best spec so far goes on, flagged."""
    limits = settings.limits().model_copy(update={"max_clarify_rounds": 2})
    sid = await relay.run("Write a greeting module [keep-asking]", spec_id=spec_id(), limits=limits)
    st = await wait_for_questions(relay, sid, 1)
    await relay.answer(sid, {"q1": "first answer", "q2": "second answer"})
    st = await wait_for_questions(relay, sid, 2)
    assert [q.id for q in st.pending.questions] == ["q3", "q4"]
    await relay.answer(sid, {"q3": "third answer", "q4": "fourth answer"})
    result = await approve_when_asked(relay, sid)

    assert "clarification_incomplete" in result.flags
    assert result.outcome == "delivered"
    for text in ("Write a greeting module", "first answer", "fourth answer"):
        assert text in result.clarified_spec
    kinds = [r.role for r in model_server.recorded() if r.role == "clarifier"]
    assert len(kinds) == 4  # ask, ask again, ask again, finalize (still asking)


async def test_answer_deadline_lets_the_best_spec_go_on(relay, settings):
    """With a deadline and no answer, the clarifier finalizes and the spec goes on, flagged."""
    limits = settings.limits().model_copy(update={"answer_timeout_s": 0.5})
    sid = await relay.run("Write a greeting module", spec_id=spec_id(), limits=limits)
    result = await approve_when_asked(relay, sid)
    assert "answers_timed_out" in result.flags and "clarification_incomplete" in result.flags
    assert result.outcome == "delivered"


async def test_specs_waiting_for_a_human_are_listed_by_search_attribute(relay, client):
    """`RelayPhase = "waiting_for_answers"` finds the spec in the Web UI and through the API."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id("waiting"))
    await wait_for_questions(relay, sid)
    query = f'RelayPhase = "waiting_for_answers" AND WorkflowId = "{sid}"'

    async def listed() -> list[str]:
        return [w.id async for w in client.list_workflows(query)]

    for _ in range(200):  # visibility is eventually consistent
        if await listed() == [sid]:
            break
        await asyncio.sleep(0.05)
    assert await listed() == [sid]
    # The Web UI shows the workflow's current details, read through the metadata query.
    metadata = await client.get_workflow_handle(sid).query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "Waiting for answers" in metadata.current_details
    assert "`q1`" in metadata.current_details
    assert {"answer"} <= {u.name for u in metadata.definition.update_definitions}
    assert {"answer_signal"} <= {s.name for s in metadata.definition.signal_definitions}
    await relay.answer(sid, ANSWERS)
    await approve_when_asked(relay, sid)
