"""Shared dependencies as `Annotated` aliases named for their role."""

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import BUSY_MESSAGE
from core.errors import DatabaseBusy
from core.settings import Settings
from core.storage import Storage
from db.models import Project
from db.session import transaction

T = TypeVar("T")


# Dependencies that do no I/O are async: FastAPI runs them on the event loop instead of a worker thread.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


@asynccontextmanager
async def database_slot_of(app) -> AsyncIterator[None]:
    """One of the process's `db_pool_size` slots, held from a session's start to its end.

    A session keeps its connection between the request's thread hops, and closing it needs a thread of its own:
    bounding threads alone let more requests than connections start, and they then waited on the pool while
    the requests that held it waited for a thread to close. Waiting here costs neither; past the pool timeout
    the request answers 503 with Retry-After.
    """
    slots: asyncio.Semaphore = app.state.db_slots
    try:
        await asyncio.wait_for(slots.acquire(), timeout=app.state.pool.timeout)
    except TimeoutError:
        raise DatabaseBusy(BUSY_MESSAGE) from None
    try:
        yield
    finally:
        slots.release()


async def database_slot(request: Request) -> AsyncIterator[None]:
    async with database_slot_of(request.app):
        yield


async def in_transaction(app, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(session, *args, **kwargs)` in a transaction of its own, on one of the process's database slots:
    opened, run, committed and closed in one worker-thread hop.

    The hot reads use it instead of `SessionDep`: the session dependency costs a hop to open the session, one for a
    sync handler and one to close it, and FastAPI's solving of three more dependencies.
    """
    url, pool = app.state.settings.database_url, app.state.pool

    def run() -> T:
        with transaction(url, pool) as session:
            return function(session, *args, **kwargs)

    async with database_slot_of(app):
        return await run_in_threadpool(run)


def get_session(request: Request, settings: SettingsDep,
                _slot: Annotated[None, Depends(database_slot, scope="function")]) -> Iterator[Session]:
    """The request's transaction: committed when the handler returns, before the response is sent."""
    with transaction(settings.database_url, request.app.state.pool) as session:
        yield session


# scope="function": the commit happens before the response leaves, so a client that reads right after sees it.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def get_current_project(request: Request) -> Project:
    """The project of the caller the gate (api/gate.py) authenticated from the headers, before any of the body was
    read; taken from the request itself rather than through a dependency of its own (each costs a solve per request)."""
    return request.state.caller.project


CurrentProject = Annotated[Project, Depends(get_current_project)]
