"""Worker heartbeats on the real database: who is live, which queues nobody serves, and the container healthcheck."""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import update

from db.migrate import upgrade
from db.models import Worker
from db.repositories import workers as repo
from db.session import transaction

ROOT = Path(__file__).resolve().parent.parent.parent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def age(url: str, node: str, seconds: float) -> None:
    with transaction(url) as session:
        session.execute(update(Worker).where(Worker.id == node).values(last_seen_at=Worker.last_seen_at - seconds))


def test_a_beating_worker_serves_its_queues_until_it_stops_or_goes_quiet(settings):
    url, queue, node = settings.database_url, unique("q"), unique("gpu0") + "@host-a"
    with transaction(url) as session:
        assert "No live worker serves gpu-x (queue " + queue + ")" in repo.unserved_message(session, queue, "gpu-x")
        repo.beat(session, node=node, host="host-a", pid=11, queues=[queue, "cpu"], concurrency=1)
    with transaction(url) as session:
        assert repo.unserved_message(session, queue) is None
        assert repo.workers_by_queue(session)[queue] == 1
        mine = next(w for w in repo.live(session) if w.id == node)
        assert (mine.host, mine.pid, mine.queues) == ("host-a", 11, sorted([queue, "cpu"]))
        first_started = mine.started_at
    # Beating again refreshes the row; the same process keeps its start time, a restarted one gets a new one.
    with transaction(url) as session:
        repo.beat(session, node=node, host="host-a", pid=11, queues=[queue], concurrency=1)
    with transaction(url) as session:
        assert next(w for w in repo.live(session) if w.id == node).started_at == first_started
    # Three missed beats and it no longer counts.
    age(url, node, repo.LIVE_SECONDS + 1)
    with transaction(url) as session:
        assert node not in {w.id for w in repo.live(session)}
        assert repo.unserved_message(session, queue) is not None
        repo.beat(session, node=node, host="host-a", pid=12, queues=[queue], concurrency=1)
    with transaction(url) as session:
        assert repo.unserved_message(session, queue) is None
        assert next(w for w in repo.live(session) if w.id == node).started_at > first_started
        repo.forget(session, node)
    with transaction(url) as session:
        assert repo.unserved_message(session, queue) is not None


def test_the_healthcheck_succeeds_while_a_worker_of_this_host_beats(tmp_path):
    url = f"sqlite:///{tmp_path / 'lorajobs.db'}"
    upgrade(url)
    env = {**os.environ, "LORAJOBS_DATABASE_URL": url}

    def healthcheck() -> int:
        return subprocess.run([sys.executable, "-m", "worker.heartbeat"], cwd=ROOT, env=env, timeout=60).returncode

    assert healthcheck() == 1  # nobody beats
    with transaction(url) as session:
        repo.beat(session, node="other@elsewhere", host="elsewhere", pid=1, queues=["gpu"], concurrency=1)
    assert healthcheck() == 1  # a worker of another host says nothing about this one
    with transaction(url) as session:
        repo.beat(session, node="gpu0@here", host=socket.gethostname(), pid=1, queues=["gpu"], concurrency=1)
    assert healthcheck() == 0
    age(url, "gpu0@here", repo.LIVE_SECONDS + 1)
    assert healthcheck() == 1
