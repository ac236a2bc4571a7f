"""Alembic environment: runs migrations on the connection ``upgrade_schema`` hands in.

The server never reads an ``alembic.ini``: ``server.db.alembic_config`` points
Alembic at this package and passes an open connection in
``config.attributes["connection"]``. For ``alembic revision --autogenerate``
during development, set ``EDGEFLEET_DATABASE_URL`` instead.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from server.db import make_engine
from server.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = os.environ.get("EDGEFLEET_DATABASE_URL")
    if not url:
        raise SystemExit("set EDGEFLEET_DATABASE_URL to run alembic by hand")
    with make_engine(url).begin() as conn:
        _run(conn)
