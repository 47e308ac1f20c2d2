"""The deployment files, checked without a Docker engine: compose services against the settings class."""

import re
from pathlib import Path

import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_every_part():
    assert {"postgres", "redis", "s3", "migrate", "api", "worker-gpu", "worker-cpu", "sweeper"} <= set(SERVICES)
    assert "healthcheck" in SERVICES["postgres"]
    assert SERVICES["migrate"]["command"] == ["lorajobs", "migrate"]
    assert SERVICES["api"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert "8000:8000" in SERVICES["api"]["ports"]


def test_the_gpu_worker_reserves_an_nvidia_gpu_and_consumes_the_gpu_queue():
    worker = SERVICES["worker-gpu"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["command"][-2:] == ["--queues", "gpu"]
    assert SERVICES["worker-cpu"]["command"][-2:] == ["--queues", "cpu"]


def test_lorajobs_variables_are_settings_fields_and_secrets_are_required():
    fields = {name.upper() for name in Settings.model_fields}
    for name in ("api", "worker-gpu", "migrate"):
        env = SERVICES[name]["environment"]
        for key, value in env.items():
            if key.startswith("LORAJOBS_"):
                assert key.removeprefix("LORAJOBS_") in fields, key
        assert env["LORAJOBS_ENVIRONMENT"] == "production"
        assert env["LORAJOBS_BROKER_URL"].startswith("redis://")
        assert env["LORAJOBS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["LORAJOBS_STORAGE_URL"].startswith("s3://")
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "LORAJOBS_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.search(r"\$\{" + secret + r":\?[^}]+\}", text), secret


def test_the_gpu_image_installs_cuda_torch_at_the_pinned_version():
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert dockerfile.startswith("# ") and "FROM nvidia/cuda:" in dockerfile
    assert f"torch=={pinned}" in dockerfile
    assert "-c constraints.txt '.[worker]'" in dockerfile


def test_production_refuses_placeholder_secrets():
    import pytest

    with pytest.raises(ValueError, match="LORAJOBS_SECRET_KEY"):
        Settings(environment="production")
    with pytest.raises(ValueError, match="LORAJOBS_SECRET_KEY"):
        Settings(environment="production", secret_key="changeme")
    assert Settings(environment="production", secret_key="x" * 40).environment == "production"


def test_every_setting_is_documented():
    documented = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"LORAJOBS_{name.upper()}" in documented, name
