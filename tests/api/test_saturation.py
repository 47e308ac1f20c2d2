"""Under more concurrent requests than the database gives connections, the API answers 200 or 503 with
Retry-After in the error envelope — never a 500 — and recovers by itself."""

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from db.session import connection_budget_problem
from tests.api.test_app import assert_envelope
from tests.helpers.database import app_role
from tests.stack import ApiServer

ROLE_CONNECTIONS = 2


@pytest.fixture
def limited_role_url(pg_url):
    """A database role PostgreSQL lets open only two connections at once: a server out of connection slots."""
    with app_role(pg_url, "lj_limited", f"CONNECTION LIMIT {ROLE_CONNECTIONS}") as role:
        scheme, rest = pg_url.split("://", 1)
        yield f"{scheme}://{role}@{rest.split('@', 1)[1]}"


def test_more_requests_than_connections_get_200_or_503_with_retry_after(settings, limited_role_url, project_key):
    limited = settings.model_copy(update={"database_url": limited_role_url, "db_pool_size": 8, "db_pool_timeout": 0.5})
    api = ApiServer(limited).start()
    headers = {"Authorization": f"Bearer {project_key.key}"}
    try:
        with httpx.Client(base_url=api.url + "/v1", headers=headers, timeout=30) as client, \
                ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda _: client.get("/fine_tuning/jobs"), range(160)))
            statuses = Counter(r.status_code for r in responses)
            assert set(statuses) <= {200, 503} and statuses[200] and statuses[503], statuses
            for response in (r for r in responses if r.status_code == 503):
                error = assert_envelope(response, 503, code="service_unavailable")
                assert response.headers["retry-after"] == "1" and error["type"] == "server_error"
                assert "connection" not in error["message"].lower()  # the driver's text stays in the log
            # Load gone, the same process serves again: nothing is stuck.
            assert all(client.get("/fine_tuning/jobs").status_code == 200 for _ in range(5))
    finally:
        api.stop()


def test_the_start_up_budget_check_names_the_numbers(pg_url):
    assert connection_budget_problem(pg_url, processes=2, pool_size=12, reserved=10) is None
    problem = connection_budget_problem(pg_url, processes=8, pool_size=50, reserved=10)
    assert problem.startswith("8 API processes x LORAJOBS_DB_POOL_SIZE 50 = 400 connections, but the server allows")
    assert "PgBouncer" in problem
    # Behind PgBouncer the limit is its max_client_conn, given in settings instead of read from the server.
    assert connection_budget_problem(pg_url, processes=8, pool_size=50, reserved=10, max_connections=2000) is None


def test_lorajobs_api_refuses_to_start_over_the_budget(settings):
    import subprocess
    import sys

    from tests.stack import ROOT, settings_env

    env = {**os.environ, **settings_env(settings), "LORAJOBS_DB_POOL_SIZE": "400"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "api", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "LORAJOBS_DB_POOL_SIZE 400" in done.stderr
