"""The deployment's model catalogue on the real database and S3: added once with a sha256 per file, downloaded and
verified by workers on first use, kept within a disk bound; a hub pull where no hub answers says so; and two workers
with separate model and work folders (two hosts, no shared filesystem) both train a model added once."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from cli.main import main as lorajobs
from core.errors import StorageError
from core.storage import get_storage
from db import catalogue
from db.session import transaction
from tests.conftest import TEST_OUTPUT, TINY_MODEL_ID, make_project_key
from tests.e2e.jobs_helpers import all_events, processed_file, support_dataset, wait_status
from tests.stack import ApiServer, WorkerProcess
from worker.catalogue import CACHE_MARKER, TOKENIZERS_FOLDER, WEIGHT_SUFFIXES, ensure_model, evict_models

ROOT = Path(__file__).resolve().parent.parent.parent


def test_a_model_is_added_once_with_a_sha256_per_file(settings, models_dir, tmp_path, capsys):
    assert lorajobs(["models", "add", "ops/added-once", str(models_dir / TINY_MODEL_ID)]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Added ops/added-once (LlamaForCausalLM) to the catalogue: ") and "uploaded " in first
    # The same folder again uploads nothing; another model sharing its files uploads nothing either.
    assert lorajobs(["models", "add", "ops/added-once", str(models_dir / TINY_MODEL_ID)]) == 0
    assert "every file already stored" in capsys.readouterr().out
    assert lorajobs(["models", "add", "ops/same-files", str(models_dir / TINY_MODEL_ID)]) == 0
    assert "every file already stored" in capsys.readouterr().out
    with transaction(settings.database_url) as session:
        entry = catalogue.get(session, "ops/added-once")
        files = {f["path"]: f for f in entry.files}
        assert entry.config["architectures"] == ["LlamaForCausalLM"] and entry.source == "upload"
    storage = get_storage(settings)
    for path, f in files.items():
        assert storage.sha256(catalogue.blob_key(f["sha256"])) == f["sha256"]
        assert f["bytes"] == (models_dir / TINY_MODEL_ID / path).stat().st_size
    # Other files under a taken id are refused.
    other = tmp_path / "other"
    shutil.copytree(models_dir / TINY_MODEL_ID, other)
    (other / "generation_config.json").write_text("{}")
    assert lorajobs(["models", "add", "ops/added-once", str(other)]) == 1
    assert "already in the catalogue with other files" in capsys.readouterr().out
    assert lorajobs(["models", "list"]) == 0
    assert "ops/added-once\tLlamaForCausalLM\tcatalogue (object storage)" in capsys.readouterr().out


def test_a_worker_downloads_and_verifies_on_first_use_and_stays_within_its_bound(settings, models_dir, tmp_path):
    assert lorajobs(["models", "add", "ops/cached", str(models_dir / TINY_MODEL_ID)]) == 0
    mine = settings.model_copy(update={"models_dir": tmp_path / "models"})
    storage = get_storage(settings)
    said = ensure_model(mine, storage, "ops/cached")
    assert said.startswith("Downloaded ops/cached from the catalogue: ") and "every sha256 verified" in said
    assert (mine.models_dir / "ops/cached/config.json").is_file()
    assert ensure_model(mine, storage, "ops/cached") is None  # cached: nothing to do
    assert ensure_model(mine, storage, TINY_MODEL_ID) is None  # not the catalogue's: a local folder or a hub id

    # A damaged object is refused, and nothing half-downloaded is left.
    assert lorajobs(["models", "add", "ops/damaged", str(models_dir / TINY_MODEL_ID)]) == 0
    with transaction(settings.database_url) as session:
        entry = catalogue.get(session, "ops/damaged")
        entry.files = [{**f, "sha256": "0" * 64} if f["path"] == "config.json" else f for f in entry.files]
    storage.put_bytes(catalogue.blob_key("0" * 64), b"{}")
    with pytest.raises(StorageError, match="config.json downloaded from object storage does not match its sha256"):
        ensure_model(mine, storage, "ops/damaged")
    assert not (mine.models_dir / "ops/damaged").exists() and not any((mine.models_dir / ".staging").iterdir())
    with transaction(settings.database_url) as session:  # the session's other tests share this catalogue
        session.delete(catalogue.get(session, "ops/damaged"))

    # Past the bound the least recently used download goes; one used in the last minutes stays.
    size = sum(f.stat().st_size for f in (mine.models_dir / "ops/cached").iterdir())
    assert evict_models(mine.models_dir, size // 2, keep="none") == []  # just used
    marker = mine.models_dir / "ops/cached" / CACHE_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "used_at": time.time() - 3600}))
    assert evict_models(mine.models_dir, size // 2, keep="none") == ["ops/cached"]
    assert not (mine.models_dir / "ops/cached").exists()


def test_pulling_from_a_hub_that_cannot_be_reached_says_so(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: the hub is unreachable, as on this machine
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "models", "pull", "HuggingFaceTB/SmolLM2-360M-Instruct",
                           "--revision", "main", "--models-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    assert done.stdout.startswith(f"lorajobs: Could not reach the model hub at http://127.0.0.1:{closed} (")
    assert "`lorajobs models add ID PATH`" in done.stdout and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def two_hosts(settings, tmp_path):
    """An API with no model folder, a broker namespace of its own and a dataset worker: the shared services."""
    mine = settings.model_copy(update={"broker_prefix": settings.broker_prefix + "hosts:",
                                       "models_dir": tmp_path / "api-models", "work_dir": tmp_path / "api-work"})
    (TEST_OUTPUT / "logs").mkdir(parents=True, exist_ok=True)
    api = ApiServer(mine).start()
    cpu = WorkerProcess(mine, "cpu", TEST_OUTPUT / "logs" / "hosts-worker-cpu.log").start()
    yield mine, api
    cpu.stop()
    api.stop()


def test_two_workers_on_separate_folders_train_a_model_added_once(two_hosts, models_dir, tmp_path):
    settings, api = two_hosts
    assert lorajobs(["models", "add", "shared/tiny", str(models_dir / TINY_MODEL_ID)]) == 0
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=key.key, max_retries=0)
    listed = httpx.get(api.url + "/v1/models", headers={"Authorization": f"Bearer {key.key}"}).json()["data"]
    assert "shared/tiny" in [m["id"] for m in listed]  # from the database: the API has no model folder
    training_file = processed_file(client, support_dataset(12))
    # The dataset worker has no model folder either: it counted the file's tokens with the catalogue's tokenizer,
    # fetched without the weights into its work folder, once: a second file counts from it.
    stats = client.get(f"/files/{training_file}/report", cast_to=object)["report"]["token_stats"]
    assert stats["shared/tiny"]["count"] == 12 and stats["shared/tiny"]["max"] > 0
    tokenizer_folder = settings.work_dir / TOKENIZERS_FOLDER / "shared/tiny"
    fetched = {path.name: path.stat().st_mtime_ns for path in tokenizer_folder.iterdir() if path.name != CACHE_MARKER}
    assert "tokenizer.json" in fetched and "config.json" in fetched
    assert not [name for name in fetched if name.endswith(WEIGHT_SUFFIXES)]
    second = processed_file(client, support_dataset(10))
    assert client.get(f"/files/{second}/report", cast_to=object)["report"]["token_stats"]["shared/tiny"]["count"] == 10
    assert {path.name: path.stat().st_mtime_ns for path in tokenizer_folder.iterdir()
            if path.name != CACHE_MARKER} == fetched  # not downloaded again

    for host in ("host-a", "host-b"):
        models, work = tmp_path / host / "models", tmp_path / host / "work"
        worker = WorkerProcess(settings.model_copy(update={"models_dir": models, "work_dir": work}), "gpu",
                               TEST_OUTPUT / "logs" / f"hosts-worker-{host}.log").start()
        try:
            job = client.fine_tuning.jobs.create(
                model="shared/tiny", training_file=training_file, suffix=host,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
                extra_body={"quantization": "none", "lora": {"r": 4}, "max_seq_length": 64})
            done = wait_status(client, job.id, timeout=240)
        finally:
            worker.stop()
        assert done.status == "succeeded", done.error
        downloaded = [e.message for e in all_events(client, job.id) if e.message.startswith("Downloaded shared/tiny")]
        assert len(downloaded) == 1 and "every sha256 verified" in downloaded[0]
        assert (models / "shared/tiny/config.json").is_file() and (models / "shared/tiny" / CACHE_MARKER).is_file()
        assert work.is_dir()
    assert not (tmp_path / "api-models").exists()  # the models folder was never written, as if mounted read-only
