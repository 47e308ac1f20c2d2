"""OpenAI's files API, plus `GET /v1/files/{id}/report`."""

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import CurrentProject, SessionDep, SettingsDep, StorageDep
from api.schemas import FileDeleted, FileObject, ListResponse, ValidationReportResponse
from api.services import files as service
from core.storage.base import attachment

router = APIRouter(prefix="/files", tags=["files"])


@router.post("", response_model=FileObject)
def upload_file(request: Request, file: UploadFile, purpose: Annotated[str, Form()], session: SessionDep,
                settings: SettingsDep, storage: StorageDep, project: CurrentProject,
                expires_after_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
                expires_after_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
                ) -> FileObject:
    """OpenAI's upload; `expires_after[anchor]=created_at` with `expires_after[seconds]` deletes the file then."""
    row = service.upload(session, settings, storage, project, stream=file.file, filename=file.filename,
                         purpose=purpose, declared_size=file.size,
                         expires_after=(expires_after_anchor, expires_after_seconds))
    return service.to_object(row)


@router.get("", response_model=ListResponse[FileObject])
def list_files(session: SessionDep, storage: StorageDep, project: CurrentProject, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: str | None = None,
               order: Literal["asc", "desc"] = "desc") -> ListResponse[FileObject]:
    service.purge_expired(session, storage, project)
    page = service.page(session, project, purpose=purpose, after=after, limit=limit, order=order)
    return ListResponse.of([service.to_object(row) for row in page.items], page.has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, project: CurrentProject) -> FileObject:
    return service.to_object(service.get(session, project, file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, storage: StorageDep, project: CurrentProject) -> StreamingResponse:
    row = service.get(session, project, file_id)
    return StreamingResponse(storage.iter_chunks(row.storage_key), media_type="application/octet-stream",
                             headers={"content-length": str(row.bytes), "x-content-sha256": row.sha256,
                                      "content-disposition": attachment(row.filename)})


@router.get("/{file_id}/report", response_model=ValidationReportResponse)
def file_report(file_id: str, session: SessionDep, project: CurrentProject) -> ValidationReportResponse:
    row = service.get(session, project, file_id)
    return ValidationReportResponse(file_id=row.id, status=row.status, report=row.report)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, storage: StorageDep, project: CurrentProject) -> FileDeleted:
    service.delete(session, storage, project, file_id)
    return FileDeleted(id=file_id)
