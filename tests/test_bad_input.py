"""Bad input never hangs a spec, never loses what was recorded, and always says why in one line.

Each case goes through the paths a person uses: the Python client (a RelayError
subclass), the `relay` CLI (exit 1 and `error: ...` on stderr) and, where the
Web UI or a raw Temporal client could send it, the raw `temporal` CLI (the
workflow fails or rejects the input; it does not retry its task forever).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator

import anthropic
import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from relay.client import (
    InvalidAnswer,
    InvalidRequest,
    RelayClient,
    RelayError,
    SpecAlreadyExists,
    SpecAlreadyRunning,
    SpecFailed,
    SpecNotFound,
    SpecNotRunning,
    TemporalUnreachable,
)
from relay.models import Phase, Role
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    approve_when_asked,
    cli_env,
    run_spec,
    spec_id,
    wait_for,
    wait_for_questions,
)
from tests.test_cli import cancel_and_wait, cli, ok, temporal_cli
from worker.devserver import free_port
from worker.main import SCRIPTED_MODEL, ModelEndpoint, build_worker

FAST = 20.0  # seconds: every bad input is answered well within this
FULL_RUN = 90.0  # seconds: a whole run of five agents, on a loaded 2-core machine


def cli_error(result: tuple[int, str, str]) -> str:
    """The one `error: ...` line of a failed CLI call (exit 1, no traceback, nothing else)."""
    code, out, err = result
    assert code == 1, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith("{")]  # JSON log records aside
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{err}"
    return lines[0]


async def raw_start(settings, sid: str, payload: object) -> None:
    """Start SpecPipeline the way the Web UI / `temporal workflow start` does: plain JSON."""
    ok(await temporal_cli(settings, "workflow", "start", "--type", "SpecPipeline",
                          "--task-queue", settings.task_queue, "--workflow-id", sid,
                          "--input", json.dumps(payload)))


async def failure_of(client: Client, sid: str) -> str:
    """The workflow's failure message; it must fail (not hang) within FAST seconds."""
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(client.get_workflow_handle(sid).result(), FAST)
    desc = await client.get_workflow_handle(sid).describe()
    assert desc.status == WorkflowExecutionStatus.FAILED
    return str(getattr(info.value.cause, "message", info.value.cause))


# --- empty and oversized requests -----------------------------------------------------------


async def test_empty_request_is_refused_by_the_client(relay):
    """An empty or blank request is refused before anything starts."""
    for text in ("", "   \n\t "):
        with pytest.raises(InvalidRequest, match="^the request is empty$"):
            await relay.run(text, spec_id=spec_id())


async def test_empty_request_is_refused_by_the_cli(relay, settings):
    """`relay run "   "` exits 1 with `error: the request is empty`."""
    assert cli_error(await cli(settings, "run", "   ")) == "error: the request is empty"


async def test_empty_request_from_the_ui_fails_the_workflow(relay, settings, client):
    """A blank request started raw fails at once with the reason, instead of running or hanging."""
    sid = spec_id("raw")
    await raw_start(settings, sid, {"request": "   "})
    assert await failure_of(client, sid) == "the request is empty"
    st = await relay.status(sid)
    assert st.phase == Phase.failed and st.error == "the request is empty"
    with pytest.raises(SpecFailed, match=f"spec {sid} failed: the request is empty"):
        await approve_when_asked(relay, sid)


async def test_oversized_request_is_refused_by_the_client_and_cli(relay, client, settings, registry,
                                                                   tmp_path):
    """A request above RELAY_MAX_REQUEST_BYTES is refused with its size (in bytes) and the limit."""
    small = RelayClient(client, settings.model_copy(update={"max_request_bytes": 1000}), registry)
    with pytest.raises(InvalidRequest, match=r"^the request is 1001 bytes; the limit is 1000 bytes"):
        await small.run("x" * 1001, spec_id=spec_id())
    sid = await small.run("x" * 1000, spec_id=spec_id())  # exactly at the limit is fine
    await wait_for_questions(small, sid)
    await cancel_and_wait(small, sid)

    path = tmp_path / "big.md"
    path.write_text("é" * 501, encoding="utf-8")  # 501 characters, 1002 bytes
    message = cli_error(await cli(settings, "run", str(path), env={"RELAY_MAX_REQUEST_BYTES": "1000"}))
    assert message.startswith("error: the request is 1002 bytes; the limit is 1000 bytes")


