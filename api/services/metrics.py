"""`/metrics` in Prometheus' text format: the service's state read from the database at each scrape, and the API's
request latency measured in this process. docs/operations.md lists every metric and the alerts built on them."""

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy.orm import Session

from core.routing import configured_classes, queue_of
from core.queue import GPU_QUEUE
from core.settings import Settings
from db.clock import db_now
from db.repositories import operations as ops
from db.repositories import workers as workers_repo
from db.session import session_factory

JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
# A job runs minutes to days; a step takes milliseconds on a tiny model to minutes on a large one.
JOB_SECONDS_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 72 * 3600)
STEP_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

API_LATENCY = Histogram("lorajobs_api_request_duration_seconds",
                        "Time the API took to answer a request, by method, route template and status code.",
                        ["method", "route", "status"])


def observe_request(scope, status: int, seconds: float) -> None:
    """One answered HTTP request into API_LATENCY (api/main.py `RequestContext` times it), labelled by its route's
    template (so `/v1/fine_tuning/jobs/{job_id}` is one series, not one per job); unrouted requests are `unmatched`."""
    API_LATENCY.labels(scope["method"], route_template(scope), str(status)).observe(seconds)


def route_template(scope) -> str:
    """The template of the route that answered (`/v1/files/{file_id}`); `unmatched` when none did."""
    route, path = scope.get("route"), scope["path"]
    if route is None or not hasattr(route, "path_regex"):
        return "unmatched"
    # An included router's routes keep their own paths: find the prefix (`/v1`) the request came through.
    for i, char in enumerate(path):
        if char == "/" and route.path_regex.match(path[i:]):
            return path[:i] + route.path
    return route.path


def _buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """Cumulative bucket counts in the exposition format's order, `+Inf` last."""
    return [(str(float(bound)), sum(1 for v in values if v <= bound)) for bound in bounds] + [("+Inf", len(values))]


def _families(session: Session, settings: Settings) -> list:
    """Every database-backed metric, read now."""
    now = db_now(session)
    workers = workers_repo.workers_by_queue(session)
    queued = ops.queued_by_queue(session)
    by_status = ops.jobs_by_status_and_queue(session)
    training_queues = {GPU_QUEUE, *(queue_of(c) for c in configured_classes(settings)), *queued,
                       *(name for _, name in by_status)}

    jobs = GaugeMetricFamily("lorajobs_jobs", "Fine-tuning jobs by status and training queue.",
                             labels=["status", "queue"])
    statuses = sorted(set(JOB_STATUSES) | {status for status, _ in by_status})  # a status added later shows too
    for name in sorted(training_queues):
        for status in statuses:
            jobs.add_metric([status, name], by_status.get((status, name), 0))
    depth = GaugeMetricFamily("lorajobs_queue_depth", "Jobs queued for training, waiting for a worker.",
                              labels=["queue"])
    oldest = GaugeMetricFamily("lorajobs_queue_oldest_wait_seconds",
                               "Age of the oldest queued job of the queue (since it was created); 0 when none waits.",
                               labels=["queue"])
    for name in sorted(training_queues):
        count, created = queued.get(name, (0, None))
        depth.add_metric([name], count)
        oldest.add_metric([name], max(0.0, now - created) if created is not None else 0.0)
    live = GaugeMetricFamily("lorajobs_workers", "Live workers (a heartbeat in the last "
                             f"{workers_repo.LIVE_SECONDS:g} s) consuming the queue.", labels=["queue"])
    for name in sorted(training_queues | set(workers)):
        live.add_metric([name], workers.get(name, 0))

    finished = ops.finished_jobs(session)
    durations = HistogramMetricFamily("lorajobs_job_duration_seconds",
                                      "Run time of finished jobs, from the worker's claim to the end, by final status "
                                      "and queue.", labels=["status", "queue"])
    steps = HistogramMetricFamily("lorajobs_job_step_seconds", "Mean time of one optimizer step of each finished job "
                                  "(its run time over its steps, loading and evaluation included), by queue.",
                                  labels=["queue"])
    for status, name in sorted({(job.status, job.queue) for job in finished}):
        seconds = [job.seconds for job in finished if (job.status, job.queue) == (status, name)]
        durations.add_metric([status, name], _buckets(seconds, JOB_SECONDS_BUCKETS), sum(seconds))
    for name in sorted({job.queue for job in finished if job.steps}):
        per_step = [job.seconds / job.steps for job in finished if job.queue == name and job.steps]
        steps.add_metric([name], _buckets(per_step, STEP_SECONDS_BUCKETS), sum(per_step))
    tokens = CounterMetricFamily("lorajobs_trained_tokens", "Tokens trained on (real tokens, padding excluded), "
                                 "summed over every job, by queue.", labels=["queue"])
    for name, total in sorted(ops.trained_tokens_by_queue(session).items()):
        tokens.add_metric([name], total)
    return [jobs, depth, oldest, live, durations, steps, tokens]


class _Snapshot:
    """A collector that yields metric families already read (the scrape's session is closed by then)."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return iter(self.families)


def exposition(session: Session, settings: Settings) -> bytes:
    """The scrape's body: the database-backed metrics, then this process's (API latency, process, Python GC)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(_families(session, settings)))
    return generate_latest(registry) + generate_latest(REGISTRY)


def queue_report(settings: Settings) -> tuple[dict[str, dict[str, int]], list[str]]:
    """For `/readyz`: queued jobs and live workers per queue, and a warning for each queue whose jobs nobody serves."""
    with session_factory(settings.database_url)() as session:
        workers = workers_repo.workers_by_queue(session)
        queued = ops.queued_by_queue(session)
    names = {GPU_QUEUE, *(queue_of(c) for c in configured_classes(settings)), *queued, *workers}
    report = {name: {"queued": queued.get(name, (0, None))[0], "workers": workers.get(name, 0)} for name in sorted(names)}
    warnings = [f"{entry['queued']} job(s) queued on {name} and no live worker serves it"
                for name, entry in report.items() if entry["queued"] and not entry["workers"]]
    return report, warnings
