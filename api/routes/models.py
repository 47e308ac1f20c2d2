"""OpenAI's models API: base models of the catalogue and this project's fine-tuned models."""

from fastapi import APIRouter

from api.deps import CurrentProject, SessionDep, SettingsDep, StorageDep
from api.schemas import ListResponse, ModelDeleted, ModelObject
from api.services import models as service

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ListResponse[ModelObject])
def list_models(session: SessionDep, settings: SettingsDep, project: CurrentProject) -> ListResponse[ModelObject]:
    return ListResponse.of(service.list_all(session, settings, project), False)


@router.get("/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, session: SessionDep, settings: SettingsDep, project: CurrentProject) -> ModelObject:
    return service.get(session, settings, project, model_id)


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep,
                 project: CurrentProject) -> ModelDeleted:
    """Delete a fine-tuned model (`ft:…`): its adapter, merged model and checkpoints; the job's history stays."""
    service.delete(session, settings, storage, project, model_id)
    return ModelDeleted(id=model_id)