async def test_oversized_request_from_the_ui_fails_the_workflow(relay, settings, client):
    """A raw start whose request exceeds its limits fails with the size and the limit."""
    sid = spec_id("raw")
    await raw_start(settings, sid, {"request": "Write a greeting module",
                                    "limits": {"max_request_bytes": 10}})
    assert await failure_of(client, sid) == "the request is 23 bytes; the limit is 10 bytes"
    assert (await relay.status(sid)).phase == Phase.failed


async def test_long_one_line_request_on_the_command_line(relay, settings, registry):
    """A request typed on the command line longer than a file name can be is taken as the request."""
    sid = spec_id("cli")
    request = "Write a greeting module " + "that is friendly " * 20  # 364 bytes, one line
    code, out, err = await cli(settings, "run", request, "--id", sid)
    assert code == 0, err
    assert out.strip() == sid
    await wait_for_questions(relay, sid)
    assert registry.spec(sid).request == request
    await cancel_and_wait(relay, sid)
    message = cli_error(await cli(settings, "run", request, env={"RELAY_MAX_REQUEST_BYTES": "300"}))
    assert message.startswith("error: the request is 364 bytes; the limit is 300 bytes")


async def test_missing_request_file(relay, settings, tmp_path):
    """`relay run notes.md` for a file that does not exist says so instead of sending the name."""
    path = tmp_path / "notes.md"
    assert cli_error(await cli(settings, "run", str(path))) == f"error: file not found: {path}"


# --- malformed workflow input from the UI -------------------------------------------------


@pytest.mark.parametrize("payload, field", [
    ({"reqest": "Write a greeting module"}, "request"),
    ({"request": 5}, "request"),
    ({"request": "Write a greeting module", "limits": {"max_request_bytes": 0}}, "max_request_bytes"),
    ("Write a greeting module", "SpecInput"),
])
async def test_malformed_workflow_input_fails_with_a_validation_message(relay, settings, client,
                                                                        payload, field):
    """Input that does not fit {"request": ...} fails the workflow naming the problem; no task retry loop."""
    sid = spec_id("raw")
    await raw_start(settings, sid, payload)
    message = await failure_of(client, sid)
    assert "validation error" in message and field in message


async def test_raw_start_reusing_a_finished_spec_id_fails_and_keeps_its_record(relay, settings,
                                                                                 client, registry):
    """Starting a new spec (not an iteration) under a finished spec's id fails, pointing at iterate."""
    sid = spec_id("raw")
    await run_spec(relay, "Write a greeting module", sid=sid)
    turns = {s.role: s.turns for s in registry.sessions(sid)}
    await raw_start(settings, sid, {"request": "Something else entirely"})
    message = await failure_of(client, sid)
    assert "already exists" in message and "relay iterate" in message
    record = registry.spec(sid)
    assert record.iteration == 1 and record.status == "completed" and record.outcome == "delivered"
    assert {s.role: s.turns for s in registry.sessions(sid)} == turns


async def test_raw_iteration_of_an_unknown_spec_fails(relay, settings, client):
    """{"iterate": true} for a spec that never ran fails with 'nothing to iterate'."""
    sid = spec_id("raw")
    await raw_start(settings, sid, {"request": "Greet in Italian too", "iterate": True})
    assert "nothing to iterate" in await failure_of(client, sid)


# --- unknown and invalid spec ids --------------------------------------------------------


async def test_unknown_spec_id_in_the_client(relay):
    """answer / status / iterate / cancel / result of a spec that does not exist: SpecNotFound."""
    sid = spec_id("nope")
    for call in (relay.answer(sid, ANSWERS), relay.status(sid), relay.iterate(sid, "change"),
                 relay.cancel(sid), relay.result(sid)):
        with pytest.raises(SpecNotFound, match=f"unknown spec '{sid}'"):
            await call
    with pytest.raises(SpecNotFound, match="unknown spec"):
        relay.sessions(sid)
    with pytest.raises(SpecNotFound, match="unknown spec"):
        relay.history(sid, "planner")


