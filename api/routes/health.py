"""Liveness and readiness probes (no auth: load balancers call them)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, StorageDep
from api.services.health import readiness
from api.services.metrics import queue_report

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    checks = readiness(settings, storage)
    failed = [name for name, result in checks.items() if result != "ok"]
    body = {"status": "ok" if not failed else "unavailable", "checks": checks}
    if checks.get("database") == "ok":
        # Reported, never failed on: the API serves without GPU workers, and restarting it would not bring one.
        body["queues"], warnings = queue_report(settings)
        if warnings:
            body["warnings"] = warnings
    if failed:
        body["error"] = {
            "message": "Not ready: " + ", ".join(f"{name} ({checks[name]})" for name in failed),
            "type": "server_error", "param": None, "code": "not_ready",
        }
    return JSONResponse(body, status_code=503 if failed else 200)
