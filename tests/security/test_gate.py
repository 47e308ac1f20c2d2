"""The gate against a real uvicorn over a real socket: bodies streamed from a generator, refused early.

Each test measures, on the server, the body bytes the app read; in this process (the server runs in a
thread of it), the resident memory and the bytes of temporary files open, sampled while the request runs.
"""

import itertools
import os
import re
import select
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from api.main import create_app
from core.storage import get_storage
from db.models import ApiKey
from db.session import transaction
from tests.conftest import make_project_key
from tests.stack import free_port

GIB, MIB, KIB = 1 << 30, 1 << 20, 1 << 10
CHUNK = b"x" * (64 * KIB)
# What uvicorn may hand the app in one message: its 64 KiB buffer plus one 256 KiB socket read.
SERVER_READ_AHEAD = 64 * KIB + 256 * KIB


class CountingApp:
    """The whole app behind a counter of the body bytes it pulled from the server."""

    def __init__(self, app):
        self.app, self.received = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


class Sampler:
    """Peak resident memory and peak bytes of open temporary files (deleted ones too) of this process."""

    def __init__(self, temp_dir: str):
        self.temp_dir, self.rss_start = temp_dir, self.rss()
        self.rss_peak, self.temp_peak, self._stop = self.rss_start, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def temp_bytes(self) -> int:
        total = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(self.temp_dir):
                    total += os.fstat(int(fd)).st_size
            except OSError:
                pass  # closed meanwhile
        return total

    def _run(self):
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, self.rss())
            self.temp_peak = max(self.temp_peak, self.temp_bytes())
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_start