@pytest.mark.parametrize("args", [
    ["answer", "{sid}", "--answer", "q1=x"], ["status", "{sid}"], ["iterate", "{sid}", "change"],
    ["cancel", "{sid}"], ["result", "{sid}"], ["watch", "{sid}"], ["sessions", "{sid}"], ["history", "{sid}", "planner"],
])
async def test_unknown_spec_id_in_the_cli(relay, settings, args):
    """Every command on a spec that does not exist exits 1 with `error: unknown spec ...`."""
    sid = spec_id("nope")
    code, out, err = await cli(settings, *(a.format(sid=sid) for a in args))
    message = cli_error((code, out, err))
    assert message.startswith(f"error: unknown spec '{sid}'")
    assert "following" not in out  # nothing claims to follow a spec that is not there


async def test_invalid_spec_id_is_refused(relay, settings):
    """A spec id with spaces or punctuation is refused before anything starts."""
    for bad in ("bad id!", "-leading-dash", "x" * 201, "a/b"):
        with pytest.raises(InvalidRequest, match="invalid spec id"):
            await relay.run("Write a greeting module", spec_id=bad)
    message = cli_error(await cli(settings, "run", "Write a greeting module", "--id", "bad id!"))
    assert message.startswith("error: invalid spec id 'bad id!'")


async def test_unknown_role_in_history(relay, settings):
    """`relay history X nobody` names the five roles."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    message = cli_error(await cli(settings, "history", sid, "nobody"))
    assert message.startswith("error: unknown role 'nobody'; roles: clarifier, planner")
    await cancel_and_wait(relay, sid)


# --- answers that do not fit -----------------------------------------------------------------


async def test_answers_that_do_not_fit_are_rejected_and_nothing_is_lost(relay, model_server):
    """Unknown ids, missing answers, blank text and non-text are refused with the reason;
    the questions stay pending and a correct answer afterwards completes the spec."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    cases = [
        ({"q1": "a", "q2": "b", "zz": "c"}, r"unknown question ids \['zz'\]; pending: \['q1', 'q2'\]"),
        ({"q1": "only one"}, r"missing answers for \['q2'\]"),
        ({}, r"missing answers for \['q1', 'q2'\]"),
        ({"q1": "   ", "q2": "fine"}, r"missing answers for \['q1'\]"),
    ]
    for answers, reason in cases:
        with pytest.raises(InvalidAnswer, match=f"^answer rejected: {reason}$"):
            await relay.answer(sid, answers)
    with pytest.raises(InvalidAnswer, match="answers must map question ids to text"):
        await relay.answer(sid, {"q1": 5, "q2": "fine"})  # type: ignore[dict-item]

    st = await relay.status(sid)
    assert st.phase == Phase.waiting_for_answers and st.pending.round == 1
    assert len(model_server.recorded("clarifier")) == 1  # the clarifier was not resumed

    ack = await relay.answer(sid, ANSWERS)
    assert ack.accepted == ["q1", "q2"] and ack.round == 1
    result = await approve_when_asked(relay, sid)
    assert result.outcome == "delivered"
    assert ANSWERS["q1"] in result.clarified_spec


async def test_answering_a_finished_spec(relay):
    """Answers for a spec that has completed: SpecNotRunning, its result unchanged."""
    sid = spec_id()
    result = await run_spec(relay, "Write a greeting module", sid=sid)
    with pytest.raises(SpecNotRunning, match=f"spec {sid} is not running"):
        await relay.answer(sid, ANSWERS)
    assert (await approve_when_asked(relay, sid)) == result


async def test_answers_after_clarification_are_refused(relay, settings, model_server):
    """Answers arriving while the planner works (update or signal) are refused as not pending,
    and the run goes on unaffected."""
    # The planner is held long enough for both refusals to land while it works, even on a
    # loaded machine.
    model_server.add_fault(Fault(kind="slow", role="planner", delay_s=8))
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    await wait_for(relay, sid, lambda s: s.phase == Phase.planning)
    with pytest.raises(InvalidAnswer, match=r"^answer rejected: no questions are pending \(phase: planning\)$"):
        await relay.answer(sid, ANSWERS)
    await relay.temporal.get_workflow_handle(sid).signal("answer_signal", {"answers": ANSWERS})
    st = await wait_for(relay, sid, lambda s: bool(s.rejected_inputs))
    assert st.rejected_inputs == ["answer_signal rejected: no questions are pending (phase: planning)"]
    result = await approve_when_asked(relay, sid)
    assert result.outcome == "delivered"
    assert len(model_server.recorded("clarifier")) == 2  # the late answers did not re-run it


