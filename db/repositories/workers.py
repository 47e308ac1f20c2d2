"""Queries on worker heartbeats: who is live, and which queues have nobody consuming them."""

from sqlalchemy import case, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.clock import db_epoch
from db.models import Worker

HEARTBEAT_SECONDS = 10.0
# Three missed beats: a worker busy in a long step still beats (its own thread), a stopped one is gone in 30 s.
LIVE_SECONDS = 3 * HEARTBEAT_SECONDS + 5
FORGET_SECONDS = 24 * 3600  # rows of workers gone this long are deleted (container hostnames change every start)


def beat(session: Session, *, node: str, host: str, pid: int, queues: list[str], concurrency: int) -> None:
    """Insert or refresh this worker's row, stamped with the database's clock."""
    values = {"id": node, "host": host, "pid": pid, "queues": sorted(queues), "concurrency": concurrency,
              "started_at": db_epoch(), "last_seen_at": db_epoch()}
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(Worker).values(**values)
    refreshed = {key: stmt.excluded[key] for key in ("host", "pid", "queues", "concurrency", "last_seen_at")}
    # A restarted worker (a new pid under the same node name) starts again.
    refreshed["started_at"] = case((Worker.pid == stmt.excluded.pid, Worker.started_at), else_=stmt.excluded.started_at)
    session.execute(stmt.on_conflict_do_update(index_elements=[Worker.id], set_=refreshed))
    session.execute(delete(Worker).where(Worker.last_seen_at < db_epoch() - FORGET_SECONDS))


def forget(session: Session, node: str) -> None:
    """A worker that stops says so: its queues lose it at once, not after LIVE_SECONDS."""
    session.execute(delete(Worker).where(Worker.id == node))


def live(session: Session) -> list[Worker]:
    """Workers whose last heartbeat is recent, by node name."""
    return list(session.scalars(select(Worker).where(Worker.last_seen_at >= db_epoch() - LIVE_SECONDS)
                                .order_by(Worker.id)))


def workers_by_queue(session: Session) -> dict[str, int]:
    """How many live workers consume each queue."""
    counts: dict[str, int] = {}
    for worker in live(session):
        for name in worker.queues:
            counts[name] = counts.get(name, 0) + 1
    return counts


def unserved_message(session: Session, queue_name: str, class_name: str | None = None) -> str | None:
    """What a job queued on `queue_name` should be told when no live worker consumes it; None when one does."""
    if queue_name in workers_by_queue(session):
        return None
    where = class_name or queue_name
    return (f"No live worker serves {where} (queue {queue_name}): the job waits until one starts. "
            "Start a worker for it (docs/deployment.md).")
