"""`/v1/models`: catalogue base models and the project's fine-tuned ones."""

from sqlalchemy.orm import Session

from api.schemas import ModelObject
from core.errors import NotFound
from core.settings import Settings
from db import catalogue
from db.models import Project
from db.repositories import jobs as jobs_repo

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
