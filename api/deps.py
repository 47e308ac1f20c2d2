"""Shared dependencies as `Annotated` aliases named for their role."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import BUSY_MESSAGE
from api.services.projects import Caller
from core.errors import DatabaseBusy
from core.settings import Settings
from core.storage import Storage
from db.models import Project
from db.session import transaction


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


async def get_caller(request: Request) -> Caller:
    """The caller the gate (api/gate.py) authenticated from the headers, before any of the body was read."""
    return request.state.caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_current_project(caller: CallerDep) -> Project:
    return caller.project


CurrentProject = Annotated[Project, Depends(get_current_project)]
