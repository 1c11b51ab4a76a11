"""hub refs are branches or tags

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every ref a 0003 registry holds is a branch: tags arrive with this revision.
    op.add_column('hub_refs', sa.Column('kind', sa.String(length=8), nullable=False, server_default='branch'))


def downgrade() -> None:
    op.execute("DELETE FROM hub_refs WHERE kind = 'tag'")
    with op.batch_alter_table('hub_refs') as batch:
        batch.drop_column('kind')
