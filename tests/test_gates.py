"""Gate 2 before delivery: a tainted trajectory is re-checked on the primary or shown to a
person; auto_approve approves a clean trajectory only; every decision is recorded.

Real dev server, the scripted model over HTTP with faults aimed at the primary model only.
"""

from __future__ import annotations

import json

import pytest_asyncio

from relay.models import GatePolicy, Phase, Role, Trust
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    SCRIPTED_MODEL,
    cli_env,
    model_endpoint_for,
    spec_id,
    wait_for,
    wait_for_questions,
)
from tests.test_agent_loop import FALLBACK
from tests.test_cli import cli, ok
from worker.main import build_worker

PLANNER_OUTAGE = 4  # the plan and its revision each use up 2 attempts on the primary


@pytest_asyncio.fixture
async def gated(client, settings, registry, model_server):
    s = settings.model_copy(update={"capacity_attempts": 2, "fallback_models": FALLBACK,
                                    "model_wait_s": 0.5, "model_wait_max_s": 1.0})
    endpoint = model_endpoint_for(model_server)
    worker = build_worker(client, task_queue=s.task_queue, registry=registry, endpoint=endpoint,
                          settings=s)
    from relay.client import RelayClient
    async with worker:
        yield RelayClient(client, s, registry)
    await endpoint.client.close()


async def start(rc, request: str = "Write a greeting module", **options) -> str:
    sid = await rc.run(request, spec_id=spec_id("gate"), **options)
    await wait_for_questions(rc, sid)
    await rc.answer(sid, ANSWERS)
    return sid


async def test_a_degraded_trajectory_is_rechecked_agrees_and_is_delivered(gated, model_server,
                                                                          registry):
    model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                 count=PLANNER_OUTAGE))
    sid = await start(gated, auto_approve=True)
    result = await gated.result(sid)
    assert result.outcome == "delivered"
    gate = result.gate
    assert gate is not None and gate.decision == "verified" and not gate.needs_human
    assert gate.decided_by == "gate: re-check on the primary" and gate.decided_at
    assert set(gate.degraded_steps) == {"planner/t1/s0", "planner/t2/s0"}
    assert all(r.agree and r.model == SCRIPTED_MODEL for r in gate.rechecks)
    assert all(d.verified_by for d in result.degraded)
    planner = registry.messages(registry.find_session(sid, Role.planner).id)
    assert all(m.verified_by for m in planner if m.role == "assistant")
    records = {r.key: r for r in registry.gate_records(sid)}
    assert records["i1/gate/deliver/recheck"].decision == "verified"
    assert records["i1/recheck/planner/t1/s0"].agree is True
    # the re-checks were paid once each, on the primary
    rechecks = [r for r in model_server.recorded("planner")
                if r.model == SCRIPTED_MODEL and r.status == 200]
    assert len(rechecks) == 2


async def test_a_recheck_that_disagrees_waits_for_a_person_who_sees_the_diff(
        gated, model_server, registry, settings):
    model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                 count=PLANNER_OUTAGE))
    model_server.add_fault(Fault(kind="divergent", role="planner", model=SCRIPTED_MODEL))
    sid = await start(gated, auto_approve=True)  # auto_approve never skips Gate 2
    st = await wait_for(gated, sid, lambda s: s.phase == Phase.waiting_for_approval, 60)
    assert st.gate.needs_human and st.gate.decision == "waiting"
    disagree = [r for r in st.gate.rechecks if r.agree is False]
    assert disagree and "+ do something else entirely" in disagree[0].diff
    assert "disagrees" in st.waiting_for and "A person must decide" in st.waiting_for
    shown = ok(await cli(gated.settings, "status", sid))
    assert "Gate 2" in shown and "disagrees" in shown and "degraded: planner/t1/s0" in shown
    assert "+ do something else entirely" in shown
    await gated.approve(sid, reviewer="alice")
    result = await gated.result(sid)
    assert result.outcome == "delivered"
    assert result.gate.decision == "approved" and result.gate.decided_by == "human: alice"
    assert registry.gate_record(sid, "i1/gate/deliver/human").decision == "approved"

    # the same, rejected: every effect is compensated
    model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                 count=PLANNER_OUTAGE))
    model_server.add_fault(Fault(kind="divergent", role="planner", model=SCRIPTED_MODEL))
    other = await start(gated, "Write a farewell module", auto_approve=True)
    await wait_for(gated, other, lambda s: s.phase == Phase.waiting_for_approval, 60)
    await gated.reject(other, "the plans differ", reviewer="bob")
    rejected = await gated.result(other)
    assert rejected.outcome == "rejected" and rejected.compensated
    assert registry.gate_record(other, "i1/gate/deliver/human").decision == "rejected"


async def test_policy_human_always_asks_a_person_for_a_tainted_trajectory(gated, model_server,
                                                                          registry):
    model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                 count=PLANNER_OUTAGE))
    sid = await start(gated, auto_approve=True, gate_policy=GatePolicy.human)
    st = await wait_for(gated, sid, lambda s: s.phase == Phase.waiting_for_approval, 60)
    assert st.gate.needs_human and not st.gate.rechecks and "policy is human" in st.gate.reason
    await gated.approve(sid, reviewer="carol")
    assert (await gated.result(sid)).outcome == "delivered"


