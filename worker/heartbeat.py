"""Worker heartbeats: every worker process says, every few seconds, which queues it consumes and from which host.

Jobs queued where nobody listens say so (db/lifecycle.py), `/readyz` and `/metrics` count workers per queue, and
`python -m worker.heartbeat` is a container's healthcheck: it succeeds while this host's worker beats.
"""

import logging
import os
import socket
import sys
import threading

from celery import signals
from sqlalchemy.orm import Session

from core.settings import get_settings
from db.repositories import workers as repo
from db.session import PoolConfig, make_engine

log = logging.getLogger("lorajobs.worker.heartbeat")


class WorkerHeartbeat(threading.Thread):
    """Writes this worker's row every HEARTBEAT_SECONDS (the first at once) and deletes it on stop."""

    def __init__(self, database_url: str, node: str, queues: list[str], concurrency: int):
        super().__init__(daemon=True, name="worker-heartbeat")
        self.node, self.queues, self.concurrency = node, queues, concurrency
        # Its own one-connection engine, dropped in forked pool children: a connection must not cross a fork.
        self.engine = make_engine(database_url, PoolConfig(size=1))
        os.register_at_fork(after_in_child=lambda: self.engine.dispose(close=False))
        self.stopped = threading.Event()

    def beat(self) -> None:
        with Session(self.engine) as session, session.begin():
            repo.beat(session, node=self.node, host=socket.gethostname(), pid=os.getpid(), queues=self.queues,
                      concurrency=self.concurrency)

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # the database restarting: beat again next time, the worker keeps working
                log.warning("heartbeat failed", exc_info=True)
            if self.stopped.wait(repo.HEARTBEAT_SECONDS):
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            with Session(self.engine) as session, session.begin():
                repo.forget(session, self.node)
        except Exception:  # unreachable database: the row simply ages out
            log.warning("could not remove this worker's heartbeat", exc_info=True)


_running: list[WorkerHeartbeat] = []


@signals.worker_ready.connect
def _start(sender, **_) -> None:
    """The consumer is ready: its queues are known and the pool's children are already forked."""
    if _running:  # the consumer restarted after losing the broker: this process already beats
        return
    queues = sorted(sender.app.amqp.queues.consume_from)
    heartbeat = WorkerHeartbeat(get_settings().database_url, sender.hostname, queues,
                                getattr(sender.pool, "num_processes", None) or 1)
    heartbeat.start()
    _running.append(heartbeat)
    log.info("heartbeat started", extra={"node": sender.hostname, "queues": queues})


@signals.worker_shutdown.connect
def _stop(**_) -> None:
    while _running:
        _running.pop().stop()


def this_host_is_live(database_url: str) -> bool:
    """Whether a worker on this host has beaten recently (the container healthcheck)."""
    engine = make_engine(database_url, PoolConfig(size=1))
    try:
        with Session(engine) as session:
            return any(worker.host == socket.gethostname() for worker in repo.live(session))
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(0 if this_host_is_live(get_settings().database_url) else 1)
