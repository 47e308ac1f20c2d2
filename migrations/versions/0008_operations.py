"""worker heartbeats (which queues each live worker consumes, from which host); the model catalogue in the
database, its files in object storage

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 11:15:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(255), nullable=False, unique=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("last_seen_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_workers_last_seen_at", "workers", ["last_seen_at"])
    op.create_table(
        "catalogue_models",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(255), nullable=False, unique=True),
        sa.Column("architecture", sa.String(255), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("provenance", sa.Text(), nullable=True),
        sa.Column("source", sa.String(512), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("catalogue_models")
    op.drop_index("ix_workers_last_seen_at", table_name="workers")
    op.drop_table("workers")
