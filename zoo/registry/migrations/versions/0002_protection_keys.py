"""protection keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('protection_keys',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=False),
    sa.Column('key', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id')
    )


def downgrade() -> None:
    op.drop_table('protection_keys')
