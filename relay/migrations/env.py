"""Alembic environment: relay runs migrations in-process on a connection it passes in
(`relay.schema.migrate`), so there is no alembic.ini and no URL here."""

from alembic import context
from sqlmodel import SQLModel

import relay.ledger  # noqa: F401  (the tables register on SQLModel.metadata)
import relay.registry  # noqa: F401

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them; batch mode does that
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
