"""The CLI's key rules and its unpacking of downloaded archives."""

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.client import client
from core.archives import unpack_archive
from tests.stack import ROOT


def lorajobs(*argv: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LORAJOBS_API_KEY", "OPENAI_API_KEY")}
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_openai_api_key_is_never_used():
    done = lorajobs("files", "list", OPENAI_API_KEY="sk-real-openai-key")
    assert done.returncode != 0 and "set LORAJOBS_API_KEY or pass --api-key" in done.stderr


def test_a_key_is_not_sent_over_plain_http_off_loopback():
    done = lorajobs("files", "list", "--base-url", "http://10.255.255.1:8000/v1", LORAJOBS_API_KEY="lj-x")
    assert done.returncode != 0 and "refusing to send the API key in clear to 10.255.255.1" in done.stderr


@pytest.mark.parametrize("url, insecure, allowed", [
    ("http://127.0.0.1:8000/v1", False, True), ("http://localhost:8000/v1", False, True),
    ("http://[::1]:8000/v1", False, True), ("https://lorajobs.internal/v1", False, True),
    ("http://lorajobs.internal/v1", False, False), ("http://lorajobs.internal/v1", True, True),
    ("ftp://lorajobs.internal/v1", True, False),
])
def test_which_urls_a_key_may_be_sent_to(url, insecure, allowed):
    args = Namespace(base_url=url, api_key="lj-x", insecure=insecure)
    if allowed:
        client(args).close()
    else:
        with pytest.raises(SystemExit):
            client(args)


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_info(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def zip_bytes(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_a_good_archive_unpacks(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz([file_info("adapter_config.json", b"{}"), file_info("sub/w.bin", b"123")]))
    out = unpack_archive(archive, tmp_path / "out", fmt="tar.gz")
    assert (out / "adapter_config.json").read_bytes() == b"{}" and (out / "sub/w.bin").read_bytes() == b"123"


MALICIOUS = {
    "traversal": (tar_gz([file_info("ok.txt", b"1"), file_info("../evil.txt", b"x")]), "unsafe path"),
    "absolute": (tar_gz([file_info("/tmp/evil.txt", b"x")]), "unsafe path"),
    "symlink": (tar_gz([link_info("link", "/etc/passwd", tarfile.SYMTYPE)]), "link"),
    "hardlink": (tar_gz([link_info("hard", "/etc/passwd", tarfile.LNKTYPE)]), "link"),
    "device": (tar_gz([link_info("dev", "", tarfile.CHRTYPE)]), "special file"),
    "zip_traversal": (zip_bytes({"../evil.txt": b"x"}), "unsafe path"),
    "zip_symlink": (zip_bytes({"ok.txt": b"1"}, symlink="link"), "link"),
    "not_an_archive": (b'{"just": "json"}\n' * 100, "not a .tar.gz, .zip or .tar archive"),
    "gzip_but_not_tar": (gzip.compress(b"hello" * 1000), "damaged"),
}


@pytest.mark.parametrize("name", MALICIOUS)
def test_a_malicious_archive_is_refused_and_leaves_nothing(tmp_path, name):
    data, message = MALICIOUS[name]
    archive = tmp_path / "download.bin"
    archive.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_a_decompression_bomb_stops_at_the_limit(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(tar_gz([file_info("zeros.bin", bytes(64 << 20))]))
    assert archive.stat().st_size < 1 << 20  # 64 MiB of zeros compress to well under 1 MiB
    with pytest.raises(ValueError, match="more than 1,048,576 bytes"):
        unpack_archive(archive, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_too_many_members_and_the_wrong_format_are_refused(tmp_path):
    many = tmp_path / "many.tar.gz"
    many.write_bytes(tar_gz([file_info(f"f{i}", b"") for i in range(20)]))
    with pytest.raises(ValueError, match="more than 10 members"):
        unpack_archive(many, tmp_path / "out", max_members=10)
    zipped = tmp_path / "adapter.tar.gz"
    zipped.write_bytes(zip_bytes({"a": b"1"}))
    with pytest.raises(ValueError, match="is a zip archive, not the expected tar.gz"):
        unpack_archive(zipped, tmp_path / "out", fmt="tar.gz")


class Downloads(BaseHTTPRequestHandler):
    """A server that answers an adapter download with a body and, or not, its sha256 header."""

    body, sha256 = b"", None

    def do_GET(self):
        self.send_response(200)
        if self.sha256:
            self.send_header("x-content-sha256", self.sha256)
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def downloads():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Downloads)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def download(server, out: Path) -> subprocess.CompletedProcess:
    return lorajobs("jobs", "download", "ftjob-x", "--out", str(out), "--base-url",
                    f"http://127.0.0.1:{server.server_port}/v1", LORAJOBS_API_KEY="lj-x")


def test_a_download_is_unpacked_only_when_its_sha256_matches(downloads, tmp_path):
    Downloads.body = tar_gz([file_info("adapter_config.json", b"{}")])
    Downloads.sha256 = None
    missing = download(downloads, tmp_path / "a")
    assert missing.returncode != 0 and "sent no x-content-sha256" in missing.stderr and not (tmp_path / "a").exists()
    Downloads.sha256 = "0" * 64
    corrupt = download(downloads, tmp_path / "b")
    assert corrupt.returncode != 0 and "corrupt" in corrupt.stderr and not (tmp_path / "b").exists()
    Downloads.sha256 = hashlib.sha256(Downloads.body).hexdigest()
    good = download(downloads, tmp_path / "c")
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "c" / "adapter_config.json").read_bytes() == b"{}"
    Downloads.body = tar_gz([file_info("../escape.txt", b"x")])
    Downloads.sha256 = hashlib.sha256(Downloads.body).hexdigest()
    hostile = download(downloads, tmp_path / "d")
    assert hostile.returncode != 0 and "unsafe path" in hostile.stderr and not (tmp_path / "escape.txt").exists()
