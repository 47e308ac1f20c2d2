"""Rows as a lost worker, a lost message or an old version left them, written straight to the real database."""

import time

from core.ids import new_id
from db.models import File, Job
from db.repositories import files as files_repo
from db.repositories import jobs as jobs_repo
from db.repositories.projects import get_project_by_name
from db.session import transaction
from tests.conftest import TINY_MODEL_ID, make_project_key


def make_project(settings) -> str:
    key = make_project_key(settings)
    with transaction(settings.database_url) as session:
        return get_project_by_name(session, key.project).id


def make_file(settings, project_id: str, **values) -> str:
    file_id = new_id("file")
    fields = {"filename": "t.jsonl", "purpose": "fine-tune", "bytes": 1, "sha256": "0" * 64,
              "storage_key": f"projects/{project_id}/files/{file_id}", "status": "processed",
              "created_at": time.time(), **values}
    with transaction(settings.database_url) as session:
        files_repo.add(session, File(id=file_id, project_id=project_id, **fields))
    return file_id


def make_jobs(settings, n: int, **values) -> list[str]:
    """`n` jobs of one new project on one processed file, each in the given state."""
    project_id = make_project(settings)
    file_id = make_file(settings, project_id)
    fields = {"spec": {"model": TINY_MODEL_ID}, "attempts": 0, "cancel_requested": False, **values}
    ids = [new_id("ftjob") for _ in range(n)]
    with transaction(settings.database_url) as session:
        for job_id in ids:
            session.add(Job(id=job_id, project_id=project_id, model=TINY_MODEL_ID, training_file_id=file_id, seed=1,
                            result_files=[], created_at=time.time(), **fields))
    return ids


def make_job(settings, **values) -> str:
    return make_jobs(settings, 1, **values)[0]


def job_row(settings, job_id: str) -> Job:
    with transaction(settings.database_url) as session:
        return jobs_repo.get_any(session, job_id)


def file_row(settings, file_id: str) -> File:
    with transaction(settings.database_url) as session:
        return files_repo.get_any(session, file_id)


def event_messages(settings, job_id: str) -> list[str]:
    with transaction(settings.database_url) as session:
        return [e.message for e in jobs_repo.events_page(session, job_id, after=None, limit=100).items]
