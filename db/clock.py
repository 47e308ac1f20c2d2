"""The database's clock: leases are stamped and compared with it, so hosts whose clocks disagree agree on leases.

A lease written with a worker's clock and judged with a sweeper's clock is wrong by their difference (a sweeper
90 s ahead requeues healthy jobs); written and judged with one clock, the database's, it cannot be.
"""

from sqlalchemy import Double, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement


class db_epoch(FunctionElement):
    """Seconds since the epoch by the database server's clock, as an SQL expression (a float)."""

    type = Double()
    inherit_cache = True


@compiles(db_epoch, "postgresql")
def _pg_epoch(element, compiler, **kw) -> str:
    # clock_timestamp(), not now(): now() is frozen at the start of the transaction.
    return "extract(epoch from clock_timestamp())::double precision"


@compiles(db_epoch, "sqlite")
def _sqlite_epoch(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


def db_now(session: Session) -> float:
    """The database's clock, read once (seconds since the epoch)."""
    return float(session.scalar(select(db_epoch())))
