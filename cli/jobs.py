"""`lorajobs jobs create | list | show | cancel | watch | events | checkpoints | plan | download | merged`:
fine-tuning jobs on a running lorajobs."""

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cli.client import add_connection_args, check, client
from cli.output import CliError, add_json_flag, download, emit, retrying
from core.archives import MERGED_FORMAT, unpack_archive

FINISHED = ("succeeded", "failed", "cancelled")
WATCH_PATIENCE_SECONDS = 600.0  # `watch` and `events --follow` ride out an API restart or a network blip this long
DOWNLOAD_PATIENCE_SECONDS = 600.0
EVENTS_PAGE = 100


def register(sub) -> None:
    jobs = sub.add_parser("jobs", help="Create and follow fine-tuning jobs.").add_subparsers(dest="jobs_command",
                                                                                            required=True)
    create = jobs.add_parser("create", help="Create a fine-tuning job.")
    create.add_argument("--model", required=True, help="Base model id (see `lorajobs models list`).")
    create.add_argument("--file", required=True, help="Training file id.")
    create.add_argument("--validation-file")
    create.add_argument("--suffix")
    create.add_argument("--quantization", choices=("auto", "nf4", "fp4", "none"))
    create.add_argument("--epochs", type=int)
    create.add_argument("--learning-rate", type=float)
    create.add_argument("--max-seq-length", type=int)
    create.add_argument("--spec", type=Path, help="A JSON file of further job-spec fields (docs/job-spec.md).")
    create.add_argument("--watch", action="store_true", help="Follow the job until it ends.")
    create.add_argument("--dry-run", action="store_true",
                        help="Print the job's plan (parameters, memory per GPU class, duration) and create nothing.")
    create.set_defaults(handler=cmd_create)
    listing = jobs.add_parser("list", help="List jobs, newest first.")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(handler=cmd_list)
    commands = [create, listing]
    for name, handler, help_text in (
            ("show", cmd_show, "Show a job as JSON."), ("cancel", cmd_cancel, "Cancel a job."),
            ("watch", cmd_watch, "Follow a job: progress bar and live loss; rides out a lost connection."),
            ("events", cmd_events, "A job's events, oldest first."),
            ("checkpoints", cmd_checkpoints, "A job's stored checkpoints."),
            ("plan", cmd_plan, "A job's pre-flight plan: parameters, memory per GPU class, duration.")):
        command = jobs.add_parser(name, help=help_text)
        command.add_argument("job_id")
        command.set_defaults(handler=handler)
        commands.append(command)
    events = jobs.choices["events"]
    events.add_argument("--limit", type=int, default=50, help="The newest N events (default 50).")
    events.add_argument("--follow", "-f", action="store_true",
                        help="Keep printing new events until the job ends (with --json: one object per line).")
    download = jobs.add_parser("download", help="Download a job's adapter (verified, resumable) and unpack it.")
    download.add_argument("job_id")
    download.add_argument("--out", type=Path, help="Folder to unpack into (default: ./<job id>-adapter).")
    download.add_argument("--checkpoint", help="An intermediate checkpoint id (ftckpt-…).")
    download.set_defaults(handler=cmd_download)
    merged = jobs.add_parser("merged", help="Download the adapter merged into its base model as a Hugging Face "
                                            "model folder (waits while the merge is produced).")
    merged.add_argument("job_id")
    merged.add_argument("--out", type=Path, help="Folder to unpack into (default: ./<job id>-merged).")
    merged.add_argument("--wait", type=float, default=1800, help="Seconds to wait for the merge (default 1800).")
    merged.set_defaults(handler=cmd_merged)
    for command in (*commands, download, merged):
        add_connection_args(command)
        add_json_flag(command)


def cmd_create(args) -> int:
    body = json.loads(args.spec.read_text()) if args.spec else {}
    body.update({"model": args.model, "training_file": args.file})
    optional = {"validation_file": args.validation_file, "suffix": args.suffix, "quantization": args.quantization,
                "n_epochs": args.epochs, "learning_rate": args.learning_rate, "max_seq_length": args.max_seq_length}
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.dry_run:
        body["dry_run"] = True
    with client(args) as http:
        response = http.post("fine_tuning/jobs", json=body)
    error = response.json().get("error") if response.status_code == 400 else None
    if error and error.get("plan"):  # fits no configured class: the plan says what would
        emit(args, error, lambda: _render_plan(error["plan"], body))
        raise CliError(f"400 {error['code']}: {error['message']}")
    job = check(response)
    if args.dry_run:
        emit(args, job, lambda: _render_plan(job, body))
        return 0
    if args.watch:
        if not args.json:
            print(f"{job['id']}  {job['status']}  {job['model']}  quantization={job['quantization']}")
        return cmd_watch(_with_job(args, job["id"]))
    emit(args, job, lambda: f"{job['id']}  {job['status']}  {job['model']}  quantization={job['quantization']}")
    return 0


