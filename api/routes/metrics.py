"""Prometheus' scrape endpoint (no auth, like the probes: it shows counts by status and queue, no project's data)."""

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from api.deps import SessionDep, SettingsDep
from api.services import metrics as service

router = APIRouter(tags=["operations"])


# The classic text format (0.0.4): every Prometheus version and compatible scraper reads it.
@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    return Response(service.exposition(session, settings), media_type=CONTENT_TYPE_PLAIN_0_0_4)
