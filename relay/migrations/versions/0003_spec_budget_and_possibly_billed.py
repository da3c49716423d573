"""A spec's budget (USD and tokens, over all iterations) and its possibly-billed model calls.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('relay_spec', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_usd', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('budget_tokens', sa.Integer(), nullable=True))

    op.create_table('relay_possibly_billed',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('spec_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('turn', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('usd', sa.Float(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['session_id'], ['relay_agent_session.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('session_id', 'turn', 'step', 'owner', name='uq_possibly_billed_call')
    )
    with op.batch_alter_table('relay_possibly_billed', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relay_possibly_billed_spec_id'), ['spec_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('relay_possibly_billed', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_possibly_billed_spec_id'))

    op.drop_table('relay_possibly_billed')
    with op.batch_alter_table('relay_spec', schema=None) as batch_op:
        batch_op.drop_column('budget_tokens')
        batch_op.drop_column('budget_usd')
