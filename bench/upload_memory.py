"""Peak memory of the API while a 300 MB dataset is uploaded, against a naive endpoint that reads it whole.

    .venv/bin/python bench/upload_memory.py [--mb 300] [--pg URL]

Starts a throwaway SeaweedFS S3 server and the real API (`lorajobs api`) on PostgreSQL, plus a baseline
FastAPI app whose upload endpoint does `await file.read()`. Streams the same generated JSONL body to each
(never held whole by the client either) and samples the server process's RSS every 20 ms.
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench._services import free_port, fresh_postgres_database, start_process, stop_processes, wait_http

NAIVE_APP = '''
import hashlib
from fastapi import FastAPI, UploadFile
app = FastAPI()
@app.post("/v1/files")
async def upload(file: UploadFile):
    data = await file.read()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
'''

BOUNDARY = "lorajobsbenchboundary"


def multipart_body(megabytes: int):
    """A multipart upload of `megabytes` MB of chat JSONL, generated chunk by chunk."""
    line = (json.dumps({"messages": [{"role": "user", "content": "What is the warranty on the trail tent?"},
                                     {"role": "assistant", "content": "Two years, parts and labour."}]}) + "\n")
    chunk = (line * ((1 << 20) // len(line) + 1)).encode()[: 1 << 20]
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/jsonl\r\n\r\n").encode()
    for _ in range(megabytes):
        yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def peak_rss_during(pid: int, action) -> tuple[float, float]:
    proc = psutil.Process(pid)
    idle = proc.memory_info().rss
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return idle / 2**20, peak[0] / 2**20


def upload(url: str, key: str | None, megabytes: int) -> None:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = httpx.post(url, content=multipart_body(megabytes), headers=headers, timeout=600)
    assert response.status_code == 200, response.text[:500]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    from api.services.projects import create_key
    from core.settings import Settings
    from core.storage import get_storage
    from db.migrate import upgrade
    from db.session import transaction
    from tests.core.s3server import start_seaweedfs

    work = Path(tempfile.mkdtemp(prefix="lorajobs-bench-"))
    endpoint, stop_s3 = start_seaweedfs(work / "s3")
    database_url, drop = fresh_postgres_database(args.pg)
    env = {"LORAJOBS_DATABASE_URL": database_url, "LORAJOBS_BROKER_URL": "redis://127.0.0.1:6379/13",
           "LORAJOBS_STORAGE_URL": "s3://bench/objects", "LORAJOBS_S3_ENDPOINT_URL": endpoint,
           "LORAJOBS_MAX_UPLOAD_BYTES": str((args.mb + 10) << 20), "LORAJOBS_LOG_LEVEL": "WARNING"}
    procs = []
    try:
        upgrade(database_url)
        settings = Settings(database_url=database_url, storage_url="s3://bench/objects", s3_endpoint_url=endpoint)
        get_storage(settings).ensure_bucket()
        with transaction(database_url) as session:
            key = create_key(session, "bench").key
        (work / "naive_app.py").write_text(NAIVE_APP)
        ports = {"lorajobs API (streaming to S3)": free_port(), "naive FastAPI (reads the file whole)": free_port()}
        names = list(ports)
        procs.append(start_process(["-m", "cli.main", "api", "--port", str(ports[names[0]])], env, work / "api.log"))
        procs.append(start_process(["-m", "uvicorn", "--app-dir", str(work), "naive_app:app", "--port",
                                    str(ports[names[1]]), "--log-level", "warning"], env, work / "naive.log"))
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/docs")
        print(f"uploading {args.mb} MB to each server; peak RSS of the server process\n")
        rows = {}
        for (name, port), proc in zip(ports.items(), procs):
            url = f"http://127.0.0.1:{port}/v1/files"
            started = time.perf_counter()
            idle, peak = peak_rss_during(proc.pid, lambda: upload(url, key, args.mb))
            rows[name] = (idle, peak, time.perf_counter() - started)
        print(f"{'server':<40} {'idle MB':>8} {'peak MB':>8} {'growth MB':>10} {'seconds':>8}")
        for name, (idle, peak, seconds) in rows.items():
            print(f"{name:<40} {idle:8.0f} {peak:8.0f} {peak - idle:10.0f} {seconds:8.1f}")
        ours, naive = (rows[n][1] - rows[n][0] for n in names)
        print(f"\nmemory growth: lorajobs {ours:.0f} MB vs naive {naive:.0f} MB "
              f"({naive / max(ours, 1):.1f}x less)")
    finally:
        stop_processes(procs)
        drop()
        stop_s3()


if __name__ == "__main__":
    main()
