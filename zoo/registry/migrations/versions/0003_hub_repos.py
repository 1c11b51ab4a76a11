"""hub repositories served by zoo serve

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from alembic import op
import sqlalchemy as sa

# Counts of bytes and parameters are BIGINT on PostgreSQL (INTEGER is 64-bit on SQLite).


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hub_repos',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_type', sa.String(length=16), nullable=False),
    sa.Column('repo_id', sa.String(length=256), nullable=False),
    sa.Column('private', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('repo_type', 'repo_id', name='uq_hub_repos_type_id')
    )
    op.create_table('hub_commits',
    sa.Column('sha', sa.String(length=40), nullable=False),
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('parent_sha', sa.String(length=40), nullable=True),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('author', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['repo_pk'], ['hub_repos.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sha')
    )
    op.create_index('ix_hub_commits_repo_pk', 'hub_commits', ['repo_pk'])
    op.create_table('hub_entries',
    sa.Column('commit_sha', sa.String(length=40), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer().with_variant(sa.BigInteger(), 'postgresql'), nullable=False),
    sa.Column('git_oid', sa.String(length=40), nullable=False),
    sa.Column('lfs', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['commit_sha'], ['hub_commits.sha'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('commit_sha', 'path')
    )
    op.create_index('ix_hub_entries_sha256', 'hub_entries', ['sha256'])
    op.create_table('hub_refs',
    sa.Column('repo_pk', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('commit_sha', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['commit_sha'], ['hub_commits.sha']),
    sa.ForeignKeyConstraint(['repo_pk'], ['hub_repos.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('repo_pk', 'name')
    )


def downgrade() -> None:
    op.drop_table('hub_refs')
    op.drop_index('ix_hub_entries_sha256', 'hub_entries')
    op.drop_table('hub_entries')
    op.drop_index('ix_hub_commits_repo_pk', 'hub_commits')
    op.drop_table('hub_commits')
    op.drop_table('hub_repos')
