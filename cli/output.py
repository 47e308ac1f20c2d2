"""What the commands that talk to a running lorajobs share: `--json`, errors as one line with an exit code,
retries with backoff, and verified, resumable downloads with a progress bar.

Exit codes (docs/cli.md): 0 done; 1 the API refused the request or the job failed; 2 bad usage; 3 the API could not
be reached (after retries where a command retries); 4 the API key was refused; 130 interrupted.
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from tqdm import tqdm

from core.archives import sha256_file

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
RETRYABLE_STATUS = (502, 503, 504)  # a proxy without its upstream, a saturated or restarting API
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


class CliError(Exception):
    """A failure the user can act on: printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


class ApiError(CliError):
    def __init__(self, status: int, message: str):
        super().__init__(message, EXIT_AUTH if status in (401, 403) else EXIT_FAILED)
        self.status = status


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the result as JSON (for scripts).")


def emit(args, data, text: Callable[[], str | None] | None = None) -> None:
    """`data` as JSON with --json, else the human text (if any)."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    elif text is not None:
        shown = text()
        if shown is not None:
            print(shown)


def unreachable(base_url: str, exc: Exception) -> CliError:
    reason = str(exc) or type(exc).__name__
    return CliError(f"cannot reach the API at {base_url} ({reason}); is lorajobs running there?", EXIT_UNREACHABLE)


def retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def retrying(send: Callable[[], httpx.Response], *, patience: float, what: str) -> httpx.Response:
    """`send()` again with exponential backoff while the API cannot be reached or answers 502/503/504, for up to
    `patience` seconds; each wait is said on stderr."""
    delay, deadline = FIRST_BACKOFF_SECONDS, time.monotonic() + patience
    while True:
        try:
            response = send()
            if response.status_code not in RETRYABLE_STATUS:
                return response
            reason, wait = f"HTTP {response.status_code}", retry_after(response) or delay
            if time.monotonic() + wait > deadline:
                return response  # out of patience: this answer stands
            response.close()
        except httpx.TransportError as exc:
            reason, wait = str(exc) or type(exc).__name__, delay
            if time.monotonic() + wait > deadline:
                raise
        print(f"lorajobs: {what}: connection lost ({reason}); retrying in {wait:.0f} s", file=sys.stderr)
        time.sleep(wait)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def download(http: httpx.Client, path: str, dest: Path, *, params: dict | None = None, patience: float,
             label: str) -> str:
    """Stream `path` into `dest` with a progress bar, resuming after a dropped connection with a Range request, and
    verify it against the sha256 the API announces; the file's sha256."""
    from cli.client import check

    expected, done, delay, deadline = None, 0, FIRST_BACKOFF_SECONDS, time.monotonic() + patience
    contacted = False  # an API that never answered is a wrong URL or a stopped service: said at once
    dest.parent.mkdir(parents=True, exist_ok=True)
    bar = None  # shown once the API answers, so a failed first request prints only its error
    try:
        with open(dest, "wb") as handle:
            while True:
                headers = {"range": f"bytes={done}-"} if done else {}
                try:
                    request = http.build_request("GET", path, params=params, headers=headers)
                    response = retrying(lambda: http.send(request, stream=True, follow_redirects=True),
                                        patience=max(0.0, deadline - time.monotonic()) if contacted else 0.0,
                                        what=f"downloading {label}")
                    contacted = True
                    try:
                        if not response.is_success:
                            response.read()
                            check(response)
                        first = response.history[0] if response.history else response
                        expected = expected or first.headers.get("x-content-sha256")
                        bar = bar or tqdm(unit="B", unit_scale=True, desc=label)
                        if done and response.status_code != 206:  # the server ignored the range: start over
                            handle.seek(0)
                            handle.truncate()
                            done, bar.n = 0, 0
                        length = response.headers.get("content-length")
                        if length is not None:
                            bar.total = done + int(length)
                        for chunk in response.iter_bytes():
                            handle.write(chunk)
                            done += len(chunk)
                            bar.update(len(chunk))
                    finally:
                        response.close()
                    break
                except httpx.TransportError as exc:
                    if not contacted or time.monotonic() + delay > deadline:
                        raise
                    print(f"lorajobs: downloading {label}: connection lost after {done:,} bytes ({exc}); resuming in "
                          f"{delay:.0f} s", file=sys.stderr)
                    handle.flush()
                    time.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_SECONDS)
    except BaseException:
        dest.unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    finally:
        if bar is not None:
            bar.close()
    if not expected:
        dest.unlink()
        raise CliError("the server sent no x-content-sha256 for the download; refusing to keep it unchecked")
    actual = sha256_file(dest)
    if actual != expected:
        dest.unlink()
        raise CliError(f"the download is corrupt (sha256 {actual}, expected {expected}); try again")
    return actual
