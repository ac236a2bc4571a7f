"""Database engines, sessions and schema upgrades for SQLite and PostgreSQL.

Flow: ``make_engine(url)`` returns an engine configured for its dialect;
``upgrade_schema(engine)`` runs the Alembic migrations shipped in
``server/migrations`` up to head; ``session_factory(engine)`` hands out
sessions for one unit of work each.

Invariants:

* SQLite runs in WAL mode with foreign keys on, a 30 s busy timeout, and every
  transaction opened with ``BEGIN IMMEDIATE``: writers queue on the database
  lock instead of failing later on a stale snapshot (pysqlite's own
  transaction handling is switched off, as the SQLAlchemy docs recommend).
* On PostgreSQL, schema upgrades take a transaction-level advisory lock, so
  several replicas starting at once upgrade the schema exactly once.
* Every ``UTCDateTime`` column reads back as an aware UTC datetime on both
  dialects.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

__all__ = [
    "UTCDateTime",
    "is_postgres",
    "make_engine",
    "normalize_url",
    "session_factory",
    "transaction_lock",
    "upgrade_schema",
]

# Keys of PostgreSQL advisory locks (arbitrary, fixed, distinct).
LOCK_SCHEMA = 0x6566_0001
LOCK_AUDIT = 0x6566_0002
LOCK_BROKER_FILES = 0x6566_0003


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for ``postgresql://`` URLs."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


def is_postgres(engine_or_session: Engine | Session) -> bool:
    bind = (
        engine_or_session.get_bind()
        if isinstance(engine_or_session, Session)
        else engine_or_session
    )
    return bind.dialect.name == "postgresql"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for a SQLite or PostgreSQL URL.

    Raises:
        sqlalchemy.exc.ArgumentError: the URL cannot be parsed.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (routes serialize after it)."""
    return sessionmaker(engine, expire_on_commit=False)


def transaction_lock(session: Session, key: int) -> None:
    """Serialize a critical section across replicas until the transaction ends.

    PostgreSQL: ``pg_advisory_xact_lock``. SQLite needs nothing: every
    transaction already holds the database's write lock (``BEGIN IMMEDIATE``).
    """
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def alembic_config() -> Any:
    """An Alembic ``Config`` whose scripts are the ones inside the installed package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "server:migrations")
    return cfg


def upgrade_schema(engine: Engine) -> str:
    """Create or upgrade the schema to the newest migration; return its revision.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused a statement.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_SCHEMA})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        revision = MigrationContext.configure(conn).get_current_revision()
    return str(revision)
