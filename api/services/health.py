"""Readiness: the database, the broker and object storage each answer."""

from sqlalchemy import text

from core.errors import LorajobsError
from core.queue import celery_for
from core.settings import Settings
from core.storage import Storage
from db.session import session_factory


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
        except LorajobsError as exc:
            results[name] = exc.message
        except Exception as exc:  # a probe reports any failure as text, it never raises
            results[name] = f"{type(exc).__name__}: {exc}"[:300]
    return results
