"""The CLI as scripts and people use it against a real API: --json everywhere, exit codes and one-line errors, the
job commands (events, checkpoints, plan, merged), files delete, and `watch`/`events --follow` through an API restart."""

import json
import os
import subprocess
import sys
import time

import openai

from tests.cli.test_cli import lorajobs
from tests.conftest import TINY_MODEL_ID
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset, wait_status
from tests.stack import ROOT, ApiServer, free_port, settings_env


def bare_lorajobs(*args, timeout=60):
    """The CLI with no lorajobs settings at all, as on a laptop that only talks to a remote API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAJOBS_")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorajobs: "), result.stderr
    return lines[0]


def test_version_and_a_server_that_is_down():
    version = bare_lorajobs("--version")
    assert version.returncode == 0 and version.stdout.startswith("lorajobs 0.")
    down = f"http://127.0.0.1:{free_port()}/v1"
    for command in (("files", "list"), ("jobs", "watch", "ftjob-x"), ("jobs", "events", "ftjob-x", "--follow"),
                    ("jobs", "download", "ftjob-x"), ("jobs", "list", "--json")):
        started = time.monotonic()
        result = bare_lorajobs(*command, "--base-url", down, "--api-key", "lj-x")
        assert result.returncode == 3, (command, result.stderr)
        assert f"cannot reach the API at {down}" in one_line_error(result)
        assert result.stdout == ""
        assert time.monotonic() - started < 20  # nothing to ride out: it never answered


def test_refused_key_and_unknown_job_exit_with_their_codes(stack):
    refused = bare_lorajobs("jobs", "list", "--base-url", stack.v1, "--api-key", "lj-not-a-key")
    assert refused.returncode == 4 and "401" in one_line_error(refused)
    missing_key = bare_lorajobs("files", "list", "--base-url", stack.v1)
    assert missing_key.returncode == 1 and "LORAJOBS_API_KEY" in missing_key.stderr


def test_a_base_url_without_v1_is_named_as_the_likely_mistake(stack, project_key):
    """The service's root serves the dashboard, which redirects to its login: the CLI says so, not "HTTP 303:"."""
    for command in (("files", "list"), ("jobs", "list", "--json"), ("jobs", "show", "ftjob-x")):
        result = bare_lorajobs(*command, "--base-url", stack.url, "--api-key", project_key.key)
        line = one_line_error(result)
        assert result.returncode == 1 and result.stdout == "", (command, result.stderr)
        assert "ending in /v1, e.g. http://127.0.0.1:8000/v1?" in line, line
    # The dashboard's pages redirect to its login; other paths are the API's own 404 for an unknown URL.
    files = bare_lorajobs("files", "list", "--base-url", stack.url, "--api-key", project_key.key)
    assert "HTTP 303: /files redirected to /login" in one_line_error(files)
    jobs = bare_lorajobs("jobs", "list", "--base-url", stack.url, "--api-key", project_key.key)
    assert "404 invalid_request_error: Unknown URL" in one_line_error(jobs)
    assert "/fine_tuning/jobs is outside the API's /v1" in one_line_error(jobs)
    # With /v1 the same key and command answer.
    assert bare_lorajobs("jobs", "list", "--base-url", stack.v1, "--api-key", project_key.key).returncode == 0


def test_every_remote_command_speaks_json(stack, settings, project_key, tmp_path):
    connection = ("--base-url", stack.v1, "--api-key", project_key.key)
    dataset = tmp_path / "support.jsonl"
    dataset.write_bytes(support_dataset(24))
    uploaded = json.loads(lorajobs(settings, "files", "upload", str(dataset), "--json", *connection).stdout)
    assert uploaded["status"] == "processed" and uploaded["report"]["format"] == "chat"
    assert [f["id"] for f in json.loads(lorajobs(settings, "files", "list", "--json", *connection).stdout)] == \
        [uploaded["id"]]
    assert json.loads(lorajobs(settings, "files", "report", uploaded["id"], "--json", *connection).stdout)[
        "report"]["examples"] == uploaded["report"]["examples"]

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"lora": {"r": 4}, "batch_size": 4, "eval_steps": 2, "save_steps": 2}))
    created = json.loads(lorajobs(settings, "jobs", "create", "--model", TINY_MODEL_ID, "--file", uploaded["id"],
                                  "--quantization", "none", "--epochs", "1", "--max-seq-length", "64", "--spec",
                                  str(spec), "--json", *connection).stdout)
    watched = lorajobs(settings, "jobs", "watch", created["id"], "--json", *connection)
    job = json.loads(watched.stdout)
    assert job["id"] == created["id"] and job["status"] == "succeeded"
    assert [j["id"] for j in json.loads(lorajobs(settings, "jobs", "list", "--json", *connection).stdout)] == \
        [job["id"]]

    events = json.loads(lorajobs(settings, "jobs", "events", job["id"], "--limit", "1000", "--json",
                                 *connection).stdout)
    client = openai.OpenAI(base_url=stack.v1, api_key=project_key.key, max_retries=0)
    api_events = list(client.fine_tuning.jobs.list_events(job["id"], limit=100).data)  # newest first
    assert [e["id"] for e in events] == [e.id for e in reversed(api_events)]
    assert events[0]["message"].startswith("Created fine-tuning job")
    assert events[-1]["message"] == "The job has successfully completed"
    text = lorajobs(settings, "jobs", "events", job["id"], "--limit", "3", *connection).stdout.splitlines()
    assert len(text) == 3 and text[-1].endswith(api_events[0].message)

    checkpoints = json.loads(lorajobs(settings, "jobs", "checkpoints", job["id"], "--json", *connection).stdout)
    assert checkpoints and [c["step_number"] for c in checkpoints] == sorted(c["step_number"] for c in checkpoints)
    assert all(c["fine_tuned_model_checkpoint"].startswith(job["fine_tuned_model"]) for c in checkpoints)

    plan = json.loads(lorajobs(settings, "jobs", "plan", job["id"], "--json", *connection).stdout)
    assert plan["object"] == "fine_tuning.job.plan" and plan["trainable_parameters"] == job["trainable_parameters"]
    assert "Smallest class that fits" in lorajobs(settings, "jobs", "plan", job["id"], *connection).stdout

    adapter = json.loads(lorajobs(settings, "jobs", "download", job["id"], "--out", str(tmp_path / "adapter"),
                                  "--json", *connection).stdout)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and len(adapter["sha256"]) == 64
    merged = json.loads(lorajobs(settings, "jobs", "merged", job["id"], "--out", str(tmp_path / "merged"), "--json",
                                 *connection, timeout=600).stdout)
    assert (tmp_path / "merged" / "config.json").is_file() and merged["path"] == str(tmp_path / "merged")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "merged").iterdir())

    refused = lorajobs(settings, "jobs", "cancel", job["id"], "--json", *connection, check=False)
    assert refused.returncode == 1 and "job_already_finished" in one_line_error(refused)
    deleted = json.loads(lorajobs(settings, "files", "delete", uploaded["id"], "--json", *connection).stdout)
    assert deleted == {"id": uploaded["id"], "object": "file", "deleted": True}
    remaining = json.loads(lorajobs(settings, "files", "list", "--json", *connection).stdout)
    assert uploaded["id"] not in [f["id"] for f in remaining]  # the job's result files stay


