"""The registry's PostgreSQL server killed mid-turn and mid-effect: nothing is paid for twice,
nothing finished is rolled back, and the spec completes once the database is back.

Real `relay worker` processes, a real dev server, the model double over HTTP and a PostgreSQL
cluster of this module's own, which the tests crash (`pg_ctl stop -m immediate`: every backend
aborts at once, no shutdown checkpoint, crash recovery at restart) and start again on the same
port and data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import AgentTurnActivities
from activities.effects import EffectActivities, EffectExecutor, effect_error
from relay.client import RelayClient
from relay.ledger import Ledger
from relay.models import AgentTurnInput, EffectInput, Role
from relay.registry import AgentSession, Registry, RegistryUnavailable, make_engine, registry_outage
from relay.scripted_model import Fault
from tests import adopter_effects
from tests.conftest import (
    ANSWERS,
    RELAY_CMD,
    SCRIPTED_MODEL,
    approve_when_asked,
    cli_env,
    git,
    model_endpoint_for,
    spec_id,
    until,
    wait_for_questions,
)
from tests.postgres_server import PostgresServer, server_bin_dir


class CrashablePostgres(PostgresServer):
    """The tests' throwaway cluster, which can also be crashed and started again. Unlike the
    shared cluster it keeps commits durable across its crashes (synchronous_commit on): with it
    off, a crash loses the last acknowledged transactions, as PostgreSQL documents."""

    def start(self, timeout: float = 60.0) -> CrashablePostgres:
        super().start(timeout)
        with psycopg.connect(host="127.0.0.1", port=self.port, user="relay", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("ALTER DATABASE relay SET synchronous_commit = on")
        return self

    def crash(self) -> None:
        subprocess.run([*self._as, str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"),
                        "stop", "-m", "immediate", "-w"], check=True, capture_output=True)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def restart(self, timeout: float = 60.0) -> None:
        log = (self.root / "postgres.log").open("ab")
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin_dir / "postgres"), "-D", str(self.root / "data"),
             "-p", str(self.port), "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user="relay", dbname="relay",
                                     connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not restart: {self.log_tail()}") from None
                time.sleep(0.1)


@pytest.fixture(scope="module")
def crashable() -> Iterator[CrashablePostgres]:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed (Debian package postgresql)")
    server = CrashablePostgres(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def registry_url(crashable: CrashablePostgres) -> str:
    """The registry of this module's tests lives on the cluster they crash."""
    return crashable.url


@pytest.fixture
async def workers(settings, tmp_path):
    """Start `relay worker` processes (ended by the test's end); their JSON logs in one file."""
    started: list[asyncio.subprocess.Process] = []
    log = tmp_path / "workers.log"

    async def start(failpoints: str = "") -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *RELAY_CMD, "worker", env=cli_env(settings) | {"RELAY_FAILPOINTS": failpoints},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=log.open("ab"))
        started.append(proc)
        return proc

    start.log = log  # type: ignore[attr-defined]
    yield start
    for proc in started:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def logged(log: Path, event: str, **fields: str) -> bool:
    """Whether a worker logged `event` (with these fields)."""
    if not log.exists():
        return False
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
            return True
    return False


def first_turn_requests(model_server, role: str) -> int:
    """Requests for the role's first turn, first step (a conversation of one user message)."""
    return sum(1 for r in model_server.recorded(role) if len(r.body.get("messages", [])) == 1)


def assert_nothing_twice(registry, sid: str) -> None:
    for session in registry.sessions(sid):
        keys = [(m.turn, m.step, m.role) for m in registry.messages(session.id)]
        assert len(keys) == len(set(keys)), session.role


def assert_nothing_rolled_back(registry, sid: str) -> None:
    rows = Ledger(registry).effects(sid)
    assert rows and all(r.status == "done" for r in rows), [(r.step, r.status) for r in rows]


async def pending_heartbeat(client, sid: str, activity: str) -> bool:
    desc = await client.get_workflow_handle(sid).describe()
    return any(p.activity_type.name == activity and p.heartbeat_details.payloads
               for p in desc.raw_description.pending_activities)


async def test_killed_mid_model_call_the_answer_is_recorded_once_back(
        client, settings, registry, model_server, crashable, workers):
    """PostgreSQL dies while the planner's model call is in flight. The paid answer cannot be
    recorded; the attempt keeps it and keeps trying (heartbeating) until the database is back,
    then records it. The model is asked once."""
    rc = RelayClient(client, settings, registry)
    limits = settings.limits().model_copy(update={"heartbeat_timeout_s": 2})
    await workers()
    sid = await rc.run("Write a greeting module", spec_id=spec_id("pgdown"), limits=limits)
    await wait_for_questions(rc, sid, timeout=90)
    model_server.add_fault(Fault(kind="slow", role="planner", delay_s=2))
    await rc.answer(sid, ANSWERS)
    await until(lambda: model_server.arrived("planner") == 1, timeout=60)
    crashable.crash()
    await until(lambda: logged(workers.log, "agent_turn.record_failed"), timeout=60)
    # well past the heartbeat timeout (2 s): the attempt stays alive while it retries
    await until(lambda: logged(workers.log, "registry.retrying", what="append_exchange"))
    await asyncio.sleep(4)  # the outage lasts: that is the condition under test
    crashable.restart()

    result = await approve_when_asked(rc, sid, timeout=120)
    assert result.outcome == "delivered"
    assert logged(workers.log, "agent_turn.recorded_after_outage")
    assert first_turn_requests(model_server, "planner") == 1  # nothing paid twice
    assert_nothing_twice(registry, sid)
    assert_nothing_rolled_back(registry, sid)
    planner = registry.find_session(sid, Role.planner)
    assert planner.lease_owner is None and planner.turns == 2


