"""files that can be deleted or expire while job history keeps their ids; deleted models; idempotency body hashes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 11:15:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.Double(), nullable=True))
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(sa.Column("idempotency_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("model_deleted_at", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("model_deleted_at")
        batch.drop_column("idempotency_hash")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("expires_at")
