"""Engines, sessions and after-commit callbacks (tasks are sent only once their rows are committed)."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.settings import Settings, get_settings

_AFTER_COMMIT = "lorajobs_after_commit"

log = logging.getLogger("lorajobs.db")


@dataclass(frozen=True)
class ConnectOptions:
    """How each PostgreSQL connection is opened (`LORAJOBS_DB_CONNECT_TIMEOUT`, `LORAJOBS_DB_PREPARED_STATEMENTS`)."""

    timeout: int = 10  # seconds for a connection to open; psycopg's own default is 130
    prepared_statements: bool = True  # off behind PgBouncer < 1.21 in transaction pooling (docs/deployment.md)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectOptions":
        return cls(settings.db_connect_timeout, settings.db_prepared_statements)


# libpq's TCP settings on every PostgreSQL connection: a peer that vanished without a word (a network that drops
# packets, a host gone) is noticed within about a minute, by keepalive probes while the connection waits and by the
# user timeout while a write stays unacknowledged, instead of when the kernel's retransmissions give up (15 minutes)
# or, for a connection waiting on an answer, never. A live server's kernel answers both, however long a query runs.
TCP_SETTINGS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                "tcp_user_timeout": 60_000}


def postgres_connect_args(url: str, options: ConnectOptions) -> dict:
    """psycopg's arguments for `options`; a libpq parameter written in the URL's query (`?connect_timeout=5`) wins."""
    query = make_url(url).query
    args = {key: value for key, value in {"connect_timeout": options.timeout, **TCP_SETTINGS}.items()
            if key not in query}
    if not options.prepared_statements:
        args["prepare_threshold"] = None  # psycopg prepares a query on its 5th run by default
    return args


def _connect_options(connect: ConnectOptions | None) -> ConnectOptions:
    return connect or ConnectOptions.from_settings(get_settings())


@dataclass(frozen=True)
class PoolConfig:
    """A process's connection budget: a fixed pool, no overflow (opening and closing connections per request under
    load left PostgreSQL counting backends still shutting down and refusing new ones with 'too many clients').

    `connect` None: how connections open comes from the process's settings (`get_settings()`, the environment).
    """

    size: int = 4  # workers and the sweeper use a connection or two at a time
    timeout: float = 30.0
    connect: ConnectOptions | None = None


WORKER_POOL = PoolConfig()


def make_engine(url: str, pool: PoolConfig = PoolConfig()) -> Engine:
    """An engine; SQLite gets WAL and a busy timeout because the API and the worker write at once; PostgreSQL gets a
    connect timeout, TCP keepalives and, where configured, no prepared statements (`ConnectOptions`)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            # Let SQLAlchemy emit BEGIN itself so SAVEPOINTs work (SQLAlchemy's pysqlite recipe).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = postgres_connect_args(url, _connect_options(pool.connect)) if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=pool.size, max_overflow=0, pool_timeout=pool.timeout,
                         connect_args=connect_args)


@lru_cache
def _session_factory(url: str, pool: PoolConfig) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url, pool), expire_on_commit=False)


def session_factory(url: str, pool: PoolConfig = WORKER_POOL) -> sessionmaker[Session]:
    return _session_factory(url, pool)


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's current transaction has committed; dropped on rollback."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    """Each callback runs once; one that fails (the broker unreachable) is logged and the rest still run.

    The rows are committed by now: failing the request would answer an error for work that was accepted. Every
    callback is a message or a cleanup the sweep or the garbage collection redoes (docs/operations.md).
    """
    callbacks = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.warning("an after-commit step failed; the sweep or the garbage collection will redo it",
                        exc_info=True)


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


@contextmanager
def transaction(url: str, pool: PoolConfig = WORKER_POOL) -> Iterator[Session]:
    """A session whose transaction commits when the block ends and rolls back on error; `pool` sizes its engine
    (the API passes its own, sized to the requests it runs at once)."""
    session = _session_factory(url, pool)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def connection_budget_problem(url: str, processes: int, pool_size: int, reserved: int,
                               max_connections: int | None = None,
                               connect: ConnectOptions | None = None) -> str | None:
    """Why `processes` API processes of `pool_size` connections cannot fit the PostgreSQL server, or None.

    The rule (docs/deployment.md): processes x pool <= max_connections - superuser_reserved_connections - reserved,
    the last being what workers, the sweeper and migrations keep. A given `max_connections` (PgBouncer's
    max_client_conn, behind which the server's own limit does not apply) replaces the server's pair.
    """
    if not url.startswith("postgresql"):
        return None
    if max_connections is not None:
        server, superuser = max_connections, 0
    else:
        from sqlalchemy import text

        engine = create_engine(url, poolclass=NullPool,
                               connect_args=postgres_connect_args(url, _connect_options(connect)))
        try:
            with engine.connect() as conn:
                server = int(conn.execute(text("SHOW max_connections")).scalar_one())
                superuser = int(conn.execute(text("SHOW superuser_reserved_connections")).scalar_one())
        finally:
            engine.dispose()
    available = server - superuser - reserved
    if processes * pool_size <= available:
        return None
    return (f"{processes} API processes x LORAJOBS_DB_POOL_SIZE {pool_size} = {processes * pool_size} connections, but "
            f"the server allows {server} (max_connections) - {superuser} (superuser_reserved_connections) - {reserved} "
            f"(LORAJOBS_DB_RESERVED_CONNECTIONS) = {available}. Lower the pool or the processes, raise max_connections, "
            "or put PgBouncer in front (docs/deployment.md).")