async def test_a_worker_dying_during_the_outage_hands_the_answer_to_the_next(
        client, settings, registry, model_server, crashable, workers):
    """PostgreSQL dies mid call, and the worker holding the paid answer dies too. The answer
    rode in the attempt's heartbeat details; the next attempt, on another worker, records it
    instead of asking the model again."""
    rc = RelayClient(client, settings, registry)
    limits = settings.limits().model_copy(update={"heartbeat_timeout_s": 2})
    first = await workers()
    sid = await rc.run("Write a greeting module", spec_id=spec_id("pgdown"), limits=limits)
    await wait_for_questions(rc, sid, timeout=90)
    model_server.add_fault(Fault(kind="slow", role="auditor", delay_s=1))
    await rc.answer(sid, ANSWERS)
    await until(lambda: model_server.arrived("auditor") == 1, timeout=60)
    crashable.crash()
    await until(lambda: logged(workers.log, "agent_turn.record_failed"), timeout=60)
    deadline = asyncio.get_running_loop().time() + 30
    while not await pending_heartbeat(client, sid, "model_step"):
        assert asyncio.get_running_loop().time() < deadline, "the answer was never carried"
        await asyncio.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    crashable.restart()
    await workers()

    result = await approve_when_asked(rc, sid, timeout=120)
    assert result.outcome == "delivered"
    assert logged(workers.log, "agent_turn.carried_answer_used")
    assert first_turn_requests(model_server, "auditor") == 1  # nothing paid twice
    assert_nothing_twice(registry, sid)
    assert_nothing_rolled_back(registry, sid)
    auditor = [m for m in registry.messages(registry.find_session(sid, Role.auditor).id)]
    assert [(m.turn, m.step, m.role) for m in auditor][:2] == [(1, 0, "user"), (1, 0, "assistant")]
    assert auditor[1].input_tokens > 0  # the carried answer's usage is recorded with it


async def test_killed_after_a_commit_before_its_ledger_update(
        client, settings, registry, model_server, crashable, workers, data_dir, tmp_path):
    """The commit is made; PostgreSQL dies before the ledger says so. Recording `done` is waited
    out as bookkeeping: the effect does not fail, nothing is compensated, the commit exists once
    and the spec is delivered."""
    rc = RelayClient(client, settings, registry)
    pause = tmp_path / "after-act"
    await workers(f"effect.after_act:git.commit@{pause}")
    sid = await rc.run("Write a greeting module", spec_id=spec_id("pgdown"))
    await wait_for_questions(rc, sid, timeout=90)
    await rc.answer(sid, ANSWERS)
    await until(lambda: (pause / "reached").exists(), timeout=90)
    crashable.crash()
    (pause / "release").touch()
    await until(lambda: logged(workers.log, "registry.retrying", what="ledger.done git.commit"),
                timeout=60)
    await asyncio.sleep(4)  # the outage lasts: that is the condition under test
    crashable.restart()

    result = await approve_when_asked(rc, sid, timeout=120)
    assert result.outcome == "delivered"
    assert_nothing_rolled_back(registry, sid)
    [commit] = [r for r in Ledger(registry).effects(sid) if r.effect == "git.commit"]
    assert commit.status == "done"
    repo = data_dir / "workspaces" / sid
    trailers = [line for line in git(repo, "log", "--format=%B", "main").splitlines()
                if line.startswith("Relay-Effect:")]
    assert Counter(trailers) == Counter({f"Relay-Effect: {commit.key}": 1})
    assert not logged(workers.log, "effect.failure_not_recorded")


# --- the classification, at the activity level (a registry nobody answers) ----------------------


@pytest.fixture
def unreachable_registry() -> Iterator[Registry]:
    with socket.socket() as s:  # a port nobody listens on: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = Registry(make_engine(f"postgresql+psycopg://relay@127.0.0.1:{port}/relay"))
    yield registry
    registry.engine.dispose()


def last_attempt(number: int) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=number, heartbeat_timeout=timedelta(seconds=2),
                                   start_to_close_timeout=timedelta(seconds=12))  # patience: 2 s
    return env