async def test_cli_answer_errors(relay, settings):
    """Malformed --json, ID=TEXT without '=', wrong ids and no answers at all: one clear error each,
    and the spec still waits for (and then takes) a correct answer."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)

    cases = {  # independent and all refused, so they run side by side
        ("--json", "not json"): "error: malformed JSON in --json:",
        ("--json", '["q1", "q2"]'): "error: --json must be an object of question id to text",
        ("--json", '{"q1": 1, "q2": 2}'): "error: --json must be an object of question id to text",
        ("--answer", "noequals"): "error: --answer takes ID=TEXT, got 'noequals'",
        ("--answer", "=text"): "error: --answer takes ID=TEXT, got '=text'",
        (): "error: no answers given: use --answer ID=TEXT or --json",
        ("--answer", "q1=yes", "--answer", "zz=no"):
            "error: answer rejected: unknown question ids ['zz']; pending: ['q1', 'q2']",
        ("--answer", "q1=yes"): "error: answer rejected: missing answers for ['q2']",
    }
    results = await asyncio.gather(*(cli(settings, "answer", sid, *args) for args in cases))
    for (args, expected), result in zip(cases.items(), results):
        assert cli_error(result).startswith(expected), args

    st = await relay.status(sid)
    assert st.phase == Phase.waiting_for_answers and st.pending.round == 1
    ok(await cli(settings, "answer", sid, "--json", json.dumps({"answers": ANSWERS})))
    assert (await approve_when_asked(relay, sid)).outcome == "delivered"

    message = cli_error(await cli(settings, "answer", sid, "--answer", "q1=late"))
    assert message == f"error: spec {sid} has no pending questions (phase: completed)"


async def test_malformed_signal_from_the_ui_is_recorded_and_the_spec_keeps_waiting(relay, settings):
    """`answer_signal` with a non-object or wrong ids is listed in status().rejected_inputs;
    the spec keeps waiting and a correct signal afterwards completes it."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    for payload in ("hello", {"answers": {"zz": "x"}}, {"answers": "q1"}):
        ok(await temporal_cli(settings, "workflow", "signal", "--workflow-id", sid,
                              "--name", "answer_signal", "--input", json.dumps(payload)))
    st = await wait_for(relay, sid, lambda s: len(s.rejected_inputs) == 3)
    assert all(r.startswith("answer_signal rejected: ") for r in st.rejected_inputs)
    assert "validation error" in st.rejected_inputs[0]
    assert "unknown question ids ['zz']" in st.rejected_inputs[1]
    assert st.phase == Phase.waiting_for_answers and st.pending.round == 1

    ok(await temporal_cli(settings, "workflow", "signal", "--workflow-id", sid,
                          "--name", "answer_signal", "--input", json.dumps({"answers": ANSWERS})))
    result = await approve_when_asked(relay, sid)
    assert result.outcome == "delivered"
    assert len((await relay.status(sid)).rejected_inputs) == 3


async def test_malformed_update_from_the_ui_is_rejected_and_the_spec_keeps_waiting(relay, settings):
    """A raw `answer` update that does not fit is rejected to its sender; the spec keeps waiting."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    for payload, reason in (({"answers": {"zz": "x"}}, "unknown question ids"),
                            ("hello", "validation error")):
        code, out, err = await temporal_cli(
            settings, "workflow", "update", "execute", "--workflow-id", sid, "--name", "answer",
            "--input", json.dumps(payload), timeout=FAST)
        assert code != 0 and reason in out + err
    st = await relay.status(sid)
    assert st.phase == Phase.waiting_for_answers and st.pending.round == 1
    await relay.answer(sid, ANSWERS)
    assert (await approve_when_asked(relay, sid)).outcome == "delivered"


# --- runs that already exist ----------------------------------------------------------------


async def test_second_run_of_an_active_spec(relay, settings):
    """Running a spec id that is still running: SpecAlreadyRunning, and the first run is untouched."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    with pytest.raises(SpecAlreadyRunning, match=f"^spec {sid} is already running$"):
        await relay.run("Another request", spec_id=sid)
    message = cli_error(await cli(settings, "run", "Another request", "--id", sid))
    assert message == f"error: spec {sid} is already running"
    with pytest.raises(SpecAlreadyRunning, match="still running"):
        await relay.iterate(sid, "a change")
    message = cli_error(await cli(settings, "iterate", sid, "a change"))
    assert message.startswith(f"error: spec {sid} is still running")

    st = await relay.status(sid)
    assert st.phase == Phase.waiting_for_answers and st.iteration == 1
    await relay.answer(sid, ANSWERS)
    assert (await approve_when_asked(relay, sid)).iteration == 1


