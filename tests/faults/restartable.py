"""Services a fault test may stop and start again: a throwaway PostgreSQL cluster and a SeaweedFS S3 server of its
own (the suite's shared ones are never touched)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.core.s3server import CREDENTIALS, PORT_FLAGS, free_ports, wait_ready, weed_binary


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    return found[-1].parent


class Postgres:
    """`initdb` + `pg_ctl` on a free loopback port with trust auth (about a second), as scripts/test.sh starts one."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="lorajobs-faults-pg-"))
        self.root.chmod(0o755)  # the cluster runs as `postgres` when we are root
        self.data = self.root / "data"
        self.port = free_ports(1)[0]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> "Postgres":
        if os.getuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "--auth=trust", "--username=postgres", "--no-sync", f"--pgdata={self.data}")
        return self.start()

    def start(self) -> "Postgres":
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-l", str(self.root / "server.log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "-l", str(self.root / "server.log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "restart")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class SeaweedFS:
    """`weed mini` on fixed free ports with one data folder, so it can be stopped and started again."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lorajobs-faults-s3-"))
        (self.root / "data").mkdir()
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "SeaweedFS":
        os.environ.update(CREDENTIALS)
        args = [weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", *(f"-{flag}={port}" for flag, port in self.ports.items())]
        log = self.root / "weed.log"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **CREDENTIALS, "GOMEMLIMIT": "300MiB"})
        wait_ready(self.endpoint, self.process, log)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
