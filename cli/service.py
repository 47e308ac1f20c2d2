"""`lorajobs up | api | worker | sweeper | migrate`: the parts of the service."""

import logging
import os
import signal
import subprocess
import sys
import time

from core.logging import configure_logging
from core.settings import Settings, get_settings

log = logging.getLogger("lorajobs.up")

RESTART_BACKOFF_SECONDS = 2.0
# How long `lorajobs up` waits for its parts to stop before killing them: a worker's training stops at its next
# step and stores a checkpoint first (docs/operations.md).
STOP_GRACE_SECONDS = 90.0


def register(sub) -> None:
    up = sub.add_parser("up", help="Run the whole service on this machine (API, workers, sweeper).")
    up.add_argument("--host", help="Address the API binds to (LORAJOBS_HOST).")
    up.add_argument("--port", type=int, help="Port of the API (LORAJOBS_PORT).")
    up.set_defaults(handler=cmd_up)

    api = sub.add_parser("api", help="Run the API server.")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--workers", type=int, help="API processes (LORAJOBS_API_WORKERS).")
    api.set_defaults(handler=cmd_api)

    worker = sub.add_parser("worker", help="Run a Celery worker.")
    worker.add_argument("--queues", default="cpu,gpu",
                        help="Comma-separated queues: cpu (datasets), gpu (training; on a CUDA machine with "
                             "LORAJOBS_GPU_CLASSES set, the class its card serves) or a class name (gpu-80g).")
    worker.add_argument("--concurrency", type=int, default=1, help="Tasks at once (one training job per GPU).")
    worker.add_argument("--hostname", help="Celery node name.")
    worker.set_defaults(handler=cmd_worker)

    sweeper = sub.add_parser("sweeper", help="Requeue jobs whose worker was lost, resend lost messages and collect "
                             "garbage every LORAJOBS_GC_INTERVAL_SECONDS (one or more per deployment).")
    sweeper.add_argument("--once", action="store_true", help="Sweep once and exit.")
    sweeper.set_defaults(handler=cmd_sweeper)

    gc = sub.add_parser("gc", help="Remove orphans: incomplete uploads, objects no row names and dead workers' work "
                        "folders older than LORAJOBS_GC_GRACE_SECONDS (safe while jobs run).")
    gc.set_defaults(handler=cmd_gc)

    migrate = sub.add_parser("migrate", help="Bring the database schema to the latest revision.")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(handler=cmd_migrate)


def prepare(settings: Settings) -> None:
    """Schema, storage bucket and bootstrap key: what every part needs before it serves."""
    from api.services.projects import ensure_bootstrap_key
    from core.storage import get_storage
    from db.migrate import upgrade
    from db.session import transaction

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    storage = get_storage(settings)
    if hasattr(storage, "ensure_bucket"):
        storage.ensure_bucket()
    if settings.bootstrap_api_key:
        with transaction(settings.database_url) as session:
            warning = ensure_bootstrap_key(session, settings.bootstrap_api_key, settings)
        if warning:
            log.warning("%s", warning)


def exposure_refusal(settings: Settings, host: str) -> str | None:
    """Why the API must not bind `host`: off loopback, nothing publicly known may sign requests or sessions."""
    from api.services.projects import active_public_keys
    from core.settings import LOOPBACK_HOSTS
    from db.session import transaction

    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return None
    problems = settings.exposure_problems()
    with transaction(settings.database_url) as session:
        problems += [f"the public API key {key} is active (lorajobs keys revoke {key[:11]})"
                     for key in active_public_keys(session, settings)]
    if not problems:
        return None
    return f"refusing to listen on {host}: " + "; ".join(problems) + " (docs/security.md)"


def cmd_migrate(args) -> int:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    prepare(settings)
    log.info("database at the latest revision")
    return 0


def cmd_api(args) -> int:
    import uvicorn

    from api.main import create_app
    from db.session import connection_budget_problem

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    host = args.host or settings.host
    refusal = exposure_refusal(settings, host)
    if refusal:
        print(f"lorajobs api: {refusal}", file=sys.stderr)
        return 2
    workers = args.workers or settings.api_workers
    problem = connection_budget_problem(settings.database_url, workers, settings.db_pool_size,
                                        settings.db_reserved_connections, settings.db_max_connections)
    if problem:
        log.error("refusing to start: %s", problem)
        print(f"lorajobs api: {problem}", file=sys.stderr)
        return 2
    # Several processes need an import string; each builds the app from the same environment.
    app = "api.main:create_served_app" if workers > 1 else create_app(settings)
    uvicorn.run(app, factory=workers > 1, workers=workers, host=host, port=args.port or settings.port,
                log_config=None, access_log=False, proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips)
    return 0


CUDA_MEMORY_PROBE = ("import torch; print(torch.cuda.get_device_properties(0).total_memory "
                     "if torch.cuda.is_available() else '')")


