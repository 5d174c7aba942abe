"""Gold tasks and blind evaluations: known answers mixed into queues, and side-by-side model comparisons.

Adds `gold_answers` (the known ranks of a gold task), `evaluations` and `eval_judgments` (blind A/B
verdicts), and two batch columns: `gold_share` (the share of ranking leases that serve a gold task) and
`purpose` (collection or evaluation; an evaluation's prompts live in a batch of their own).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 14:11:34.098701
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('evaluations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_a_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_b_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('n_prompts', sa.Integer(), nullable=False),
    sa.Column('overlap', sa.Integer(), nullable=False),
    sa.Column('prompt_split', sa.String(length=8), nullable=False),
    sa.Column('temperature', sa.Float(), nullable=False),
    sa.Column('max_new_tokens', sa.Integer(), nullable=False),
    sa.Column('n_identical', sa.Integer(), nullable=False),
    sa.Column('triggered_by', sa.String(length=32), nullable=False),
    sa.Column('created_by_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('sampling', 'labeling', 'completed', 'cancelled')", name=op.f('ck_evaluations_status')),
    sa.CheckConstraint('model_a_id <> model_b_id', name=op.f('ck_evaluations_two_models')),
    sa.CheckConstraint('n_prompts >= 1', name=op.f('ck_evaluations_n_prompts')),
    sa.CheckConstraint('overlap >= 1', name=op.f('ck_evaluations_overlap')),
    sa.ForeignKeyConstraint(['batch_id'], ['prompt_batches.id'], name=op.f('fk_evaluations_batch_id_prompt_batches')),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_evaluations_created_by_id_users')),
    sa.ForeignKeyConstraint(['model_a_id'], ['model_versions.id'], name=op.f('fk_evaluations_model_a_id_model_versions')),
    sa.ForeignKeyConstraint(['model_b_id'], ['model_versions.id'], name=op.f('fk_evaluations_model_b_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations')),
    sa.UniqueConstraint('batch_id', name=op.f('uq_evaluations_batch_id'))
    )
    op.create_index(op.f('ix_evaluations_model_a_id'), 'evaluations', ['model_a_id'], unique=False)
    op.create_index(op.f('ix_evaluations_model_b_id'), 'evaluations', ['model_b_id'], unique=False)
    op.create_table('eval_judgments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('evaluation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('assignment_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prompt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('labeler_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('winner', sa.String(length=4), nullable=False),
    sa.Column('chosen_completion_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('shown_first', sa.String(length=1), nullable=False),
    sa.Column('active_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("shown_first IN ('a', 'b')", name=op.f('ck_eval_judgments_shown_first')),
    sa.CheckConstraint("winner IN ('a', 'b', 'tie')", name=op.f('ck_eval_judgments_winner')),
    sa.ForeignKeyConstraint(['assignment_id'], ['assignments.id'], name=op.f('fk_eval_judgments_assignment_id_assignments')),
    sa.ForeignKeyConstraint(['chosen_completion_id'], ['completions.id'], name=op.f('fk_eval_judgments_chosen_completion_id_completions')),
    sa.ForeignKeyConstraint(['evaluation_id'], ['evaluations.id'], name=op.f('fk_eval_judgments_evaluation_id_evaluations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['labeler_id'], ['users.id'], name=op.f('fk_eval_judgments_labeler_id_users')),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_eval_judgments_prompt_id_prompts')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_eval_judgments_task_id_tasks')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_eval_judgments')),
    sa.UniqueConstraint('assignment_id', name=op.f('uq_eval_judgments_assignment_id'))
    )
    op.create_index(op.f('ix_eval_judgments_evaluation_id'), 'eval_judgments', ['evaluation_id'], unique=False)
    op.create_index(op.f('ix_eval_judgments_labeler_id'), 'eval_judgments', ['labeler_id'], unique=False)
    op.create_index(op.f('ix_eval_judgments_task_id'), 'eval_judgments', ['task_id'], unique=False)
    op.create_table('gold_answers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('ranks', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('source_ranking_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_by_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("source IN ('ranking', 'consensus')", name=op.f('ck_gold_answers_source')),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_gold_answers_created_by_id_users')),
    sa.ForeignKeyConstraint(['source_ranking_id'], ['rankings.id'], name=op.f('fk_gold_answers_source_ranking_id_rankings'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_gold_answers_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gold_answers')),
    sa.UniqueConstraint('task_id', name=op.f('uq_gold_answers_task_id'))
    )
    op.add_column('prompt_batches', sa.Column('gold_share', sa.Float(), server_default=sa.text('0'), nullable=False))
    op.add_column('prompt_batches', sa.Column('purpose', sa.String(length=16), server_default=sa.text("'collection'"), nullable=False))
    # Batch mode: SQLite (the embedded default) cannot add a CHECK constraint to an existing table.
    with op.batch_alter_table('prompt_batches') as batch:
        batch.create_check_constraint(op.f('ck_prompt_batches_purpose'), "purpose IN ('collection', 'evaluation')")
        batch.create_check_constraint(op.f('ck_prompt_batches_gold_share'), 'gold_share >= 0 AND gold_share <= 1')
    op.create_index('ix_tasks_gold', 'tasks', ['batch_id'], unique=False, postgresql_where=sa.text('is_gold'), sqlite_where=sa.text('is_gold'))


def downgrade() -> None:
    op.drop_index('ix_tasks_gold', table_name='tasks', postgresql_where=sa.text('is_gold'), sqlite_where=sa.text('is_gold'))
    with op.batch_alter_table('prompt_batches') as batch:
        batch.drop_constraint(op.f('ck_prompt_batches_gold_share'), type_='check')
        batch.drop_constraint(op.f('ck_prompt_batches_purpose'), type_='check')
        batch.drop_column('purpose')
        batch.drop_column('gold_share')
    op.drop_table('gold_answers')
    op.drop_index(op.f('ix_eval_judgments_task_id'), table_name='eval_judgments')
    op.drop_index(op.f('ix_eval_judgments_labeler_id'), table_name='eval_judgments')
    op.drop_index(op.f('ix_eval_judgments_evaluation_id'), table_name='eval_judgments')
    op.drop_table('eval_judgments')
    op.drop_index(op.f('ix_evaluations_model_b_id'), table_name='evaluations')
    op.drop_index(op.f('ix_evaluations_model_a_id'), table_name='evaluations')
    op.drop_table('evaluations')
