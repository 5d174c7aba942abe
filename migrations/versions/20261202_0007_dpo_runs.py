"""DPO runs: the run kind `dpo`, one active at a time like the other trainers.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

OLD_RUN_KINDS = "kind IN ('pretrain', 'sample', 'sft', 'rm', 'ppo', 'validate')"
NEW_RUN_KINDS = "kind IN ('pretrain', 'sample', 'sft', 'rm', 'ppo', 'validate', 'dpo')"
OLD_ACTIVE = "status IN ('queued', 'running') AND kind IN ('sft', 'rm', 'ppo')"
NEW_ACTIVE = "status IN ('queued', 'running') AND kind IN ('sft', 'rm', 'ppo', 'dpo')"


def _one_active(where: str) -> None:
    op.drop_index('uq_training_runs_one_active', table_name='training_runs')
    op.create_index(
        'uq_training_runs_one_active',
        'training_runs',
        ['kind'],
        unique=True,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    with op.batch_alter_table('training_runs') as batch:
        batch.drop_constraint(op.f('ck_training_runs_kind'), type_='check')
        batch.create_check_constraint(op.f('ck_training_runs_kind'), NEW_RUN_KINDS)
    _one_active(NEW_ACTIVE)


def downgrade() -> None:
    # DPO runs and the policy versions they made cannot exist without the kind.
    op.execute(
        "UPDATE model_versions SET training_run_id = NULL"
        " WHERE training_run_id IN (SELECT id FROM training_runs WHERE kind = 'dpo')"
    )
    op.execute("DELETE FROM training_runs WHERE kind = 'dpo'")
    _one_active(OLD_ACTIVE)
    with op.batch_alter_table('training_runs') as batch:
        batch.drop_constraint(op.f('ck_training_runs_kind'), type_='check')
        batch.create_check_constraint(op.f('ck_training_runs_kind'), OLD_RUN_KINDS)
