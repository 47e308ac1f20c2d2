"""The Celery app both sides share: the API sends tasks by name, the worker registers them.

Torch-free on purpose: `api/` sends `lorajobs.*` tasks through this app without importing the worker.
"""

from celery import Celery
from kombu import Queue

from core.settings import Settings

TRAIN_JOB = "lorajobs.jobs.train"
MERGE_JOB = "lorajobs.jobs.merge"
VALIDATE_FILE = "lorajobs.files.validate"
SWEEP = "lorajobs.jobs.sweep"
PING = "lorajobs.ping"

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"


def broker_options(settings: Settings) -> dict:
    """Transport options; the filesystem transport needs its folders and a short polling interval."""
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
            "polling_interval": 0.1,
        }
    # A task still running after the visibility timeout is delivered again; the database claim makes that harmless.
    options = {"visibility_timeout": 6 * 3600}
    if settings.broker_prefix:
        options["global_keyprefix"] = settings.broker_prefix
    return options


def make_celery(settings: Settings) -> Celery:
    app = Celery("lorajobs", broker=settings.broker_url)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(CPU_QUEUE), Queue(GPU_QUEUE)],
        task_default_queue=CPU_QUEUE,
        # Merging needs memory for one 16-bit copy of the base, not a GPU's time: it runs on the CPU queue.
        task_routes={TRAIN_JOB: {"queue": GPU_QUEUE}, MERGE_JOB: {"queue": CPU_QUEUE}, VALIDATE_FILE: {"queue": CPU_QUEUE},
                     SWEEP: {"queue": CPU_QUEUE}, PING: {"queue": CPU_QUEUE}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


_apps: dict[tuple[str, str], Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """One Celery app per broker (URL and key prefix), created on first use."""
    key = (settings.broker_url, settings.broker_prefix)
    if key not in _apps:
        _apps[key] = make_celery(settings)
    return _apps[key]


def send(settings: Settings, task_name: str, object_id: str, *, queue: str | None = None) -> None:
    """Send a task that carries only an id; its queue comes from the routes above unless named (a GPU class)."""
    celery_for(settings).send_task(task_name, args=[object_id], **({"queue": queue} if queue else {}))

