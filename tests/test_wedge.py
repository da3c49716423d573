"""No input can wedge a spec: every entry point of SpecPipeline, driven through the raw
temporalio client as the Web UI or `temporal` CLI would, with any payload shape and any
number of arguments.

A bad start input is a clean failed run with the reason; a bad signal is refused and
listed (the last 20, all counted); a bad update is rejected to its caller. In every case
the spec stays queryable and cancellable, and a cancel still compensates. "Wedged" is
checked on the history itself: no WorkflowTaskFailed event, ever.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import (
    Client, WorkflowFailureError, WorkflowHandle, WorkflowQueryFailedError, WorkflowUpdateFailedError,
)
from temporalio.common import RawValue
from temporalio.service import RPCError

from relay.client import RelayClient
from relay.models import REJECTED_KEPT, WORKFLOW_TYPE, Phase, Status, WorkspaceInput
from tests.conftest import TERMINAL, snapshot, spec_id, until, wait_for, wait_for_questions

SIGNALS = ("answer_signal", "approve_signal", "reject_signal", "raise_budget_signal")
UPDATES = ("answer", "approve", "reject", "raise_budget")


# A task the server refused because new signals arrived while it completed (or while it
# closed the run) is redone at once with them: Temporal's normal flow under a burst of
# signals, not a failure of relay's code. Anything else counts.
BENIGN = {WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
          WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND,
          WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE}


async def task_failures(handle: WorkflowHandle) -> list[str]:
    failed = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            attributes = event.workflow_task_failed_event_attributes
            if attributes.cause not in BENIGN:
                failed.append(f"{attributes.cause}: {attributes.failure.message}")
    return failed


async def status_of(handle: WorkflowHandle) -> Status:
    return await handle.query("status", result_type=Status)


async def start_raw(client: Client, rc: RelayClient, *args: object) -> WorkflowHandle:
    return await client.start_workflow(WORKFLOW_TYPE, args=list(args), id=spec_id("raw"),
                                       task_queue=rc.settings.task_queue)


async def failed_with(handle: WorkflowHandle) -> str:
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 30)
    return str(failure.value.cause)


# --- malformed starts ------------------------------------------------------------------------

BAD_STARTS: list[tuple[str, tuple[object, ...], str]] = [
    ("no input", (), "given 0"),
    ("two inputs", ({"request": "a"}, {"request": "b"}), "given 2"),
    ("null", (None,), "invalid input"),
    ("a string", ("Add a /health endpoint",), "invalid input"),
    ("a list", ([1, 2],), "invalid input"),
    ("unknown field", ({"request": "x", "requets": 1},), "requets"),
    ("attempts >= 2**31", ({"request": "x", "limits": {"model_max_attempts": 2**31}},),
     "model_max_attempts"),
    ("rounds 0", ({"request": "x", "limits": {"max_fix_rounds": 0}},), "max_fix_rounds"),
    ("timeout 1e300", ({"request": "x", "limits": {"turn_timeout_s": 1e300}},), "turn_timeout_s"),
    ("answer deadline 31 days", ({"request": "x", "limits": {"answer_timeout_s": 31 * 86400}},),
     "answer_timeout_s"),
]


@pytest.mark.parametrize("name,args,reason", BAD_STARTS, ids=[b[0] for b in BAD_STARTS])
async def test_malformed_start_fails_cleanly(client: Client, relay: RelayClient, name: str,
                                             args: tuple, reason: str) -> None:
    handle = await start_raw(client, relay, *args)
    assert reason in await failed_with(handle)
    assert (await status_of(handle)).phase == Phase.failed
    assert await task_failures(handle) == []


@pytest.mark.parametrize("payload", [
    Payload(metadata={"encoding": b"binary/plain"}, data=b"\xff\xfe not json"),
    Payload(metadata={"encoding": b"json/plain"}, data=b'{"request": "x", "limits": '
                                                      b'{"heartbeat_timeout_s": Infinity}}'),
    Payload(metadata={"encoding": b"binary/null"}, data=b""),
    Payload(metadata={"encoding": b"json/plain"}, data=b'{"request": '),
    Payload(metadata={"encoding": b"application/x-unknown"}, data=b"\x00\x01"),
], ids=["binary", "json-infinity", "binary-null", "truncated-json", "unknown-encoding"])
async def test_non_json_start_fails_cleanly(client: Client, relay: RelayClient,
                                            payload: Payload) -> None:
    handle = await start_raw(client, relay, RawValue(payload))
    assert "invalid input" in await failed_with(handle)
    assert await task_failures(handle) == []


# --- bad signals and updates on a running spec -------------------------------------------------


async def test_empty_and_extra_argument_signals_never_wedge(client: Client, relay: RelayClient,
                                                            user_repo: Path) -> None:
    """The empty Web UI form: a signal with no argument, and one with two."""
    before = snapshot(user_repo)
    sid = await relay.run("Add a greeting module", spec_id=spec_id("empty"),
                          workspace=WorkspaceInput(path=str(user_repo)))
    await wait_for_questions(relay, sid)
    handle = client.get_workflow_handle(sid)
    for name in SIGNALS:
        await handle.signal(name)  # no argument at all
        await handle.signal(name, args=[{"answers": {}}, {"x": 1}])
    st = await wait_for(relay, sid, lambda s: s.rejected_count == 2 * len(SIGNALS))
    # approve_signal with no payload means "approve with no comment": refused here only
    # because nothing waits for approval yet
    assert all("rejected" in r for r in st.rejected_inputs)
    assert st.phase == Phase.waiting_for_answers
    for name in UPDATES:
        for args in ([], [{"answers": {}}, {}], [None], ["text"]):
            with pytest.raises((WorkflowUpdateFailedError, RPCError)):
                await handle.execute_update(name, args=args)
    assert await task_failures(handle) == []

    await relay.cancel(sid)
    st = await wait_for(relay, sid, lambda s: s.phase in TERMINAL)
    assert st.phase == Phase.cancelled
    assert snapshot(user_repo) == before  # the branch and worktree were compensated away
    assert await task_failures(handle) == []


async def test_a_flood_of_bad_signals_keeps_the_status_small(client: Client, relay: RelayClient,
                                                             user_repo: Path) -> None:
    sid = await relay.run("Add a greeting module", spec_id=spec_id("flood"),
                          workspace=WorkspaceInput(path=str(user_repo)))
    await wait_for_questions(relay, sid)
    handle = client.get_workflow_handle(sid)
    flood = 1500
    for start in range(0, flood, 100):
        await asyncio.gather(*(handle.signal("answer_signal", {"answers": {"nope": str(i)}})
                               for i in range(start, start + 100)))
    st = await wait_for(relay, sid, lambda s: s.rejected_count == flood, timeout=120)
    assert len(st.rejected_inputs) == REJECTED_KEPT
    assert len(st.model_dump_json()) < 20_000
    refused = [e for e in st.progress if e.kind == "refused"]  # one event for the whole burst
    assert len(refused) == 1 and refused[0].text.startswith(f"{flood} inputs refused in a row")
    assert st.phase == Phase.waiting_for_answers
    await relay.answer(sid, {q.id: "an answer" for q in st.pending.questions})
    await wait_for(relay, sid, lambda s: s.phase != Phase.waiting_for_answers)
    await relay.cancel(sid)
    assert (await wait_for(relay, sid, lambda s: s.phase in TERMINAL, timeout=60)).phase == (
        Phase.cancelled)
    assert await task_failures(handle) == []


# --- the fuzz suite for the raw workflow API ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(["request", "answers", "reviewer", "reason", "comment", "limits",
                               "workspace", "hooks", "iterate", "auto_approve", "q1", "q2"])
shaped = st.dictionaries(field_names, json_values, max_size=4)
limits_like = st.fixed_dictionaries({"request": st.just("x")}, optional={
    "limits": st.dictionaries(st.sampled_from([
        "max_request_bytes", "max_clarify_rounds", "max_fix_rounds", "answer_timeout_s",
        "model_max_attempts", "turn_timeout_s", "heartbeat_timeout_s", "max_tool_steps",
        "check_timeout_s", "effect_max_attempts"]),
        st.integers(min_value=-2**40, max_value=2**40) | st.floats(allow_nan=False)
        | st.sampled_from([0, -1, 2**31, 1e300, "10", None]), max_size=3),
    "workspace": st.dictionaries(st.sampled_from(["path", "target", "check", "x"]),
                                 st.text(max_size=20) | st.none(), max_size=2)})
arguments = st.lists(json_values | shaped, max_size=3)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture
async def bystander(relay: RelayClient) -> str:
    """A spec that is not fuzzed: it must come out unchanged."""
    sid = await relay.run("Add a greeting module", spec_id=spec_id("bystander"))
    await wait_for_questions(relay, sid)
    return sid


async def test_fuzzed_signals_updates_and_queries(client: Client, relay: RelayClient,
                                                  bystander: str) -> None:
    target = await relay.run("Add a greeting module", spec_id=spec_id("fuzzed"))
    await wait_for_questions(relay, target)
    handle = client.get_workflow_handle(target)
    other_before = (await relay.status(bystander)).model_dump()
    sent = 0

    # hypothesis draws the inputs; they are sent afterwards, on the test's own event loop
    @FUZZ
    @given(kind=st.sampled_from(["signal", "update", "query"]),
           name=st.sampled_from([*SIGNALS, *UPDATES, "status"]), args=arguments)
    def one(kind: str, name: str, args: list) -> None:
        nonlocal sent
        sent += 1
        calls.append((kind, name, args))

    calls: list[tuple[str, str, list]] = []
    one()
    for kind, name, args in calls:
        try:
            if kind == "signal":
                await handle.signal(name, args=args)
            elif kind == "update":
                await handle.execute_update(name, args=args)
            else:
                await handle.query(name, args=args)
        except (WorkflowUpdateFailedError, WorkflowQueryFailedError, RPCError):
            pass  # refused to the caller: that is the point
    st_after = await status_of(handle)  # queryable after all of it
    assert st_after.phase in (Phase.waiting_for_answers, Phase.clarifying, Phase.planning,
                              Phase.auditing, Phase.constructing, Phase.validating,
                              Phase.waiting_for_approval, *TERMINAL)
    assert await task_failures(handle) == []
    assert (await relay.status(bystander)).model_dump() == other_before
    assert sent == len(calls) >= 150
    for sid in (target, bystander):
        await relay.cancel(sid)
        await wait_for(relay, sid, lambda s: s.phase in TERMINAL)


async def test_fuzzed_starts(client: Client, relay: RelayClient, bystander: str) -> None:
    other_before = (await relay.status(bystander)).model_dump()
    inputs: list[list] = []

    @FUZZ
    @given(args=st.one_of(arguments, st.lists(limits_like, min_size=1, max_size=1)))
    def collect(args: list) -> None:
        inputs.append(args)

    collect()
    handles = []
    for args in inputs:
        handles.append(await start_raw(client, relay, *args))
    for handle in handles:
        st_now = await status_of(handle)
        # a valid start is a live spec (it waits for answers); cancel it: it must end too
        if st_now.phase not in TERMINAL:
            await wait_for(relay, handle.id, lambda s: s.phase in TERMINAL
                           or s.phase == Phase.waiting_for_answers, timeout=60)
            await handle.cancel()
        final = await wait_for(relay, handle.id, lambda s: s.phase in TERMINAL, timeout=60)
        assert final.phase in (Phase.failed, Phase.cancelled)
        assert await task_failures(handle) == [], json.dumps(handle.id)
    assert (await relay.status(bystander)).model_dump() == other_before
    assert len(inputs) >= 150
    await relay.cancel(bystander)


async def test_oversized_answers_are_refused_and_the_spec_waits(client: Client,
                                                                relay: RelayClient) -> None:
    """Answers go into every later prompt: bounded like the request (max_request_bytes)."""
    limits = relay.settings.limits().model_copy(update={"max_request_bytes": 1_000})
    sid = await relay.run("Add a greeting module", spec_id=spec_id("bigans"), limits=limits)
    await wait_for_questions(relay, sid)
    handle = client.get_workflow_handle(sid)
    await handle.signal("answer_signal", {"answers": {"q1": "x" * 2_000, "q2": "fine"}})
    st = await wait_for(relay, sid, lambda s: s.rejected_count == 1)
    assert "limit is 1000 bytes" in st.rejected_inputs[-1]
    assert st.phase == Phase.waiting_for_answers
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update("answer", {"answers": {"q1": "y" * 2_000, "q2": "fine"}})
    assert "limit is 1000 bytes" in str(refused.value.cause)
    await relay.cancel(sid)
    assert (await wait_for(relay, sid, lambda s: s.phase in TERMINAL)).phase == Phase.cancelled
