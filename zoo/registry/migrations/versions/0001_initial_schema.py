"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26
"""

from alembic import op
import sqlalchemy as sa

# Counts of bytes and parameters are BIGINT on PostgreSQL (INTEGER is 64-bit on SQLite).


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('base_id', sa.Integer(), nullable=True),
    sa.Column('form', sa.String(length=16), nullable=False),
    sa.Column('model_type', sa.String(length=64), nullable=True),
    sa.Column('hidden_size', sa.Integer(), nullable=True),
    sa.Column('num_layers', sa.Integer(), nullable=True),
    sa.Column('num_heads', sa.Integer(), nullable=True),
    sa.Column('num_kv_heads', sa.Integer(), nullable=True),
    sa.Column('vocab_size', sa.Integer(), nullable=True),
    sa.Column('architecture', sa.JSON(), nullable=True),
    sa.Column('tensor_count', sa.Integer(), nullable=False),
    sa.Column('param_count', sa.Integer().with_variant(sa.BigInteger(), 'postgresql'), nullable=False),
    sa.Column('total_bytes', sa.Integer().with_variant(sa.BigInteger(), 'postgresql'), nullable=False),
    sa.Column('dtypes', sa.JSON(), nullable=False),
    sa.Column('source_type', sa.String(length=16), nullable=False),
    sa.Column('source_path', sa.Text(), nullable=True),
    sa.Column('hub_repo', sa.String(length=256), nullable=True),
    sa.Column('hub_revision', sa.String(length=64), nullable=True),
    sa.Column('in_place', sa.Boolean(), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('base', 'expert', 'adapter', 'merged', 'protected')", name='ck_models_kind'),
    sa.ForeignKeyConstraint(['base_id'], ['models.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_models_name_version')
    )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_models_base_id'), ['base_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_models_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_models_name'), ['name'], unique=False)

    op.create_table('tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('data_sha256', sa.String(length=64), nullable=True),
    sa.Column('data_format', sa.String(length=32), nullable=True),
    sa.Column('splits', sa.JSON(), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('relpath', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer().with_variant(sa.BigInteger(), 'postgresql'), nullable=False),
    sa.Column('external_path', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_id', 'relpath', name='uq_files_model_relpath')
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_files_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_files_sha256'), ['sha256'], unique=False)

    op.create_table('lineage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('parent_ref', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['child_id'], ['models.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['models.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lineage_child_id'), ['child_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lineage_parent_id'), ['parent_id'], unique=False)

    op.create_table('metrics',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=True),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('split', sa.String(length=32), nullable=True),
    sa.Column('dataset', sa.String(length=256), nullable=True),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_metrics_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_metrics_task_id'), ['task_id'], unique=False)

    op.create_table('model_tags',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=128), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'tag')
    )
    with op.batch_alter_table('model_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_tags_tag'), ['tag'], unique=False)

    op.create_table('model_tasks',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'task_id')
    )
    with op.batch_alter_table('model_tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_tasks_task_id'), ['task_id'], unique=False)

    op.create_table('recipes',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('recipe', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id')
    )


def downgrade() -> None:
    op.drop_table('recipes')
    with op.batch_alter_table('model_tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_tasks_task_id'))

    op.drop_table('model_tasks')
    with op.batch_alter_table('model_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_tags_tag'))

    op.drop_table('model_tags')
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_metrics_task_id'))
        batch_op.drop_index(batch_op.f('ix_metrics_model_id'))

    op.drop_table('metrics')
    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lineage_parent_id'))
        batch_op.drop_index(batch_op.f('ix_lineage_child_id'))

    op.drop_table('lineage')
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_files_sha256'))
        batch_op.drop_index(batch_op.f('ix_files_model_id'))

    op.drop_table('files')
    op.drop_table('tasks')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_name'))
        batch_op.drop_index(batch_op.f('ix_models_kind'))
        batch_op.drop_index(batch_op.f('ix_models_base_id'))

    op.drop_table('models')
