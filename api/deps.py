"""Shared dependencies as `Annotated` aliases named for their role."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.services.projects import authenticate
from core.settings import Settings
from core.storage import Storage
from db.models import Project
from db.session import transaction


# Dependencies that do no I/O are async: FastAPI runs them on the event loop instead of a worker thread.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(request: Request, settings: SettingsDep) -> Iterator[Session]:
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


def get_current_project(request: Request, session: SessionDep) -> Project:
    return authenticate(session, bearer_key(request))


CurrentProject = Annotated[Project, Depends(get_current_project)]
