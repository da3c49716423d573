"""The handshake registry: one session per (spec, role), idempotent appends, the three questions."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from temporalio.testing import ActivityEnvironment

from activities import AgentTurnActivities
from relay.models import AgentTurnInput, Role, TokenUsage
from relay.registry import AgentSession, Registry, session_name
from relay.scripted_model import Fault
from tests.conftest import BACKENDS, SCRIPTED_MODEL, model_endpoint_for, spec_id


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every registry behaviour holds on SQLite (the default) and PostgreSQL (production)."""
    return request.param


def _exchange(registry: Registry, session_id: str, turn: int, step: int = 0) -> bool:
    return registry.append_exchange(
        session_id, turn=turn, step=step,
        user_content=[{"type": "text", "text": f"turn {turn}"}],
        assistant_content=[{"type": "tool_use", "id": f"t{turn}", "name": "submit_plan",
                            "input": {"summary": "s", "steps": ["a"]}}],
        model=SCRIPTED_MODEL, usage=TokenUsage(input_tokens=10, output_tokens=2), valid=True,
        error=None, prompt_version="planner@test")


def attempt(number: int) -> ActivityEnvironment:
    """An activity environment posing as attempt `number` of the same activity."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=number,
                                   heartbeat_timeout=timedelta(seconds=5))
    return env


class TestUniqueness:
    def test_one_session_per_spec_and_role(self, registry):
        """The database itself refuses a second session for the same spec and role."""
        sid = spec_id()
        registry.resolve_session(sid, Role.planner)
        with pytest.raises(IntegrityError), Session(registry.engine) as db:
            db.add(AgentSession(id="ses_dup", spec_id=sid, role="planner", name="x"))
            db.commit()

    def test_concurrent_resolution_yields_one_session(self, registry):
        """Eight racing creators (scenario A at once) all end up with the same session."""
        sid = spec_id()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: registry.resolve_session(sid, Role.auditor), range(8)))
        assert len({s.id for s, _ in results}) == 1
        assert sum(created for _, created in results) == 1

    def test_an_exchange_is_recorded_once(self, registry):
        """Appending the same (turn, step) twice records it once and reports the duplicate."""
        session, _ = registry.resolve_session(spec_id(), Role.planner)
        assert _exchange(registry, session.id, 1) is True
        assert _exchange(registry, session.id, 1) is False
        assert _exchange(registry, session.id, 2) is True
        messages = registry.messages(session.id)
        assert [(m.seq, m.turn, m.role) for m in messages] == [
            (1, 1, "user"), (2, 1, "assistant"), (3, 2, "user"), (4, 2, "assistant")]
        row = registry.find_session(session.spec_id, Role.planner)
        assert (row.turns, row.input_tokens, row.output_tokens) == (2, 20, 4)


class TestHandshakeQuestions:
    def test_discovery_finds_the_roles_session(self, registry):
        """'The session of spec-42's planner': found after creation, absent before."""
        sid = spec_id()
        assert registry.find_session(sid, Role.planner) is None
        created, was_new = registry.resolve_session(sid, Role.planner)
        found, was_new_again = registry.resolve_session(sid, Role.planner)
        assert was_new and not was_new_again
        assert registry.find_session(sid, "planner").id == created.id == found.id

    def test_names_are_human_and_stable(self, registry):
        """Kael-planner, not ses_1d6f…; the same spec and role always get the same name."""
        sid = spec_id()
        session, _ = registry.resolve_session(sid, Role.validator)
        assert re.fullmatch(r"[A-Z][a-z]+-validator", session.name)
        assert session.name == session_name(sid, Role.validator)
        assert registry.session_by_name(sid, session.name).id == session.id

    def test_orchestration_state_answers_running_and_approved(self, registry):
        """'Is the planner running? Has the validator approved?' from the registry alone."""
        sid = spec_id()
        planner, _ = registry.resolve_session(sid, Role.planner)
        validator, _ = registry.resolve_session(sid, Role.validator)
        registry.set_status(sid, [Role.planner], "running")
        registry.append_exchange(
            validator.id, turn=1, step=0, user_content=[{"type": "text", "text": "check"}],
            assistant_content=[{"type": "tool_use", "id": "v1", "name": "submit_validation",
                                "input": {"approved": True, "failures": []}}],
            model=SCRIPTED_MODEL, usage=TokenUsage(), valid=True, error=None, prompt_version="v")
        state = registry.orchestration_state(sid)
        assert state["planner"]["running"] is True
        assert state["validator"]["approved"] is True
        assert state["validator"]["last_output"] == {"approved": True, "failures": []}


