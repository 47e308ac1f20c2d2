"""Cursor pages in OpenAI's shape: `after=<last id>`, `limit`, newest first unless `order=asc`."""

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from core.errors import InvalidRequest

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
) -> Page:
    """Rows of `stmt` after the row whose id is `after`, in `seq` order; one extra row tells `has_more`."""
    if after:
        cursor = session.scalar(select(model.seq).where(model.id == after))
        if cursor is None:
            raise InvalidRequest(f"No object with id '{after}' to page after.", param="after")
        stmt = stmt.where(model.seq < cursor if order == "desc" else model.seq > cursor)
    stmt = stmt.order_by(model.seq.desc() if order == "desc" else model.seq.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return Page(rows[:limit], len(rows) > limit)
