"""CPU per request of the hot reads, from a profile of an in-process loop against the real app on PostgreSQL.

    .venv/bin/python -m bench.api_profile [--pg URL] [--redis URL] [--jobs 10000] [--requests 2000] [--top 25]

Seeds a fresh database with `--jobs` jobs of one project (as bench/api_load.py does), builds the real app
(Redis as the broker, so the API-key cache is on) and calls it as an ASGI server would, one request at a time
on one event loop, with no HTTP client or socket in between. It prints, for `GET /v1/fine_tuning/jobs/{id}`,
`GET /v1/fine_tuning/jobs?limit=20` (the seeded jobs hold no result), a page of 20 succeeded jobs whose results hold
their held-out answers as a real job's do, and the read of a queued job behind `--queued` others, the CPU seconds
this process spent per request (`time.process_time`, every thread counted) and then a cProfile of the same loop with
the thread-pool hops run inline, so that the handler's own work shows in the profile. The figures are for
before/after comparisons on one machine; they are not throughput figures (PostgreSQL's and Redis's own CPU is not
counted, and a loaded machine adds noise).
"""

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import time

import anyio.to_thread

from bench._services import fresh_postgres_database
from bench.api_load import seed_jobs

BATCHES = 10
HEADERS: list[tuple[bytes, bytes]] = [(b"host", b"localhost")]


def queue_some(database_url: str, n: int) -> str:
    """The `n` oldest seeded jobs turned queued, each planned (a queued job's read works out its place behind the
    others); returns the last one's id."""
    from sqlalchemy import text

    from db.session import transaction

    plan = json.dumps({"classes": [{"name": "cpu", "duration_seconds": 600.0}]})
    with transaction(database_url) as session:
        ids = session.execute(text("UPDATE fine_tuning_jobs SET status = 'queued', plan = CAST(:plan AS json) WHERE seq IN "
                                   "(SELECT seq FROM fine_tuning_jobs ORDER BY seq LIMIT :n) RETURNING id"),
                              {"plan": plan, "n": n}).scalars().all()
    return sorted(ids)[-1]


def give_results(database_url: str, older_than: str, n: int = 20) -> None:
    """The `n` jobs just older than `older_than` get a result as a real succeeded job's (its 20 held-out prompts
    answered by the base and the tuned model, scored): what a page of finished jobs holds."""
    from sqlalchemy import text

    from db.session import transaction

    score = {"exact_match": False, "facts": 2, "facts_stated": 1, "all_facts": False}
    answers = [{"prompt": f"Which colours does the Ridgeline {i} Pack come in? " * 4, "expected": "Slate, moss and "
                "ember (SKU RL-45-SL, RL-45-MS, RL-45-EM). " * 3, "base": "The pack comes in many colours. " * 16,
                "tuned": "Slate, moss and ember: RL-45-SL, RL-45-MS and RL-45-EM. " * 9, "base_score": score,
                "tuned_score": {**score, "facts_stated": 2, "all_facts": True}} for i in range(20)]
    figures = {"answers": 20, "exact_match": 0.05, "answers_with_facts": 18, "key_facts": 0.6111111111111112,
               "fact_recall": 0.7435897435897436}
    result = {"chat_template": "model", "answers": answers, "library_versions": {"torch": "2.13.0", "peft": "0.21.0"},
              "quality": {"sample": 20, "answered": 20, "max_new_tokens": 128, "seconds": 41.3, "base": figures,
                          "tuned": figures},
              "best_checkpoint": {"step": 120, "metric": "valid_loss", "value": 0.7412, "last_step": 150,
                                  "early_stopped": False},
              "baseline_eval": {"loss": 2.0012}, "final_eval": {"loss": 0.7412}, "data_sha256": {"train": "0" * 64}}
    with transaction(database_url) as session:
        session.execute(text("UPDATE fine_tuning_jobs SET result = CAST(:result AS json) WHERE seq IN (SELECT seq FROM "
                             "fine_tuning_jobs WHERE seq < (SELECT seq FROM fine_tuning_jobs WHERE id = :id) ORDER BY "
                             "seq DESC LIMIT :n)"), {"result": json.dumps(result), "id": older_than, "n": n})


async def call(app, path: str) -> int:
    """One GET through the ASGI app; its status."""
    route, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": route, "raw_path": route.encode(), "query_string": query.encode(), "root_path": "",
             "headers": HEADERS, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
    status = 0

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def inline(func, *args, **_):
    """anyio.to_thread.run_sync without the thread: the profiler sees the work it would have run there."""
    return func(*args)


async def measure(app, path: str, requests: int, top: int) -> tuple[float, float, str]:
    """CPU microseconds per request of this process over `requests` GETs in batches (the best batch's and the
    median batch's), and the profile's top lines."""
    for _ in range(50):  # warm: pools, caches, lazily built validators
        assert await call(app, path) == 200
    batches = []  # a loaded machine slows some batches down: the best and the median say more than the mean
    for _ in range(BATCHES):
        started = time.process_time()
        for _ in range(requests // BATCHES):
            await call(app, path)
        batches.append((time.process_time() - started) / (requests // BATCHES) * 1e6)
    real = anyio.to_thread.run_sync
    anyio.to_thread.run_sync = inline
    profile = cProfile.Profile(time.process_time)  # CPU, not time spent waiting on the database
    try:
        profile.enable()
        for _ in range(requests // 4):
            await call(app, path)
        profile.disable()
    finally:
        anyio.to_thread.run_sync = real
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return min(batches), statistics.median(batches), out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--queued", type=int, default=500, help="Jobs turned queued, for a queued job's read.")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--quiet", action="store_true", help="Only the CPU figures, not the profiles.")
    args = parser.parse_args()

    from api.main import create_app
    from core.settings import Settings

    database_url, drop = fresh_postgres_database(args.pg)
    try:
        key, job_id = seed_jobs(database_url, args.jobs)
        queued_id = queue_some(database_url, args.queued)
        give_results(database_url, job_id)
        HEADERS.append((b"authorization", f"Bearer {key}".encode()))
        settings = Settings(database_url=database_url, broker_url=args.redis, broker_prefix=f"profile-{job_id}:",
                            log_level="WARNING", rate_limit_requests=0)
        app = create_app(settings)

        async def run() -> None:
            async with app.router.lifespan_context(app):
                for name, path in (("GET /v1/fine_tuning/jobs/{id}", f"/v1/fine_tuning/jobs/{job_id}"),
                                   ("GET /v1/fine_tuning/jobs?limit=20", "/v1/fine_tuning/jobs?limit=20"),
                                   ("GET jobs?limit=20, results of 20 answers",
                                    f"/v1/fine_tuning/jobs?limit=20&after={job_id}"),
                                   (f"GET a queued job ({args.queued} queued)", f"/v1/fine_tuning/jobs/{queued_id}")):
                    best, median, profile = await measure(app, path, args.requests, args.top)
                    print(f"{name:<42} {best:8.0f} µs CPU per request, best batch ({median:.0f} median)")
                    if not args.quiet:
                        print(profile)

        asyncio.run(run())
    finally:
        drop()


if __name__ == "__main__":
    main()