async def test_run_of_a_finished_spec_points_at_iterate(relay, settings):
    """`relay run --id X` of a finished spec: SpecAlreadyExists telling how to iterate instead."""
    sid = spec_id()
    await run_spec(relay, "Write a greeting module", sid=sid)
    with pytest.raises(SpecAlreadyExists, match=f"relay iterate {sid}") as info:
        await relay.run("Another request", spec_id=sid)
    assert not isinstance(info.value, SpecAlreadyRunning)
    message = cli_error(await cli(settings, "run", "Another request", "--id", sid))
    assert message.startswith(f"error: spec {sid} already exists") and "relay iterate" in message


async def test_empty_change_request_is_refused(relay, settings):
    """`relay iterate X ""` is refused like an empty request, and no iteration starts."""
    sid = spec_id()
    await run_spec(relay, "Write a greeting module", sid=sid)
    with pytest.raises(InvalidRequest, match="^the request is empty$"):
        await relay.iterate(sid, "  ")
    assert cli_error(await cli(settings, "iterate", sid, " ")) == "error: the request is empty"
    assert (await relay.status(sid)).iteration == 1


async def test_cancel_of_a_finished_spec(relay, settings):
    """Cancelling a spec that already completed: SpecNotRunning naming its state."""
    sid = spec_id()
    await run_spec(relay, "Write a greeting module", sid=sid)
    with pytest.raises(SpecNotRunning, match=f"^spec {sid} is not running \\(completed\\)$"):
        await relay.cancel(sid)
    message = cli_error(await cli(settings, "cancel", sid))
    assert message == f"error: spec {sid} is not running (completed)"


# --- servers that cannot be reached -----------------------------------------------------------


async def test_unreachable_temporal(settings):
    """Nothing listening at the Temporal address: TemporalUnreachable, and the CLI says so fast."""
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(TemporalUnreachable, match=f"^cannot reach Temporal at {address}"):
        await asyncio.wait_for(RelayClient.connect(settings, address=address), FAST)
    message = cli_error(await cli(settings, "status", "some-spec", "--address", address,
                                  timeout=FAST))
    assert message.startswith(f"error: cannot reach Temporal at {address}")


async def test_malformed_temporal_address(settings):
    """A malformed --address ('not an address', a port above 65535) gets a clear error, no traceback."""
    for address in ("not an address", "127.0.0.1:99999"):
        with pytest.raises(RelayError, match=re.escape(address)):
            await RelayClient.connect(settings, address=address)
    message = cli_error(await cli(settings, "status", "some-spec", "--address", "127.0.0.1:99999",
                                  timeout=FAST))
    assert "127.0.0.1:99999" in message
    for address in ("http://localhost:7233", "http://[::1"):  # a URL, not host:port
        with pytest.raises(RelayError, match="give host:port"):
            await RelayClient.connect(settings, address=address)
        message = cli_error(await cli(settings, "status", "some-spec", "--address", address,
                                      timeout=FAST))
        assert "is a URL" in message


async def test_out_of_range_ports_and_unknown_log_settings(settings):
    code, _, err = await cli(settings, "dev", "--port", "99999", timeout=FAST)
    assert code == 2 and "Traceback" not in err and "65535" in err
    message = cli_error(await cli(settings, "status", "some-spec", timeout=FAST,
                                  env={"RELAY_LOG_LEVEL": "loud"}))
    assert "RELAY_LOG_LEVEL" in message


