"""Services a broker fault test breaks on purpose: a Redis of its own (no persistence), and the sweeper as a process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.settings import Settings
from tests.core.s3server import free_ports
from tests.stack import ROOT, settings_env

READY_TIMEOUT_S = 30


class RedisServer:
    """`redis-server` on a fixed free loopback port, without persistence: `kill` loses every message, `start` brings
    back an empty broker at the same URL."""

    def __init__(self, tmp_path: Path):
        self.dir = Path(tmp_path)
        self.port = free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")], start_new_session=True)
        import redis

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


class Sweeper:
    """`lorajobs sweeper` as a child process on `settings`, sweeping every half second with resend deadlines of
    seconds (validation after 3 s, waits capped at 3 s), so a test sees lost messages resent quickly."""

    def __init__(self, settings: Settings, log_path: Path, **env: str):
        self.env = {**os.environ, **settings_env(settings), "LORAJOBS_SWEEP_INTERVAL_SECONDS": "0.5",
                    "LORAJOBS_VALIDATION_RESEND_SECONDS": "3", "LORAJOBS_RESEND_BACKOFF_MAX_SECONDS": "3", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sweeper":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "sweeper"], cwd=ROOT, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.log.close()
