"""answers, exact match, best checkpoint (placeholder: filled in by the work on issue 15)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 11:15:00
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
