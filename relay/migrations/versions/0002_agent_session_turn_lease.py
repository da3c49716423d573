"""Agent sessions get a turn lease, so two live attempts of one turn never both pay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('relay_agent_session', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_relay_agent_session_lease_owner'), ['lease_owner'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('relay_agent_session', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_agent_session_lease_owner'))
        batch_op.drop_column('lease_until')
        batch_op.drop_column('lease_owner')

