"""`/v1/models`: catalogue base models and the project's fine-tuned ones."""

import time

from sqlalchemy.orm import Session

from api.schemas import ModelObject
from core.errors import NotFound, PermissionDenied
from core.settings import Settings
from core.storage import Storage
from db import catalogue
from db.models import Project
from db.repositories import jobs as jobs_repo
from db.session import after_commit

CATALOGUE_OWNER = "lorajobs"


def list_all(session: Session, settings: Settings, project: Project) -> list[ModelObject]:
    base = [ModelObject(id=m.id, created=m.created, owned_by=CATALOGUE_OWNER, provenance=m.provenance) for m in catalogue.list_all(session, settings.models_dir)]
    tuned = [
        ModelObject(id=job.fine_tuned_model, created=int(job.finished_at or job.created_at), owned_by=project.name,
                    root=job.model, parent=job.model)
        for job in jobs_repo.fine_tuned(session, project.id) if job.fine_tuned_model
    ]
    return base + tuned


def get(session: Session, settings: Settings, project: Project, model_id: str) -> ModelObject:
    for model in list_all(session, settings, project):
        if model.id == model_id:
            return model
    raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


def delete(session: Session, settings: Settings, storage: Storage, project: Project, model_id: str) -> None:
    """Delete a fine-tuned model: its adapter archives, merged model and checkpoints; the job keeps its history."""
    # Locked: a merge finishing meanwhile records its archive first (then deleted here) or finds the model gone.
    job = jobs_repo.by_fine_tuned_model(session, project.id, model_id, for_update=True)
    if job is None:
        if any(m.id == model_id for m in catalogue.list_all(session, settings.models_dir)):
            raise PermissionDenied(f"'{model_id}' is a base model of the catalogue; only fine-tuned models can be "
                                   "deleted.", param="model")
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    keys = [entry["key"] for entry in (job.artifacts or {}).values() if isinstance(entry, dict) and entry.get("key")]
    for checkpoint in jobs_repo.checkpoints(session, job.id):
        keys += [checkpoint.storage_key] + [entry["key"] for entry in (checkpoint.artifacts or {}).values()]
        jobs_repo.delete_row(session, checkpoint)
    job.model_deleted_at = time.time()
    job.artifacts = {}

    def delete_objects() -> None:
        for key in keys:
            storage.delete(key)

    after_commit(session, delete_objects)
