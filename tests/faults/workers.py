"""A lorajobs of one test's own for the worker fault tests: its broker namespace, API, sweeper and workers, with
settings a fault needs (a short watchdog, a small work folder) given to the workers it starts."""

import os
import signal
import subprocess
import sys
import time
import uuid

import openai

from core.settings import Settings
from tests.conftest import TEST_OUTPUT, make_project_key
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset
from tests.stack import ROOT, ApiServer, WorkerProcess, settings_env

LOGS = TEST_OUTPUT / "logs"


class Worker(WorkerProcess):
    """`lorajobs worker` with extra environment (fault settings) on top of the stack's."""

    def __init__(self, settings: Settings, queues: str, name: str, env: dict[str, str] | None = None):
        LOGS.mkdir(parents=True, exist_ok=True)
        super().__init__(settings, queues, LOGS / f"faults-{name}.log")
        self.env = env or {}

    def start(self) -> "Worker":
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            super().start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return self

    def pool(self, timeout: float = 60) -> list[int]:
        """The pids of the worker's pool processes (its training happens there)."""
        from worker.resilience import pool_children

        deadline = time.time() + timeout
        while time.time() < deadline:
            children = pool_children(self.proc.pid)
            if children:
                return children
            time.sleep(0.1)
        raise AssertionError("the worker started no pool process")


class FaultStack:
    """API (in a thread), sweeper and CPU worker on `settings` with a broker namespace of their own."""

    def __init__(self, settings: Settings, sweep_interval: float = 0.5):
        self.settings = settings.model_copy(update={"broker_prefix": f"{settings.broker_prefix}faults-{uuid.uuid4().hex[:6]}:"})
        self.sweep_interval = sweep_interval
        self.workers: list[Worker] = []

    def __enter__(self) -> "FaultStack":
        LOGS.mkdir(parents=True, exist_ok=True)  # also when this test runs alone, before any Worker made it
        self.api = ApiServer(self.settings).start()
        self.sweeper = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "sweeper"], cwd=ROOT,
            env={**os.environ, **settings_env(self.settings),
                 "LORAJOBS_SWEEP_INTERVAL_SECONDS": str(self.sweep_interval)},
            stdout=open(LOGS / "faults-sweeper.log", "ab"), stderr=subprocess.STDOUT)
        self.worker("cpu", "cpu")
        key = make_project_key(self.settings)
        self.client = openai.OpenAI(base_url=self.api.url + "/v1", api_key=key.key, max_retries=2, timeout=30)
        return self

    def worker(self, queues: str, name: str, **env: str) -> Worker:
        worker = Worker(self.settings, queues, name, {k.upper(): v for k, v in env.items()}).start()
        self.workers.append(worker)
        return worker

    def __exit__(self, *_exc) -> None:
        self.sweeper.terminate()
        self.sweeper.wait(timeout=10)
        for worker in self.workers:
            if worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(timeout=10)
            worker.log.close()
        self.api.stop()

    def training_file(self, n: int = 48) -> str:
        return processed_file(self.client, support_dataset(n))

    def job(self, training_file: str, **extra):
        extra.setdefault("hyperparameters", {"n_epochs": 6, "batch_size": 2})
        extra.setdefault("save_steps", 100)
        extra.setdefault("eval_steps", 100)
        return create_job(self.client, training_file, **extra)

    def wait_step(self, job_id: str, step: int, timeout: float = 120) -> dict:
        """Wait until the running job reported `step` trained steps; its progress then."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client.fine_tuning.jobs.retrieve(job_id)
            progress = job.model_extra.get("progress") or {}
            if job.status == "running" and (progress.get("step") or 0) >= step:
                return progress
            assert job.status in ("queued", "running"), (job.status, job.error)
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not reach step {step} in {timeout} s")


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    from tests.e2e.jobs_helpers import all_events

    return [event.message for event in all_events(client, job_id)]
