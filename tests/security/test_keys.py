"""API keys: peppered hashes, legacy rows rehashed on use, last use, read-only keys, bootstrap rotation."""

import hashlib
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from api.services.projects import (LAST_USED_RESOLUTION_SECONDS, create_key, ensure_bootstrap_key, hash_key,
                                   revoke_key)
from api.services import key_cache
from core.ids import new_id
from core.settings import Settings
from db.models import ApiKey, Project
from db.session import transaction
from tests.conftest import make_project_key
from tests.stack import ROOT


def key_row(settings, key_id: str) -> ApiKey:
    with transaction(settings.database_url) as session:
        return session.get(ApiKey, session.query(ApiKey.seq).filter(ApiKey.id == key_id).scalar())


def test_a_key_is_stored_as_an_hmac_under_the_pepper(settings):
    with transaction(settings.database_url) as session:
        new = create_key(session, f"team-{uuid.uuid4().hex[:8]}")
    row = key_row(settings, new.row.id)
    assert row.hash_scheme == "hmac-sha256"
    assert row.key_hash != hashlib.sha256(new.key.encode()).hexdigest()
    assert row.key_hash == hash_key(new.key, settings)
    assert hash_key(new.key, settings.model_copy(update={"api_key_pepper": "another-pepper-" * 3})) != row.key_hash


def test_a_key_made_before_the_pepper_works_and_is_rehashed_on_first_use(settings, api_url):
    key = "lj-legacy-" + uuid.uuid4().hex
    with transaction(settings.database_url) as session:
        project = Project(id=new_id("proj"), name=f"legacy-{uuid.uuid4().hex[:8]}", created_at=time.time())
        session.add(project)
        session.flush()
        row = ApiKey(id=new_id("key", 16), project_id=project.id, prefix=key[:11], hash_scheme="sha256",
                     key_hash=hashlib.sha256(key.encode()).hexdigest(), created_at=time.time())
        session.add(row)
        key_id = row.id
    response = httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    row = key_row(settings, key_id)
    assert (row.hash_scheme, row.key_hash) == ("hmac-sha256", hash_key(key, settings))
    assert httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_last_used_is_kept_without_a_write_per_request(settings, api_url):
    created = make_project_key(settings)
    headers = {"Authorization": f"Bearer {created.key}"}
    with transaction(settings.database_url) as session:
        key_id = session.query(ApiKey.id).filter(ApiKey.key_hash == hash_key(created.key, settings)).scalar()
    assert key_row(settings, key_id).last_used_at is None
    before = time.time()
    assert httpx.get(api_url + "/v1/files", headers=headers).status_code == 200
    first = key_row(settings, key_id).last_used_at
    assert first is not None and first >= before - 1
    assert httpx.get(api_url + "/v1/files", headers=headers).status_code == 200
    assert key_row(settings, key_id).last_used_at == first  # within the minute: not written again
    with transaction(settings.database_url) as session:
        session.query(ApiKey).filter(ApiKey.id == key_id).update(
            {"last_used_at": first - LAST_USED_RESOLUTION_SECONDS - 1})
    key_cache.invalidate(settings)  # as if the API's cached entry had expired (key_cache.CACHE_SECONDS)
    assert httpx.get(api_url + "/v1/files", headers=headers).status_code == 200
    assert key_row(settings, key_id).last_used_at >= before - 1


def test_a_read_only_key_reads_and_is_refused_every_write(settings, api_url):
    with transaction(settings.database_url) as session:
        key = create_key(session, f"monitoring-{uuid.uuid4().hex[:8]}", read_only=True).key
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(api_url + "/v1/files", headers=headers).status_code == 200
    assert httpx.get(api_url + "/v1/fine_tuning/jobs", headers=headers).status_code == 200
    writes = [("POST", "/v1/files", {"files": {"file": ("a.jsonl", b"{}\n")}, "data": {"purpose": "fine-tune"}}),
              ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny/llama", "training_file": "file-x"}}),
              ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", {}),
              ("DELETE", "/v1/files/file-x", {})]
    for method, path, body in writes:
        response = httpx.request(method, api_url + path, headers=headers, **body)
        assert response.status_code == 403, (path, response.text)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("permission_error", "permission_denied")


