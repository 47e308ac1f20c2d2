"""quotas, file deletion, OpenAI surface (placeholder: filled in by the work on issue 12)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 11:15:00
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
