"""The fault matrix: every way a model provider can fail ends in a defined state, said clearly.

Transient faults (capacity, transport, an unreadable answer) are retryable errors: the next
attempt succeeds once the fault clears, and only the answer that arrived is recorded.
Permanent ones (the provider refused the request) fail at once, non-retryable, with the status
and the provider's reason. Answers a real model may give (cut at max_tokens, a refusal, text
with no tool call) are named for what they are.

Each case runs the real agent_turn activity against the scripted model over HTTP (the SDK's
own request and parsing code), attempt by attempt, as Temporal would; one representative of
each class also runs end to end through a real worker and dev server.
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta

import anthropic
import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import AgentTurnActivities
from relay.client import SpecFailed
from relay.models import AgentTurnInput, Phase, Role
from relay.scripted_model import REFUSAL_TEXT, Fault
from tests.conftest import (
    ANSWERS,
    SCRIPTED_MODEL,
    approve_when_asked,
    run_spec,
    spec_id,
    wait_for,
    wait_for_questions,
)

CLIENT_TIMEOUT_S = 1.0  # short, so a hanging provider is given up on quickly


@pytest_asyncio.fixture
async def model_client(model_server):
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=model_server.url,
                                      max_retries=0, timeout=CLIENT_TIMEOUT_S)
    yield client
    await client.close()


@pytest.fixture
def turns(registry, model_client) -> AgentTurnActivities:
    return AgentTurnActivities(registry, model_client, SCRIPTED_MODEL, max_tokens=512)


def planner_turn() -> AgentTurnInput:
    return AgentTurnInput(spec_id=spec_id("matrix"), role=Role.planner, turn=1, kind="plan",
                          variables={"spec": "Greet people", "iteration": "1"})


def attempt(number: int) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=number, heartbeat_timeout=timedelta(seconds=5),
                                   start_to_close_timeout=timedelta(seconds=60))
    return env


async def fails(turns: AgentTurnActivities, inp: AgentTurnInput, number: int = 1) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await attempt(number).run(turns.agent_turn, inp)
    error = caught.value
    # one line, without library help links or transport debug dumps
    assert "\n" not in error.message and "https://" not in error.message
    assert "Background on this error" not in error.message and "{" not in error.message
    return error


def recorded_steps(registry, inp: AgentTurnInput) -> list[tuple[int, int, str]]:
    session = registry.find_session(inp.spec_id, inp.role)
    return [(m.turn, m.step, m.role) for m in registry.messages(session.id)] if session else []


TRANSIENT = [  # (status, retry-after, error type)
    (429, 0.5, "ModelRateLimited"),
    (429, None, "ModelRateLimited"),
    (408, None, "ModelTimeout"),
    (409, None, "ModelConflict"),
    (500, None, "ModelServerError"),
    (502, None, "ModelServerError"),
    (503, 2, "ModelServerError"),
    (504, None, "ModelTimeout"),
    (529, None, "ModelOverloaded"),
]


@pytest.mark.parametrize(("status", "retry_after", "kind"), TRANSIENT,
                         ids=[f"{s}{'-retry-after' if r else ''}" for s, r, _ in TRANSIENT])
async def test_transient_status_is_retried_then_the_turn_completes(turns, model_server, registry,
                                                                   status, retry_after, kind):
    model_server.add_fault(Fault(kind="error", status=status, retry_after=retry_after))
    inp = planner_turn()
    error = await fails(turns, inp)
    assert error.type == kind and not error.non_retryable
    assert f"HTTP {status}" in error.message and f"Scripted fault: error {status}" in error.message
    # the provider's delay is honoured; without one, the retry policy decides
    assert error.next_retry_delay == (timedelta(seconds=retry_after) if retry_after else None)
    assert recorded_steps(registry, inp) == []  # nothing was paid for, nothing recorded

    result = await attempt(2).run(turns.agent_turn, inp)
    assert result.output["summary"] and not result.replayed
    assert [r.status for r in model_server.recorded("planner")] == [status, 200]
    assert recorded_steps(registry, inp) == [(1, 0, "user"), (1, 0, "assistant")]
    assert registry.find_session(inp.spec_id, Role.planner).lease_owner is None


PERMANENT = [(400, "Bad Request", "invalid_request_error"),
             (401, "Unauthorized", "authentication_error"),
             (403, "Forbidden", "permission_error"),
             (404, "Not Found", "not_found_error"),
             (413, "Request Entity Too Large", "request_too_large")]


@pytest.mark.parametrize(("status", "phrase", "provider_type"), PERMANENT,
                         ids=[str(p[0]) for p in PERMANENT])
async def test_permanent_status_fails_at_once_with_status_and_reason(turns, model_server, registry,
                                                                     status, phrase, provider_type):
    model_server.add_fault(Fault(kind="error", status=status))
    inp = planner_turn()
    error = await fails(turns, inp)
    assert error.type == "ModelRequestRejected" and error.non_retryable
    assert f"answered HTTP {status} {phrase} ({provider_type}): Scripted fault: error {status}" \
        in error.message
    assert registry.find_session(inp.spec_id, Role.planner).lease_owner is None


async def test_connection_refused_is_retryable_and_says_unreachable(registry, model_server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=f"http://127.0.0.1:{port}",
                                      max_retries=0, timeout=CLIENT_TIMEOUT_S)
    try:
        turns = AgentTurnActivities(registry, client, SCRIPTED_MODEL)
        error = await fails(turns, planner_turn())
    finally:
        await client.close()
    assert error.type == "ModelUnreachable" and not error.non_retryable
    assert f"127.0.0.1:{port} is unreachable" in error.message
    assert "Connect call failed" in error.message or "refused" in error.message.lower()


@pytest.mark.parametrize(("kind", "error_type", "says"), [
    ("reset", "ModelUnreachable", "broke during the request"),
    ("hang", "ModelTimeout", "did not answer in time"),
    ("truncated", "ModelBadResponse", "sent an unreadable answer (truncated or not JSON"),
])
async def test_transport_faults_are_transient(turns, model_server, registry, kind, error_type, says):
    model_server.add_fault(Fault(kind=kind, delay_s=CLIENT_TIMEOUT_S * 3))
    inp = planner_turn()
    error = await fails(turns, inp)
    assert error.type == error_type and not error.non_retryable
    assert says in error.message
    assert recorded_steps(registry, inp) == []  # an unread answer is not recorded as one

    result = await attempt(2).run(turns.agent_turn, inp)
    assert result.output["summary"]
    assert len(model_server.recorded("planner")) == 2
    assert recorded_steps(registry, inp) == [(1, 0, "user"), (1, 0, "assistant")]


async def test_max_tokens_gets_a_repair_turn_that_says_so(turns, model_server, registry):
    model_server.add_fault(Fault(kind="max_tokens"))
    inp = planner_turn()
    result = await attempt(1).run(turns.agent_turn, inp)
    assert result.repaired and result.output["summary"]
    first, repair = model_server.recorded("planner")
    feedback = repair.body["messages"][-1]["content"][0]
    assert feedback["is_error"] and "cut off at max_tokens (512 tokens" in feedback["content"]
    assert "RELAY_MAX_TOKENS" in feedback["content"]
    answer = [m for m in registry.messages(result.session_id) if m.role == "assistant"][0]
    assert answer.valid is False and "cut at max_tokens" in answer.error


async def test_max_tokens_twice_fails_naming_the_setting(turns, model_server, registry):
    model_server.add_fault(Fault(kind="max_tokens", count=2))
    inp = planner_turn()
    error = await fails(turns, inp)
    assert error.type == "InvalidModelOutput" and error.non_retryable
    assert "cut at max_tokens (512 tokens)" in error.message and "RELAY_MAX_TOKENS" in error.message
    assert "did not validate" not in error.message


async def test_a_refusal_is_named_and_not_repaired(turns, model_server, registry):
    """A refusal is not asked again: insisting would pay for the same refusal; the human can
    change the request instead. It is recorded (it was paid for) and the turn fails at once."""
    model_server.add_fault(Fault(kind="refusal"))
    inp = planner_turn()
    error = await fails(turns, inp)
    assert error.type == "ModelRefused" and error.non_retryable
    assert error.message == f"planner turn 1: the model refused: {REFUSAL_TEXT}"
    assert len(model_server.recorded("planner")) == 1
    assert recorded_steps(registry, inp) == [(1, 0, "user"), (1, 0, "assistant")]
    session = registry.find_session(inp.spec_id, Role.planner)
    assert session.status == "failed" and session.lease_owner is None

    # a retry of the same turn (a redelivered attempt) fails the same way without paying again
    again = await fails(turns, inp, number=2)
    assert again.type == "ModelRefused" and len(model_server.recorded("planner")) == 1


async def test_text_only_gets_a_repair_turn_then_fails_clearly(turns, model_server, registry):
    model_server.add_fault(Fault(kind="text_only"))
    result = await attempt(1).run(turns.agent_turn, planner_turn())
    assert result.repaired and result.output["summary"]

    model_server.add_fault(Fault(kind="text_only", count=2))
    error = await fails(turns, planner_turn())
    assert error.type == "InvalidModelOutput" and error.non_retryable
    assert "did not call submit_plan (it answered with text only: 'Here is my answer" in error.message


# --- end to end through a real worker: one of each class ---------------------------------------


async def test_e2e_transient_status_and_transport_faults_complete(relay, model_server):
    """A 503 on one turn, a cut connection on another, a truncated body on a third: retried by
    Temporal, and the spec is delivered."""
    model_server.add_fault(Fault(kind="error", status=503, role="planner"))
    model_server.add_fault(Fault(kind="reset", role="auditor"))
    model_server.add_fault(Fault(kind="truncated", role="validator"))
    result = await run_spec(relay, "Write a greeting module")
    assert result.outcome == "delivered"
    assert [r.status for r in model_server.recorded("planner")][:2] == [503, 200]
    assert [r.fault for r in model_server.recorded("auditor")][:2] == ["reset", None]
    assert [r.fault for r in model_server.recorded("validator")][:2] == ["truncated", None]


async def test_e2e_permanent_status_fails_the_spec_with_the_reason(relay, model_server):
    model_server.add_fault(Fault(kind="error", status=403, role="clarifier"))
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    with pytest.raises(SpecFailed, match="HTTP 403 Forbidden"):
        await relay.result(sid)
    st = await relay.status(sid)
    assert st.phase == Phase.failed
    assert "clarifier turn 1 failed" in st.error
    assert "answered HTTP 403 Forbidden (permission_error): Scripted fault: error 403" in st.error
    assert "(gave up" not in st.error  # not retried: one request
    assert len(model_server.recorded("clarifier")) == 1


async def test_e2e_model_answers_are_named(relay, model_server):
    """A refusal fails its spec at once, named; max_tokens twice fails naming the setting."""
    model_server.add_fault(Fault(kind="refusal", role="clarifier"))
    refused = await relay.run("Write a greeting module", spec_id=spec_id())
    with pytest.raises(SpecFailed, match="the model refused"):
        await relay.result(refused)
    assert f"the model refused: {REFUSAL_TEXT}" in (await relay.status(refused)).error

    model_server.add_fault(Fault(kind="max_tokens", role="planner", count=2))
    cut = await relay.run("Write a farewell module", spec_id=spec_id())
    await wait_for_questions(relay, cut)
    await relay.answer(cut, ANSWERS)
    st = await wait_for(relay, cut, lambda s: s.phase == Phase.failed)
    assert "cut at max_tokens" in st.error and "RELAY_MAX_TOKENS" in st.error
    with pytest.raises(SpecFailed):
        await approve_when_asked(relay, cut)
