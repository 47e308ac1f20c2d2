"""Fixtures on real services: PostgreSQL, Redis and S3 (started by `make test`), a real API and real workers."""

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from core.settings import Settings, get_settings
from tests.stack import ApiServer, WorkerProcess, settings_env

# Training in tests is reproducible run to run and process to process: the CPU compute path is pinned to float32.
# A worker's own probe may choose bf16 on this CPU, or flip where two paths nearly tie; tests/worker/training/
# test_compute.py tests the probe itself.
os.environ.setdefault("LORAJOBS_CPU_COMPUTE", "float32")

TINY_MODEL_ID = "tiny/llama"
FAMILY_ORG = "fam"  # family models are catalogued as fam/llama2, fam/mistral, ... (tests/helpers/families.py)
TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the suite with `make test`, which starts PostgreSQL, Redis and S3")
    return value


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    admin_url = _required_env("LORAJOBS_TEST_PG_ADMIN_URL")
    name = f"lorajobs_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url():

    url = _required_env("LORAJOBS_TEST_REDIS_URL")
    return url


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    from tests.core.s3server import start_seaweedfs

    endpoint, stop = start_seaweedfs(tmp_path_factory.mktemp("s3"))
    yield endpoint
    stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A model catalogue holding the tiny random Llama as `tiny/llama`."""
    from tests.helpers.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / TINY_MODEL_ID)
    return root


@pytest.fixture(scope="session")
def family_catalogue(tmp_path_factory) -> Path:
    """A catalogue of tiny random models of real families with real vocabularies, as `fam/<family>` (about 20 s)."""
    from tests.helpers.families import FAMILIES, build_family_model

    root = tmp_path_factory.mktemp("families")
    for name in FAMILIES:
        build_family_model(name, root / FAMILY_ORG / name)
    return root


@pytest.fixture(scope="session")
def smollm2_models_dir(tmp_path_factory) -> Path:
    """A catalogue with SmolLM2-135M-Instruct converted from the packaged GGUF (about 25 s, once per session)."""
    from worker.catalogue import install_smollm2

    root = tmp_path_factory.mktemp("smollm2")
    install_smollm2(root)
    return root


@pytest.fixture(scope="session")
def settings(pg_url, redis_url, s3_endpoint, models_dir, tmp_path_factory) -> Settings:
    """Settings on the real services; exported to the environment so workers and `get_settings()` agree."""
    from core.storage import get_storage
    from db.migrate import upgrade

    data_dir = tmp_path_factory.mktemp("data")
    bucket = f"lorajobs-test-{uuid.uuid4().hex[:8]}"
    # A key prefix of its own: test runs sharing one Redis never consume each other's tasks.
    settings = Settings(database_url=pg_url, broker_url=redis_url, broker_prefix=f"{bucket}:",
                        storage_url=f"s3://{bucket}/data",
                        s3_endpoint_url=s3_endpoint, models_dir=models_dir, data_dir=data_dir, lease_seconds=6,
                        sweep_interval_seconds=1, max_attempts=3, max_upload_bytes=8 * 1024 * 1024, log_json=False,
                        # Tests poll many objects several times a second; tests/api/test_quotas.py sets the limits.
                        rate_limit_requests=100_000, rate_limit_uploads=10_000)
    os.environ.update(settings_env(settings))
    os.environ["LORAJOBS_MAX_UPLOAD_BYTES"] = str(settings.max_upload_bytes)
    get_settings.cache_clear()
    get_storage(settings).ensure_bucket()
    upgrade(pg_url)
    return settings


@dataclass
class Stack:
    settings: Settings
    url: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@pytest.fixture(scope="session")
def stack(settings, tmp_path_factory):
    """The API on a loopback port and one worker per queue, as `lorajobs up` runs them."""
    logs = TEST_OUTPUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    api = ApiServer(settings).start()
    workers = [WorkerProcess(settings, queue, logs / f"worker-{queue}.log").start() for queue in ("cpu", "gpu")]
    yield Stack(settings, api.url)
    for worker in workers:
        worker.stop()
    api.stop()


@dataclass
class ProjectKey:
    project: str
    key: str


def make_project_key(settings: Settings, name: str | None = None) -> ProjectKey:
    from api.services.projects import create_key
    from db.session import transaction

    name = name or f"team-{uuid.uuid4().hex[:8]}"
    with transaction(settings.database_url) as session:
        new = create_key(session, name)
    return ProjectKey(name, new.key)


@pytest.fixture
def project_key(settings) -> ProjectKey:
    """A fresh project and its API key: tests are isolated by tenancy."""
    return make_project_key(settings)


@pytest.fixture
def openai_client(stack, project_key):
    import openai

    return openai.OpenAI(base_url=stack.v1, api_key=project_key.key, max_retries=0, timeout=60)


@pytest.fixture
def http(stack, project_key):
    with httpx.Client(base_url=stack.v1 + "/", headers={"Authorization": f"Bearer {project_key.key}"},
                      timeout=60) as client:
        yield client
