"""Lease queue indexes: open tasks in lease order, so leasing never sorts every open task.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_tasks_lease_queue', 'tasks', ['kind', sa.literal_column('priority DESC'), 'id'], unique=False,
                    postgresql_where=sa.text('is_open'), sqlite_where=sa.text('is_open'))
    op.create_index('ix_tasks_lease_queue_any_kind', 'tasks', [sa.literal_column('priority DESC'), 'id'], unique=False,
                    postgresql_where=sa.text('is_open'), sqlite_where=sa.text('is_open'))


def downgrade() -> None:
    op.drop_index('ix_tasks_lease_queue_any_kind', table_name='tasks')
    op.drop_index('ix_tasks_lease_queue', table_name='tasks')
