"""Cursor pages in OpenAI's shape: `after=<last id>`, `limit`, newest first unless `order=asc`."""

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from core.errors import NotFound

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_more: bool


def paginate(
    session: Session,
    stmt: Select,
    model,
    *,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"] = "desc",
    scope: ColumnElement[bool] | None = None,
) -> Page:
    """Rows of `stmt` after the row whose id is `after`, in `seq` order; one extra row tells `has_more`.

    The cursor is looked up within `scope` (default: `stmt`'s own filters; a list filtered by status passes its
    project) only: another project's id answers exactly as an id that does not exist, so a cursor never tells
    whether someone else's object exists.
    """
    if after:
        scope = stmt.whereclause if scope is None else scope
        lookup = select(model.seq).where(model.id == after)
        cursor = session.scalar(lookup if scope is None else lookup.where(scope))
        if cursor is None:
            raise unknown_cursor(after)
        stmt = stmt.where(model.seq < cursor if order == "desc" else model.seq > cursor)
    stmt = stmt.order_by(model.seq.desc() if order == "desc" else model.seq.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return Page(rows[:limit], len(rows) > limit)


def unknown_cursor(after: str) -> NotFound:
    """The answer to an `after` cursor that names no object the caller can see."""
    return NotFound(f"No object with id '{after}' to page after.", param="after")
