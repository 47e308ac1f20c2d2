"""lorajobs behind a real PgBouncer in transaction pooling, set up as docs/deployment.md says (Debian's pgbouncer,
1.18 on bookworm, installed by scripts/prepare.sh), in front of the suite's PostgreSQL, with `lorajobs api` itself:

- with `LORAJOBS_DB_PREPARED_STATEMENTS=false` and `LORAJOBS_DB_MAX_CONNECTIONS` set, it answers only 200s to more
  requests at once than its pool, on more client connections than PgBouncer has server connections, which the
  server sees no more of;
- with prepared statements on, PgBouncer older than 1.21 breaks requests (the reason for the setting);
- a PgBouncer whose server connections are all taken makes requests answer 503 with Retry-After, not 500.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, make_url, text

from db.session import connection_budget_problem
from tests.api.test_app import assert_envelope
from tests.stack import ROOT, free_port, settings_env
from tests.helpers.database import app_role

PGBOUNCER = shutil.which("pgbouncer") or next(
    (path for path in ("/usr/sbin/pgbouncer",) if os.access(path, os.X_OK)), None)
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed: `make prepare` (scripts/prepare.sh) installs Debian's package")

SERVER_POOL = 3  # PgBouncer's server connections (default_pool_size)
MAX_CLIENT_CONN = 500
# Beyond anyio's default 40 worker threads: behind PgBouncer such a pool stalled until the API made its thread
# limit follow the pool (api/main.py `connection_budget`, docs/deployment.md).
API_POOL = 100
ENDPOINTS = ("/v1/fine_tuning/jobs", "/v1/files", "/v1/models")


def pgbouncer_version() -> tuple[int, int]:
    printed = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True, timeout=10).stdout
    major, minor = re.search(r"PgBouncer (\d+)\.(\d+)", printed).groups()
    return int(major), int(minor)


@pytest.fixture
def bouncer_role(pg_url):
    """A role of its own for PgBouncer's server connections, so the server's count of them is exact."""
    with app_role(pg_url, "lj_bouncer") as role:
        yield role


@dataclass
class Bouncer:
    url: str  # lorajobs' database URL through PgBouncer
    conninfo: str  # the same, for psycopg
    log: Path


@pytest.fixture
def pgbouncer(pg_url, bouncer_role):
    """Start PgBouncer on a free loopback port: transaction pooling, SERVER_POOL server connections, trust auth."""
    started = []

    def start(**options) -> Bouncer:
        folder = Path(tempfile.mkdtemp(prefix="lorajobs-pgbouncer-"))
        folder.chmod(0o755)  # PgBouncer refuses to run as root: then it runs as `nobody`, which reads its files
        server, port = make_url(pg_url), free_port()
        config = {"listen_addr": "127.0.0.1", "listen_port": port, "unix_socket_dir": "", "auth_type": "trust",
                  "auth_file": folder / "userlist.txt", "pool_mode": "transaction",
                  "default_pool_size": SERVER_POOL, "max_client_conn": MAX_CLIENT_CONN, **options}
        (folder / "userlist.txt").write_text(f'"{bouncer_role}" ""\n')
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"lorajobs = host={server.host} port={server.port or 5432} dbname={server.database}\n\n"
            "[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in config.items()))
        for path in folder.iterdir():
            path.chmod(0o644)
        log = folder / "pgbouncer.log"
        as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(log, "wb") as out:
            proc = subprocess.Popen([PGBOUNCER, *as_user, str(folder / "pgbouncer.ini")], stdout=out,
                                    stderr=subprocess.STDOUT)
        started.append((proc, folder))
        bouncer = Bouncer(f"postgresql+psycopg://{bouncer_role}@127.0.0.1:{port}/lorajobs",
                          f"host=127.0.0.1 port={port} dbname=lorajobs user={bouncer_role} connect_timeout=2", log)
        deadline = time.time() + 20
        while True:
            try:
                with psycopg.connect(bouncer.conninfo, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return bouncer
            except psycopg.OperationalError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"PgBouncer did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)

    yield start
    for proc, folder in started:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def lorajobs_api(settings, database_url: str, log: Path, **variables: str):
    """`lorajobs api` as a process of its own on `database_url`, its settings from the environment as deployed."""
    port = free_port()
    env = {**os.environ, **settings_env(settings), "LORAJOBS_DATABASE_URL": database_url, **variables}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"lorajobs api did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def hammer(url: str, key: str, requests: int, at_once: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client, \
            ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda i: client.get(ENDPOINTS[i % len(ENDPOINTS)]), range(requests)))


class ServerConnections:
    """The most connections PostgreSQL held for `role` at once, sampled while the block runs."""

    def __init__(self, pg_url: str, role: str):
        self.engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        self.role, self.peak, self._stop = role, 0, threading.Event()

    def _sample(self) -> None:
        with self.engine.connect() as conn:
            while not self._stop.is_set():
                count = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE usename = :role"),
                                     {"role": self.role}).scalar_one()
                self.peak = max(self.peak, count)
                time.sleep(0.02)

    def __enter__(self) -> "ServerConnections":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.dispose()


def test_behind_pgbouncer_the_api_answers_more_requests_than_the_server_gives_connections(
        settings, pg_url, bouncer_role, project_key, pgbouncer, tmp_path):
    bouncer = pgbouncer()
    # Through PgBouncer a query reads the server's max_connections, which no longer bounds the clients: the start-up
    # check refuses processes the server alone could not hold until LORAJOBS_DB_MAX_CONNECTIONS says PgBouncer's
    # max_client_conn.
    problem = connection_budget_problem(bouncer.url, processes=4, pool_size=API_POOL, reserved=10)
    assert problem and "PgBouncer" in problem
    assert connection_budget_problem(bouncer.url, processes=4, pool_size=API_POOL, reserved=10,
                                     max_connections=MAX_CLIENT_CONN) is None

    with lorajobs_api(settings, bouncer.url, tmp_path / "api.log", LORAJOBS_DB_PREPARED_STATEMENTS="false",
                      LORAJOBS_DB_POOL_SIZE=str(API_POOL), LORAJOBS_DB_MAX_CONNECTIONS=str(MAX_CLIENT_CONN)) as url:
        with ServerConnections(pg_url, bouncer_role) as server:
            # More at once than the API's default 40 threads and PgBouncer's 3 server connections.
            responses = hammer(url, project_key.key, requests=300, at_once=48)
        statuses = Counter(response.status_code for response in responses)
        assert statuses == {200: 300}, (statuses, next(r.text for r in responses if r.status_code != 200))
        assert 1 <= server.peak <= SERVER_POOL, server.peak  # 100 client connections on 3 server connections
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok", ready.text


def test_prepared_statements_through_pgbouncer_older_than_1_21_break_requests(
        settings, project_key, pgbouncer, tmp_path):
    """What LORAJOBS_DB_PREPARED_STATEMENTS=false is for: psycopg prepares a query on its fifth run, on whichever
    server connection PgBouncer lent the transaction, and the next transaction of another client finds it there
    ('already exists') or of the same client finds it missing. 1.21+ tracks them itself (max_prepared_statements)."""
    if pgbouncer_version() >= (1, 21):
        pytest.skip(f"pgbouncer {pgbouncer_version()} handles prepared statements itself (max_prepared_statements)")
    bouncer = pgbouncer()
    log = tmp_path / "api.log"
    with lorajobs_api(settings, bouncer.url, log, LORAJOBS_DB_MAX_CONNECTIONS=str(MAX_CLIENT_CONN)) as url:
        responses = hammer(url, project_key.key, requests=300, at_once=32)
    statuses = Counter(response.status_code for response in responses)
    assert statuses[500], statuses
    for response in (r for r in responses if r.status_code == 500):
        assert_envelope(response, 500, code="internal_error")
    assert re.search(r"prepared statement \S+ (already exists|does not exist)", log.read_text()), \
        log.read_text()[-3000:]


def test_a_pgbouncer_out_of_server_connections_answers_503_then_serves_again(
        settings, project_key, pgbouncer, tmp_path):
    bouncer = pgbouncer(query_wait_timeout=2)
    with lorajobs_api(settings, bouncer.url, tmp_path / "api.log", LORAJOBS_DB_PREPARED_STATEMENTS="false") as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {project_key.key}"}, timeout=60) as client:
        assert client.get("/v1/fine_tuning/jobs").status_code == 200
        # Other clients hold every server connection in open transactions.
        holders = [psycopg.connect(bouncer.conninfo) for _ in range(SERVER_POOL)]
        try:
            for holder in holders:
                holder.execute("SELECT 1")
            began = time.monotonic()
            response = client.get("/v1/fine_tuning/jobs")
            waited = time.monotonic() - began
            error = assert_envelope(response, 503, code="service_unavailable")
            assert response.headers["retry-after"] == "1" and error["type"] == "server_error"
            assert waited < 15, waited  # PgBouncer's query_wait_timeout, not a hang
        finally:
            for holder in holders:
                holder.close()
        assert [client.get("/v1/fine_tuning/jobs").status_code for _ in range(3)] == [200, 200, 200]
