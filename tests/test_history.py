"""Every agent resumes its own session: each model request carries that agent's whole history.

Asserted on what the model server received, so it holds for any model behind
the Messages API, not just for what relay believes it sent.
"""

from __future__ import annotations

import copy

import pytest

from relay.client import SpecFailed
from relay.models import ROLES, Phase
from relay.scripted_model import Fault
from tests.conftest import approve_when_asked, run_spec, spec_id, wait_for


def _plain(messages: list[dict]) -> list[dict]:
    """Messages without cache breakpoints (they move to the newest block each turn)."""
    messages = copy.deepcopy(messages)
    for m in messages:
        if isinstance(m["content"], list):
            for block in m["content"]:
                block.pop("cache_control", None)
    return messages


def turn_starts(requests: list) -> list:
    """The requests that open a turn (their newest message carries text, not only tool results)."""
    return [r for r in requests if any(
        b.get("type") == "text" for b in r.body["messages"][-1]["content"])]


def assert_resumes_full_history(requests: list) -> None:
    """Request k+1 of a role starts with request k's messages and the answer it got."""
    for before, after in zip(requests, requests[1:]):
        prev, nxt = _plain(before.body["messages"]), _plain(after.body["messages"])
        assert nxt[: len(prev)] == prev, "a later request dropped or changed earlier history"
        answer = nxt[len(prev)]
        assert answer["role"] == "assistant" and answer["content"][0]["type"] == "tool_use"
        assert nxt[-1]["role"] == "user"


async def test_second_turns_carry_the_same_session_history(relay, model_server):
    """The clarifier's answers turn, the planner's revision and the constructor's fix resume."""
    await run_spec(relay, "Write a greeting module [reject-once]")
    for role in ("clarifier", "planner", "constructor", "auditor", "validator"):
        requests = model_server.recorded(role)
        assert len(turn_starts(requests)) == 2, role
        assert_resumes_full_history(requests)  # every request, tool steps included
    first, second = model_server.recorded("clarifier")
    assert len(second.body["messages"]) == 3
    # The answers follow the tool_result that closes the clarifier's question call.
    blocks = second.body["messages"][2]["content"]
    assert blocks[0]["type"] == "tool_result"
    assert blocks[0]["tool_use_id"] == second.body["messages"][1]["content"][0]["id"]
    assert "Developers on the team" in blocks[-1]["text"]


async def test_seven_iterations_resume_all_five_sessions(relay, model_server, registry):
    """Seven iterations of one spec: sessions and names never change, and history only grows."""
    sid = spec_id()
    await run_spec(relay, "Write a greeting module", sid=sid)
    sessions = {s.role: (s.id, s.name) for s in registry.sessions(sid)}

    for iteration in range(2, 8):
        await relay.iterate(sid, f"Change number {iteration}: greet in Italian too", auto_approve=True)
        result = await approve_when_asked(relay, sid)
        assert result.iteration == iteration
        assert result.outcome == "delivered"
        assert {s.role: (s.id, s.name) for s in registry.sessions(sid)} == sessions

    for role in ROLES:
        requests = model_server.recorded(role.value)
        assert_resumes_full_history(requests)
        assert len(turn_starts(requests)) == (8 if role.value in ("clarifier", "planner", "auditor") else 7)
    last_clarifier = model_server.recorded("clarifier")[-1].body["messages"]
    assert "Change number 7" in last_clarifier[-1]["content"][-1]["text"]
    assert "Change number 2" in str(last_clarifier)  # still carries the earlier iterations

    state = registry.orchestration_state(sid)
    assert state["validator"]["approved"] is True
    assert state["clarifier"]["turns"] == 8
    assert registry.spec(sid).iteration == 7
    st = await relay.status(sid)
    assert st.phase == Phase.completed and st.iteration == 7


async def test_iteration_history_survives_a_failed_run(relay, model_server, registry):
    """A failed iteration keeps what it recorded; the next iteration resumes after it."""
    sid = spec_id()
    await run_spec(relay, "Write a greeting module", sid=sid)
    model_server.add_fault(Fault(kind="auth_error", role="planner", count=1))
    await relay.iterate(sid, "A change the planner never sees")
    with pytest.raises(SpecFailed, match="HTTP 401"):
        await approve_when_asked(relay, sid)
    clarifier_turns = registry.find_session(sid, "clarifier").turns

    await relay.iterate(sid, "Try again")
    result = await approve_when_asked(relay, sid)
    assert result.iteration == 3
    assert registry.find_session(sid, "clarifier").turns == clarifier_turns + 1
    assert_resumes_full_history(model_server.recorded("clarifier"))
    await wait_for(relay, sid, lambda s: s.phase == Phase.completed)
