"""Validation of an uploaded dataset: stream it from storage, write the report, settle the file's status."""

import logging

from core.datasets.validate import validate_jsonl
from core.settings import get_settings
from core.storage import get_storage
from db import lifecycle
from db.repositories import files as files_repo
from db.session import transaction

log = logging.getLogger("lorajobs.worker.datasets")


def validate_file(file_id: str) -> None:
    """Validate a file once; a file already processed or in error is left as it is."""
    settings = get_settings()
    with transaction(settings.database_url) as session:
        row = files_repo.get_any(session, file_id)
        if row is None or row.status != "uploaded":
            return
        key = row.storage_key
    try:
        with get_storage(settings).open(key) as stream:
            report = validate_jsonl(stream)
        report_data, ok, summary = report.model_dump(mode="json"), report.ok, report.summary
    except Exception as exc:  # the file gets a clear status; the worker stays up
        log.exception("validation crashed", extra={"file_id": file_id})
        report_data, ok, summary = None, False, f"Validation failed unexpectedly: {type(exc).__name__}"
    with transaction(settings.database_url) as session:
        row = files_repo.get_any(session, file_id)
        if row is None:
            return
        row.report = report_data
        row.status = "processed" if ok else "error"
        row.status_details = None if ok else summary
        lifecycle.promote_waiting_jobs(session, settings, row)
    log.info("file validated", extra={"file_id": file_id, "ok": ok})