async def test_a_clean_trajectory_is_auto_approved_and_the_decision_recorded(gated, registry):
    sid = await start(gated, auto_approve=True)
    result = await gated.result(sid)
    assert result.outcome == "delivered" and not result.degraded
    assert result.gate.decision == "proceed" and result.gate.decided_by == "gate: clean trajectory"
    assert registry.gate_record(sid, "i1/gate/deliver").decision == "proceed"


async def test_taint_crosses_iterations_until_verified(gated, model_server, registry):
    """A degraded plan of iteration 1, approved by a person but never verified, taints the
    planner's resumed session in iteration 2, and everything computed from it."""
    model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                 count=PLANNER_OUTAGE))
    sid = await start(gated, gate_policy=GatePolicy.human)
    await wait_for(gated, sid, lambda s: s.phase == Phase.waiting_for_approval, 60)
    await gated.approve(sid, reviewer="dave")
    assert (await gated.result(sid)).outcome == "delivered"

    await gated.iterate(sid, "Greet in Italian too", gate_policy=GatePolicy.human)
    st = await wait_for(gated, sid, lambda s: s.iteration == 2
                        and s.phase == Phase.waiting_for_approval, 60)
    planner = next(d for d in st.degraded if d.role == Role.planner)
    assert planner.provenance.trust == Trust.full  # answered by the primary this time
    assert "planner/t1/s0" in planner.provenance.tainted_by
    assert {d.role for d in st.degraded} >= {Role.planner, Role.auditor, Role.validator}
    rows = registry.messages(registry.find_session(sid, Role.planner).id)
    newest = [m for m in rows if m.role == "assistant"][-1]
    assert "planner/t1/s0" in (newest.tainted_by or [])
    shown = ok(await cli(gated.settings, "history", sid, "planner"))
    assert "DEGRADED" in shown and "tainted by planner/t1/s0" in " ".join(shown.split())
    await gated.reject(sid, "tainted")
    await gated.result(sid)
    assert json.dumps(st.model_dump(mode="json"))  # the status serialises for every client


# --- destructive changes and what lands ----------------------------------------------------


async def test_a_destructive_deletion_needs_a_person_even_with_auto_approve(relay, user_repo,
                                                                            registry):
    """The constructor deletes README.md, which exists on main: a clean trajectory and
    auto_approve, and still a person decides (gate on risk, not on confidence)."""
    from tests.test_workspace import start as start_in, waiting_for_approval
    sid = await start_in(relay, "Write a greeting module [delete-readme]", user_repo,
                         auto_approve=True)
    st = await waiting_for_approval(relay, sid)
    assert st.phase == Phase.waiting_for_approval, st.error
    assert not st.degraded and st.gate.needs_human
    assert st.gate.destructive == ["deletes README.md, which exists on main"]
    assert "gate on risk, not on confidence" in st.waiting_for
    assert (user_repo / "README.md").is_file()  # nothing landed yet
    await relay.approve(sid, reviewer="erin")
    result = await relay.result(sid)
    assert result.outcome == "delivered" and not (user_repo / "README.md").exists()
    assert registry.gate_record(sid, "i1/gate/deliver/human").decided_by == "human: erin"


async def test_a_constructor_that_only_declares_files_is_never_delivered(relay, user_repo,
                                                                         model_server):
    """The constructor answers with file contents and writes none: the branch's diff is empty,
    so the change did not happen; it is told to write through its tools, the validator is
    never asked to approve a description, and nothing is delivered."""
    from tests.conftest import git
    from tests.test_workspace import start as start_in
    before = git(user_repo, "rev-parse", "main")
    sid = await start_in(relay, "Write a greeting module [declare-only]", user_repo,
                         auto_approve=True)
    result = await relay.result(sid)
    assert result.outcome == "change_rejected"
    assert "change_not_made" in result.flags and result.delivery is None
    assert git(user_repo, "rev-parse", "main") == before
    assert model_server.recorded("validator") == []
    fixes = model_server.recorded("constructor")[1:]
    assert fixes and "No file changed on the branch" in json.dumps(fixes[0].body["messages"][-1])
    system = model_server.recorded("constructor")[0].body["system"][0]["text"]
    assert "only what you write with write_file" in " ".join(system.split())


async def test_the_validator_judges_the_branchs_real_diff(relay, user_repo, model_server):
    from tests.test_workspace import start as start_in, waiting_for_approval
    sid = await start_in(relay, "Write a greeting module", user_repo)
    await waiting_for_approval(relay, sid)
    shown = json.dumps(model_server.recorded("validator")[0].body["messages"][-1])
    assert "Files changed on the branch" in shown and "A greeting.py" in shown
    assert "+def greet" in shown  # the diff itself, read from git
    await relay.reject(sid, "only looking")
    await relay.result(sid)


