"""Cost and one budget per spec (issue 10, item 9).

Real dev server, the scripted model over HTTP, a real registry. The scripted model is priced
through RELAY_PRICES (the setting users have), so its figures are not zero.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowUpdateFailedError

from temporalio.worker import Replayer

from relay.client import RelayClient, SpecFailed
from relay.converter import data_converter
from relay.ledger import Ledger
from relay.models import ROLES, Phase, Role, Status
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    TERMINAL,
    approve_when_asked,
    cli_env,
    run_spec,
    spec_id,
    until,
    wait_for,
    wait_for_questions,
)
from worker.main import SCRIPTED_MODEL
from workflows.pipeline import SpecPipeline

PRICES = {SCRIPTED_MODEL: {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75,
                           "source": "test: Sonnet-like prices", "date": "2026-11-24"}}
REQUEST = "Write a greeting module"


@pytest.fixture
def settings(settings):
    """The session's settings with the scripted model priced (RELAY_PRICES)."""
    return settings.model_copy(update={"prices": json.dumps(PRICES)})


def env_for(settings) -> dict[str, str]:
    return {**cli_env(settings), "RELAY_PRICES": json.dumps(PRICES)}


async def cli(settings, *args: str) -> subprocess.CompletedProcess:
    """`relay ...` in a subprocess, awaited: the test's own worker runs in this event loop."""
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, *args, env=env_for(settings), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def expected_cost(registry, sid: str) -> dict[str, tuple[Decimal, int]]:
    """The price table applied to the recorded usage, row by row: (USD, tokens) per role."""
    price = {k: Decimal(str(v)) for k, v in PRICES[SCRIPTED_MODEL].items()
             if k in ("input", "output", "cache_read", "cache_write")}
    out = {}
    for session in registry.sessions(sid):
        usd, tokens = Decimal(0), 0
        for m in registry.messages(session.id):
            if m.role != "assistant":
                continue
            assert m.model == SCRIPTED_MODEL  # each row records the model that answered
            usd += (m.input_tokens * price["input"] + m.output_tokens * price["output"]
                    + m.cache_read_tokens * price["cache_read"]
                    + m.cache_write_tokens * price["cache_write"]) / Decimal(1_000_000)
            tokens += (m.input_tokens + m.output_tokens + m.cache_read_tokens
                       + m.cache_write_tokens)
        out[session.role] = (usd, tokens)
    return out


def requests_by_role(model_server) -> Counter:
    return Counter(r.role for r in model_server.recorded() if r.status == 200)


async def test_cost_figures_equal_the_price_table_applied_to_the_recorded_usage(
        relay, registry, settings):
    """Status, result, the SDK's registry view and the CLI all show the same cost: the price
    table applied to the registry's message rows (per role = per session, and in total)."""
    result = await run_spec(relay, REQUEST, budget_usd=50.0)
    sid = result.spec_id
    expected = expected_cost(registry, sid)
    total_usd = sum(usd for usd, _ in expected.values())
    total_tokens = sum(tokens for _, tokens in expected.values())
    assert total_usd > 0 and total_tokens > 0

    status = await relay.status(sid)
    from_registry = relay.cost(sid)
    for cost, by_role in ((result.cost, result.cost_by_role),
                          (status.cost, status.cost_by_role),
                          (from_registry.total, from_registry.by_role)):
        assert cost.usd == pytest.approx(float(total_usd), abs=1e-9)
        assert cost.tokens == total_tokens
        assert cost.possibly_billed_calls == 0 and not cost.unpriced_models
        assert set(by_role) == {r.value for r in ROLES}
        for role, (usd, tokens) in expected.items():
            assert by_role[role].usd == pytest.approx(float(usd), abs=1e-9), role
            assert by_role[role].tokens == tokens, role
    assert result.budget.usd == 50.0 and result.budget.tokens is None

    sessions = json.loads((await cli(settings, "sessions", sid, "--json")).stdout)
    assert {s["role"]: s["cost"]["usd"] for s in sessions} == pytest.approx(
        {role: float(usd) for role, (usd, _) in expected.items()}, abs=1e-9)
    shown = await cli(settings, "sessions", sid)
    assert shown.returncode == 0 and f"${float(total_usd):,.4f}" in shown.stdout
    status_json = json.loads((await cli(settings, "status", sid, "--json")).stdout)
    assert status_json["cost"]["usd"] == pytest.approx(float(total_usd), abs=1e-9)


