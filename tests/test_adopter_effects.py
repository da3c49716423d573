"""Adopters' effects: registered outside the workflow, run as hooks, compensated like git's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.service import RPCError

from relay.client import SpecFailed
from relay.effects import EffectRegistry
from relay.ledger import Ledger
from relay.models import HookEffect, Phase
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    cli_env,
    spec_id,
    wait_for,
    wait_for_questions,
)


async def start(relay, tracker: Path, *hooks: HookEffect) -> str:
    sid = await relay.run("Write a greeting module", spec_id=spec_id("hooks"), hooks=list(hooks))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    return sid


async def test_a_compensation_that_keeps_failing_needs_a_human_then_relay_compensate(
        relay, registry, settings, tmp_path):
    """The tracker refuses to close the ticket 3 times: the row is needs_human, the spec says so;
    once the tracker is back, `relay compensate` closes it."""
    tracker = tmp_path / "tracker"
    tracker.mkdir()
    sid = await start(relay, tracker, HookEffect(effect="tickets.open", payload={"dir": str(tracker)}))
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    assert (tracker / f"{sid}.open").exists()

    (tracker / "tracker-down").touch()
    await relay.reject(sid, "wrong approach")
    result = await relay.result(sid)
    assert result.outcome == "rejected"
    assert [r.effect for r in result.needs_human] == ["tickets.open"]
    assert "the ticket tracker is down" in result.needs_human[0].error
    assert (tracker / "close-attempts").read_text() == str(settings.compensation_max_attempts)
    rows = {r.effect: r.status for r in Ledger(registry).effects(sid)}
    assert rows["tickets.open"] == "needs_human" and rows["git.prepare_workspace"] == "compensated"

    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "status", sid, env=cli_env(settings), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert "needs a human: compensation of tickets.open" in out.decode()
    assert f"relay compensate {sid}" in out.decode()

    (tracker / "tracker-down").unlink()
    report = await relay.compensate(sid)
    assert [r.effect for r in report.compensated] == ["tickets.open"] and not report.needs_human
    assert not (tracker / f"{sid}.open").exists()
    assert {r.status for r in Ledger(registry).effects(sid)} == {"compensated"}
    assert (await relay.compensate(sid)).compensated == []  # nothing left: a no-op


async def test_delivery_hooks_run_after_the_merge_and_are_final(relay, registry, tmp_path):
    """An irreversible hook at delivery runs once the change is merged, and is never undone."""
    tracker = tmp_path / "tracker"
    tracker.mkdir()
    sid = await start(relay, tracker,
                      HookEffect(effect="tickets.open", payload={"dir": str(tracker)}),
                      HookEffect(effect="tickets.announce", payload={"dir": str(tracker)}, at="deliver"))
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    assert not (tracker / f"{sid}.announced").exists()
    await relay.approve(sid)
    assert (await relay.result(sid)).outcome == "delivered"
    assert (tracker / f"{sid}.announced").exists() and (tracker / f"{sid}.open").exists()
    assert (await relay.compensate(sid)).compensated == []  # a delivered run is final


async def test_an_irreversible_effect_cannot_run_before_approval(relay, registry, tmp_path):
    """Declaring an irreversible effect at the prepare stage fails the spec with the reason."""
    tracker = tmp_path / "tracker"
    tracker.mkdir()
    sid = await relay.run("Write a greeting module", spec_id=spec_id("hooks"), hooks=[
        HookEffect(effect="tickets.announce", payload={"dir": str(tracker)})])
    with pytest.raises(SpecFailed, match="irreversible and cannot run before approval"):
        await relay.result(sid)
    assert not (tracker / f"{sid}.announced").exists()
    assert all(r.status == "compensated" for r in Ledger(registry).effects(sid)
               if r.effect != "tickets.announce")


async def test_an_unknown_effect_fails_the_spec_clearly(relay):
    sid = await relay.run("Write a greeting module", spec_id=spec_id("hooks"), hooks=[
        HookEffect(effect="tickets.teleport")])
    with pytest.raises(SpecFailed, match="unknown effect 'tickets.teleport'"):
        await relay.result(sid)


def test_registry_rules():
    """Reversible effects need a compensation; irreversible ones cannot have one; names are unique."""
    effects = EffectRegistry()

    @effects.effect("a.reversible")
    def act(ctx, payload):
        return {}

    with pytest.raises(KeyError, match="has no compensation"):
        effects.get("a.reversible")
    with pytest.raises(ValueError, match="already registered"):
        effects.effect("a.reversible")(act)
    final = effects.effect("a.final", reversible=False)(act)
    with pytest.raises(ValueError, match="irreversible"):
        final.compensation(lambda *a: None)


async def test_no_iteration_while_a_compensation_runs(relay, registry, settings, tmp_path):
    """While `relay compensate` works on a spec, `relay iterate` is refused: the old run's
    compensations would otherwise remove the new run's branch."""
    tracker = tmp_path / "tracker"
    tracker.mkdir()
    sid = await start(relay, tracker, HookEffect(effect="tickets.open", payload={"dir": str(tracker)}))
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    (tracker / "tracker-down").touch()
    await relay.reject(sid, "no")
    assert (await relay.result(sid)).needs_human

    # The tracker stays down until the refusal is seen, so the compensation is still retrying
    # however slow the machine; then it comes back and the retried compensation succeeds.
    patient = relay.settings.model_copy(update={"compensation_max_attempts": 8})
    from relay.client import RelayClient, SpecAlreadyRunning

    compensating = asyncio.create_task(RelayClient(relay.temporal, patient, registry).compensate(sid))
    handle = relay.temporal.get_workflow_handle(f"compensate:{sid}")
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # until the compensation workflow exists
        assert not compensating.done(), compensating
        assert asyncio.get_running_loop().time() < deadline, "compensation workflow never started"
        try:
            await handle.describe()
            break
        except RPCError:
            await asyncio.sleep(0.05)
    with pytest.raises(SpecAlreadyRunning, match="being compensated"):
        await relay.iterate(sid, "next")
    assert not compensating.done()
    (tracker / "tracker-down").unlink()
    report = await asyncio.wait_for(compensating, 90)
    assert [r.effect for r in report.compensated] == ["tickets.open"] and not report.needs_human
