"""API latency and throughput with 10,000 jobs in PostgreSQL, beside a bare FastAPI endpoint; dispatch latency.

    .venv/bin/python -m bench.api_load [--pg URL] [--redis URL] [--workers 2] [--clients 64,128] [--rounds 3]

Runs the real API (`lorajobs api --workers N`) and a bare FastAPI app served the same way (uvicorn, N
processes), drives each with 64 and 128 concurrent connections from `wrk` (Debian's package: a C load
generator, so the client does not eat the server's CPU as a Python one would), in interleaved rounds, and
prints the median requests/s, p50/p99 latency with their spread, and the ratio to the bare endpoint. Any
non-2xx response fails the run loudly, with its count of 503s and of other 5xx. Then measures create ->
running on an idle worker.
"""

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench._services import free_port, fresh_postgres_database, start_process, stop_processes, wait_http

BARE_APP = '''
from fastapi import FastAPI
app = FastAPI()
@app.get("/bare")
def bare():
    return {"id": "ftjob-bare", "object": "fine_tuning.job", "status": "succeeded"}
'''


def seed_jobs(database_url: str, n: int) -> tuple[str, str]:
    """A project, its key, a file and `n` jobs inserted in bulk; returns (key, one job id)."""
    from api.services.projects import create_key
    from db.migrate import upgrade
    from db.models import File, Job
    from db.session import transaction

    upgrade(database_url)
    now = time.time()
    with transaction(database_url) as session:
        new = create_key(session, "bench")
        project_id = new.project.id
        session.add(File(id="file-bench", project_id=project_id, filename="t.jsonl", purpose="fine-tune", bytes=1,
                         sha256="0" * 64, storage_key="x", status="processed", created_at=now))
        session.flush()
        spec = {"model": "tiny/llama", "quantization": "nf4", "lora": {"r": 16}, "max_seq_length": 1024,
                "n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
        jobs = [dict(id=f"ftjob-bench{i:06d}", project_id=project_id, model="tiny/llama",
                     training_file_id="file-bench", status="succeeded", spec=spec, seed=i, result_files=[],
                     attempts=1, cancel_requested=False, created_at=now - n + i,
                     hyperparameters={"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0},
                     progress={"step": 100, "total_steps": 100, "percent": 100.0}) for i in range(n)]
        session.bulk_insert_mappings(Job, jobs)
    return new.key, f"ftjob-bench{n // 2:06d}"


def _millis(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


# wrk runs one Lua state per thread: `done` sums the threads' counts of 503s and other 5xx.
STATUS_COUNTER = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) s503 = 0; s5xx = 0 end
function response(status, headers, body)
  if status == 503 then s503 = s503 + 1 elseif status >= 500 then s5xx = s5xx + 1 end
end
function done(summary, latency, requests)
  local a, b = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("s503"); b = b + t:get("s5xx") end
  io.write(string.format("status_503 %d\\nstatus_other_5xx %d\\n", a, b))
end
"""


def load(url: str, key: str | None, connections: int, seconds: int, script: Path) -> dict:
    """wrk's requests/s and latency percentiles for GETs of `url`; any non-2xx response fails the run."""
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    if key:
        command[1:1] = ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    counts = {name: int(n) for name, n in re.findall(r"^(status_503|status_other_5xx) (\d+)$", out, re.M)}
    if "Non-2xx" in out or any(counts.values()):
        raise SystemExit(f"FAILED: non-2xx responses from {url} at {connections} connections {counts}:\n{out}")
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if len(percentiles) != 2:
        raise SystemExit(f"FAILED: wrk printed no latency distribution for {url}:\n{out}")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": _millis(percentiles["50"]), "p99_ms": _millis(percentiles["99"])}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}–{max(values):.1f})"


def dispatch_latency(api_url: str, key: str, database_url: str, env: dict, runs: int, work: Path) -> list[float]:
    """Create -> running on an idle worker, for `runs` jobs one after another."""
    from db.session import transaction
    from db.repositories import jobs as jobs_repo

    worker = start_process(["-m", "cli.main", "worker", "--queues", "gpu", "--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h"],
                           env, work / "worker.log")
    headers = {"Authorization": f"Bearer {key}"}
    samples = []
    try:
        time.sleep(5)
        for _ in range(runs):
            body = {"model": "tiny/llama", "training_file": "file-bench", "quantization": "none"}
            started = time.perf_counter()
            job = httpx.post(f"{api_url}/v1/fine_tuning/jobs", json=body, headers=headers, timeout=30).json()
            while True:
                with transaction(database_url) as session:
                    status = jobs_repo.get_any(session, job["id"]).status
                if status != "queued":
                    break
                time.sleep(0.005)
            samples.append(time.perf_counter() - started)
            httpx.post(f"{api_url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers, timeout=30)
            time.sleep(1.0)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", default="64,128", help="Concurrent connections, comma-separated.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds over every endpoint.")
    parser.add_argument("--seconds", type=int, default=10, help="Load per endpoint.")
    parser.add_argument("--workers", type=int, default=2, help="Server processes, for ours and the bare app.")
    parser.add_argument("--dispatch-runs", type=int, default=10)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("install the load generator first: apt-get install wrk")

    database_url, drop = fresh_postgres_database(args.pg)
    work = Path(tempfile.mkdtemp(prefix="lorajobs-bench-"))
    models = work / "models"
    from tests.helpers.tiny_model import build_tiny_model

    build_tiny_model(models / "tiny" / "llama")
    env = {"LORAJOBS_DATABASE_URL": database_url, "LORAJOBS_BROKER_URL": args.redis,
           "LORAJOBS_STORAGE_URL": f"file://{work / 'objects'}", "LORAJOBS_MODELS_DIR": str(models),
           "LORAJOBS_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           # One key drives the whole load: the per-key rate limit would measure itself, not the API.
           "LORAJOBS_RATE_LIMIT_REQUESTS": "0"}
    (work / "bare_app.py").write_text(BARE_APP)
    api_port, bare_port = free_port(), free_port()
    procs = []
    try:
        key, job_id = seed_jobs(database_url, args.jobs)
        procs.append(start_process(["-m", "cli.main", "api", "--port", str(api_port), "--workers", str(args.workers)],
                                   env, work / "api.log"))
        procs.append(start_process(["-m", "uvicorn", "--app-dir", str(work), "bare_app:app", "--port", str(bare_port),
                                    "--workers", str(args.workers), "--log-level", "warning", "--no-access-log"],
                                   env, work / "bare.log"))
        api, bare = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{bare_port}"
        wait_http(api + "/healthz")
        wait_http(bare + "/bare")
        script = work / "status.lua"
        script.write_text(STATUS_COUNTER)
        clients = [int(c) for c in args.clients.split(",")]
        print(f"{args.jobs:,} jobs in PostgreSQL; {args.clients} concurrent connections (wrk); {args.seconds} s each; "
              f"{args.workers} server processes; {args.rounds} interleaved rounds (median, min–max)\n")
        endpoints = (("bare FastAPI endpoint", bare + "/bare", None),
                     ("GET /v1/fine_tuning/jobs/{id}", f"{api}/v1/fine_tuning/jobs/{job_id}", key),
                     ("GET /v1/fine_tuning/jobs?limit=20", f"{api}/v1/fine_tuning/jobs?limit=20", key))
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            for connections in clients:
                for name, url, auth in endpoints:
                    runs.setdefault((name, connections), []).append(load(url, auth, connections, args.seconds, script))
        print(f"{'endpoint':<36} {'conns':>5} {'req/s':>22} {'p50 ms':>22} {'p99 ms':>22} {'vs bare':>8}")
        for (name, connections), samples in runs.items():
            base = statistics.median(r["rps"] for r in runs[("bare FastAPI endpoint", connections)])
            rps = [r["rps"] for r in samples]
            print(f"{name:<36} {connections:>5} {spread(rps):>22} {spread([r['p50_ms'] for r in samples]):>22} "
                  f"{spread([r['p99_ms'] for r in samples]):>22} {statistics.median(rps) / base:8.2f}")
        print("\nno non-2xx response in any round")
        samples = dispatch_latency(api, key, database_url, env, args.dispatch_runs, work)
        print(f"\ndispatch create -> running on an idle worker ({len(samples)} runs): "
              f"p50 {statistics.median(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms")
    finally:
        stop_processes(procs)
        drop()


if __name__ == "__main__":
    main()
