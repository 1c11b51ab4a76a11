"""users, organisations and tokens of zoo serve; repository ids unique whatever their case

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('uq_hub_repos_type_lower_id', 'hub_repos', ['repo_type', sa.text('lower(repo_id)')],
                    unique=True)
    op.create_table('hub_accounts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=96), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind in ('user', 'org')", name='ck_hub_accounts_kind'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_index('uq_hub_accounts_lower_name', 'hub_accounts', [sa.text('lower(name)')], unique=True)
    op.create_table('hub_members',
    sa.Column('org_pk', sa.Integer(), nullable=False),
    sa.Column('user_pk', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['org_pk'], ['hub_accounts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_pk'], ['hub_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('org_pk', 'user_pk')
    )
    op.create_index('ix_hub_members_user_pk', 'hub_members', ['user_pk'])
    op.create_table('hub_tokens',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('user_pk', sa.Integer(), nullable=False),
    sa.Column('scope', sa.String(length=8), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("scope in ('read', 'write')", name='ck_hub_tokens_scope'),
    sa.ForeignKeyConstraint(['user_pk'], ['hub_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('digest')
    )
    op.create_index('ix_hub_tokens_user_pk', 'hub_tokens', ['user_pk'])


def downgrade() -> None:
    op.drop_index('ix_hub_tokens_user_pk', 'hub_tokens')
    op.drop_table('hub_tokens')
    op.drop_index('ix_hub_members_user_pk', 'hub_members')
    op.drop_table('hub_members')
    op.drop_index('uq_hub_accounts_lower_name', 'hub_accounts')
    op.drop_table('hub_accounts')
    op.drop_index('uq_hub_repos_type_lower_id', 'hub_repos')
