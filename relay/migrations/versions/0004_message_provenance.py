"""Recorded answers carry their provenance: the prompt version, the upstream degraded steps they
were computed from (tainted_by) and, once a degraded answer is re-checked, who verified it.

The source/trust columns exist since 0001; from this revision on they are filled truthfully
(source fallback, trust degraded for a fallback model's answer).

Revision ID: 0004
Revises: 0002  (re-chain onto the newest head at merge: main may have a 0003)
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0004'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('relay_session_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tainted_by', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('prompt_version', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.add_column(sa.Column('verified_by', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('relay_session_message', schema=None) as batch_op:
        batch_op.drop_column('verified_by')
        batch_op.drop_column('prompt_version')
        batch_op.drop_column('tainted_by')