@pytest_asyncio.fixture
async def relay_without_model(client: Client, settings, registry) -> AsyncIterator[RelayClient]:
    """A worker whose model endpoint is a closed port, with two attempts per turn."""
    settings = settings.model_copy(update={"model_max_attempts": 2})
    endpoint = ModelEndpoint(
        client=anthropic.AsyncAnthropic(api_key="k", base_url=f"http://127.0.0.1:{free_port()}",
                                        max_retries=0),
        model=SCRIPTED_MODEL)
    worker = build_worker(client, task_queue=settings.task_queue, registry=registry,
                          endpoint=endpoint, settings=settings)
    async with worker:
        yield RelayClient(client, settings, registry)
    await endpoint.client.close()


async def test_unreachable_model_waits_for_the_model_and_says_why(relay_without_model, registry):
    """A model endpoint that cannot be reached is a capacity error (Gate 1): the spec never
    fails or rolls back for it; it waits in waiting_for_model, saying why and when it tries
    again, and nothing is recorded meanwhile. Cancelling it ends it cleanly."""
    rc = relay_without_model
    sid = await rc.run("Write a greeting module", spec_id=spec_id())
    st = await wait_for(rc, sid, lambda s: s.phase == Phase.waiting_for_model, FAST)
    assert st.model_wait is not None and st.model_wait.role == Role.clarifier
    assert "unreachable" in st.model_wait.last_error and st.model_wait.next_attempt_at
    assert "unreachable" in st.waiting_for and st.error is None
    assert registry.spec(sid).status == "running"
    assert registry.messages(registry.find_session(sid, "clarifier").id) == []
    await rc.cancel(sid)
    st = await wait_for(rc, sid, lambda s: s.phase == Phase.cancelled, FAST)
    assert registry.spec(sid).status == "cancelled"


async def test_refusing_model_fails_the_spec_at_once(relay, model_server, registry):
    """A model endpoint answering 401 fails the spec on the first attempt with HTTP 401."""
    model_server.add_fault(Fault(kind="auth_error", count=10))
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    with pytest.raises(SpecFailed, match="HTTP 401") as info:
        await asyncio.wait_for(relay.result(sid), FAST)
    assert f"spec {sid} failed: clarifier turn 1 failed" in str(info.value)
    assert len(model_server.recorded()) == 1  # not retried
    assert model_server.recorded()[0].status == 401
    st = await relay.status(sid)
    assert st.phase == Phase.failed and "HTTP 401" in st.error
    assert registry.spec(sid).status == "failed"


async def test_a_failed_turn_keeps_earlier_turns_and_the_spec_can_iterate(relay, model_server,
                                                                            registry):
    """When the model refuses the planner, the spec fails but the clarifier's recorded turns
    (with the answers) stay, and the next iteration resumes from them."""
    model_server.add_fault(Fault(kind="auth_error", role="planner"))
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    with pytest.raises(SpecFailed, match="planner turn 1 failed: .*HTTP 401"):
        await asyncio.wait_for(relay.result(sid), FAST)
    assert registry.spec(sid).status == "failed"
    clarifier = registry.find_session(sid, "clarifier")
    kept = registry.messages(clarifier.id)
    assert len(kept) == 4 and ANSWERS["q1"] in json.dumps([m.content for m in kept])
    assert all(s.status == "idle" for s in registry.sessions(sid))
    assert all(s.lease_owner is None for s in registry.sessions(sid))  # the failed turn's too

    await relay.iterate(sid, "Try again", auto_approve=True)
    result = await asyncio.wait_for(relay.result(sid), FULL_RUN)
    assert result.iteration == 2 and result.outcome == "delivered"
    assert [m.seq for m in registry.messages(clarifier.id)][:4] == [m.seq for m in kept]
    resumed = model_server.recorded("clarifier")[-1].body["messages"]
    assert ANSWERS["q1"] in json.dumps(resumed)  # the answers given before the failure


# --- the error line itself ----------------------------------------------------------------------


async def test_long_errors_stay_on_one_line(relay, settings):
    """A long error message is still exactly one `error: ...` line on stderr."""
    sid = spec_id("a-rather-long-spec-identifier-" + "x" * 40)
    code, out, err = await cli(settings, "status", sid)
    assert code == 1
    assert err.strip() == f"error: unknown spec '{sid}'"


