"""Bring your own model: versions registered from a folder or hub id, validated by a worker job.

Adds the model status `validating`, the run kind `validate`, and four model_versions columns: `source`
(the folder or hub id it was registered from), `revision`, `error` (why validation failed) and `facts`
(what validation found: architecture, parameters, dtype, context length, chat template, ...).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 15:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

OLD_MODEL_STATUSES = "status IN ('training', 'ready', 'failed', 'promoted', 'retired')"
NEW_MODEL_STATUSES = "status IN ('training', 'validating', 'ready', 'failed', 'promoted', 'retired')"
OLD_RUN_KINDS = "kind IN ('pretrain', 'sample', 'sft', 'rm', 'ppo')"
NEW_RUN_KINDS = "kind IN ('pretrain', 'sample', 'sft', 'rm', 'ppo', 'validate')"
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('model_versions') as batch:
        batch.add_column(sa.Column('source', sa.Text(), nullable=True))
        batch.add_column(sa.Column('revision', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('error', sa.Text(), nullable=True))
        # The server default fills existing rows; the application always writes the column itself.
        batch.add_column(sa.Column('facts', JSON, nullable=False, server_default=sa.text("'{}'")))
        batch.drop_constraint(op.f('ck_model_versions_status'), type_='check')
        batch.create_check_constraint(op.f('ck_model_versions_status'), NEW_MODEL_STATUSES)
    with op.batch_alter_table('model_versions') as batch:
        batch.alter_column('facts', server_default=None)
    with op.batch_alter_table('training_runs') as batch:
        batch.drop_constraint(op.f('ck_training_runs_kind'), type_='check')
        batch.create_check_constraint(op.f('ck_training_runs_kind'), NEW_RUN_KINDS)


def downgrade() -> None:
    # Rows that only the new schema allows cannot stay: validate runs go, validating versions become failed.
    op.execute(
        "UPDATE model_versions SET training_run_id = NULL"
        " WHERE training_run_id IN (SELECT id FROM training_runs WHERE kind = 'validate')"
    )
    op.execute("DELETE FROM training_runs WHERE kind = 'validate'")
    op.execute("UPDATE model_versions SET status = 'failed' WHERE status = 'validating'")
    with op.batch_alter_table('training_runs') as batch:
        batch.drop_constraint(op.f('ck_training_runs_kind'), type_='check')
        batch.create_check_constraint(op.f('ck_training_runs_kind'), OLD_RUN_KINDS)
    with op.batch_alter_table('model_versions') as batch:
        batch.drop_constraint(op.f('ck_model_versions_status'), type_='check')
        batch.create_check_constraint(op.f('ck_model_versions_status'), OLD_MODEL_STATUSES)
        batch.drop_column('facts')
        batch.drop_column('error')
        batch.drop_column('revision')
        batch.drop_column('source')
