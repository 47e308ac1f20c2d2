"""`lorajobs files upload | list | report | delete`: datasets on a running lorajobs."""

import os
import time
from pathlib import Path

from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

from cli.client import add_connection_args, check, client
from cli.output import add_json_flag, emit


def register(sub) -> None:
    files = sub.add_parser("files", help="Upload and inspect datasets.").add_subparsers(dest="files_command",
                                                                                       required=True)
    upload = files.add_parser("upload", help="Upload a JSONL dataset and wait for its validation report.")
    upload.add_argument("path", type=Path)
    upload.add_argument("--purpose", default="fine-tune")
    upload.add_argument("--no-wait", action="store_true", help="Return once uploaded, before validation.")
    add_connection_args(upload)
    upload.set_defaults(handler=cmd_upload)
    listing = files.add_parser("list", help="List uploaded files.")
    add_connection_args(listing)
    listing.set_defaults(handler=cmd_list)
    report = files.add_parser("report", help="Show a file's validation report.")
    report.add_argument("file_id")
    add_connection_args(report)
    report.set_defaults(handler=cmd_report)
    delete = files.add_parser("delete", help="Delete a file (its jobs keep their history).")
    delete.add_argument("file_id")
    add_connection_args(delete)
    delete.set_defaults(handler=cmd_delete)
    for command in (upload, listing, report, delete):
        add_json_flag(command)


def cmd_upload(args) -> int:
    size = os.path.getsize(args.path)
    with client(args, timeout=None) as http, open(args.path, "rb") as handle, \
            tqdm(total=size, unit="B", unit_scale=True, desc=args.path.name) as bar:
        wrapped = CallbackIOWrapper(bar.update, handle, "read")
        uploaded = check(http.post("files", data={"purpose": args.purpose},
                                   files={"file": (args.path.name, wrapped, "application/jsonl")}))
    if not args.json:
        print(f"{uploaded['id']}  {uploaded['bytes']:,} bytes  sha256 {uploaded['sha256']}")
    if args.no_wait:
        emit(args, uploaded)
        return 0
    with client(args) as http:
        while uploaded["status"] == "uploaded":
            time.sleep(0.5)
            uploaded = check(http.get(f"files/{uploaded['id']}"))
        report = check(http.get(f"files/{uploaded['id']}/report"))
    emit(args, {**uploaded, "report": report.get("report")}, lambda: print_report(report))
    return 0 if uploaded["status"] == "processed" else 1


def cmd_list(args) -> int:
    with client(args) as http:
        items = check(http.get("files"))["data"]

    def text() -> str:
        lines = []
        for item in items:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["created_at"]))
            lines.append(f"{item['id']}  {item['status']:<9}  {item['bytes']:>12,}  {created}  {item['filename']}")
        return "\n".join(lines) if lines else "No files yet."

    emit(args, items, text)
    return 0


def cmd_report(args) -> int:
    with client(args) as http:
        body = check(http.get(f"files/{args.file_id}/report"))
    emit(args, body, lambda: print_report(body))
    return 0 if body["status"] == "processed" else 1


def cmd_delete(args) -> int:
    with client(args) as http:
        deleted = check(http.delete(f"files/{args.file_id}"))
    emit(args, deleted, lambda: f"{deleted['id']}  deleted")
    return 0


def print_report(body: dict) -> None:
    report = body.get("report")
    print(f"file {body['file_id']}: {body['status']}")
    if not report:
        print("  (no report yet)")
        return
    print(f"  format: {report.get('format')}   examples: {report.get('examples')}   lines: {report.get('lines')}")
    for title, key, counts in (("errors", "errors", "error_counts"), ("warnings", "warnings", "warning_counts")):
        if report.get(counts):
            print(f"  {title}: " + ", ".join(f"{code} ×{n}" for code, n in report[counts].items()))
            for problem in report.get(key, [])[:20]:
                print(f"    line {problem['line']}: {problem['code']}: {problem['message']}")
    for model, stats in (report.get("token_stats") or {}).items():
        print(f"  tokens ({model}, max {stats.get('max_seq_length')}): total {stats.get('total'):,}, "
              f"mean {stats.get('mean'):.0f}, p95 {stats.get('p95')}, max {stats.get('max')}, "
              f"truncated {stats.get('truncated')}, no trainable token {stats.get('no_trainable_after_truncation')}")
    print(f"  {report.get('summary', '')}")
