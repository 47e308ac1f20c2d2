"""Response shapes of the API: OpenAI's objects plus our documented extensions."""

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, items: list[T], has_more: bool) -> "ListResponse[T]":
        ids = [getattr(item, "id", None) for item in items]
        return cls(data=items, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    provenance: str | None = None  # ours: where a catalogue model's weights came from, when not the hub's checkpoint


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ValidationReportResponse(BaseModel):
    """Our extension: the dataset's validation report (see docs/datasets.md)."""

    object: Literal["file.report"] = "file.report"
    file_id: str
    status: str
    report: dict[str, Any] | None
