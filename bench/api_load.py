"""API latency and throughput with 10,000 jobs in PostgreSQL, beside a bare FastAPI endpoint; dispatch latency.

    .venv/bin/python bench/api_load.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres \
        --redis redis://127.0.0.1:6379/13

Runs the real API (`lorajobs api`, one uvicorn process) and a bare FastAPI app the same way, drives both
with 64 concurrent clients from this process, and prints p50/p99 latency, requests/s and the ratio.
Then measures create -> running on an idle worker.
"""

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench._services import ROOT, free_port, fresh_postgres_database, start_process, wait_http

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


async def load(url: str, headers: dict, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    remaining = iter(range(requests))

    async def client_loop(http: httpx.AsyncClient) -> None:
        for _ in remaining:
            started = time.perf_counter()
            response = await http.get(url, headers=headers)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        await http.get(url, headers=headers)
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


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
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--dispatch-runs", type=int, default=10)
    args = parser.parse_args()

    database_url, drop = fresh_postgres_database(args.pg)
    work = Path(tempfile.mkdtemp(prefix="lorajobs-bench-"))
    models = work / "models"
    from tests.helpers.tiny_model import build_tiny_model

    build_tiny_model(models / "tiny" / "llama")
    env = {"LORAJOBS_DATABASE_URL": database_url, "LORAJOBS_BROKER_URL": args.redis,
           "LORAJOBS_STORAGE_URL": f"file://{work / 'objects'}", "LORAJOBS_MODELS_DIR": str(models),
           "LORAJOBS_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    (work / "bare_app.py").write_text(BARE_APP)
    api_port, bare_port = free_port(), free_port()
    procs = []
    try:
        key, job_id = seed_jobs(database_url, args.jobs)
        procs.append(start_process(["-m", "cli.main", "api", "--port", str(api_port)], env, work / "api.log"))
        procs.append(start_process(["-m", "uvicorn", "--app-dir", str(work), "bare_app:app", "--port", str(bare_port),
                                    "--log-level", "warning", "--no-access-log"], env, work / "bare.log"))
        api, bare = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{bare_port}"
        wait_http(api + "/healthz")
        wait_http(bare + "/bare")
        headers = {"Authorization": f"Bearer {key}"}
        print(f"{args.jobs:,} jobs in PostgreSQL; {args.clients} concurrent clients; {args.requests} requests each\n")
        results = {}
        for name, url, hdrs in (("bare FastAPI endpoint", bare + "/bare", {}),
                                ("GET /v1/fine_tuning/jobs/{id}", f"{api}/v1/fine_tuning/jobs/{job_id}", headers),
                                ("GET /v1/fine_tuning/jobs?limit=20", f"{api}/v1/fine_tuning/jobs?limit=20", headers)):
            results[name] = asyncio.run(load(url, hdrs, args.clients, args.requests))
        base = results["bare FastAPI endpoint"]["rps"]
        print(f"{'endpoint':<36} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs bare':>8}")
        for name, r in results.items():
            print(f"{name:<36} {r['rps']:8.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['rps'] / base:8.2f}")
        samples = dispatch_latency(api, key, database_url, env, args.dispatch_runs, work)
        print(f"\ndispatch create -> running on an idle worker ({len(samples)} runs): "
              f"p50 {statistics.median(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        drop()


if __name__ == "__main__":
    main()