def _render_plan(plan: dict, body: dict) -> str:
    """`lorajobs plan`'s table for a plan the API answered."""
    from pydantic import ValidationError

    from cli.plan import render
    from core.planning import Plan
    from core.spec import JobSpec

    try:
        spec = JobSpec.model_validate({k: v for k, v in body.items() if k in JobSpec.model_fields})
    except ValidationError:  # the API accepted it; the table only needs the rank and double quantization
        spec = JobSpec.model_validate({"model": body["model"]})
    return render(Plan.model_validate(plan), spec)


def _with_job(args, job_id: str):
    args.job_id = job_id
    return args


def cmd_list(args) -> int:
    with client(args) as http:
        jobs = check(http.get("fine_tuning/jobs", params={"limit": args.limit}))["data"]

    def text() -> str:
        lines = []
        for job in jobs:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
            percent = (job.get("progress") or {}).get("percent", 0)
            lines.append(f"{job['id']}  {job['status']:<16} {percent:5.1f}%  {created}  {job['model']}  "
                         f"{job.get('fine_tuned_model') or ''}")
        return "\n".join(lines) if lines else "No jobs yet."

    emit(args, jobs, text)
    return 0


def cmd_show(args) -> int:
    with client(args) as http:
        job = check(http.get(f"fine_tuning/jobs/{args.job_id}"))
    print(json.dumps(job, indent=2))  # the job object is the human view too
    return 0


def cmd_cancel(args) -> int:
    with client(args) as http:
        job = check(http.post(f"fine_tuning/jobs/{args.job_id}/cancel"))
    emit(args, job, lambda: f"{job['id']}  {job['status']}"
                            f"{' (stopping at the end of this step)' if job['status'] == 'running' else ''}")
    return 0


def cmd_plan(args) -> int:
    with client(args) as http:
        job = check(http.get(f"fine_tuning/jobs/{args.job_id}"))
    if not job.get("plan"):
        raise CliError(f"job {args.job_id} has no plan (it was created before plans were recorded)")
    emit(args, job["plan"], lambda: _render_plan(job["plan"], job.get("spec") or {"model": job["model"]}))
    return 0


def _get_job(http, job_id: str, *, patience: float = WATCH_PATIENCE_SECONDS) -> dict:
    return check(retrying(lambda: http.get(f"fine_tuning/jobs/{job_id}"), patience=patience,
                          what=f"watching {job_id}"))


def cmd_watch(args) -> int:
    bar_format = "{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]{postfix}"
    with client(args) as http:
        # An API that never answered is a wrong URL or a stopped service: said at once, before any progress bar.
        job = _get_job(http, args.job_id, patience=0.0)
        with tqdm(total=100, unit="%", bar_format=bar_format) as bar:
            while True:
                progress = job.get("progress") or {}
                bar.n = progress.get("percent") or (100 if job["status"] == "succeeded" else 0)
                loss = progress.get("train_loss")
                bar.set_postfix_str(f"{job['status']} step {progress.get('step', 0)}/"
                                    f"{progress.get('total_steps') or '?'}"
                                    + (f" loss {loss:.4f}" if loss is not None else ""))
                if job["status"] in FINISHED:
                    break
                time.sleep(1)
                job = _get_job(http, args.job_id)
    emit(args, job, lambda: _finished_text(job))
    if job["status"] == "succeeded":
        return 0
    error = job.get("error") or {}
    if not args.json:
        print(f"{job['status']}: {error.get('code', '')} {error.get('message', '')}".rstrip(), file=sys.stderr)
    return 1


def _finished_text(job: dict) -> str | None:
    if job["status"] != "succeeded":
        return None
    lines = [f"succeeded: {job['fine_tuned_model']}  eval loss {job.get('baseline_eval_loss')} -> "
             f"{job.get('final_eval_loss')}"]
    if job.get("trainable_parameters") is not None:
        lines.append(f"trained {job['trainable_parameters']:,} of {job['total_parameters']:,} parameters "
                     f"({job['trainable_percent']:.4f} %)")
    served = job.get("served_eval")
    if served:
        lines.append(f"served on the full-precision base: eval loss "
                     f"{served['adapter_on_full_precision_base_loss']:.4f}; merged export uses the "
                     f"{served['merge_base'].replace('_', ' ')} base")
    return "\n".join(lines)


def _event_line(event: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["created_at"]))
    return f"{when}  {event['level']:<5}  {event['message']}"