def cuda_memory_gib() -> float | None:
    """The first card's memory, asked in a child process: CUDA initialised before the pool forks breaks its children."""
    try:
        out = subprocess.run([sys.executable, "-c", CUDA_MEMORY_PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip()
    return int(text) / 1024**3 if out.returncode == 0 and text else None


def worker_queues(requested: str, settings: Settings, memory_gib: float | None) -> str:
    """`gpu` becomes the queue of the class this card serves when GPU classes are configured; the CPU keeps `gpu`."""
    from core.queue import GPU_QUEUE
    from core.routing import class_for_memory, configured_classes

    names = [q.strip() for q in requested.split(",") if q.strip()]
    classes = configured_classes(settings)
    if GPU_QUEUE not in names or not classes or memory_gib is None:
        return requested
    gpu = class_for_memory(classes, memory_gib)
    if gpu is None:
        log.warning("this card's %.1f GiB is below every configured GPU class; serving the gpu queue", memory_gib)
        return requested
    log.info("this card has %.1f GiB: serving GPU class %s (queue %s)", memory_gib, gpu.name, gpu.name)
    return ",".join(gpu.name if q == GPU_QUEUE else q for q in names)


def cmd_worker(args) -> int:
    from worker.app import app

    settings = get_settings()
    queues = args.queues
    if settings.gpu_classes and "gpu" in queues.split(","):
        configure_logging(settings.log_level, settings.log_json)
        queues = worker_queues(queues, settings, cuda_memory_gib())
    argv = ["worker", "--queues", queues, "--concurrency", str(args.concurrency), "--pool", "prefork",
            "--loglevel", get_settings().log_level, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_sweeper(args) -> int:
    from worker.gc import collect
    from worker.sweep import sweep

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    collected_at = None
    while True:
        try:
            sweep()
        except Exception:  # a failed sweep (database restarting) is retried at the next interval
            log.exception("sweep failed")
        if args.once:
            return 0
        due = collected_at is None or time.monotonic() - collected_at >= settings.gc_interval_seconds
        if settings.gc_interval_seconds and due:
            collected_at = time.monotonic()
            try:
                collect(settings)
            except Exception:  # storage or database away: the next interval tries again
                log.exception("garbage collection failed")
        time.sleep(settings.sweep_interval_seconds)


def cmd_gc(args) -> int:
    import json

    from worker.gc import collect

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    print(json.dumps(collect(settings)))
    return 0


def _part_commands(settings: Settings, host: str, port: int) -> dict[str, list[str]]:
    me = [sys.executable, "-m", "cli.main"]
    return {
        "api": me + ["api", "--host", host, "--port", str(port)],
        "worker-cpu": me + ["worker", "--queues", "cpu", "--hostname", "cpu@%h"],
        "worker-gpu": me + ["worker", "--queues", "gpu", "--hostname", "gpu@%h"],
        "sweeper": me + ["sweeper"],
    }


def cmd_up(args) -> int:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    prepare(settings)
    from worker.catalogue import SMOLLM2_ID, install_smollm2

    if not (settings.models_dir / SMOLLM2_ID / "config.json").is_file():
        log.info("installing %s into the model catalogue (once, about 30 s)", SMOLLM2_ID)
        install_smollm2(settings.models_dir)
    host, port = args.host or settings.host, args.port or settings.port
    refusal = exposure_refusal(settings, host)
    if refusal:
        print(f"lorajobs up: {refusal}", file=sys.stderr)
        return 2
    commands = _part_commands(settings, host, port)
    parts = {name: _start_part(cmd) for name, cmd in commands.items()}
    log.info("lorajobs is up: API on http://%s:%s (docs at /docs); Ctrl-C stops every part", host, port)
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping:
        time.sleep(0.5)
        for name, proc in list(parts.items()):
            code = proc.poll()
            if code is not None and not stopping:
                log.warning("%s exited with code %s; starting it again", name, code)
                time.sleep(RESTART_BACKOFF_SECONDS)
                parts[name] = _start_part(commands[name])
    stop_parts(list(parts.values()))
    return 0


def _start_part(command: list[str]) -> subprocess.Popen:
    """A part in a process group of its own: a terminal's Ctrl-C reaches `lorajobs up` alone, which stops each part
    once, and the group holds every process the part starts (a worker's pool), so none can outlive `up`."""
    return subprocess.Popen(command, start_new_session=True)


def stop_parts(parts: list[subprocess.Popen], grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM to each part (a worker's training checkpoints and releases its job), then SIGKILL to whatever is
    left in its process group after `grace_seconds`, children included."""
    log.info("stopping every part (at most %.0f s)", grace_seconds)
    for proc in parts:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for proc in parts:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("a part did not stop in %.0f s; killing it", grace_seconds)
    for proc in parts:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group: a pool process whose main is gone
        except (ProcessLookupError, PermissionError):
            continue
        proc.wait(timeout=10)
    log.info("stopped")
