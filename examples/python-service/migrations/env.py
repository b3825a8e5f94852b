"""Alembic's env.py for a service whose replicas all run `alembic upgrade head` when they start.

A whole file: it replaces the env.py that `alembic init` generates (set `target_metadata` to your
models' metadata). The replicas take turns: before it reads the database, each takes the
PostgreSQL advisory lock that `pglock run migrations` takes, so one migrates while the others
wait, then find nothing left to do. Run under `pglock run migrations -- alembic upgrade head`,
it finds that pglock holds the lock for it already and does not take it a second time (that
would wait for itself). Works with every SQLAlchemy PostgreSQL driver, async ones included.
"""

import asyncio
import hashlib
import logging.config
import os

from alembic import context
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from shop.models import Base

# What `alembic revision --autogenerate` compares the database with: your models' metadata.
target_metadata = Base.metadata

# Tables that other tools keep in this database. Autogenerate proposes to drop every table no
# model describes; it must leave these alone. `pglock leader` keeps its fencing terms in
# pglock_leader_terms: dropping it would start every leadership's terms again from the first,
# below the terms already handed out.
NOT_OURS = {"pglock_leader_terms"}

# How long a replica waits for another replica's migrations before it gives up (the error is
# SQLSTATE 55P03, "canceling statement due to lock timeout").
LOCK_TIMEOUT = os.environ.get("MIGRATIONS_LOCK_TIMEOUT", "10min")

config = context.config
if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name)

url = make_url(os.environ["DATABASE_URL"])


def pglock_key(name: str) -> int:
    """pglock's key for a lock name (docs/keys.md)."""
    digest = hashlib.sha256(b"pglock:v1:" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# `pglock status` shows this lock by its key only, as nothing in this session's
# application_name names it: `pglock status --known migrations` shows the name.
MIGRATIONS_KEY = pglock_key("migrations")  # 5222762659125900503


def include_name(name, type_, parent_names) -> bool:
    """Autogenerate's filter: neither reflects nor compares the tables in NOT_OURS."""
    return not (type_ == "table" and name in NOT_OURS)


def held_by_pglock() -> bool:
    """Whether this runs under `pglock run migrations`, which holds the lock already."""
    return (
        os.environ.get("PGLOCK_KEY") == str(MIGRATIONS_KEY)
        and os.environ.get("PGLOCK_MODE") == "exclusive"
    )


def migrate(connection: Connection) -> None:
    if not held_by_pglock():
        # Wait for the lock in a transaction of its own, where SET LOCAL bounds this wait only:
        # the migrations' own statements keep the server's lock_timeout. The lock is a session
        # lock: it outlives this transaction and the migrations' commits, and goes with the
        # connection, which run_migrations_online closes whatever happens.
        with connection.begin():
            connection.execute(
                text("SELECT set_config('lock_timeout', :timeout, true)"),
                {"timeout": LOCK_TIMEOUT},
            )
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATIONS_KEY})
    # Whatever else reads or writes the database goes below the lock, including statements
    # that look idempotent: CREATE SCHEMA IF NOT EXISTS (for a version_table_schema) or CREATE
    # EXTENSION IF NOT EXISTS, run by several replicas at once, fail on a duplicate key too.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


async def migrate_async() -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(migrate)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """`alembic upgrade head`. NullPool: closing the connection ends the session, and frees the
    lock, when the migrations end, succeeded or not."""
    if url.get_dialect().is_async:
        asyncio.run(migrate_async())
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            migrate(connection)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: prints the SQL; connects to nothing, so takes no lock."""
    context.configure(
        url=url,
        target_metadata=target_metadata,
        include_name=include_name,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