async def phase_attribute(client, sid: str) -> str | None:
    async for execution in client.list_workflows(f'WorkflowId = "{sid}"'):
        values = execution.typed_search_attributes
        for pair in values:
            if pair.key.name == "RelayPhase":
                return pair.value
    return None


async def test_a_budget_that_runs_out_mid_constructor_pauses_the_spec_and_raising_it_resumes(
        relay, client, registry, model_server, settings):
    """The spec waits in waiting_for_budget before any call that would go over (each raise
    here gives exactly what the next call needs, so it pauses before every call); raised
    through the SDK and at last through the CLI, it is delivered with the same model requests,
    per role, as an unbudgeted run: nothing lost and nothing paid twice."""
    reference = await run_spec(relay, REQUEST)
    unbudgeted = requests_by_role(model_server)
    model_server.reset()

    sid = await relay.run(REQUEST, spec_id=spec_id("budget"), budget_tokens=1)
    seen, pauses, answered = set(), [], False
    while True:
        st = await wait_for(relay, sid, lambda s: (
            s.phase in (Phase.waiting_for_budget, Phase.waiting_for_answers) or s.phase in TERMINAL)
            and _key(s) not in seen, timeout=60)
        assert st.phase not in TERMINAL, st
        seen.add(_key(st))
        if st.phase == Phase.waiting_for_answers:
            assert not answered
            await relay.answer(sid, ANSWERS)
            answered = True
            continue
        wait = st.budget_wait
        assert st.current_role == wait.role and wait.turn >= 1
        assert st.waiting_for and "raise_budget" in st.waiting_for
        pauses.append((wait.role, wait.turn, wait.step))
        if wait.role == Role.constructor and wait.step >= 2:
            break  # mid-constructor: some of its exchanges are recorded already
        short = wait.spent_tokens + wait.estimate_tokens - st.budget.tokens
        assert short > 0
        budget = await relay.budget(sid, add_tokens=short)  # exactly enough for this call
        assert budget.tokens == st.budget.tokens + short

    # paused mid-constructor: visible in the status, the search attribute and the Web UI text
    constructor = registry.find_session(sid, Role.constructor)
    recorded = [m for m in registry.messages(constructor.id) if m.role == "assistant"]
    assert len(recorded) == 2 and st.current_role == Role.constructor
    await until_async(lambda: phase_attribute(client, sid), "waiting_for_budget")
    metadata = await client.get_workflow_handle(sid).query(  # the Web UI's current details
        "__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "budget raise" in metadata.current_details
    assert '`raise_budget`' in metadata.current_details and '{"add_tokens": ' in (
        metadata.current_details)
    assert {"raise_budget"} <= {u.name for u in metadata.definition.update_definitions}
    assert {"raise_budget_signal"} <= {s.name for s in metadata.definition.signal_definitions}
    assert {r for r, _, _ in pauses} == set(ROLES) - {Role.validator}  # all before it

    # bad raises are refused; the spec stays waiting and queryable
    handle = client.get_workflow_handle(sid)
    refused_before = st.rejected_count
    for payload in ([], [{"add_usd": -1}], ["2.00"], [{"add_tokens": "5"}], [{"tokens": 5}],
                    [{"add_usd": 2.0}]):  # this spec has a token budget only
        await handle.signal("raise_budget_signal", *payload)
    for payload in ({"add_tokens": -5}, {}, {"add_usd": 1.0}):
        with pytest.raises(WorkflowUpdateFailedError):
            await handle.execute_update("raise_budget", payload)
    still = await wait_for(relay, sid, lambda s: s.rejected_count == refused_before + 6)
    assert still.phase == Phase.waiting_for_budget and still.budget == st.budget
    assert "raise_budget_signal rejected" in still.rejected_inputs[-1]

    raised = await cli(settings, "budget", sid, "--tokens", "100000000")
    assert raised.returncode == 0, raised.stderr
    assert f"{st.budget.tokens + 100_000_000:,} tokens" in raised.stdout
    result = await approve_when_asked(relay, sid, timeout=60)

    assert result.outcome == "delivered"
    assert [f.path for f in result.change.files] == [f.path for f in reference.change.files]
    assert result.validation.approved == reference.validation.approved
    assert requests_by_role(model_server) == unbudgeted  # nothing paid twice, nothing skipped
    for session in registry.sessions(sid):
        keys = [(m.turn, m.step, m.role) for m in registry.messages(session.id)]
        assert len(keys) == len(set(keys)), session.role
    assert result.cost.tokens <= result.budget.tokens
    # the pauses, raises and refused raises replay deterministically
    history = await client.get_workflow_handle(sid).fetch_history()
    await Replayer(workflows=[SpecPipeline], data_converter=data_converter).replay_workflow(history)


async def test_the_budget_is_one_per_spec_across_iterations(relay, registry):
    """A raise outlives its run, an iteration's own budget never lowers the spec's, and the
    cost counts every iteration."""
    sid = await relay.run(REQUEST, spec_id=spec_id("budget"), budget_tokens=1)
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_budget)
    assert (await relay.budget(sid, add_tokens=10_000_000)).tokens == 10_000_001
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    first = await approve_when_asked(relay, sid)
    assert first.outcome == "delivered" and registry.spec(sid).budget_tokens == 10_000_001

    await relay.iterate(sid, "Greet in Italian too", auto_approve=True, budget_tokens=1)
    second = await relay.result(sid)
    assert second.iteration == 2 and second.budget.tokens == 10_000_001
    expected = expected_cost(registry, sid)
    assert second.cost.tokens == sum(t for _, t in expected.values()) > first.cost.tokens


