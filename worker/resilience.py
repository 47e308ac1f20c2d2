"""What a training worker does when the ground moves: database blips, storage outages, full disks, SIGTERM.

The rules and their costs to a job are stated in docs/operations.md ("Faults and guarantees").
"""

import errno
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from botocore.exceptions import BotoCoreError
from sqlalchemy import exc as sa_exc
from urllib3.exceptions import HTTPError as Urllib3Error

from core.errors import DatabaseBusy, StorageError


# A body streamed from S3 fails with botocore's or urllib3's errors, past the storage layer's mapping.
STORAGE_ERRORS = (StorageError, BotoCoreError, Urllib3Error)

log = logging.getLogger("lorajobs.worker.resilience")

T = TypeVar("T")

RETRY_FIRST_DELAY = 0.2
RETRY_MAX_DELAY = 5.0


class InfrastructureFailure(Exception):
    """A failure of what the job runs on, not of the job: requeued without spending an attempt, up to
    `max_infra_retries` times, then failed with `code`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Fenced(Exception):
    """This worker no longer owns the job (its lease went to the sweep and maybe another worker): write nothing."""


def transient_db_error(exc: BaseException) -> bool:
    """A database that is restarting, unreachable or busy, as opposed to a query that is wrong."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, DatabaseBusy)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def retry_db(write: Callable[[], T], *, budget_seconds: float, what: str,
             give_up: Callable[[], bool] = lambda: False) -> T:
    """Run `write` (a whole transaction) until it succeeds, backing off on transient database errors for at most
    `budget_seconds`; other errors, an exhausted budget or `give_up()` raise the last error."""
    deadline = time.monotonic() + budget_seconds
    delay = RETRY_FIRST_DELAY
    while True:
        try:
            return write()
        except Exception as exc:
            if not transient_db_error(exc) or give_up() or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable while writing %s; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)


def retry_storage(action: Callable[[], T], *, budget_seconds: float, what: str) -> T:
    """Run a storage `action` until it succeeds, backing off for at most `budget_seconds`; then raise
    InfrastructureFailure(`storage_unavailable`). A missing object is not retried (the caller says what it means)."""
    from core.errors import ObjectNotFound

    deadline = time.monotonic() + budget_seconds
    delay = RETRY_FIRST_DELAY
    while True:
        try:
            return action()
        except ObjectNotFound:
            raise
        except STORAGE_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise InfrastructureFailure("storage_unavailable", f"Object storage failed while {what}: "
                                            f"{getattr(exc, 'message', exc)}") from exc
            log.warning("storage failed while %s; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)


def disk_full(exc: BaseException) -> bool:
    """ENOSPC (or a quota) anywhere in the exception's chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_free_space(folder: Path, needed: int, reserve: int) -> None:
    """Refuse to start a job whose datasets, checkpoints and archives would not fit in `folder`."""
    free = shutil.disk_usage(folder).free
    if free < needed + reserve:
        raise InfrastructureFailure(
            "disk_full", f"The worker's work folder {folder} has {free / 1024**2:,.0f} MiB free; this job needs about "
            f"{needed / 1024**2:,.0f} MiB plus the {reserve / 1024**2:,.0f} MiB kept free "
            "(LORAJOBS_WORK_MIN_FREE_BYTES). Free space on the worker or point LORAJOBS_WORK_DIR at a larger disk.")


# Set in a process asked to stop (SIGTERM; Ctrl-C reaches pool processes as a SIGTERM from their main process): the
# training in it checkpoints at the next step and releases its job (docs/operations.md).
SHUTDOWN = threading.Event()


class GracefulSigterm:
    """While a job trains in this process, SIGTERM asks for a graceful stop instead of ending the process (Celery's
    pool process handler); the previous handler comes back after, so an idle process still ends on SIGTERM."""

    def __enter__(self) -> "GracefulSigterm":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    @staticmethod
    def _handle(signum, _frame) -> None:
        log.warning("%s: the running job checkpoints at the next step and is released", signal.Signals(signum).name)
        SHUTDOWN.set()

    def __exit__(self, *_exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def pool_children(pid: int | None = None) -> list[int]:
    """The direct children of a process (Linux /proc): a Celery worker's pool processes."""
    pid = pid or os.getpid()
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return children
