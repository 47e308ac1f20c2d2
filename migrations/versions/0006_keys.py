"""keys, sessions and secrets: peppered key hashes, read-only keys, server-side dashboard sessions

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 11:15:00

Existing keys keep their plain sha256 (`hash_scheme` 'sha256'): the clear key is needed to compute the
peppered HMAC, so each is rehashed the next time it is used (api/services/projects.py).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("hash_scheme", sa.String(length=16), nullable=False, server_default="sha256"))
        batch.add_column(sa.Column("read_only", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "dashboard_sessions",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index(op.f("ix_dashboard_sessions_api_key_id"), "dashboard_sessions", ["api_key_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_dashboard_sessions_api_key_id"), table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("read_only")
        batch.drop_column("hash_scheme")