# --- SIGKILL of the worker ------------------------------------------------------------------


async def _worker(settings, log, failpoints: str = ""):
    import asyncio
    return await asyncio.create_subprocess_exec(
        *RELAY_CMD, "worker", env=cli_env(settings) | {"RELAY_FAILPOINTS": failpoints},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("ab"))


async def _stop(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()


def _fallback_settings(settings):
    return settings.model_copy(update={"capacity_attempts": 2, "fallback_models": FALLBACK,
                                       "heartbeat_timeout_s": 2})


def _nothing_twice(registry, sid: str) -> None:
    for session in registry.sessions(sid):
        keys = [(m.turn, m.step, m.role) for m in registry.messages(session.id)]
        assert len(keys) == len(set(keys)), session.role


async def test_sigkill_during_a_fallback_call(client, settings, registry, model_server, tmp_path):
    """The worker dies while the fallback model answers the planner: a new worker takes the
    step over, the fallback answer is recorded once (degraded), the gate re-checks it and the
    spec is delivered."""
    import signal

    from relay.client import RelayClient
    from tests.conftest import until
    s = _fallback_settings(settings)
    rc = RelayClient(client, s, registry)
    log = tmp_path / "workers.log"
    first = await _worker(s, log)
    second = None
    try:
        sid = await rc.run("Write a greeting module", spec_id=spec_id("killfb"),
                           auto_approve=True)
        await wait_for_questions(rc, sid, timeout=90)
        model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                     count=PLANNER_OUTAGE))
        model_server.add_fault(Fault(kind="slow", role="planner", model=FALLBACK, delay_s=4))
        await rc.answer(sid, ANSWERS)
        await until(lambda: any(r.model == FALLBACK for r in model_server.recorded("planner"))
                    or model_server.arrived("planner") >= 3, timeout=90)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        second = await _worker(s, log)
        result = await rc.result(sid)
    finally:
        await _stop(first, second)
    assert result.outcome == "delivered" and result.gate.decision == "verified"
    _nothing_twice(registry, sid)
    planner = [m for m in registry.messages(registry.find_session(sid, Role.planner).id)
               if m.role == "assistant"]
    assert all((m.source, m.model) == ("fallback", FALLBACK) for m in planner)


async def test_sigkill_between_a_recheck_and_its_verdict(client, settings, registry,
                                                         model_server, tmp_path):
    """The worker dies after the primary answered a re-check and before its verdict was
    recorded: the answer rode in the heartbeat, the next attempt records the verdict without
    asking the primary again, and the gate decision is recorded."""
    import asyncio
    import signal

    from relay.client import RelayClient
    from tests.conftest import until
    from tests.test_registry_outage import pending_heartbeat
    s = _fallback_settings(settings)
    rc = RelayClient(client, s, registry)
    log = tmp_path / "workers.log"
    pause = tmp_path / "pause"
    first = await _worker(s, log, f"gate.after_recheck_call:planner/t1/s0@{pause}")
    second = None
    try:
        sid = await rc.run("Write a greeting module", spec_id=spec_id("killgate"),
                           auto_approve=True)
        await wait_for_questions(rc, sid, timeout=90)
        model_server.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL,
                                     count=PLANNER_OUTAGE))
        await rc.answer(sid, ANSWERS)
        await until(lambda: (pause / "reached").exists(), timeout=90)
        deadline = asyncio.get_running_loop().time() + 30
        while not await pending_heartbeat(client, sid, "recheck_step"):
            assert asyncio.get_running_loop().time() < deadline, "the answer was never carried"
            await asyncio.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        primary_before = [r for r in model_server.recorded("planner")
                          if r.model == SCRIPTED_MODEL and r.status == 200]
        second = await _worker(s, log)
        result = await rc.result(sid)
    finally:
        await _stop(first, second)
    assert result.outcome == "delivered" and result.gate.decision == "verified"
    primary = [r for r in model_server.recorded("planner")
               if r.model == SCRIPTED_MODEL and r.status == 200]
    assert len(primary_before) == 1 and len(primary) == 2  # each re-check paid once
    assert "gate.recheck_carried_answer_used" in log.read_text()
    assert registry.gate_record(sid, "i1/recheck/planner/t1/s0").agree is True
    assert registry.gate_record(sid, "i1/gate/deliver/recheck").decision == "verified"


async def test_an_adopter_effect_declared_destructive_needs_a_person(relay, tmp_path):
    from relay.models import HookEffect
    tracker = tmp_path / "tracker"
    tracker.mkdir()
    sid = await start(relay, auto_approve=True, hooks=[
        HookEffect(effect="tickets.purge", at="deliver", payload={"dir": str(tracker)})])
    st = await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval, 60)
    assert st.gate.destructive == ["runs tickets.purge at delivery, declared destructive"]
    assert not (tracker / f"{sid}.purged").exists()
    await relay.approve(sid, reviewer="frank")
    assert (await relay.result(sid)).outcome == "delivered"
    assert (tracker / f"{sid}.purged").exists()
