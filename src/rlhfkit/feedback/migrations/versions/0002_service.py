"""The annotation service: users, sessions, invites, golden items, chat prompts, exclusion.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add the service tables and the new columns (existing rows get the defaults)."""
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name=op.f("fk_users_annotator_id_annotators")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "invites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.Column("used_by", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_invites_created_by_users")),
        sa.ForeignKeyConstraint(["used_by"], ["users.id"], name=op.f("fk_invites_used_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invites")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_invites_token_hash")),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_sessions_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_sessions_token_hash")),
    )
    # batch_alter_table: SQLite cannot add some columns in place; it is a no-op elsewhere.
    with op.batch_alter_table("annotators") as batch:
        batch.add_column(sa.Column("excluded", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("messages", JSON_TYPE, nullable=True))
        batch.add_column(sa.Column("is_golden", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("golden", JSON_TYPE, nullable=True))
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("correct", sa.Boolean(), nullable=True))
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("golden_rate", sa.Double(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    """Drop what upgrade added."""
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("golden_rate")
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("correct")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("golden")
        batch.drop_column("is_golden")
        batch.drop_column("messages")
    with op.batch_alter_table("annotators") as batch:
        batch.drop_column("excluded")
    for table in ("sessions", "invites", "users"):
        op.drop_table(table)
