"""The `lorajobs` command as a person uses it: keys, files and jobs against a running service."""

import json
import os
import subprocess
import sys

import httpx

from tests.conftest import TINY_MODEL_ID
from tests.stack import ROOT, settings_env

DEMO = ROOT / "examples" / "demo"


def lorajobs(settings, *args, check=True, timeout=300):
    env = {**os.environ, **settings_env(settings)}
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_keys_create_list_revoke(stack, settings):
    created = lorajobs(settings, "keys", "create", "--project", "cli-team", "--name", "ci")
    key = created.stdout.splitlines()[0]
    assert key.startswith("lj-") and "not shown again" in created.stdout
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(stack.v1 + "/files", headers=headers).status_code == 200
    listing = lorajobs(settings, "keys", "list", "--project", "cli-team").stdout
    assert key[:11] in listing and "active" in listing and key not in listing
    lorajobs(settings, "keys", "revoke", key[:11])
    assert "revoked" in lorajobs(settings, "keys", "list", "--project", "cli-team").stdout
    assert httpx.get(stack.v1 + "/files", headers=headers).status_code == 401


def test_upload_report_train_watch_and_download(stack, settings, project_key, tmp_path):
    connection = ("--base-url", stack.v1, "--api-key", project_key.key)
    uploaded = lorajobs(settings, "files", "upload", str(DEMO / "train.jsonl"), *connection)
    file_id = uploaded.stdout.split()[0]
    assert file_id.startswith("file-")
    assert "processed" in uploaded.stdout and "format: chat" in uploaded.stdout
    assert f"tokens ({TINY_MODEL_ID}" in uploaded.stdout
    assert "format: chat" in lorajobs(settings, "files", "report", file_id, *connection).stdout

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"lora": {"r": 4}, "batch_size": 32, "eval_steps": 5}))
    created = lorajobs(settings, "jobs", "create", "--model", TINY_MODEL_ID, "--file", file_id, "--quantization",
                       "none", "--epochs", "1", "--max-seq-length", "512", "--spec", str(spec), "--suffix", "cli",
                       "--watch", *connection)
    job_id = created.stdout.split()[0]
    assert job_id.startswith("ftjob-") and "succeeded: ft:" in created.stdout
    assert job_id in lorajobs(settings, "jobs", "list", *connection).stdout
    shown = json.loads(lorajobs(settings, "jobs", "show", job_id, *connection).stdout)
    assert shown["status"] == "succeeded" and shown["lora"]["r"] == 4

    out = tmp_path / "adapter"
    downloaded = lorajobs(settings, "jobs", "download", job_id, "--out", str(out), *connection)
    assert "verified" in downloaded.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]

    refused = lorajobs(settings, "jobs", "cancel", job_id, *connection, check=False)
    assert refused.returncode != 0 and "job_already_finished" in refused.stderr


def test_jobs_create_dry_run_prints_the_plan_and_creates_nothing(stack, settings, project_key):
    connection = ("--base-url", stack.v1, "--api-key", project_key.key)
    file_id = lorajobs(settings, "files", "upload", str(DEMO / "train.jsonl"), *connection).stdout.split()[0]
    planned = lorajobs(settings, "jobs", "create", "--model", TINY_MODEL_ID, "--file", file_id, "--quantization",
                       "none", "--max-seq-length", "256", "--dry-run", *connection).stdout
    assert f"{TINY_MODEL_ID} (llama): " in planned and "trainable of" in planned
    assert "Smallest class that fits: gpu-24g" in planned
    assert "cpu" in planned and "micro×acc" in planned
    assert "ftjob-" not in lorajobs(settings, "jobs", "list", *connection).stdout
