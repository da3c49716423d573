"""The registry's schema, kept current by Alembic migrations run in-process.

Every process that opens the registry (worker, CLI, SDK) brings it to the newest
revision first, so an upgraded relay never meets an old schema. A database created
before relay had migrations is recognised and stamped with the initial revision.
One process migrates at a time, inside one transaction: PostgreSQL takes an
advisory transaction lock; SQLite begins IMMEDIATE (its DDL is then part of the
transaction, so a crash mid-migration leaves the old schema, not half of the new).
A database already migrated by a newer relay is left alone, with a warning, so an
older worker or CLI keeps working during a rolling upgrade.
"""

from __future__ import annotations

import functools
import threading

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

log = structlog.get_logger("relay.schema")

BASELINE = "0001"
# pg_advisory_xact_lock takes a bigint; this one is "relay" in ASCII.
_PG_LOCK = 0x72656C6179


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "relay:migrations")
    config.attributes["connection"] = conn
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this relay knows."""
    head_revision = _scripts().get_current_head()
    assert head_revision is not None
    return head_revision


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _current(conn)


# Alembic's `context` is a module global: one migration at a time in a process.
_IN_PROCESS = threading.Lock()


def migrate(engine: Engine, attempts: int = 5) -> None:
    for attempt in range(1, attempts + 1):
        try:
            with _IN_PROCESS:
                _migrate_once(engine)
            return
        except (OperationalError, IntegrityError, ProgrammingError):
            # A concurrent creator on a database without locks; the next read sees its work.
            if attempt == attempts:
                raise


def _migrate_once(engine: Engine) -> None:
    with engine.connect() as conn:
        if _current(conn) == head():  # the common case: no lock, one read
            return
        conn.rollback()
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
        revision = _current(conn)  # again, now that no other process migrates
        if revision == head():
            conn.rollback()
            return
        if revision is not None and not _known(revision):
            log.warning("registry.schema_is_newer", revision=revision, this_relay_knows=head())
            conn.rollback()
            return
        config = _config(conn)
        if revision is None and "relay_spec" in inspect(conn).get_table_names():
            command.stamp(config, BASELINE)  # made by create_all before there were migrations
        command.upgrade(config, "head")
        conn.commit()
