"""The `relay` command line and the raw `temporal` CLI drive specs end to end.

Every command runs as a real subprocess against the session's Temporal dev
server, scripted model and registry; the worker runs in this test process, so
subprocesses are awaited asynchronously and the event loop keeps serving it.
"""

from __future__ import annotations

import asyncio
import json
from asyncio.subprocess import DEVNULL, PIPE

import pytest

from relay.client import SpecFailed
from relay.models import ROLES, Phase, Role
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    approve_when_asked,
    cli_env,
    make_repo,
    spec_id,
    wait_for,
    wait_for_questions,
)
from worker.devserver import temporal_binary


async def cli(settings, *args: str, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `relay ARGS...` (with `env` added to cli_env); returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, *args, env={**cli_env(settings), **(env or {})}, stdin=DEVNULL,
        stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def temporal_cli(settings, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run the raw `temporal` CLI against the session's dev server."""
    proc = await asyncio.create_subprocess_exec(
        temporal_binary(), *args, "--address", settings.temporal_address,
        stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def cancel_and_wait(rc, sid: str) -> None:
    """Cancel a spec this test leaves waiting, and wait until it has really ended."""
    await rc.cancel(sid)
    with pytest.raises(SpecFailed, match="cancelled"):
        await approve_when_asked(rc, sid)


def ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out


# --- relay run / answer / result / status / sessions / history --------------------------


async def test_a_spec_end_to_end_through_the_cli(relay, settings, registry):
    """`relay run` prints the id; `relay answer --json` is accepted; result, status, sessions
    and history show the finished spec, its five named sessions and the planner's turns."""
    sid = spec_id("cli")
    out = ok(await cli(settings, "run", "Write a greeting module", "--id", sid))
    assert out.strip() == sid

    st = await wait_for_questions(relay, sid)
    assert [q.id for q in st.pending.questions] == ["q1", "q2"]

    out = ok(await cli(settings, "answer", sid, "--json", json.dumps(ANSWERS)))
    assert "q1" in out and "q2" in out  # the questions are shown
    assert "accepted answers q1, q2 (round 1)" in out

    st = await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    out = ok(await cli(settings, "status", sid))
    assert "waiting for approval to merge" in out
    out = ok(await cli(settings, "approve", sid, "--reviewer", "cli-test"))
    assert f"{sid}: approved" in out
    out = ok(await cli(settings, "result", sid))
    assert "outcome: delivered" in out and f"relay/{sid} merged into main" in out
    assert "relay-scripted-1" in out and "scripted model" in out
    assert "Developers on the team" in out  # the answer made it into the clarified spec

    out = ok(await cli(settings, "status", sid, "--json"))
    status = json.loads(out)
    assert status["spec_id"] == sid
    assert status["phase"] == Phase.completed.value
    assert status["outcome"] == "delivered"
    assert status["decision"] == {"approved": True, "reviewer": "cli-test", "reason": None}
    assert status["iteration"] == 1

    sessions = registry.sessions(sid)
    assert [s.role for s in sessions] == [r.value for r in ROLES]
    out = ok(await cli(settings, "sessions", sid, "--json"))
    listed = json.loads(out)
    assert [(s["name"], s["role"], s["status"]) for s in listed] == [
        (s.name, s.role, "done") for s in sessions]

    planner = registry.find_session(sid, Role.planner)
    messages = registry.messages(planner.id)
    assert planner.turns == 2 and len(messages) == 4  # plan + revision, user/assistant each
    out = ok(await cli(settings, "history", sid, "planner"))
    assert planner.name in out
    assert f"{len(messages)} messages" in out and f"{planner.turns} turns" in out
    assert out.count("submit_plan") == 2  # each turn's structured answer is shown
    out = ok(await cli(settings, "history", sid, "planner", "--json"))
    assert [(m["turn"], m["role"]) for m in json.loads(out)] == [
        (1, "user"), (1, "assistant"), (2, "user"), (2, "assistant")]


async def test_answers_given_as_id_equals_text_pairs(relay, settings):
    """`relay answer X --answer q1=... --answer q2=...` answers the questions like --json does."""
    sid = spec_id("cli")
    ok(await cli(settings, "run", "Write a greeting module", "--id", sid))
    await wait_for_questions(relay, sid)
    out = ok(await cli(settings, "answer", sid, "--answer", "q1=People at the shell, daily.",
                       "--answer", "q2=It prints hello = bonjour."))
    assert "accepted answers q1, q2 (round 1)" in out
    result = await approve_when_asked(relay, sid)
    assert result.outcome == "delivered"
    # Text after the first '=' is kept whole, including further '=' signs.
    assert "It prints hello = bonjour." in result.clarified_spec


async def test_run_reads_the_request_from_a_file(relay, settings, tmp_path, model_server):
    """`relay run FILE` sends the file's contents as the request, not its path."""
    request = "Write a module that says goodbye\nin three languages, with tests.\n"
    path = tmp_path / "request.md"
    path.write_text(request, encoding="utf-8")
    sid = spec_id("cli")
    assert ok(await cli(settings, "run", str(path), "--id", sid)).strip() == sid
    await wait_for_questions(relay, sid)
    first = model_server.recorded("clarifier")[0].body["messages"][0]["content"]
    sent = "\n".join(b.get("text", "") for b in first)
    assert "says goodbye" in sent and str(path) not in sent
    await relay.answer(sid, ANSWERS)
    result = await approve_when_asked(relay, sid)
    assert "says goodbye" in result.clarified_spec


async def test_iterate_starts_the_next_iteration(relay, settings):
    """`relay iterate X "change"` on a finished spec starts iteration 2, and the result says so."""
    sid = spec_id("cli")
    ok(await cli(settings, "run", "Write a greeting module", "--id", sid))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    assert (await approve_when_asked(relay, sid)).iteration == 1

    out = ok(await cli(settings, "iterate", sid, "Greet in Italian too", "--auto-approve"))
    assert f"{sid}: next iteration started" in out
    out = ok(await cli(settings, "result", sid))
    assert f"{sid} · iteration 2" in out
    assert "outcome: delivered" in out
    st = await relay.status(sid)
    assert st.iteration == 2 and st.phase == Phase.completed


async def test_cancel_a_spec_waiting_for_answers(relay, settings, registry):
    """`relay cancel X` ends a spec that waits for answers: status says cancelled, result fails."""
    sid = spec_id("cli")
    ok(await cli(settings, "run", "Write a greeting module", "--id", sid))
    await wait_for_questions(relay, sid)

    out = ok(await cli(settings, "cancel", sid))
    assert f"{sid}: cancellation requested" in out
    st = await wait_for(relay, sid, lambda s: s.phase == Phase.cancelled)
    assert st.pending is None and st.error == "cancelled"
    with pytest.raises(SpecFailed, match="cancelled"):
        await approve_when_asked(relay, sid)
    assert registry.spec(sid).status == "cancelled"
    assert all(s.status == "idle" for s in registry.sessions(sid))

    code, out, err = await cli(settings, "status", sid, "--json")
    assert code == 0 and json.loads(out)["phase"] == "cancelled"


# --- the raw temporal CLI (the Web UI / raw client contract) -----------------------------


async def start_raw(relay, settings) -> str:
    """`temporal workflow start` with plain JSON, as the Web UI's start form sends it."""
    sid = spec_id("raw")
    ok(await temporal_cli(settings, "workflow", "start", "--type", "SpecPipeline",
                          "--task-queue", settings.task_queue, "--workflow-id", sid,
                          "--input", json.dumps({"request": "Write a greeting module"})))
    await wait_for_questions(relay, sid)
    return sid


async def test_raw_temporal_cli_starts_queries_answers_and_reads_the_result(relay, settings):
    """Plain JSON through `temporal workflow start / query / update execute / result` runs a spec."""
    sid = await start_raw(relay, settings)

    out = ok(await temporal_cli(settings, "workflow", "query", "--workflow-id", sid,
                                "--name", "status", "-o", "json"))
    [status] = json.loads(out)["queryResult"]
    assert status["phase"] == "waiting_for_answers"
    assert [q["id"] for q in status["pending"]["questions"]] == ["q1", "q2"]

    out = ok(await temporal_cli(settings, "workflow", "update", "execute", "--workflow-id", sid,
                                "--name", "answer", "--input", json.dumps({"answers": ANSWERS})))
    assert "accepted:[q1 q2] round:1" in out  # the AnswerAck comes back to the sender

    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    out = ok(await temporal_cli(settings, "workflow", "update", "execute", "--workflow-id", sid,
                                "--name", "approve", "--input", json.dumps({"reviewer": "raw"})))
    assert "approved:true" in out

    out = ok(await temporal_cli(settings, "workflow", "result", "--workflow-id", sid, "-o", "json"))
    result = json.loads(out)
    assert result["status"] == "COMPLETED"
    assert result["result"]["outcome"] == "delivered"
    assert result["result"]["spec_id"] == sid


async def test_raw_temporal_cli_signal_answers_a_spec(relay, settings):
    """A `temporal workflow signal --name answer_signal` with the answers completes the spec."""
    sid = await start_raw(relay, settings)
    ok(await temporal_cli(settings, "workflow", "signal", "--workflow-id", sid,
                          "--name", "answer_signal", "--input", json.dumps({"answers": ANSWERS})))
    result = await approve_when_asked(relay, sid)
    assert result.outcome == "delivered"
    assert "Developers on the team" in result.clarified_spec
    assert (await relay.status(sid)).rejected_inputs == []


# --- output people and scripts read ---------------------------------------------------------


async def test_sessions_table_shows_whole_names_at_80_columns(relay, settings, registry):
    """`relay sessions X` (piped, or in an 80-column terminal) shows each session's full name and id."""
    sid = spec_id("cli")
    ok(await cli(settings, "run", "Write a greeting module", "--id", sid))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    await approve_when_asked(relay, sid)
    out = ok(await cli(settings, "sessions", sid))
    for s in registry.sessions(sid):
        assert s.name in out, f"the sessions table does not show {s.name}:\n{out}"
        assert s.id in out, f"the sessions table does not show {s.id}:\n{out}"
        # no column squeezed to an ellipsis: every figure whole
        whole = s.input_tokens + s.cache_read_tokens + s.cache_write_tokens  # input counted whole
        assert f"{whole:,}/{s.output_tokens:,}" in out, out
        assert (s.model or "-") in out, out
    assert "…" not in out, out


async def test_request_text_with_brackets_is_shown_verbatim(relay, settings):
    """A request that mentions things in square brackets is shown as written by result and history."""
    sid = spec_id("cli")
    ok(await cli(settings, "run", "Add a [bold] flag and a [/help] command", "--id", sid))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    await approve_when_asked(relay, sid)
    out = ok(await cli(settings, "result", sid))
    assert "Add a [bold] flag and a [/help] command" in out
    out = ok(await cli(settings, "history", sid, "clarifier"))
    assert "Add a [bold] flag and a [/help] command" in out


async def test_run_prints_a_long_spec_id_on_one_line(relay, settings):
    """`sid=$(relay run ... --id LONG)` captures the whole id, whatever its (valid) length."""
    sid = spec_id("a-long-spec-id-" + "y" * 100)
    out = ok(await cli(settings, "run", "Write a greeting module", "--id", sid))
    assert out == sid + "\n"
    await wait_for_questions(relay, sid)
    await cancel_and_wait(relay, sid)


# --- workspaces, approval and the effects ledger through the CLI ------------------------------


async def test_workspace_spec_through_the_cli(relay, settings, tmp_path):
    """`relay run --workspace --check`, `relay approve`, `relay effects`; then a rejected one."""
    repo = make_repo(tmp_path / "repo")
    sid = spec_id("cli")
    ok(await cli(settings, "run", "Write a greeting module", "--id", sid, "--workspace", str(repo),
                 "--check", "python -m unittest"))
    await wait_for_questions(relay, sid)
    ok(await cli(settings, "answer", sid, "--json", json.dumps(ANSWERS)))
    await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval)
    out = ok(await cli(settings, "effects", sid))
    assert "git.prepare_workspace" in out and "git.commit" in out and "done" in out
    ok(await cli(settings, "approve", sid))
    out = ok(await cli(settings, "result", sid))
    assert "outcome: delivered" in out and (repo / "greeting.py").is_file()
    rows = json.loads(ok(await cli(settings, "effects", sid, "--json")))
    assert [r["effect"] for r in rows][-2:] == ["git.deliver", "git.cleanup"]

    other = spec_id("cli")
    ok(await cli(settings, "run", "Write a greeting module", "--id", other, "--workspace", str(repo)))
    await wait_for_questions(relay, other)
    await relay.answer(other, ANSWERS)
    await wait_for(relay, other, lambda s: s.phase == Phase.waiting_for_approval)
    code, _, err = await cli(settings, "reject", other)
    assert code != 0 and "--reason" in err  # a rejection needs a reason
    out = ok(await cli(settings, "reject", other, "--reason", "not now"))
    assert f"{other}: rejected" in out
    out = ok(await cli(settings, "result", other))
    assert "outcome: rejected" in out and "compensated" in out
    assert json.loads(ok(await cli(settings, "status", other, "--json")))["decision"]["reason"] == "not now"
    out = ok(await cli(settings, "compensate", other))
    assert "nothing to compensate" in out
