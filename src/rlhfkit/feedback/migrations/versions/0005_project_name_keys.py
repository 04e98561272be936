"""Project names unique ignoring case, Unicode form and spacing: `projects.name_key`, uniquely indexed.

"Top5", "top5 " and fullwidth "Ｔｏｐ５" read as one name on the dashboard (HTML collapses spaces, too),
so the store now refuses a new project whose key another project has. Unlike user names (0003),
look-alike projects already in a database do not stop the upgrade: a project is found by its
id, or by its exact name, so two of them are not ambiguous, and refusing to open the database
would stop the service over a naming matter. The oldest project of each such group gets the
key, the others keep a NULL key (a unique index allows many NULLs on SQLite and PostgreSQL):
they go on working under their exact names, and no new look-alike of any of them can be made.

Revision ID: 0005
Revises: 0004
"""

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _project_key(name: str) -> str:
    # Frozen here (a migration must not change when the store does): the store's project_key.
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return " ".join(folded.split())


def upgrade() -> None:
    """Add and fill projects.name_key (the oldest project of a look-alike group only)."""
    conn = op.get_bind()
    # Added nullable and indexed, not altered: SQLite would have to copy the table to add a NOT
    # NULL column, and projects are referenced by other tables.
    op.add_column("projects", sa.Column("name_key", sa.Text(), nullable=True))
    first_of_key: dict[str, int] = {}
    for id_, name in conn.execute(sa.text("SELECT id, name FROM projects ORDER BY id")).all():
        first_of_key.setdefault(_project_key(name), id_)
    if first_of_key:
        conn.execute(
            sa.text("UPDATE projects SET name_key = :key WHERE id = :id"),
            [{"key": key, "id": id_} for key, id_ in first_of_key.items()],
        )
    op.create_index("uq_projects_name_key", "projects", ["name_key"], unique=True)


def downgrade() -> None:
    """Drop projects.name_key."""
    op.drop_index("uq_projects_name_key", table_name="projects")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("name_key")