@pytest.mark.parametrize("args, expected", [
    (["status", "spec[/x]"], "error: unknown spec 'spec[/x]'"),
    (["history", "spec[bold]", "planner"], "error: unknown spec 'spec[bold]' in the registry"),
])
async def test_errors_echo_user_text_verbatim(relay, settings, args, expected):
    """An error that quotes what the user typed shows it as typed, whatever brackets it holds."""
    assert cli_error(await cli(settings, *args)) == expected


# --- the registry cannot be opened ----------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("sqlite:////nonexistent-dir/registry.db", "no relay registry at sqlite:////nonexistent-dir"),
    ("postgresql+psycopg://relay:s3cret@127.0.0.1:1/relay",
     "(the driver for|cannot open the relay registry at) postgresql\\+psycopg://relay:\\*\\*\\*@"),
])
async def test_an_unreachable_registry_is_one_clear_line(settings, url, expected):
    """Registry reads with a wrong or unreachable database say so, without the password."""
    for command in (["sessions", "x"], ["effects", "x"], ["history", "x", "planner"]):
        proc = await asyncio.create_subprocess_exec(
            *RELAY_CMD, *command, env=cli_env(settings) | {"RELAY_DATABASE_URL": url},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        text = err.decode()
        assert proc.returncode == 1 and "Traceback" not in text, text
        assert re.search(expected, text) and "s3cret" not in text, text


# --- one-line errors, settings, payload size, registry outage (hardening) -----------------------


def test_one_line_drops_transport_debug_and_help_links():
    """Rust Debug output and library help links go; the cause stays."""
    from relay import one_line

    rust = ('Failed client connect: Server connection error: tonic::transport::Error(Transport, '
            'ConnectError(ConnectError("tcp connect error", 127.0.0.1:1, Os { code: 111, kind: '
            'ConnectionRefused, message: "Connection refused" })))')
    assert one_line(rust) == ("Failed client connect: Server connection error: tcp connect error: "
                              "Connection refused")
    status = ('poll: Status { code: Unavailable, message: "tcp connect error", details: [], '
              'metadata: MetadataMap { headers: {"content-type": "application/grpc"} } }')
    assert one_line(status) == "poll: tcp connect error"
    sql = ("(sqlite3.OperationalError) no such table: x\n[SQL: SELECT 1]\n"
           "(Background on this error at: https://sqlalche.me/e/20/e3q8)")
    assert one_line(sql) == "(sqlite3.OperationalError) no such table: x"
    assert one_line("a\udcffb") == "a\\udcffb"


@pytest.mark.parametrize("name, value, expected", [
    ("RELAY_CHECK_TIMEOUT_S", "nan", "Input should be a finite number"),
    ("RELAY_MAX_FIX_ROUNDS", "0", "greater than or equal to 1"),
    ("RELAY_TURN_TIMEOUT_S", "2592001", "less than or equal to 2592000"),
    ("RELAY_MODEL_MAX_ATTEMPTS", "1001", "less than or equal to 1000"),
])
async def test_invalid_settings_are_one_line(settings, monkeypatch, name, value, expected):
    """An out-of-bounds RELAY_* value: InvalidSettings from the SDK, `error: invalid setting` from
    the CLI, with the same bounds as a run's Limits."""
    from relay.client import InvalidSettings

    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidSettings, match=f"^invalid setting {name}: .*{expected}"):
        await RelayClient.connect()
    message = cli_error(await cli(settings, "status", "x", env={name: value}))
    assert message.startswith(f"error: invalid setting {name}: ") and expected in message


def test_settings_bounds_are_the_limits_bounds():
    """Every limit setting accepts exactly what Limits accepts."""
    from relay.models import Limits
    from relay.settings import RelaySettings

    for name, field in Limits.model_fields.items():
        assert RelaySettings.model_fields[name].metadata == field.metadata, name


