"""A running lorajobs for tests: the API on a loopback port (uvicorn in a thread) and real worker processes."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from api.main import create_app
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a child process read the same settings."""
    env = {
        "LORAJOBS_DATABASE_URL": settings.database_url,
        "LORAJOBS_BROKER_URL": settings.broker_url,
        "LORAJOBS_BROKER_PREFIX": settings.broker_prefix,
        "LORAJOBS_STORAGE_URL": settings.storage_url,
        "LORAJOBS_MODELS_DIR": str(settings.models_dir),
        "LORAJOBS_DATA_DIR": str(settings.data_dir),
        "LORAJOBS_LEASE_SECONDS": str(settings.lease_seconds),
        "LORAJOBS_MAX_ATTEMPTS": str(settings.max_attempts),
        "LORAJOBS_LOG_JSON": "false",
    }
    if settings.s3_endpoint_url:
        env["LORAJOBS_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.gpu_classes:
        env["LORAJOBS_GPU_CLASSES"] = settings.gpu_classes
    if settings.work_dir:
        env["LORAJOBS_WORK_DIR"] = str(settings.work_dir)
    return env


class ApiServer:
    def __init__(self, settings: Settings, port: int | None = None):
        self.port = port or free_port()  # a restarted API takes its predecessor's port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "ApiServer":
        self.thread.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the API did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class WorkerProcess:
    """`lorajobs worker` as a real child process (its own process group, so kill -9 takes its pool too)."""

    def __init__(self, settings: Settings, queues: str, log_path: Path):
        self.settings, self.queues, self.log_path = settings, queues, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **settings_env(self.settings)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--queues", self.queues,
             "--hostname", f"{self.queues.replace(',', '-')}-{os.getpid()}-{free_port()}@%h"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill_hard(self) -> None:
        """SIGKILL the worker and its pool children at once, as a machine loss would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