class TestIdempotentTurns:
    """The agent_turn activity itself (real code, real model over HTTP, real registry)."""

    async def test_a_retried_turn_is_served_from_the_registry(self, registry, model_server):
        """An attempt whose turn is already recorded returns it without calling the model."""
        acts = AgentTurnActivities(registry, model_endpoint_for(model_server).client, SCRIPTED_MODEL)
        inp = AgentTurnInput(spec_id=spec_id(), role=Role.planner, turn=1, kind="plan",
                             variables={"spec": "Greet people", "iteration": "1"})
        first = await ActivityEnvironment().run(acts.agent_turn, inp)
        again = await ActivityEnvironment().run(acts.agent_turn, inp)
        assert len(model_server.recorded()) == 1
        assert again.replayed and not first.replayed
        assert again.output == first.output and again.session_id == first.session_id
        assert again.usage == TokenUsage()  # nothing new was paid for

    async def test_concurrent_attempts_record_one_exchange(self, registry, model_server):
        """Two attempts of one turn racing (a timed-out attempt still running): one pays for the
        model call and records the exchange; the other waits for it and reuses it."""
        model_server.add_fault(Fault(kind="slow", delay_s=0.3, count=2))
        acts = AgentTurnActivities(registry, model_endpoint_for(model_server).client, SCRIPTED_MODEL)
        inp = AgentTurnInput(spec_id=spec_id(), role=Role.auditor, turn=1, kind="audit",
                             variables={"spec": "Greet people", "plan": "1. greet"})
        a, b = await asyncio.gather(attempt(1).run(acts.agent_turn, inp),
                                    attempt(2).run(acts.agent_turn, inp))
        assert a.output == b.output and a.session_id == b.session_id
        assert len(model_server.recorded()) == 1
        assert sorted([a.replayed, b.replayed]) == [False, True]
        assert b.usage == TokenUsage() or a.usage == TokenUsage()
        messages = registry.messages(a.session_id)
        assert [(m.turn, m.role) for m in messages] == [(1, "user"), (1, "assistant")]
        session = registry.find_session(inp.spec_id, Role.auditor)
        # only the recorded exchange is counted in the session's usage
        assert session.input_tokens == messages[1].input_tokens


class TestTurnLease:
    """One activity attempt at a time works on a session's turn."""

    def test_a_held_lease_is_refused_to_another_attempt_until_released(self, registry):
        session, _ = registry.resolve_session(spec_id(), Role.planner)
        assert registry.claim_turn(session.id, "attempt-1", 30)
        assert not registry.claim_turn(session.id, "attempt-2", 30)
        assert registry.claim_turn(session.id, "attempt-1", 30)  # renewing
        registry.release_turn("attempt-2")  # not theirs: no effect
        assert not registry.claim_turn(session.id, "attempt-2", 30)
        registry.release_turn("attempt-1")
        assert registry.claim_turn(session.id, "attempt-2", 30)

    def test_a_released_lease_is_not_taken_back_by_a_late_renewal(self, registry):
        """Renewal only extends a lease its owner still holds: a renewal racing the turn's end
        must not leave the session leased (which would stall its next turn)."""
        session, _ = registry.resolve_session(spec_id(), Role.constructor)
        assert registry.claim_turn(session.id, "attempt-1", 30)
        assert registry.extend_turn(session.id, "attempt-1", 30)
        registry.release_turn("attempt-1")
        assert not registry.extend_turn(session.id, "attempt-1", 30)
        assert registry.find_session(session.spec_id, Role.constructor).lease_owner is None
        assert registry.claim_turn(session.id, "attempt-2", 0)
        assert registry.claim_turn(session.id, "attempt-3", 30)  # attempt-2's lapsed
        assert not registry.extend_turn(session.id, "attempt-2", 30)  # taken over: lost

    def test_a_lapsed_lease_can_be_taken(self, registry):
        """The holder died: once its lease lapses, a new attempt takes it."""
        session, _ = registry.resolve_session(spec_id(), Role.auditor)
        assert registry.claim_turn(session.id, "dead-attempt", 0)
        assert registry.claim_turn(session.id, "attempt-2", 30)
        assert registry.find_session(session.spec_id, Role.auditor).lease_owner == "attempt-2"