async def test_cli_input_that_cannot_be_decoded_or_used(relay, settings, tmp_path):
    """Undecodable bytes, empty ids and targets, over-long paths: one line each."""
    bad = tmp_path / "latin1.md"
    bad.write_bytes(b"caf\xe9 request")
    cases = {
        ("status", ""): "error: the spec id is empty",
        ("status", "a\udcffb"): "error: the spec id is not valid UTF-8 text",
        ("run", "Write a module", "--target", ""): "error: invalid workspace: target:",
        ("run", str(bad)): f"error: {bad} is not UTF-8 text (byte 0xe9 at offset 3)",
        ("run", "Write a module", "-w", "/" + "x" * 5000): "error: workspace /xxx",
    }
    results = await asyncio.gather(*(cli(settings, *args) for args in cases))
    for (args, expected), result in zip(cases.items(), results):
        assert cli_error(result).startswith(expected), args
    code, _, err = await cli(settings, "status", "--bogus")
    assert code == 2 and err.strip().startswith("error: No such option: --bogus")


async def test_oversized_payloads_are_refused_with_the_reason(relay, settings, client, tmp_path):
    """A payload over Temporal's blob limit is refused by the SDK before sending, and the
    server's own refusal maps to the same error."""
    from relay.client import TEMPORAL_PAYLOAD_LIMIT, PayloadTooLarge, _rpc_error
    from relay.models import Limits
    from temporalio.service import RPCError

    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    huge = "x" * (TEMPORAL_PAYLOAD_LIMIT + 1)
    reason = r"bytes once encoded; Temporal refuses payloads over 2,097,152 bytes"
    with pytest.raises(PayloadTooLarge, match=f"^the answers is .*{reason}"):
        await relay.answer(sid, {"q1": huge, "q2": "x"})
    with pytest.raises(PayloadTooLarge, match=reason):
        await relay.reject(sid, huge)
    escaped = "\x01" * 400_000  # 400 KB of text, 2.4 MB of JSON
    with pytest.raises(PayloadTooLarge, match=f"^the request is .*{reason}"):
        await relay.run(escaped, spec_id=spec_id(), limits=Limits(max_request_bytes=2_000_000))
    path = tmp_path / "big.md"
    path.write_text(escaped)
    message = cli_error(await cli(settings, "run", str(path),
                                  env={"RELAY_MAX_REQUEST_BYTES": "2000000"}))
    assert message.startswith("error: the request is ") and "Temporal refuses payloads" in message
    assert (await relay.status(sid)).phase == Phase.waiting_for_answers

    with pytest.raises(RPCError) as info:  # the server's refusal, sent past the client's check
        await client.start_workflow("SpecPipeline", {"request": huge}, id=spec_id("big"),
                                    task_queue=settings.task_queue)
    mapped = _rpc_error(info.value, "big")
    assert isinstance(mapped, PayloadTooLarge) and "payload is too large" in str(mapped)
    await cancel_and_wait(relay, sid)


async def test_status_says_when_the_registry_is_unreachable(relay, settings):
    """`relay status` still shows Temporal's view while the registry is down, and says so."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id())
    await wait_for_questions(relay, sid)
    down = {"RELAY_DATABASE_URL": "postgresql+psycopg://relay:s3cret@127.0.0.1:1/relay"}
    code, out, err = await cli(settings, "status", sid, env=down)
    assert code == 0 and "Traceback" not in err, err
    assert "waiting_for_answers" in out and "s3cret" not in out
    assert [line for line in out.splitlines() if line.startswith("registry unreachable: ")]
    code, out, err = await cli(settings, "status", sid, "--json", env=down)
    assert code == 0 and json.loads(out)["spec_id"] == sid
    assert err.strip().startswith("warning: registry unreachable: ")
    assert await relay.registry_problem(sid) is None  # the session's registry is up
    await cancel_and_wait(relay, sid)


def test_a_non_utf8_environment_variable_is_no_panic(settings):
    """Temporal's Rust core panics reading an environment that is not UTF-8; relay never lets
    it read the raw environment, so any variable of the user's shell is harmless."""
    env = {k.encode(): v.encode() for k, v in cli_env(settings).items()}
    env[b"LEGACY_LATIN1"] = b"caf\xe9"
    env[b"RELAY_TEMPORAL_ADDRESS"] = f"127.0.0.1:{free_port()}".encode()
    proc = subprocess.run([*RELAY_CMD, "status", "some-spec"], env=env, capture_output=True,
                          timeout=FAST, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1 and "panicked" not in err and "Traceback" not in err, err
    assert err.strip().startswith("error: cannot reach Temporal")