def test_bootstrap_rotation_revokes_the_previous_key_and_a_revoked_one_stays_revoked(settings, api_url):
    first, second = "lj-boot-" + uuid.uuid4().hex, "lj-boot-" + uuid.uuid4().hex
    with transaction(settings.database_url) as session:
        assert ensure_bootstrap_key(session, first, settings) is None
    assert httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    with transaction(settings.database_url) as session:
        assert ensure_bootstrap_key(session, second, settings) is None
    assert httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {first}"}).status_code == 401
    assert httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {second}"}).status_code == 200

    # Going back to the revoked key: `lorajobs migrate` carries on, says so, and the key stays revoked.
    env = {**os.environ, "LORAJOBS_BOOTSTRAP_API_KEY": first, "LORAJOBS_LOG_JSON": "false"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "migrate"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "was revoked and stays revoked" in done.stderr
    assert httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {first}"}).status_code == 401
    assert httpx.get(api_url + "/v1/files", headers={"Authorization": f"Bearer {second}"}).status_code == 200


def test_an_empty_bootstrap_key_means_unset():
    assert Settings(bootstrap_api_key="").bootstrap_api_key is None


@pytest.mark.parametrize("secret, key, problem", [
    ("dev-insecure-secret-key", None, "LORAJOBS_SECRET_KEY is a placeholder"),
    ("abc", None, "LORAJOBS_SECRET_KEY is too short"),
    ("x" * 31, None, "LORAJOBS_SECRET_KEY is too short"),
    ("x" * 32, "lj-local-dev-key", "the public key lj-local-dev-key"),
])
def test_production_refuses_weak_secrets_and_public_keys(secret, key, problem):
    with pytest.raises(ValueError, match=problem):
        Settings(environment="production", secret_key=secret, bootstrap_api_key=key)


def test_production_accepts_a_real_secret():
    assert Settings(environment="production", secret_key="x" * 32).secure_cookies is True


def test_the_api_refuses_to_listen_off_loopback_with_a_placeholder_secret_or_a_public_key(settings):
    def api_on(host: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", "api", "--host", host, "--port", "1"], cwd=ROOT,
                              env={**os.environ, "LORAJOBS_LOG_JSON": "false", **env}, capture_output=True,
                              text=True, timeout=120)

    refused = api_on("0.0.0.0")
    assert refused.returncode == 2 and "LORAJOBS_SECRET_KEY is a placeholder" in refused.stderr

    pepper = "p" * 40
    with transaction(settings.database_url) as session:
        public = create_key(session, f"demo-{uuid.uuid4().hex[:8]}", key="lj-local-dev-key",
                            settings=settings.model_copy(update={"api_key_pepper": pepper})).row.id
    try:
        refused = api_on("0.0.0.0", LORAJOBS_SECRET_KEY="s" * 40, LORAJOBS_API_KEY_PEPPER=pepper)
    finally:
        with transaction(settings.database_url) as session:
            revoke_key(session, public)
    assert refused.returncode == 2 and "the public API key lj-local-dev-key is active" in refused.stderr


def test_lorajobs_keys_create_read_only_makes_a_key_that_only_reads(api_url):
    project = f"grafana-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "--project", project, "--read-only"],
                          cwd=ROOT, env={**os.environ, "LORAJOBS_LOG_JSON": "false"}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    key = done.stdout.split()[0]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(api_url + "/v1/fine_tuning/jobs", headers=headers).status_code == 200
    assert httpx.post(api_url + "/v1/fine_tuning/jobs/ftjob-x/cancel", headers=headers).status_code == 403
    listed = subprocess.run([sys.executable, "-m", "cli.main", "keys", "list", "--project", project], cwd=ROOT,
                            env={**os.environ, "LORAJOBS_LOG_JSON": "false"}, capture_output=True, text=True, timeout=60)
    assert "read-only" in listed.stdout