def _newer_events(http, job_id: str, last_seen: str | None, limit: int, patience: float) -> list[dict]:
    """Events after `last_seen`, oldest first (the API pages newest first); without it, the newest `limit`."""
    found, after = [], None
    while True:
        params = {"limit": EVENTS_PAGE if last_seen else min(limit, EVENTS_PAGE)}
        if after:
            params["after"] = after
        page = check(retrying(lambda: http.get(f"fine_tuning/jobs/{job_id}/events", params=params),
                              patience=patience, what=f"events of {job_id}"))
        for event in page["data"]:
            if event["id"] == last_seen:
                return found[::-1]
            found.append(event)
        if not last_seen and len(found) >= limit:
            return found[:limit][::-1]
        if not page.get("has_more") or not page["data"]:
            return found[::-1]
        after = page["data"][-1]["id"]


def cmd_events(args) -> int:
    with client(args) as http:
        events = _newer_events(http, args.job_id, None, args.limit, patience=0.0)
        if not args.follow:
            emit(args, events, lambda: "\n".join(_event_line(e) for e in events) or "No events yet.")
            return 0
        last = None
        while True:
            for event in events:
                print(json.dumps(event) if args.json else _event_line(event), flush=True)
                last = event["id"]
            job = _get_job(http, args.job_id)
            if job["status"] in FINISHED:
                events = _newer_events(http, args.job_id, last, args.limit, WATCH_PATIENCE_SECONDS) if last else []
                if not events:
                    return 0 if job["status"] == "succeeded" else 1
                continue
            time.sleep(1)
            events = _newer_events(http, args.job_id, last, args.limit, WATCH_PATIENCE_SECONDS)


def cmd_checkpoints(args) -> int:
    with client(args) as http:
        found, after = [], None
        while True:
            page = check(http.get(f"fine_tuning/jobs/{args.job_id}/checkpoints",
                                  params={"limit": 100, **({"after": after} if after else {})}))
            found += page["data"]
            if not page.get("has_more") or not page["data"]:
                break
            after = page["data"][-1]["id"]
    found.sort(key=lambda c: c["step_number"])

    def text() -> str:
        lines = []
        for c in found:
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in (c.get("metrics") or {}).items()
                                if isinstance(v, (int, float)) and k != "step")
            lines.append(f"{c['id']}  step {c['step_number']:>6}  {metrics}  {c['fine_tuned_model_checkpoint']}")
        return "\n".join(lines) if lines else "No checkpoint stored."

    emit(args, found, text)
    return 0


def cmd_download(args) -> int:
    out = args.out or Path(f"{args.job_id}-adapter")
    params = {"format": "tar.gz"}
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    archive = out.with_name(out.name + ".tar.gz")
    with client(args, timeout=None) as http:
        digest = download(http, f"fine_tuning/jobs/{args.job_id}/adapter", archive, params=params,
                          patience=DOWNLOAD_PATIENCE_SECONDS, label=archive.name)
    _unpack(archive, out, "tar.gz")
    emit(args, {"path": str(out), "archive": str(archive), "sha256": digest, "bytes": archive.stat().st_size},
         lambda: f"adapter unpacked into {out}/ (sha256 {digest}, verified)")
    return 0


def cmd_merged(args) -> int:
    out = args.out or Path(f"{args.job_id}-merged")
    archive = out.with_name(f"{out.name}.{MERGED_FORMAT}")
    path = f"fine_tuning/jobs/{args.job_id}/merged"
    deadline = time.monotonic() + args.wait
    with client(args, timeout=None) as http:
        while True:  # 202 while the merge is produced on a worker
            response = retrying(lambda: http.get(path, follow_redirects=False), patience=DOWNLOAD_PATIENCE_SECONDS,
                                what=f"merged model of {args.job_id}")
            if response.status_code != 202:
                if not response.is_success and not response.is_redirect:
                    check(response)
                response.close()
                break
            if time.monotonic() > deadline:
                raise CliError(f"the merged model of {args.job_id} is still being produced after {args.wait:.0f} s; "
                               "run this again later")
            if not args.json:
                print(f"lorajobs: {response.json().get('message')}", file=sys.stderr)
            time.sleep(float(response.headers.get("retry-after") or 5))
        digest = download(http, path, archive, patience=DOWNLOAD_PATIENCE_SECONDS, label=archive.name)
    _unpack(archive, out, MERGED_FORMAT)
    emit(args, {"path": str(out), "archive": str(archive), "sha256": digest, "bytes": archive.stat().st_size},
         lambda: f"merged model unpacked into {out}/ (sha256 {digest}, verified)")
    return 0


def _unpack(archive: Path, out: Path, fmt: str) -> None:
    try:
        unpack_archive(archive, out, fmt=fmt)
    except ValueError as exc:
        raise CliError(f"refusing to unpack {archive}: {exc}") from None
