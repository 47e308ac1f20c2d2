"""A database that accepts connections and never answers (a network that silently drops packets, a hung server or
load balancer): every wait is bounded by LORAJOBS_DB_CONNECT_TIMEOUT, where psycopg alone waits 130 s per attempt.

The API answers 503 with Retry-After and /readyz names the database, within seconds; a worker's retried write gives
up within its budget; and the connections that do open carry TCP keepalives and a user timeout, so one whose peer
vanishes later is noticed too.
"""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import text

from core.settings import get_settings
from db.session import ConnectOptions, PoolConfig, make_engine, transaction
from tests.api.test_app import assert_envelope
from tests.stack import ApiServer
from worker.resilience import retry_db, transient_db_error

CONNECT_TIMEOUT = 2  # seconds, psycopg's least
# The connect timeout, plus a wait for a free connection (LORAJOBS_DB_POOL_TIMEOUT, 3 s) and room for a slow machine;
# far below the 130 s a request waited without a timeout.
BOUND = CONNECT_TIMEOUT + 3 + 7


@pytest.fixture
def silent_database():
    """A TCP listener on loopback that accepts every connection and never sends a byte; its URL and what it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"postgresql+psycopg://lorajobs@127.0.0.1:{listener.getsockname()[1]}/lorajobs", accepted
    stop.set()
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.fixture
def connect_timeout():
    """LORAJOBS_DB_CONNECT_TIMEOUT for this process: engines read how they connect from its settings."""
    before = os.environ.get("LORAJOBS_DB_CONNECT_TIMEOUT")
    os.environ["LORAJOBS_DB_CONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT)
    get_settings.cache_clear()
    yield CONNECT_TIMEOUT
    if before is None:
        del os.environ["LORAJOBS_DB_CONNECT_TIMEOUT"]
    else:
        os.environ["LORAJOBS_DB_CONNECT_TIMEOUT"] = before
    get_settings.cache_clear()


def test_requests_answer_503_and_readiness_fails_within_the_connect_timeout(settings, project_key, silent_database,
                                                                         connect_timeout):
    url, accepted = silent_database
    api = ApiServer(settings.model_copy(update={"database_url": url})).start()
    try:
        def timed_get(path: str) -> tuple[httpx.Response, float]:
            began = time.monotonic()
            response = httpx.get(api.url + path, headers={"Authorization": f"Bearer {project_key.key}"}, timeout=60)
            return response, time.monotonic() - began

        with ThreadPoolExecutor(16) as pool:  # more at once than the API's 12 connections
            answers = list(pool.map(lambda _: timed_get("/v1/fine_tuning/jobs"), range(16)))
        for response, waited in answers:
            error = assert_envelope(response, 503, code="service_unavailable")
            assert response.headers["retry-after"] == "1" and error["type"] == "server_error"
            assert waited < BOUND, waited
        assert accepted  # the API did reach the silent server: the 503s are its timeouts, not a refusal

        ready, waited = timed_get("/readyz")
        assert ready.status_code == 503 and waited < BOUND, (ready.text, waited)
        body = ready.json()
        assert body["checks"] == {"database": "unavailable", "broker": "ok", "storage": "ok"}
        assert body["error"]["code"] == "not_ready"
    finally:
        api.stop()


def test_a_workers_retried_write_gives_up_within_its_budget(silent_database, connect_timeout):
    url, _ = silent_database

    def write() -> None:
        with transaction(url) as session:
            session.execute(text("SELECT 1"))

    began = time.monotonic()
    with pytest.raises(Exception) as raised:
        retry_db(write, budget_seconds=3, what="a test row")
    assert transient_db_error(raised.value)  # retried as a database away, then raised
    assert time.monotonic() - began < 3 + CONNECT_TIMEOUT + 5


def test_open_connections_carry_keepalives_and_a_user_timeout(pg_url):
    engine = make_engine(pg_url, PoolConfig(size=1, connect=ConnectOptions(prepared_statements=False)))
    try:
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver.prepare_threshold is None
            with socket.socket(fileno=os.dup(driver.pgconn.socket)) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    pytest.skip("the test database is reached over a Unix socket, which has no TCP settings")
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
    finally:
        engine.dispose()
