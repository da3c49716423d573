"""Live progress: `relay watch` (and `run --follow`, the demo) shows every step as it happens.

Every phase transition the workflow made (its RelayPhase upserts in the run's history) is a
numbered progress event, and a watcher prints each one once, in order, however fast the run
went. Piped, the output is plain lines; on a terminal, a live line sits under them.
"""

from __future__ import annotations

import asyncio
import json
import re
from asyncio.subprocess import DEVNULL, PIPE

from temporalio.client import Client

from relay import view
from relay.models import PHASE_SEARCH_ATTRIBUTE, PROGRESS_KEPT, Limits, Phase, ProgressEvent, Status
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    cli_env,
    spec_id,
    wait_for,
    wait_for_questions,
)
from tests.test_cli import cli, ok

ANSI = re.compile(r"\x1b\[")


async def history_phases(client: Client, sid: str) -> list[str]:
    """The phases the run went through, from its history (the RelayPhase upserts)."""
    phases = []
    async for event in client.get_workflow_handle(sid).fetch_history_events():
        if event.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
            if PHASE_SEARCH_ATTRIBUTE in fields.indexed_fields:
                phases.append(json.loads(fields.indexed_fields[PHASE_SEARCH_ATTRIBUTE].data))
    return phases


async def watch(settings, sid: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """`relay watch SID`, piped, started now."""
    return await asyncio.create_subprocess_exec(
        *RELAY_CMD, "watch", sid, env={**cli_env(settings), **(env or {})}, stdin=DEVNULL,
        stdout=PIPE, stderr=PIPE)


async def finished(proc: asyncio.subprocess.Process, timeout: float = 90) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def phase_lines(out: str) -> list[str]:
    return [line.split("▸ ", 1)[1] for line in out.splitlines() if "▸ " in line]


async def test_every_phase_transition_is_shown_in_order(relay, settings, client):
    """A whole run, answered and approved as fast as the SDK can: `relay watch` (piped) prints
    every phase the history records, in order, as plain lines, with the agents' turns, their
    tool calls and paths, verdicts, elapsed times and tokens."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id("progress"))
    watcher = await watch(settings, sid)
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    await relay.approve(sid, reviewer="tests")
    code, out, err = await finished(watcher)
    assert code == 0, err

    phases = await history_phases(client, sid)
    st = await relay.status(sid)
    events = [e for e in st.progress if e.kind == "phase"]
    # the progress log holds every transition the history records, and nothing else
    assert [e.phase for e in events] == phases
    assert phases[0] == "clarifying" and phases[-1] == "completed"
    assert {"waiting_for_answers", "planning", "auditing", "constructing", "validating",
            "waiting_for_approval", "delivering"} <= set(phases)
    # ... and the watcher printed each of them, in order
    assert phase_lines(out) == [e.text for e in events], out
    assert [e.seq for e in st.progress] == list(range(1, st.progress_seq + 1))

    assert not ANSI.search(out), "piped output must be plain"
    assert "iteration 0" not in out and "starting" not in out
    assert "\\[" not in out  # no markup escapes shown
    assert "completed" not in out and "▸ ended: delivered" in out
    turn = next(line for line in out.splitlines() if "constructor turn 1 (construct)" in line)
    assert "write_file greeting.py" in turn and "write_file test_greeting.py" in turn
    assert re.search(r"\d+\.\d s", turn) and re.search(r"tokens [\d,]+ in / [\d,]+ out", turn)
    assert "verdict: plan rejected" in out and "verdict: plan approved" in out
    assert "validator turn 1 (validate)" in out and "tools: run_checks" in out
    assert "verdict: change approved" in out
    assert "answers received for q1, q2" in out and "approved by tests" in out
    assert f"merged relay/{sid} into main" in out
    assert re.search(r"^\+0:\d\d\.\d ", out, re.M)  # each line: time since the run started
    assert "outcome: delivered" in out  # the result follows


async def test_a_watcher_asks_only_for_what_it_has_not_seen(relay, settings, client):
    """`status` with {"after": K} returns only the events numbered above K; any other
    argument shape is ignored, never a failed query."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id("progress"))
    st = await wait_for_questions(relay, sid)
    assert st.progress_seq == len(st.progress) >= 3
    later = await relay.status(sid, after=2)
    assert [e.seq for e in later.progress] == list(range(3, st.progress_seq + 1))
    assert later.progress_seq == st.progress_seq
    assert await relay.progress(sid, after=st.progress_seq) == []
    handle = client.get_workflow_handle(sid)
    for expected, args in ((1, [{"after": 1}]), (1, [1]), (0, ["x"]), (0, [{"after": -1}]),
                           (0, [{"after": "2"}]), (0, [None]), (0, [[1, 2]]), (0, [1, 2]),
                           (0, [{"after": True}]), (0, [])):
        raw = await handle.query("status", args=args, result_type=Status)
        assert [e.seq for e in raw.progress] == list(range(expected + 1, st.progress_seq + 1)), args
    await relay.cancel(sid)


async def test_a_rejected_run_is_never_printed_as_completed(relay, settings):
    """Rejected by the reviewer (and compensated): watch, status and result say rejected."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id("progress"))
    watcher = await watch(settings, sid)
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    await relay.reject(sid, "not this way")
    code, out, err = await finished(watcher)
    assert code == 0, err
    assert "▸ ended: rejected by the reviewer" in out
    assert "▸ compensating" in out and "compensated" in out
    assert "rejected by a reviewer: not this way" in out or "rejected by" in out
    assert "outcome: rejected (rejected by the reviewer" in out
    assert "completed" not in out
    out = ok(await cli(settings, "status", sid))
    assert "ended: rejected by the reviewer" in out
    out = ok(await cli(settings, "result", sid))
    assert "outcome: rejected" in out and "completed" not in out


async def test_a_change_the_validator_rejects_reads_as_rejected(relay, settings):
    """One fix round allowed and a first module that fails: change_rejected, never completed."""
    sid = await relay.run("Write a greeting module [buggy-first]", spec_id=spec_id("progress"),
                          limits=Limits(max_fix_rounds=1))
    watcher = await watch(settings, sid)
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    code, out, err = await finished(watcher)
    assert code == 0, err
    assert "verdict: change rejected" in out and "exit code: 1" in out
    assert "▸ ended: rejected: the validator did not approve the change" in out
    assert "completed" not in out
    assert "outcome: change_rejected (rejected: the validator" in out


async def test_the_phase_line_and_the_result_link_to_the_web_ui(relay, settings):
    """With the Web UI's address known (RELAY_WEB_UI_URL, or the running relay dev's), the
    watcher and the result carry the spec's page."""
    sid = await relay.run("Write a greeting module", spec_id=spec_id("progress"),
                          auto_approve=True)
    await wait_for_questions(relay, sid)
    ui = {"RELAY_WEB_UI_URL": "http://ui.example:8233/"}
    watcher = await watch(settings, sid, ui)
    await relay.answer(sid, ANSWERS)
    code, out, err = await finished(watcher)
    assert code == 0, err
    link = f"http://ui.example:8233/namespaces/default/workflows/{sid}"
    assert out.splitlines()[0] == f"{sid}: following its progress · Web UI: {link}"
    assert f"Web UI: {link}" in out.splitlines()[-1] or f"Web UI: {link}" in out.split("outcome:")[1]
    assert f"Web UI: {link}" in ok(await cli(settings, "status", sid, env=ui))
    assert f"Web UI: {link}" in ok(await cli(settings, "result", sid, env=ui))
    assert "Web UI" not in ok(await cli(settings, "result", sid))  # unknown: no link


def test_a_watcher_that_fell_behind_is_told_what_it_missed():
    """Only the last PROGRESS_KEPT events are kept: a gap in the numbers is said, not hidden."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    printer = view.ProgressPrinter(Console(file=buffer, width=100), live=False)
    printer.seq = 3
    st = Status(spec_id="s", progress_seq=PROGRESS_KEPT + 10, progress=[
        ProgressEvent(seq=n, kind="phase", text=f"step {n}")
        for n in range(11, PROGRESS_KEPT + 11)])
    printer.show(st)
    text = buffer.getvalue()
    assert "7 earlier event(s) not shown" in text
    assert text.count("▸ step") == PROGRESS_KEPT and printer.seq == PROGRESS_KEPT + 10
    printer.show(st)  # nothing new: nothing printed twice
    assert buffer.getvalue() == text
