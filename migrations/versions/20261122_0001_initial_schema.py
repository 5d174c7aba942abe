"""Initial schema: users, credentials, batches, prompts, samples, tasks, labels, runs, models.

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 11:08:50.559855
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('login_failures',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('ip', sa.String(length=64), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_login_failures'))
    )
    op.create_index('ix_login_failures_at', 'login_failures', ['at'], unique=False)
    op.create_index(op.f('ix_login_failures_ip'), 'login_failures', ['ip'], unique=False)
    op.create_index(op.f('ix_login_failures_username'), 'login_failures', ['username'], unique=False)
    op.create_table('model_versions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('parent_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('lineage', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('data_snapshot', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('artifact_path', sa.Text(), nullable=False),
    sa.Column('training_run_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('base', 'sft', 'rm', 'policy')", name=op.f('ck_model_versions_kind')),
    sa.CheckConstraint("status IN ('training', 'ready', 'failed', 'promoted', 'retired')", name=op.f('ck_model_versions_status')),
    sa.ForeignKeyConstraint(['parent_id'], ['model_versions.id'], name=op.f('fk_model_versions_parent_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('name', name=op.f('uq_model_versions_name'))
    )
    op.create_index('uq_model_versions_one_promoted', 'model_versions', ['kind'], unique=True, postgresql_where=sa.text("status = 'promoted'"), sqlite_where=sa.text("status = 'promoted'"))
    op.create_table('users',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('is_active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('held_out', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("role IN ('labeler', 'admin')", name=op.f('ck_users_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_index(op.f('ix_api_tokens_user_id'), 'api_tokens', ['user_id'], unique=False)
    op.create_table('prompt_batches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('guidelines', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('wants_demonstrations', sa.Boolean(), nullable=False),
    sa.Column('wants_rankings', sa.Boolean(), nullable=False),
    sa.Column('allow_prompt_writing', sa.Boolean(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('overlap', sa.Integer(), nullable=False),
    sa.Column('extra_overlap_fraction', sa.Float(), nullable=False),
    sa.Column('extra_overlap', sa.Integer(), nullable=False),
    sa.Column('temperature', sa.Float(), nullable=False),
    sa.Column('top_p', sa.Float(), nullable=False),
    sa.Column('max_new_tokens', sa.Integer(), nullable=False),
    sa.Column('policy_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('pii_policy', sa.String(length=8), nullable=False),
    sa.Column('hygiene_report', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_by_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("pii_policy IN ('drop', 'redact', 'flag')", name=op.f('ck_prompt_batches_pii_policy')),
    sa.CheckConstraint("status IN ('draft', 'sampling', 'labeling', 'paused', 'completed', 'archived')", name=op.f('ck_prompt_batches_status')),
    sa.CheckConstraint('extra_overlap_fraction >= 0 AND extra_overlap_fraction <= 1', name=op.f('ck_prompt_batches_extra_fraction')),
    sa.CheckConstraint('k BETWEEN 4 AND 9', name=op.f('ck_prompt_batches_k_range')),
    sa.CheckConstraint('max_new_tokens BETWEEN 1 AND 4096', name=op.f('ck_prompt_batches_max_new_tokens')),
    sa.CheckConstraint('overlap >= 1', name=op.f('ck_prompt_batches_overlap_positive')),
    sa.CheckConstraint('temperature >= 0 AND top_p > 0 AND top_p <= 1', name=op.f('ck_prompt_batches_sampling')),
    sa.CheckConstraint('wants_demonstrations OR wants_rankings', name=op.f('ck_prompt_batches_some_task_kind')),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_prompt_batches_created_by_id_users')),
    sa.ForeignKeyConstraint(['policy_version_id'], ['model_versions.id'], name=op.f('fk_prompt_batches_policy_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompt_batches')),
    sa.UniqueConstraint('name', name=op.f('uq_prompt_batches_name'))
    )
    op.create_table('user_sessions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('user_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_user_sessions_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_user_sessions')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_user_sessions_token_hash'))
    )
    op.create_index(op.f('ix_user_sessions_user_id'), 'user_sessions', ['user_id'], unique=False)
    op.create_table('prompts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('source_user_id', sa.String(length=200), nullable=True),
    sa.Column('category', sa.String(length=16), nullable=False),
    sa.Column('split', sa.String(length=8), nullable=False),
    sa.Column('normalized_key', sa.String(length=64), nullable=False),
    sa.Column('prefix_key', sa.String(length=64), nullable=True),
    sa.Column('metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('pii_flags', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('source_line', sa.Integer(), nullable=True),
    sa.Column('author_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("category IN ('plain', 'few-shot', 'user-based')", name=op.f('ck_prompts_category')),
    sa.CheckConstraint("split IN ('train', 'valid', 'test')", name=op.f('ck_prompts_split')),
    sa.CheckConstraint('length(text) > 0', name=op.f('ck_prompts_text_not_empty')),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], name=op.f('fk_prompts_author_id_users')),
    sa.ForeignKeyConstraint(['batch_id'], ['prompt_batches.id'], name=op.f('fk_prompts_batch_id_prompt_batches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prompts'))
    )
    op.create_index(op.f('ix_prompts_batch_id'), 'prompts', ['batch_id'], unique=False)
    op.create_index(op.f('ix_prompts_normalized_key'), 'prompts', ['normalized_key'], unique=False)
    op.create_index(op.f('ix_prompts_prefix_key'), 'prompts', ['prefix_key'], unique=False)
    op.create_index(op.f('ix_prompts_source_user_id'), 'prompts', ['source_user_id'], unique=False)
    op.create_table('training_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('params', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('checkpoint_dir', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('traceback', sa.Text(), nullable=True),
    sa.Column('triggered_by', sa.String(length=32), nullable=False),
    sa.Column('output_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('pretrain', 'sample', 'sft', 'rm', 'ppo')", name=op.f('ck_training_runs_kind')),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_training_runs_status')),
    sa.CheckConstraint('progress >= 0 AND progress <= 1', name=op.f('ck_training_runs_progress_range')),
    sa.ForeignKeyConstraint(['batch_id'], ['prompt_batches.id'], name=op.f('fk_training_runs_batch_id_prompt_batches')),
    sa.ForeignKeyConstraint(['output_version_id'], ['model_versions.id'], name=op.f('fk_training_runs_output_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs'))
    )
    op.create_index(op.f('ix_training_runs_batch_id'), 'training_runs', ['batch_id'], unique=False)
    op.create_index('ix_training_runs_unsent', 'training_runs', ['status', 'enqueued_at'], unique=False)
    op.create_index('uq_training_runs_one_active', 'training_runs', ['kind'], unique=True, postgresql_where=sa.text("status IN ('queued', 'running') AND kind IN ('sft', 'rm', 'ppo')"), sqlite_where=sa.text("status IN ('queued', 'running') AND kind IN ('sft', 'rm', 'ppo')"))
    op.create_table('completions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prompt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('model_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('sampling', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_completions_model_version_id_model_versions')),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_completions_prompt_id_prompts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_completions'))
    )
    op.create_index(op.f('ix_completions_model_version_id'), 'completions', ['model_version_id'], unique=False)
    op.create_index(op.f('ix_completions_prompt_id'), 'completions', ['prompt_id'], unique=False)
    op.create_table('tasks',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prompt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('k', sa.Integer(), nullable=True),
    sa.Column('needed', sa.Integer(), nullable=False),
    sa.Column('done_count', sa.Integer(), nullable=False),
    sa.Column('is_open', sa.Boolean(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('is_gold', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind <> 'ranking' OR (k BETWEEN 4 AND 9)", name=op.f('ck_tasks_ranking_k')),
    sa.CheckConstraint("kind IN ('demonstration', 'ranking', 'eval')", name=op.f('ck_tasks_kind')),
    sa.CheckConstraint('done_count >= 0 AND done_count <= needed', name=op.f('ck_tasks_done_count')),
    sa.CheckConstraint('needed >= 1', name=op.f('ck_tasks_needed_positive')),
    sa.ForeignKeyConstraint(['batch_id'], ['prompt_batches.id'], name=op.f('fk_tasks_batch_id_prompt_batches'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_tasks_prompt_id_prompts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('prompt_id', 'kind', name='uq_tasks_prompt_kind')
    )
    op.create_index(op.f('ix_tasks_batch_id'), 'tasks', ['batch_id'], unique=False)
    op.create_index('ix_tasks_open', 'tasks', ['is_open', 'priority', 'id'], unique=False)
    op.create_table('assignments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('labeler_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('leased_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('skip_reason', sa.String(length=64), nullable=True),
    sa.Column('skip_note', sa.Text(), nullable=True),
    sa.Column('draft', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('display_order', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('active_seconds', sa.Float(), nullable=False),
    sa.CheckConstraint("state IN ('leased', 'submitted', 'skipped', 'expired')", name=op.f('ck_assignments_state')),
    sa.ForeignKeyConstraint(['labeler_id'], ['users.id'], name=op.f('fk_assignments_labeler_id_users')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_assignments_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_assignments')),
    sa.UniqueConstraint('task_id', 'labeler_id', name='uq_assignments_task_labeler')
    )
    op.create_index('ix_assignments_expiry', 'assignments', ['state', 'expires_at'], unique=False)
    op.create_index('ix_assignments_labeler_state', 'assignments', ['labeler_id', 'state'], unique=False)
    op.create_table('task_items',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('completion_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['completion_id'], ['completions.id'], name=op.f('fk_task_items_completion_id_completions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_items_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_task_items')),
    sa.UniqueConstraint('task_id', 'completion_id', name='uq_task_items_task_completion')
    )
    op.create_index(op.f('ix_task_items_task_id'), 'task_items', ['task_id'], unique=False)
    op.create_table('demonstrations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('assignment_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prompt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('labeler_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('active_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['assignment_id'], ['assignments.id'], name=op.f('fk_demonstrations_assignment_id_assignments')),
    sa.ForeignKeyConstraint(['labeler_id'], ['users.id'], name=op.f('fk_demonstrations_labeler_id_users')),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_demonstrations_prompt_id_prompts')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_demonstrations_task_id_tasks')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_demonstrations')),
    sa.UniqueConstraint('assignment_id', name=op.f('uq_demonstrations_assignment_id'))
    )
    op.create_index(op.f('ix_demonstrations_created_at'), 'demonstrations', ['created_at'], unique=False)
    op.create_index(op.f('ix_demonstrations_labeler_id'), 'demonstrations', ['labeler_id'], unique=False)
    op.create_index(op.f('ix_demonstrations_prompt_id'), 'demonstrations', ['prompt_id'], unique=False)
    op.create_index(op.f('ix_demonstrations_task_id'), 'demonstrations', ['task_id'], unique=False)
    op.create_table('rankings',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('assignment_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('task_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prompt_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('labeler_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('all_unacceptable', sa.Boolean(), nullable=False),
    sa.Column('is_gold', sa.Boolean(), nullable=False),
    sa.Column('active_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['assignment_id'], ['assignments.id'], name=op.f('fk_rankings_assignment_id_assignments')),
    sa.ForeignKeyConstraint(['labeler_id'], ['users.id'], name=op.f('fk_rankings_labeler_id_users')),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompts.id'], name=op.f('fk_rankings_prompt_id_prompts')),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_rankings_task_id_tasks')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rankings')),
    sa.UniqueConstraint('assignment_id', name=op.f('uq_rankings_assignment_id'))
    )
    op.create_index(op.f('ix_rankings_created_at'), 'rankings', ['created_at'], unique=False)
    op.create_index(op.f('ix_rankings_labeler_id'), 'rankings', ['labeler_id'], unique=False)
    op.create_index(op.f('ix_rankings_prompt_id'), 'rankings', ['prompt_id'], unique=False)
    op.create_index(op.f('ix_rankings_task_id'), 'rankings', ['task_id'], unique=False)
    op.create_table('ranking_items',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('ranking_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('completion_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('likert', sa.Integer(), nullable=False),
    sa.Column('flags', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.CheckConstraint('likert BETWEEN 1 AND 7', name=op.f('ck_ranking_items_likert_range')),
    sa.CheckConstraint('position BETWEEN 0 AND 8', name=op.f('ck_ranking_items_position_range')),
    sa.CheckConstraint('rank BETWEEN 1 AND 9', name=op.f('ck_ranking_items_rank_range')),
    sa.ForeignKeyConstraint(['completion_id'], ['completions.id'], name=op.f('fk_ranking_items_completion_id_completions')),
    sa.ForeignKeyConstraint(['ranking_id'], ['rankings.id'], name=op.f('fk_ranking_items_ranking_id_rankings'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ranking_items')),
    sa.UniqueConstraint('ranking_id', 'completion_id', name='uq_ranking_items_ranking_completion')
    )
    op.create_index(op.f('ix_ranking_items_ranking_id'), 'ranking_items', ['ranking_id'], unique=False)
    # model_versions and training_runs point at each other; the second edge is added once both exist.
    with op.batch_alter_table('model_versions') as batch:
        batch.create_foreign_key(
            op.f('fk_model_versions_training_run_id_training_runs'), 'training_runs', ['training_run_id'], ['id']
        )


def downgrade() -> None:
    with op.batch_alter_table('model_versions') as batch:
        batch.drop_constraint(op.f('fk_model_versions_training_run_id_training_runs'), type_='foreignkey')
    op.drop_index(op.f('ix_ranking_items_ranking_id'), table_name='ranking_items')
    op.drop_table('ranking_items')
    op.drop_index(op.f('ix_rankings_task_id'), table_name='rankings')
    op.drop_index(op.f('ix_rankings_prompt_id'), table_name='rankings')
    op.drop_index(op.f('ix_rankings_labeler_id'), table_name='rankings')
    op.drop_index(op.f('ix_rankings_created_at'), table_name='rankings')
    op.drop_table('rankings')
    op.drop_index(op.f('ix_demonstrations_task_id'), table_name='demonstrations')
    op.drop_index(op.f('ix_demonstrations_prompt_id'), table_name='demonstrations')
    op.drop_index(op.f('ix_demonstrations_labeler_id'), table_name='demonstrations')
    op.drop_index(op.f('ix_demonstrations_created_at'), table_name='demonstrations')
    op.drop_table('demonstrations')
    op.drop_index(op.f('ix_task_items_task_id'), table_name='task_items')
    op.drop_table('task_items')
    op.drop_index('ix_assignments_labeler_state', table_name='assignments')
    op.drop_index('ix_assignments_expiry', table_name='assignments')
    op.drop_table('assignments')
    op.drop_index('ix_tasks_open', table_name='tasks')
    op.drop_index(op.f('ix_tasks_batch_id'), table_name='tasks')
    op.drop_table('tasks')
    op.drop_index(op.f('ix_completions_prompt_id'), table_name='completions')
    op.drop_index(op.f('ix_completions_model_version_id'), table_name='completions')
    op.drop_table('completions')
    op.drop_index('uq_training_runs_one_active', table_name='training_runs', postgresql_where=sa.text("status IN ('queued', 'running') AND kind IN ('sft', 'rm', 'ppo')"), sqlite_where=sa.text("status IN ('queued', 'running') AND kind IN ('sft', 'rm', 'ppo')"))
    op.drop_index('ix_training_runs_unsent', table_name='training_runs')
    op.drop_index(op.f('ix_training_runs_batch_id'), table_name='training_runs')
    op.drop_table('training_runs')
    op.drop_index(op.f('ix_prompts_source_user_id'), table_name='prompts')
    op.drop_index(op.f('ix_prompts_prefix_key'), table_name='prompts')
    op.drop_index(op.f('ix_prompts_normalized_key'), table_name='prompts')
    op.drop_index(op.f('ix_prompts_batch_id'), table_name='prompts')
    op.drop_table('prompts')
    op.drop_index(op.f('ix_user_sessions_user_id'), table_name='user_sessions')
    op.drop_table('user_sessions')
    op.drop_table('prompt_batches')
    op.drop_index(op.f('ix_api_tokens_user_id'), table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_index('uq_model_versions_one_promoted', table_name='model_versions', postgresql_where=sa.text("status = 'promoted'"), sqlite_where=sa.text("status = 'promoted'"))
    op.drop_table('model_versions')
    op.drop_index(op.f('ix_login_failures_username'), table_name='login_failures')
    op.drop_index(op.f('ix_login_failures_ip'), table_name='login_failures')
    op.drop_index('ix_login_failures_at', table_name='login_failures')
    op.drop_table('login_failures')
