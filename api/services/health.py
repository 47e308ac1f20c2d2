"""Readiness: the database, the broker and object storage each answer.

The probe is unauthenticated, so it says only which part failed; why (a driver's, the broker's or S3's own
text, which can name hosts, users and buckets) is logged under the request id.
"""

import logging

from sqlalchemy import text

from core.errors import LorajobsError
from core.queue import celery_for
from core.settings import Settings
from core.storage import Storage
from db.session import session_factory

log = logging.getLogger("lorajobs.api")


def _check_database(settings: Settings) -> None:
    with session_factory(settings.database_url)() as session:
        session.execute(text("SELECT 1"))


def _check_broker(settings: Settings) -> None:
    with celery_for(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def readiness(settings: Settings, storage: Storage) -> dict[str, str]:
    checks = {"database": lambda: _check_database(settings), "broker": lambda: _check_broker(settings),
              "storage": storage.check}
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:  # a probe reports any failure, it never raises
            detail = exc.message if isinstance(exc, LorajobsError) else f"{type(exc).__name__}: {exc}"
            log.warning("not ready: %s: %s", name, detail[:500])
            results[name] = "unavailable"
    return results