@pytest.fixture
def served(settings, tmp_path):
    """The app on a loopback port (uvicorn in a thread), its temporary files in a folder of this test's."""
    temp_dir = str(tmp_path / "tmp")
    os.makedirs(temp_dir)
    previous, tempfile.tempdir = tempfile.tempdir, temp_dir
    app = CountingApp(create_app(settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield app, port, temp_dir
    server.should_exit = True
    thread.join(timeout=10)
    tempfile.tempdir = previous


def chunked(parts: Iterator[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


def repeated(total: int) -> Iterator[bytes]:
    for _ in range(total // len(CHUNK)):
        yield CHUNK


def send_streamed(port: int, method: str, path: str, headers: dict[str, str],
                  body: Iterator[bytes]) -> tuple[int, bytes, int]:
    """Send a request whose body comes from `body`, stopping once the server answers or stops reading.

    Returns the status, the response body and the bytes of body this client managed to send."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(head.encode() + b"\r\n")
    sent = 0
    try:
        for piece in body:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server has answered: the rest of the body is not wanted
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server closed the connection without reading on
    response = b""
    try:
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
        head_bytes, _, rest = response.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                break
            rest += data
    finally:
        sock.close()
    return int(head_bytes.split(b" ")[1]), rest, sent


def multipart(boundary: str, data: Iterator[bytes]) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/jsonl\r\n\r\n").encode()
    yield from data
    yield f"\r\n--{boundary}--\r\n".encode()


def project_objects(settings, key: str) -> list[str]:
    from api.services.projects import hash_key

    with transaction(settings.database_url) as session:
        project_id = session.query(ApiKey.project_id).filter(ApiKey.key_hash == hash_key(key)).scalar()
    return get_storage(settings).list_keys(f"projects/{project_id}/")


def test_a_keyless_chunked_upload_of_1_gib_is_refused_before_its_body_is_read(served):
    app, port, temp_dir = served
    boundary = uuid.uuid4().hex
    with Sampler(temp_dir) as sampled:
        status, body, sent = send_streamed(
            port, "POST", "/v1/files",
            {"Transfer-Encoding": "chunked", "Content-Type": f"multipart/form-data; boundary={boundary}"},
            chunked(multipart(boundary, repeated(GIB))))
    assert status == 401 and b'"authentication_error"' in body
    assert app.received == 0, "the app read body bytes of an unauthenticated request"
    assert sent < 64 * MIB, "the client could push much of the gigabyte: the connection was not closed"
    assert sampled.temp_peak == 0 and os.listdir(temp_dir) == []
    assert sampled.rss_growth < 32 * MIB


def test_a_keyless_100_mb_json_body_is_refused_before_it_is_read(served):
    app, port, temp_dir = served
    with Sampler(temp_dir) as sampled:
        status, body, _ = send_streamed(port, "POST", "/v1/fine_tuning/jobs",
                                        {"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
                                        chunked(repeated(100 * MIB)))
    assert status == 401 and app.received == 0
    assert sampled.temp_peak == 0 and sampled.rss_growth < 32 * MIB


def test_a_keyed_100_mb_json_body_is_cut_at_its_limit(served, settings):
    app, port, temp_dir = served
    key = make_project_key(settings).key
    with Sampler(temp_dir) as sampled:
        status, body, _ = send_streamed(port, "POST", "/v1/fine_tuning/jobs",
                                        {"Transfer-Encoding": "chunked", "Content-Type": "application/json",
                                         "Authorization": f"Bearer {key}"},
                                        chunked(repeated(100 * MIB)))
    assert status == 413 and b'"request_too_large"' in body and b"LORAJOBS_MAX_JSON_BYTES" in body
    assert app.received <= settings.max_json_bytes + SERVER_READ_AHEAD
    assert sampled.temp_peak == 0 and sampled.rss_growth < 32 * MIB
    # Declared too large: refused from the headers alone.
    app.received = 0
    status, _, _ = send_streamed(port, "POST", "/v1/fine_tuning/jobs",
                                 {"Content-Length": str(100 * MIB), "Content-Type": "application/json",
                                  "Authorization": f"Bearer {key}"}, repeated(100 * MIB))
    assert status == 413 and app.received == 0


def test_a_keyed_chunked_upload_over_the_limit_is_cut_and_leaves_nothing(served, settings):
    app, port, temp_dir = served
    key = make_project_key(settings).key
    limit = settings.max_upload_bytes
    boundary = uuid.uuid4().hex
    with Sampler(temp_dir) as sampled:
        status, body, _ = send_streamed(
            port, "POST", "/v1/files",
            {"Transfer-Encoding": "chunked", "Content-Type": f"multipart/form-data; boundary={boundary}",
             "Authorization": f"Bearer {key}"},
            chunked(multipart(boundary, repeated(GIB))))
    assert status == 413 and b'"file_too_large"' in body
    assert app.received <= limit + 64 * KIB + SERVER_READ_AHEAD
    assert sampled.temp_peak <= limit + 64 * KIB  # spooled after authentication, never past the limit
    assert sampled.rss_growth < 64 * MIB
    deadline = time.time() + 5
    while Sampler(temp_dir).temp_bytes() and time.time() < deadline:
        time.sleep(0.05)  # the spool is closed when the request's last reference to it goes
    assert Sampler(temp_dir).temp_bytes() == 0 and os.listdir(temp_dir) == []
    assert project_objects(settings, key) == []

    # Within the limit, the same chunked upload is stored whole.
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    status, body, _ = send_streamed(
        port, "POST", "/v1/files",
        {"Transfer-Encoding": "chunked", "Content-Type": f"multipart/form-data; boundary={boundary}",
         "Authorization": f"Bearer {key}"},
        chunked(multipart(boundary, iter([line * 1000]))))
    assert status == 200, body
    assert len(project_objects(settings, key)) == 1


def test_a_dashboard_upload_without_a_session_is_refused_before_its_body(served):
    app, port, _ = served
    boundary = uuid.uuid4().hex
    status, _, _ = send_streamed(port, "POST", "/files",
                                 {"Transfer-Encoding": "chunked",
                                  "Content-Type": f"multipart/form-data; boundary={boundary}"},
                                 chunked(multipart(boundary, repeated(GIB))))
    assert status == 303 and app.received == 0


def test_a_signed_in_dashboard_upload_over_the_limit_is_cut_and_leaves_nothing(served, settings):
    app, port, _ = served
    key = make_project_key(settings).key
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as browser:
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text).group(1)
        browser.post("/login", data={"api_key": key, "csrf_token": token})
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/files").text).group(1)
        cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    boundary = uuid.uuid4().hex
    form = iter([f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\n{token}\r\n".encode()])
    app.received = 0
    status, body, _ = send_streamed(
        port, "POST", "/files",
        {"Transfer-Encoding": "chunked", "Content-Type": f"multipart/form-data; boundary={boundary}",
         "Cookie": cookie},
        chunked(itertools.chain(form, multipart(boundary, repeated(GIB)))))
    assert status == 413 and b'"file_too_large"' in body
    assert app.received <= settings.max_upload_bytes + 64 * KIB + SERVER_READ_AHEAD
    assert project_objects(settings, key) == []


def test_a_small_request_still_reads_normally(served, settings):
    _, port, _ = served
    key = make_project_key(settings).key
    response = httpx.post(f"http://127.0.0.1:{port}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "tiny/llama", "training_file": "file-missing"})
    assert response.status_code in (400, 404, 422) and "error" in response.json()
