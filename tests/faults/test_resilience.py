"""The worker's rules for failures, on real errors: what is retried, for how long, and what counts as a full disk."""

import errno
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from tests.stack import free_port
from worker.resilience import disk_full, retry_db, transient_db_error


def _unreachable_database():
    """A real OperationalError: PostgreSQL on a port where nothing listens."""
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres")
    with engine.connect() as conn:
        conn.execute(text("select 1"))


def test_a_database_that_comes_back_within_the_budget_costs_only_the_wait():
    calls = []

    def write():
        calls.append(time.monotonic())
        if len(calls) < 3:
            _unreachable_database()
        return "written"

    assert retry_db(write, budget_seconds=10, what="a test row") == "written"
    assert len(calls) == 3
    assert calls[2] - calls[0] >= 0.2 + 0.4  # backed off, doubling


def test_a_database_away_past_the_budget_raises_its_error():
    began = time.monotonic()
    with pytest.raises(Exception) as raised:
        retry_db(_unreachable_database, budget_seconds=1, what="a test row")
    assert transient_db_error(raised.value)
    assert time.monotonic() - began < 5


def test_a_wrong_query_is_not_retried():
    calls = []

    def write():
        calls.append(1)
        raise IntegrityError("insert", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        retry_db(write, budget_seconds=10, what="a test row")
    assert calls == [1]


def test_a_full_disk_is_found_anywhere_in_the_chain(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("archive failed") from exc
    except RuntimeError as wrapped:
        assert disk_full(wrapped)
    assert not disk_full(OSError(errno.ENOENT, "missing"))
