"""`lorajobs up` on the embedded default: SQLite, Celery's filesystem transport, a local objects folder."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil

from tests.conftest import TEST_OUTPUT
from tests.stack import ROOT, free_port

KEY = "lj-embedded-test-key"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def start_up(cwd, env, log):
    return subprocess.Popen([sys.executable, "-m", "cli.main", "up"], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "lorajobs up exited"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("/readyz never answered 200")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> list[psutil.Process]:
    """Ctrl-C; returns the processes that outlived it (none, when every part stopped)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(family, timeout=20)
    return alive


def test_lorajobs_up_serves_everything_restarts_a_dead_worker_and_stops_cleanly(tmp_path, smollm2_models_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAJOBS_")}
    port = free_port()
    env.update(LORAJOBS_PORT=str(port), LORAJOBS_BOOTSTRAP_API_KEY=KEY, LORAJOBS_MODELS_DIR=str(smollm2_models_dir),
               LORAJOBS_LOG_JSON="false", PYTHONPATH=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    log_path = TEST_OUTPUT / "logs" / "embedded-up.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = start_up(tmp_path, env, log)
        try:
            wait_ready(url, proc)
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
            assert SMOLLM2 in {m.id for m in client.models.list()}
            # The packaged weights are not the official checkpoint, and the catalogue says so.
            assert "Q4_1 GGUF" in client.models.retrieve(SMOLLM2).model_extra["provenance"]
            rows = [{"messages": [{"role": "user", "content": f"Where is order {i}?"},
                                  {"role": "assistant", "content": f"Order {i} ships tomorrow."}]} for i in range(12)]
            data = "\n".join(json.dumps(r) for r in rows).encode()
            uploaded = client.files.create(file=("orders.jsonl", io.BytesIO(data)), purpose="fine-tune")
            done = client.files.wait_for_processing(uploaded.id, poll_interval=0.2, max_wait_seconds=90)
            assert done.status == "processed"
            report = client.get(f"/files/{uploaded.id}/report", cast_to=object)["report"]
            assert report["token_stats"][SMOLLM2]["count"] == 12
            assert (tmp_path / "var" / "lorajobs.db").is_file() and (tmp_path / "var" / "objects").is_dir()

            def gpu_worker():
                for child in psutil.Process(proc.pid).children():
                    try:
                        if "gpu" in " ".join(child.cmdline()):
                            return child
                    except psutil.Error:  # the killed one, until `up` reaps it
                        continue
                return None

            dead = gpu_worker()
            for process in [dead, *dead.children(recursive=True)]:
                process.kill()
            wait_for(lambda: (w := gpu_worker()) is not None and w.pid != dead.pid, 30, "a new gpu worker")
            wait_for(lambda: b"worker-gpu exited with code" in log_path.read_bytes(), 10, "the restart log line")
            # Stop once the new worker is up: a Celery worker sent SIGTERM while it is still booting may not exit
            # (it then waits for the 90 s kill), a leftover of `up`, not what this test is about.
            wait_for(lambda: len(re.findall(rb"gpu@\S+ ready\.", log_path.read_bytes())) >= 2, 60,
                     "the new gpu worker ready")
        finally:
            alive = stop(proc)
        assert alive == []

        second = start_up(tmp_path, env, log)
        try:
            wait_ready(url, second)
            assert [f.id for f in client.files.list()] == [uploaded.id]
        finally:
            assert stop(second) == []
