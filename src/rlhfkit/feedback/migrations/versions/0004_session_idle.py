"""Sessions end after a time without activity: `sessions.idle_until`.

Nullable: a session from before this revision has none, and gets one at its next request.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add sessions.idle_until."""
    # batch_alter_table: SQLite cannot add some columns in place; it is a no-op elsewhere.
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("idle_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop sessions.idle_until."""
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("idle_until")
