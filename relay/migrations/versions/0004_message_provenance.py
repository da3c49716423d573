"""Gate 2 keeps its record (relay_gate_record: re-checks and decisions), and recorded answers carry their provenance: the prompt version, the upstream degraded steps they
were computed from (tainted_by) and, once a degraded answer is re-checked, who verified it.

The source/trust columns exist since 0001; from this revision on they are filled truthfully
(source fallback, trust degraded for a fallback model's answer).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'relay_gate_record',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('spec_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('iteration', sa.Integer(), nullable=False),
        sa.Column('key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('step_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('model', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('output', sa.JSON(), nullable=True),
        sa.Column('agree', sa.Boolean(), nullable=True),
        sa.Column('diff', sa.JSON(), nullable=True),
        sa.Column('decision', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('decided_by', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('spec_id', 'key', name='uq_gate_record_key'),
    )
    with op.batch_alter_table('relay_gate_record', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_relay_gate_record_spec_id'), ['spec_id'], unique=False)
    with op.batch_alter_table('relay_session_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tainted_by', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('prompt_version', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.add_column(sa.Column('verified_by', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('relay_gate_record', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_relay_gate_record_spec_id'))
    op.drop_table('relay_gate_record')
    with op.batch_alter_table('relay_session_message', schema=None) as batch_op:
        batch_op.drop_column('verified_by')
        batch_op.drop_column('prompt_version')
        batch_op.drop_column('tainted_by')
