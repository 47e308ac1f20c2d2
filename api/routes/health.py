"""Liveness and readiness probes (no auth: load balancers call them)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, StorageDep
from api.services.health import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    checks = readiness(settings, storage)
    failed = [name for name, result in checks.items() if result != "ok"]
    body = {"status": "ok" if not failed else "unavailable", "checks": checks}
    if failed:
        body["error"] = {
            "message": "Not ready: " + ", ".join(f"{name} ({checks[name]})" for name in failed),
            "type": "server_error", "param": None, "code": "not_ready",
        }
    return JSONResponse(body, status_code=503 if failed else 200)
