"""Conversations: a prompt is an ordered list of messages ending with a user turn.

Adds `prompts.messages` (JSON: [{"role", "content"}, ...]). Every existing prompt becomes the
one-message conversation [{"role": "user", "content": text}], so nothing is lost, and `text` stays
the last user message for every reader that only wants the question. Downgrading drops the column:
a multi-turn prompt keeps only its last user message (in `text`), its earlier turns are lost.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 17:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('prompts') as batch:
        batch.add_column(sa.Column('messages', JSON, nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(
            "UPDATE prompts SET messages = jsonb_build_array(jsonb_build_object('role', 'user', 'content', text))"
        )
    else:
        op.execute("UPDATE prompts SET messages = json_array(json_object('role', 'user', 'content', text))")
    with op.batch_alter_table('prompts') as batch:
        batch.alter_column('messages', existing_type=JSON, nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('prompts') as batch:
        batch.drop_column('messages')
