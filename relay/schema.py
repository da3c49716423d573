"""The registry's schema, kept current by Alembic migrations run in-process.

Every process that opens the registry (worker, CLI, SDK) brings it to the newest
revision first, so an upgraded relay never meets an old schema. A database created
before relay had migrations is recognised and stamped with the initial revision.
On PostgreSQL an advisory lock serialises workers that start together; on SQLite a
concurrent creator shows up as "already exists" and the migration is simply re-read.
"""

from __future__ import annotations

import functools
import threading

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

BASELINE = "0001"
# pg_advisory_lock takes a bigint; this one is "relay" in ASCII.
_PG_LOCK = 0x72656C6179


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "relay:migrations")
    config.attributes["connection"] = conn
    return config


@functools.cache
def head() -> str:
    """The newest revision this relay knows."""
    head_revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert head_revision is not None
    return head_revision


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# Alembic's `context` is a module global: one migration at a time in a process.
_IN_PROCESS = threading.Lock()


def migrate(engine: Engine, attempts: int = 5) -> None:
    for attempt in range(1, attempts + 1):
        try:
            with _IN_PROCESS:
                _migrate_once(engine)
            return
        except (OperationalError, IntegrityError, ProgrammingError):
            # Another process created the same tables or version row first.
            if attempt == attempts:
                raise


def _migrate_once(engine: Engine) -> None:
    with engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK})
            conn.commit()
        try:
            if MigrationContext.configure(conn).get_current_revision() == head():
                return
            config = _config(conn)
            tables = set(inspect(conn).get_table_names())
            if "alembic_version" not in tables and "relay_spec" in tables:
                command.stamp(config, BASELINE)
            command.upgrade(config, "head")
            conn.commit()
        finally:
            if postgres:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK})
                conn.commit()
