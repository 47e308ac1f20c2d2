"""`lorajobs jobs create | list | show | cancel | watch | download`: fine-tuning jobs on a running lorajobs."""

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cli.client import add_connection_args, check, client
from core.archives import sha256_file, unpack_archive

FINISHED = ("succeeded", "failed", "cancelled")


def register(sub) -> None:
    jobs = sub.add_parser("jobs", help="Create and follow fine-tuning jobs.").add_subparsers(dest="jobs_command",
                                                                                            required=True)
    create = jobs.add_parser("create", help="Create a fine-tuning job.")
    create.add_argument("--model", required=True, help="Base model id (see `lorajobs models list`).")
    create.add_argument("--file", required=True, help="Training file id.")
    create.add_argument("--validation-file")
    create.add_argument("--suffix")
    create.add_argument("--quantization", choices=("nf4", "fp4", "none"))
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
    for name, handler, help_text in (("show", cmd_show, "Show a job as JSON."), ("cancel", cmd_cancel, "Cancel a job."),
                                     ("watch", cmd_watch, "Follow a job: progress bar and live loss.")):
        command = jobs.add_parser(name, help=help_text)
        command.add_argument("job_id")
        command.set_defaults(handler=handler)
    download = jobs.add_parser("download", help="Download a job's adapter and unpack it.")
    download.add_argument("job_id")
    download.add_argument("--out", type=Path, help="Folder to unpack into (default: ./<job id>-adapter).")
    download.add_argument("--checkpoint", help="An intermediate checkpoint id (ftckpt-…).")
    download.set_defaults(handler=cmd_download)
    for command in (create, listing, download, *[jobs.choices[n] for n in ("show", "cancel", "watch")]):
        add_connection_args(command)


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
        print(_render_plan(error["plan"], body))
        sys.exit(f"lorajobs: 400 {error['code']}: {error['message']}")
    job = check(response)
    if args.dry_run:
        print(_render_plan(job, body))
        return 0
    print(f"{job['id']}  {job['status']}  {job['model']}  quantization={job['quantization']}")
    return cmd_watch(_with_job(args, job["id"])) if args.watch else 0


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
    for job in jobs:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
        percent = (job.get("progress") or {}).get("percent", 0)
        print(f"{job['id']}  {job['status']:<16} {percent:5.1f}%  {created}  {job['model']}  "
              f"{job.get('fine_tuned_model') or ''}")
    return 0


def cmd_show(args) -> int:
    with client(args) as http:
        print(json.dumps(check(http.get(f"fine_tuning/jobs/{args.job_id}")), indent=2))
    return 0


def cmd_cancel(args) -> int:
    with client(args) as http:
        job = check(http.post(f"fine_tuning/jobs/{args.job_id}/cancel"))
    print(f"{job['id']}  {job['status']}{' (stopping at the end of this step)' if job['status'] == 'running' else ''}")
    return 0


def cmd_watch(args) -> int:
    bar_format = "{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]{postfix}"
    with client(args) as http, tqdm(total=100, unit="%", bar_format=bar_format) as bar:
        while True:
            job = check(http.get(f"fine_tuning/jobs/{args.job_id}"))
            progress = job.get("progress") or {}
            bar.n = progress.get("percent") or (100 if job["status"] == "succeeded" else 0)
            loss = progress.get("train_loss")
            bar.set_postfix_str(f"{job['status']} step {progress.get('step', 0)}/{progress.get('total_steps') or '?'}"
                                + (f" loss {loss:.4f}" if loss is not None else ""))
            if job["status"] in FINISHED:
                break
            time.sleep(1)
    if job["status"] == "succeeded":
        print(f"succeeded: {job['fine_tuned_model']}  eval loss {job.get('baseline_eval_loss')} -> "
              f"{job.get('final_eval_loss')}")
        if job.get("trainable_parameters") is not None:
            print(f"trained {job['trainable_parameters']:,} of {job['total_parameters']:,} parameters "
                  f"({job['trainable_percent']:.4f} %)")
        served = job.get("served_eval")
        if served:
            print(f"served on the full-precision base: eval loss {served['adapter_on_full_precision_base_loss']:.4f}; "
                  f"merged export uses the {served['merge_base'].replace('_', ' ')} base")
        return 0
    error = job.get("error") or {}
    print(f"{job['status']}: {error.get('code', '')} {error.get('message', '')}".rstrip(), file=sys.stderr)
    return 1


def cmd_download(args) -> int:
    out = args.out or Path(f"{args.job_id}-adapter")
    params = {"format": "tar.gz"}
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    archive = out.with_name(out.name + ".tar.gz")
    with client(args, timeout=None) as http:
        with http.stream("GET", f"fine_tuning/jobs/{args.job_id}/adapter", params=params,
                         follow_redirects=True) as response:
            if not response.is_success:
                response.read()
                check(response)
            with open(archive, "wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
            first = response.history[0] if response.history else response
            expected = first.headers.get("x-content-sha256")
    actual = sha256_file(archive)
    if not expected:
        sys.exit("lorajobs: the server sent no x-content-sha256 for the download; refusing to unpack it unchecked")
    if actual != expected:
        sys.exit(f"lorajobs: the download is corrupt (sha256 {actual}, expected {expected}); try again")
    try:
        unpack_archive(archive, out, fmt="tar.gz")
    except ValueError as exc:
        sys.exit(f"lorajobs: refusing to unpack {archive}: {exc}")
    print(f"adapter unpacked into {out}/ (sha256 {actual}, verified)")
    return 0
