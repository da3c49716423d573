"""The registry's schema is migrated by Alembic: models and migrations never drift apart, a
database from before migrations is adopted with its rows, and workers that start together
migrate once. On SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import SQLModel

from relay.models import Role
from relay.registry import Registry, make_engine, utcnow
from relay.schema import BASELINE, _config, current, head
from tests.conftest import BACKENDS, spec_id

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The URL of a database with nothing in it yet."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").new_database(f"t_{uuid.uuid4().hex[:12]}")
    return f"sqlite:///{tmp_path / 'registry.db'}"


def assert_schema_matches_the_models(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_migrations_create_exactly_the_models_schema(empty_url):
    """A model change without its migration fails here."""
    registry = Registry.from_url(empty_url)
    assert current(registry.engine) == head()
    assert_schema_matches_the_models(registry)


def test_a_database_from_before_migrations_is_adopted_with_its_rows(empty_url):
    """relay created its tables with create_all before it had migrations; such a registry is
    stamped, not rebuilt."""
    engine = make_engine(empty_url)
    frozen = FIXTURES / f"registry-before-migrations.{engine.dialect.name}.sql"
    ddl = "\n".join(line for line in frozen.read_text().splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in filter(str.strip, ddl.split(";")):
            conn.exec_driver_sql(statement)
    sid = spec_id()
    with engine.begin() as conn:  # rows written by that relay, through its columns only
        conn.execute(text(
            "INSERT INTO relay_spec (spec_id, request, iteration, last_run_id, status, created_at,"
            " updated_at) VALUES (:sid, 'Write a greeting module', 1, 'run-1', 'completed',"
            " :now, :now)"), {"sid": sid, "now": utcnow()})
        conn.execute(text(
            "INSERT INTO relay_agent_session (id, spec_id, role, name, status, turns,"
            " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, created_at,"
            " updated_at) VALUES ('ses_old', :sid, 'planner', 'Old-planner', 'done', 2, 10, 5,"
            " 0, 0, :now, :now)"), {"sid": sid, "now": utcnow()})
    engine.dispose()

    registry = Registry.from_url(empty_url)
    assert current(registry.engine) == head()
    assert registry.spec(sid).request == "Write a greeting module"
    session = registry.find_session(sid, Role.planner)
    assert (session.id, session.turns, session.lease_owner) == ("ses_old", 2, None)
    assert registry.claim_turn(session.id, "attempt-1", 30)  # the new columns work
    assert_schema_matches_the_models(registry)


OPENER = """
import pathlib, sys, time
from relay.registry import Registry
ready, go = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
while not go.exists():  # a start line, so the processes really migrate at the same moment
    time.sleep(0.001)
Registry.from_url(sys.argv[1])
"""


def test_workers_starting_together_migrate_once(empty_url, tmp_path):
    """Six processes open one empty database at the same moment: all succeed, and they share
    one schema."""
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{i}" for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, empty_url, str(r), str(go)],
                              stderr=subprocess.PIPE) for r in readies]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.stderr.read().decode() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    registry = Registry.from_url(empty_url)
    assert current(registry.engine) == head()
    assert_schema_matches_the_models(registry)


def test_threads_of_one_process_migrate_one_at_a_time(empty_url):
    """Alembic's context is process-global; concurrent openers in threads still all succeed."""
    with ThreadPoolExecutor(4) as pool:
        registries = list(pool.map(lambda _: Registry.from_url(empty_url), range(4)))
    assert {current(r.engine) for r in registries} == {head()}


def test_the_baseline_is_the_first_revision():
    """Stamping an old database with BASELINE is only right while it is the root revision."""
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(_config()).get_base() == BASELINE


def test_a_registry_migrated_by_a_newer_relay_is_left_alone(empty_url):
    """During a rolling upgrade an older worker or CLI still opens the registry (with a
    warning in its log) instead of failing on a revision it does not know."""
    registry = Registry.from_url(empty_url)
    with registry.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    older = Registry.from_url(empty_url)
    assert current(older.engine) == "9999_future"
    session, created = older.resolve_session(spec_id(), Role.planner)
    assert created and session.name.endswith("-planner")