def _key(st: Status) -> tuple:
    w = st.budget_wait
    return (st.phase, w.role, w.turn, w.step, st.budget.tokens) if w else (
        st.phase, st.pending.round if st.pending else None)


async def until_async(read, expected, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{got!r} != {expected!r}"
        await asyncio.sleep(0.1)


async def test_cancel_while_waiting_for_budget_compensates(relay, registry, user_repo):
    """A spec waiting for budget is cancelled like any other: its effects are undone."""
    from relay.models import WorkspaceInput

    sid = await relay.run(REQUEST, spec_id=spec_id("budget"), budget_usd=1e-6,
                          workspace=WorkspaceInput(path=str(user_repo)))
    st = await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_budget)
    assert st.current_role == Role.clarifier and st.budget_wait.estimate_usd > 1e-6
    assert Ledger(registry).effects(sid)  # the workspace was prepared
    await relay.cancel(sid)
    with pytest.raises(SpecFailed, match="cancelled"):
        await relay.result(sid)
    rows = Ledger(registry).effects(sid)
    assert rows and all(r.status == "compensated" for r in rows)
    assert (await relay.status(sid)).phase == Phase.cancelled


async def start_worker(settings, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *RELAY_CMD, "worker", env=env_for(settings), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab"))


async def test_a_call_lost_to_a_killed_worker_is_counted_as_possibly_billed(
        client, settings, registry, model_server, tmp_path):
    """SIGKILL while the planner's model call is in flight: the answer is paid for (the model
    answers into the void) and never recorded. The next attempt counts it, once, as possibly
    billed at its estimate, next to the recorded cost."""
    rc = RelayClient(client, settings, registry)
    log = tmp_path / "workers.log"
    limits = settings.limits().model_copy(update={"heartbeat_timeout_s": 2})
    first = await start_worker(settings, log)
    second = None
    try:
        sid = await rc.run(REQUEST, spec_id=spec_id("billed"), limits=limits, budget_usd=50.0)
        await wait_for_questions(rc, sid, timeout=90)
        model_server.add_fault(Fault(kind="slow", role="planner", delay_s=4))
        await rc.answer(sid, ANSWERS)
        await until(lambda: model_server.arrived("planner") == 1, timeout=90)
        first.kill()
        await first.wait()
        second = await start_worker(settings, log)
        result = await approve_when_asked(rc, sid, timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
    assert result.outcome == "delivered"
    await until(lambda: len(model_server.recorded("planner")) >= 2)  # it was answered, twice
    billed = registry.possibly_billed(sid)
    assert [(b.reason, b.turn, b.step) for b in billed] == [("attempt_lost", 1, 0)]
    planner = registry.find_session(sid, Role.planner)
    assert billed[0].session_id == planner.id and billed[0].usd > 0
    for cost in (result.cost, result.cost_by_role["planner"], rc.cost(sid).total):
        assert cost.possibly_billed_calls == 1
        assert cost.possibly_billed_usd == pytest.approx(billed[0].usd)
        assert cost.possibly_billed_tokens == billed[0].tokens
    expected = expected_cost(registry, sid)
    assert result.cost.usd == pytest.approx(float(sum(u for u, _ in expected.values())), abs=1e-9)
