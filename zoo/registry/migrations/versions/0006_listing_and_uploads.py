"""each model's `zoo list --json` line, kept with the model; LFS uploads awaiting their commit

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('models', sa.Column('listing', sa.Text(), nullable=True))
    op.create_table('hub_uploads',
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('oid', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['repo_pk'], ['hub_repos.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('repo_pk', 'oid')
    )
    # The lines of the models already registered, written as `zoo list --json` reads them.
    from zoo.registry.listing import relist

    relist(op.get_bind().connection.dbapi_connection)


def downgrade() -> None:
    op.drop_table('hub_uploads')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('listing')
