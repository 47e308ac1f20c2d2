"""every job and file state has an exit: resends counted apart from attempts, file validations resent

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 11:15:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("resend_at", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("resend_at")
        batch.drop_column("resends")
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("resends")