async def test_an_outage_before_acting_is_retryable_on_the_last_attempt_too(
        unreachable_registry, tmp_path):
    """Not the effect's failure: it stays retryable whatever its attempt count, waits before the
    next attempt, and says what is unreachable on one line. The effect did not act."""
    executor = EffectExecutor(Ledger(unreachable_registry), adopter_effects.effects, tmp_path)
    inp = EffectInput(spec_id=spec_id(), step="i1/hook/prepare/0", effect="tickets.open",
                      payload={"dir": str(tmp_path)}, max_attempts=3)
    started = time.monotonic()
    with pytest.raises(ApplicationError) as caught:
        await last_attempt(3).run(EffectActivities(executor).run_effect, inp)
    error = caught.value
    assert time.monotonic() - started >= 1.5  # retried within the attempt first
    assert error.type == "RegistryUnavailable" and not error.non_retryable
    assert error.next_retry_delay is not None and error.next_retry_delay.total_seconds() >= 5
    assert error.message.startswith("registry unavailable: ") and "Connection refused" in error.message
    assert "\n" not in error.message and "sqlalche.me" not in error.message
    assert not list(tmp_path.glob("*.open"))  # never acted


async def test_an_outage_during_a_turn_is_retryable_and_pays_nothing(
        unreachable_registry, model_server):
    """The turn cannot even begin: a retryable RegistryUnavailable, no model call, and the lease
    release that fails on the way out does not hide why."""
    turns = AgentTurnActivities(unreachable_registry, model_endpoint_for(model_server).client,
                                SCRIPTED_MODEL)
    inp = AgentTurnInput(spec_id=spec_id(), role=Role.planner, turn=1, kind="plan",
                         variables={"spec": "Greet people", "iteration": "1"})
    with pytest.raises(ApplicationError) as caught:
        await last_attempt(6).run(turns.agent_turn, inp)
    assert caught.value.type == "RegistryUnavailable" and not caught.value.non_retryable
    assert "Connection refused" in caught.value.message
    assert model_server.recorded() == []


def test_only_outages_are_classified_as_outages(unreachable_registry, registry):
    """Connection failures are outages; a constraint violation is a conflict, not an outage."""
    with pytest.raises(Exception) as refused:
        unreachable_registry.find_session("x", Role.planner)
    assert isinstance(registry_outage(refused.value), RegistryUnavailable)
    session, _ = registry.resolve_session(spec_id(), Role.planner)
    with pytest.raises(IntegrityError) as duplicate, Session(registry.engine) as db:
        db.add(AgentSession(id=session.id, spec_id="y", role="planner", name="n"))
        db.commit()
    assert registry_outage(duplicate.value) is None
    assert effect_error(RuntimeError("the tracker is down"), 3, 3).non_retryable  # its own: final


async def test_an_attempt_that_gives_up_hands_its_answer_and_lease_to_the_next(
        registry, model_server, crashable):
    """The outage outlasts the attempt's patience: it fails retryable, its paid answer in its last
    heartbeat. The next attempt records that answer (no second model call) and takes over the
    lease the first could not release, without waiting for it to lapse."""
    turns = AgentTurnActivities(registry, model_endpoint_for(model_server).client, SCRIPTED_MODEL)
    inp = AgentTurnInput(spec_id=spec_id(), role=Role.auditor, turn=1, kind="audit",
                         variables={"spec": "Greet people", "plan": "1. greet"})
    model_server.add_fault(Fault(kind="slow", role="auditor", delay_s=1))
    beats: list[tuple] = []
    first = last_attempt(1)
    first.info = dataclasses.replace(first.info, heartbeat_timeout=timedelta(seconds=60))
    first.on_heartbeat = lambda *details: beats.append(details)
    running = asyncio.ensure_future(first.run(turns.agent_turn, inp))
    await until(lambda: model_server.arrived("auditor") == 1)
    crashable.crash()
    try:
        with pytest.raises(ApplicationError) as caught:
            await running
    finally:
        crashable.restart()
    assert caught.value.type == "RegistryUnavailable" and not caught.value.non_retryable
    carried = [d for d in beats if d][-1]
    assert carried[0]["pending"]["gave_up"] is True
    session = registry.find_session(inp.spec_id, Role.auditor)
    assert session.lease_owner is not None  # left behind: the release failed too, and was logged

    second = last_attempt(2)
    second.info = dataclasses.replace(second.info, heartbeat_timeout=timedelta(seconds=60),
                                      heartbeat_details=list(carried))
    started = time.monotonic()
    result = await second.run(turns.agent_turn, inp)
    assert time.monotonic() - started < 10  # the 60 s lease was superseded, not waited out
    assert len(model_server.recorded("auditor")) == 1  # the answer was paid for once
    assert result.output == {"approved": False, "findings": [
        "The plan has no step that verifies the result with a test."]}
    assert result.usage.input_tokens > 0  # this attempt reports what the first one paid
    assert [(m.turn, m.step, m.role) for m in registry.messages(result.session_id)] == [
        (1, 0, "user"), (1, 0, "assistant")]
    assert registry.find_session(inp.spec_id, Role.auditor).lease_owner is None
