"""Responses for objects the service already built and validated.

A route that returns a pydantic object has FastAPI validate it again against the route's `response_model` (on a
worker thread for a sync route) before serialising it. The hot reads (a job, a page of jobs) return the JSON
bytes of the object they built instead: the same bytes, as pydantic serialises them for FastAPI, without the
second validation or its thread hop. The routes keep their `response_model`, so the OpenAPI schema is unchanged.
"""

from fastapi.responses import Response
from pydantic import BaseModel


def built(obj: BaseModel) -> Response:
    return Response(obj.model_dump_json(by_alias=True), media_type="application/json")
