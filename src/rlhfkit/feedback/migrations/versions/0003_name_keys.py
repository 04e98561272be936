"""Names unique ignoring case: users and annotators get a `name_key` with a unique index.

A database that already holds two names with the same key (`Root` and `root`) is not
upgraded: the migration refuses, naming them, and changes nothing (it runs in one
transaction), so the database still opens with the rlhfkit that made it. Keeping both
would leave exactly the look-alike accounts the key is there to prevent, and make a login
by name ambiguous; merging or renaming them here would silently decide whose labels are whose.

Revision ID: 0003
Revises: 0002
"""

import unicodedata
from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _name_key(name: str) -> str:
    # Frozen here (a migration must not change when the store does): the store's name_key.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def upgrade() -> None:
    """Add and fill users.name_key and annotators.name_key; refuse names that clash."""
    conn = op.get_bind()
    for table in ("users", "annotators"):
        # Added nullable and indexed, not altered: SQLite would have to copy the table to add a
        # NOT NULL column, and users and annotators are referenced by other tables.
        op.add_column(table, sa.Column("name_key", sa.Text(), nullable=True))
        rows = conn.execute(sa.text(f"SELECT id, name FROM {table} ORDER BY id")).all()
        by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for id_, name in rows:
            by_key[_name_key(name)].append((id_, name))
        clashes = [group for group in by_key.values() if len(group) > 1]
        if clashes:
            listed = "; ".join(", ".join(f"{name!r} (id {id_})" for id_, name in group) for group in clashes)
            raise ValueError(
                f"names in table {table} differ only in case or Unicode form: {listed}. rlhfkit now "
                "treats such names as one name; rename all but one of each group (e.g. UPDATE "
                f"{table} SET name = 'root-2' WHERE id = ..., and the user or annotator of the same "
                "name), then open the database again. Nothing was changed."
            )
        if by_key:
            conn.execute(
                sa.text(f"UPDATE {table} SET name_key = :key WHERE id = :id"),
                [{"key": key, "id": group[0][0]} for key, group in by_key.items()],
            )
        op.create_index(f"uq_{table}_name_key", table, ["name_key"], unique=True)


def downgrade() -> None:
    """Drop the name keys."""
    for table in ("annotators", "users"):
        op.drop_index(f"uq_{table}_name_key", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("name_key")
