"""The initial registry schema: specs, agent sessions, session messages, effects ledger.

This is exactly what relay created with `create_all` before it had migrations; such a
database is stamped with this revision rather than created again (relay.schema.migrate).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('relay_agent_session',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('spec_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('turns', sa.Integer(), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_read_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_write_tokens', sa.Integer(), nullable=False),
    sa.Column('prompt_version', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('spec_id', 'role', name='uq_session_spec_role')
    )
    with op.batch_alter_table('relay_agent_session', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relay_agent_session_spec_id'), ['spec_id'], unique=False)

    op.create_table('relay_effect',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('spec_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('step', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('effect', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reversible', sa.Boolean(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('payload_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('undo', sa.JSON(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('compensation_attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('spec_id', 'step', name='uq_effect_step')
    )
    with op.batch_alter_table('relay_effect', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relay_effect_key'), ['key'], unique=True)
        batch_op.create_index(batch_op.f('ix_relay_effect_spec_id'), ['spec_id'], unique=False)

    op.create_table('relay_spec',
    sa.Column('spec_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('request', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('iteration', sa.Integer(), nullable=False),
    sa.Column('last_run_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('workspace', sa.JSON(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('spec_id')
    )
    op.create_table('relay_session_message',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('turn', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('content', sa.JSON(), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('trust', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('valid', sa.Boolean(), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_read_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_write_tokens', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['session_id'], ['relay_agent_session.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('session_id', 'seq', name='uq_message_seq'),
    sa.UniqueConstraint('session_id', 'turn', 'step', 'role', name='uq_message_exchange')
    )
    with op.batch_alter_table('relay_session_message', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relay_session_message_session_id'), ['session_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('relay_session_message', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_session_message_session_id'))

    op.drop_table('relay_session_message')
    op.drop_table('relay_spec')
    with op.batch_alter_table('relay_effect', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_effect_spec_id'))
        batch_op.drop_index(batch_op.f('ix_relay_effect_key'))

    op.drop_table('relay_effect')
    with op.batch_alter_table('relay_agent_session', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_agent_session_spec_id'))

    op.drop_table('relay_agent_session')
