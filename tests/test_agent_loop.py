"""The agent loop in the workflow: one model_step activity per model call, one agent_tool
activity per tool call, and Gate 1 (fall back on capacity errors only, or wait for the model).

Real dev server, the scripted model over HTTP (two model names, faults aimed at one), the
real registry; activity attempts are driven as Temporal would drive them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import anthropic
import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.model_step import ModelStepActivities, call_timeout
from relay.client import RelayClient, SpecFailed
from relay.ledger import Ledger
from relay.models import ModelStepInput, Phase, Role, Source, Trust
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    SCRIPTED_MODEL,
    approve_when_asked,
    model_endpoint_for,
    run_spec,
    spec_id,
    until,
    wait_for,
    wait_for_questions,
)
from worker.main import build_worker

FALLBACK = "relay-scripted-fallback-1"


@pytest_asyncio.fixture
async def steps(registry, model_server):
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=model_server.url, max_retries=0)
    yield ModelStepActivities(registry, client, SCRIPTED_MODEL, max_tokens=512)
    await client.close()


def attempt(number: int, heartbeat_s: float = 5) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=number,
                                   heartbeat_timeout=timedelta(seconds=heartbeat_s),
                                   start_to_close_timeout=timedelta(seconds=60))
    return env


def planner_step(sid: str | None = None, **extra) -> ModelStepInput:
    return ModelStepInput(spec_id=sid or spec_id("loop"), role=Role.planner, turn=1, step=0,
                          kind="plan", variables={"spec": "Greet people", "iteration": "1"},
                          **extra)


def paid(model_server, role: str = "planner", model: str | None = None) -> int:
    return sum(1 for r in model_server.recorded(role)
               if r.status == 200 and (model is None or r.model == model))


# --- the model step activity ------------------------------------------------------------------


async def test_a_recorded_step_is_never_paid_twice(steps, model_server, registry):
    inp = planner_step()
    first = await attempt(1).run(steps.model_step, inp)
    again = await attempt(2).run(steps.model_step, inp)  # a retried attempt of the same step
    assert first.output and not first.replayed and again.replayed
    assert again.output == first.output and again.usage == first.usage
    assert paid(model_server) == 1
    session = registry.find_session(inp.spec_id, Role.planner)
    assert [(m.turn, m.step, m.role) for m in registry.messages(session.id)] == [
        (1, 0, "user"), (1, 0, "assistant")]
    assert session.lease_owner is None
    assert first.provenance.source == Source.primary and first.provenance.trust == Trust.full
    assert first.provenance.model == SCRIPTED_MODEL and first.provenance.prompt_version
    assert first.step_id == "planner/t1/s0"


async def test_two_live_attempts_of_one_step_never_both_pay(steps, model_server, registry):
    """The first attempt is still in its model call when Temporal starts a retry beside it (its
    heartbeat was lost): the retry waits for the step's lease and then uses the recorded
    answer. This is why the lease stays, per step."""
    inp = planner_step()
    model_server.add_fault(Fault(kind="slow", role="planner", delay_s=1.5))
    first = asyncio.ensure_future(attempt(1).run(steps.model_step, inp))
    await until(lambda: model_server.arrived("planner") == 1)
    second = await attempt(2).run(steps.model_step, inp)
    one = await first
    assert model_server.arrived("planner") == 1 and paid(model_server) == 1
    assert second.replayed and second.output == one.output


async def test_capacity_errors_go_to_the_workflow_after_the_configured_attempts(steps,
                                                                                model_server):
    model_server.add_fault(Fault(kind="overloaded", role="planner", count=2))
    inp = planner_step(capacity_attempts=2)
    with pytest.raises(ApplicationError) as first:
        await attempt(1).run(steps.model_step, inp)
    assert first.value.type == "ModelOverloaded" and not first.value.non_retryable
    with pytest.raises(ApplicationError) as last:
        await attempt(2).run(steps.model_step, inp)
    assert last.value.type == "ModelOverloaded" and last.value.non_retryable  # fall back / wait
    assert last.value.details[0]["model"] == SCRIPTED_MODEL


async def test_a_long_retry_after_goes_to_the_workflow_at_once(steps, model_server):
    model_server.add_fault(Fault(kind="rate_limit", role="planner", retry_after=120))
    with pytest.raises(ApplicationError) as caught:
        await attempt(1).run(steps.model_step, planner_step(max_retry_after_s=60))
    assert caught.value.type == "ModelRateLimited" and caught.value.non_retryable
    assert caught.value.details[0]["retry_after_s"] == 120


@pytest.mark.parametrize("kind", ["invalid_output", "refusal", "auth_error"])
async def test_bad_answers_and_4xx_are_not_capacity_errors(steps, model_server, registry, kind):
    """An invalid output is answered (and repaired by the loop), a refusal is named, a 401
    fails at once: none of them is a capacity error, so none trips the fallback."""
    model_server.add_fault(Fault(kind=kind, role="planner"))
    inp = planner_step(capacity_attempts=1)
    if kind == "auth_error":
        with pytest.raises(ApplicationError) as caught:
            await attempt(1).run(steps.model_step, inp)
        assert caught.value.type == "ModelRequestRejected" and caught.value.non_retryable
        return
    result = await attempt(1).run(steps.model_step, inp)
    assert result.output is None and result.error
    assert result.refused == (kind == "refusal")


async def test_a_hung_request_is_cut_by_a_timeout_sized_to_the_call(steps, model_server):
    assert 60 < call_timeout(4096) < 180  # sized to the tokens requested, not the 600 s turn
    model_server.add_fault(Fault(kind="hang", role="planner", delay_s=5))
    started = asyncio.get_running_loop().time()
    with pytest.raises(ApplicationError) as caught:
        await attempt(1).run(steps.model_step, planner_step(call_timeout_s=0.5))
    assert caught.value.type == "ModelTimeout"
    assert asyncio.get_running_loop().time() - started < 4


async def test_a_fallback_answer_is_recorded_degraded(steps, model_server, registry):
    result = await attempt(1).run(steps.model_step,
                                  planner_step(model=FALLBACK, source=Source.fallback))
    assert result.provenance.source == Source.fallback
    assert result.provenance.trust == Trust.degraded and result.provenance.model == FALLBACK
    assert f"[by {FALLBACK}]" in result.output["summary"]  # the scripted model's second name
    answer = registry.messages(result.session_id)[-1]
    assert (answer.source, answer.trust, answer.model) == ("fallback", "degraded", FALLBACK)


# --- end to end: Gate 1 --------------------------------------------------------------------


@pytest_asyncio.fixture
async def gated(client, settings, registry, model_server):
    """A worker and client whose settings name a fallback model and short Gate 1 schedules."""
    made = []

    async def make(**update) -> RelayClient:
        s = settings.model_copy(update={"capacity_attempts": 2, "model_wait_s": 0.5,
                                        "model_wait_max_s": 1.0, **update})
        endpoint = model_endpoint_for(model_server)
        worker = build_worker(client, task_queue=s.task_queue, registry=registry,
                              endpoint=endpoint, settings=s)
        await worker.__aenter__()
        made.append((worker, endpoint))
        return RelayClient(client, s, registry)

    yield make
    for worker, endpoint in made:
        await worker.__aexit__(None, None, None)
        await endpoint.client.close()


async def test_fallback_on_529_taints_everything_downstream(gated, model_server, registry):
    """The primary answers 529 for the planner only; the fallback answers; the plan is degraded
    and the auditor, constructor and validator are tainted by it."""
    rc = await gated(fallback_models=FALLBACK)
    model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                 count=1000))
    result = await run_spec(rc, "Write a greeting module")
    assert result.outcome == "delivered"
    assert paid(model_server, "planner", SCRIPTED_MODEL) == 0
    assert paid(model_server, "planner", FALLBACK) == 2  # plan and revision, once each
    assert paid(model_server, "auditor", FALLBACK) == 0  # only capacity errors fall back

    planner = registry.messages(registry.find_session(result.spec_id, Role.planner).id)
    answers = [m for m in planner if m.role == "assistant"]
    assert {(m.source, m.trust, m.model) for m in answers} == {("fallback", "degraded", FALLBACK)}
    for role in (Role.auditor, Role.constructor, Role.validator):
        rows = [m for m in registry.messages(registry.find_session(result.spec_id, role).id)
                if m.role == "assistant"]
        assert all(m.source == "primary" and m.trust == "full" for m in rows)
        assert all(any(t.startswith("planner/") for t in m.tainted_by or []) for m in rows), role
    degraded = {d.role for d in result.degraded}
    assert degraded == {Role.planner, Role.auditor, Role.constructor, Role.validator}
    plan_step = next(d for d in result.degraded if d.role == Role.planner)
    assert plan_step.provenance.source == Source.fallback and "fallback" in plan_step.reason
    status = await rc.status(result.spec_id)
    assert "degraded_trajectory" in status.flags and status.degraded == result.degraded


async def test_invalid_output_and_refusal_never_trip_the_fallback(gated, model_server):
    rc = await gated(fallback_models=FALLBACK)
    model_server.add_fault(Fault(kind="invalid_output", role="planner"))
    result = await run_spec(rc, "Write a greeting module")
    assert result.outcome == "delivered" and "planner_output_repaired" in result.flags
    assert not result.degraded
    assert all(r.model == SCRIPTED_MODEL for r in model_server.recorded())

    model_server.reset()
    model_server.add_fault(Fault(kind="refusal", role="clarifier"))
    sid = await rc.run("Write a greeting module", spec_id=spec_id())
    with pytest.raises(SpecFailed, match="the model refused"):
        await rc.result(sid)
    model_server.add_fault(Fault(kind="auth_error", role="clarifier", count=5))
    sid = await rc.run("Write a greeting module", spec_id=spec_id())
    with pytest.raises(SpecFailed, match="HTTP 401"):
        await rc.result(sid)
    assert all(r.model == SCRIPTED_MODEL for r in model_server.recorded())
    assert len([r for r in model_server.recorded() if r.status == 401]) == 1  # at once


async def test_an_outage_without_fallback_waits_visibly_and_loses_nothing(gated, model_server,
                                                                         registry):
    """The primary stays overloaded with no fallback configured: the spec waits in
    waiting_for_model (last error, next attempt time), then completes when the primary is
    back. Nothing is compensated and nothing is paid twice. (The outage is 12 consecutive 529s
    against waits of 0.5-1 s: the schedule is configurable, RELAY_MODEL_WAIT_S and
    RELAY_MODEL_WAIT_MAX_S, minutes to hours in production.)"""
    rc = await gated()
    sid = await rc.run("Write a greeting module", spec_id=spec_id("outage"),
                       workspace=None)
    await wait_for_questions(rc, sid)
    model_server.add_fault(Fault(kind="overloaded", role="planner", count=12))
    await rc.answer(sid, ANSWERS)
    waiting = await wait_for(rc, sid, lambda s: s.phase == Phase.waiting_for_model)
    assert waiting.model_wait is not None and waiting.model_wait.role == Role.planner
    assert "529" in waiting.model_wait.last_error and waiting.model_wait.next_attempt_at
    assert "available again" in (waiting.waiting_for or "")
    result = await approve_when_asked(rc, sid, timeout=60)
    assert result.outcome == "delivered" and not result.compensated
    assert [r.status for r in model_server.recorded("planner")].count(529) == 12
    for session in registry.sessions(sid):
        keys = [(m.turn, m.step, m.role) for m in registry.messages(session.id)]
        assert len(keys) == len(set(keys))
    assert paid(model_server, "planner") == 2
    assert all(r.status == "done" for r in Ledger(registry).effects(sid))
    assert (await rc.status(sid)).model_wait is None


def test_fallback_chains_come_from_settings_with_a_per_role_override(monkeypatch):
    from relay.models import SpecInput
    from relay.settings import RelaySettings
    monkeypatch.setenv("RELAY_FALLBACK_MODELS", "model-b, model-c")
    monkeypatch.setenv("RELAY_FALLBACK_MODELS_PLANNER", "model-p")
    every, by_role = RelaySettings().fallback_chains()
    spec = SpecInput(request="x", fallback_models=every, fallback_models_by_role=by_role)
    assert spec.fallbacks(Role.planner) == ["model-p"]
    assert spec.fallbacks(Role.auditor) == ["model-b", "model-c"]
