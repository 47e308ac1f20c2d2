"""The Celery app of the worker process: the shared app with lorajobs' tasks registered on it."""

from core.logging import configure_logging
from core.queue import celery_for
from core.settings import get_settings

settings = get_settings()
configure_logging(settings.log_level, settings.log_json)
app = celery_for(settings)
app.set_default()
app.set_current()

import worker.tasks  # noqa: E402,F401  registers the tasks on `app`
import worker.heartbeat  # noqa: E402,F401  beats while the worker runs (queues, host)
