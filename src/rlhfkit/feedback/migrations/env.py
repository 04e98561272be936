"""Alembic environment of the feedback store.

rlhfkit runs the migrations itself when a store is opened (rlhfkit.feedback.migrate),
passing its own connection; from the command line
`alembic -x url=sqlite:///feedback.db upgrade head` works too.
"""

from alembic import context
from sqlalchemy import create_engine

from rlhfkit.feedback.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database: alembic -x url=DATABASE_URL ...")
    engine = create_engine(url)
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