def test_watch_and_follow_ride_out_an_api_restart(stack, settings, project_key, tmp_path):
    """`jobs watch` and `jobs events --follow` against an API that is stopped and started again meanwhile."""
    client = openai.OpenAI(base_url=stack.v1, api_key=project_key.key, max_retries=0)
    job = create_job(client, processed_file(client, support_dataset(24)),
                     hyperparameters={"n_epochs": 30, "batch_size": 1})
    api = ApiServer(settings).start()
    env = {**os.environ, **settings_env(settings)}
    connection = ("--base-url", api.url + "/v1", "--api-key", project_key.key)
    command = [sys.executable, "-m", "cli.main", "jobs"]
    out = {name: (tmp_path / f"{name}.out", tmp_path / f"{name}.err") for name in ("watch", "follow")}
    watch = subprocess.Popen([*command, "watch", job.id, *connection], cwd=ROOT, env=env,
                             stdout=out["watch"][0].open("w"), stderr=out["watch"][1].open("w"))
    follow = subprocess.Popen([*command, "events", job.id, "--follow", "--json", *connection], cwd=ROOT, env=env,
                              stdout=out["follow"][0].open("w"), stderr=out["follow"][1].open("w"))
    try:
        wait_status(client, job.id, ("running",), timeout=120)
        deadline = time.time() + 60  # both have had answers: the progress bar is drawn, events are printed
        while not ("%|" in out["watch"][1].read_text() and out["follow"][0].read_text()):
            assert time.time() < deadline and watch.poll() is None and follow.poll() is None
            time.sleep(0.2)
        api.stop()
        time.sleep(4)  # a few failed polls, each retried with a longer wait
        api = ApiServer(settings, port=api.port).start()
        time.sleep(3)
        client.fine_tuning.jobs.cancel(job.id)
        wait_status(client, job.id)
        watch.wait(timeout=120)
        follow.wait(timeout=120)
    finally:
        for process in (watch, follow):
            if process.poll() is None:
                process.kill()
        api.stop()

    watched = out["watch"][1].read_text()
    assert watch.returncode == 1, watched  # the job was cancelled: not a success
    assert "connection lost" in watched and "retrying in" in watched and "Traceback" not in watched
    assert "cancelled" in watched.splitlines()[-1]
    followed = out["follow"][1].read_text()
    assert follow.returncode == 1 and "connection lost" in followed and "Traceback" not in followed
    printed = [json.loads(line)["id"] for line in out["follow"][0].read_text().splitlines()]
    newest = [e.id for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100).data))]
    assert len(printed) == len(set(printed)) and printed[-len(newest):] == newest  # each once, none missed


def test_keys_and_models_speak_json_too(stack, settings):
    created = json.loads(lorajobs(settings, "keys", "create", "--project", "json-team", "--read-only", "--json").stdout)
    assert created["key"].startswith("lj-") and created["project"] == "json-team" and created["read_only"] is True
    listed = json.loads(lorajobs(settings, "keys", "list", "--project", "json-team", "--json").stdout)
    assert [(k["id"], k["state"], k["read_only"]) for k in listed] == [(created["id"], "active", True)]
    assert created["key"] not in json.dumps(listed)  # the key itself is shown once, at creation
    revoked = json.loads(lorajobs(settings, "keys", "revoke", created["id"], "--json").stdout)
    assert revoked["id"] == created["id"] and revoked["state"] == "revoked"
    assert json.loads(lorajobs(settings, "keys", "list", "--project", "json-team", "--json").stdout)[0]["state"] == \
        "revoked"
    models = json.loads(lorajobs(settings, "models", "list", "--json").stdout)
    assert TINY_MODEL_ID in [m["id"] for m in models]
