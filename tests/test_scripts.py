"""The test command's own service starts (scripts/test.sh): a service that does not come up stops the run with the
reason, and "started" is printed only for a server that answers and is the one the script started."""

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_functions(commands: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Source scripts/test.sh (which then runs nothing by itself), make its run folder and run `commands`."""
    script = f"source scripts/test.sh && make_run_dir && {commands}"
    return subprocess.run(["bash", "-c", script, "bash", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_failed(result: subprocess.CompletedProcess, reason: str, detail: str) -> None:
    assert result.returncode == 1, result
    assert f"[test.sh] FAILED: {reason}" in result.stderr
    assert detail in result.stderr, result.stderr
    assert "started" not in result.stdout


@pytest.fixture
def fake_bin():
    """A folder for stand-in programs that the `postgres` user can run too (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lorajobs-fake-bin-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def write_program(folder: Path, name: str, body: str) -> None:
    program = folder / name
    program.write_text(f"#!/bin/sh\n{body}\n")
    program.chmod(0o755)


@pytest.fixture
def silent_listener():
    """A loopback port that accepts connections and never answers: a server stuck, or something else, holds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def other_redis(fake_bin):
    """A port where a Redis that the test command did not start answers PING."""
    port = free_port()
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(fake_bin)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
        assert server.poll() is None and time.monotonic() < deadline, "the other Redis did not start"
        time.sleep(0.1)
    yield port
    server.terminate()
    server.wait()


def debian_pg_bin() -> str:
    return run_functions("debian_pg_bin").stdout.strip()


def test_an_initdb_that_rejects_its_options_stops_the_run_with_its_message(fake_bin):
    # What PostgreSQL 15's initdb did with the `-q` the script once passed; pg_ctl would have "started".
    write_program(fake_bin, "initdb", "echo \"initdb: invalid option -- 'q'\" >&2; exit 1")
    write_program(fake_bin, "pg_ctl", "exit 0")
    result = run_functions('start_postgres "$1"', str(fake_bin))
    assert_failed(result, "PostgreSQL: initdb failed", "invalid option -- 'q'")


def test_a_postgres_that_cannot_take_its_port_stops_the_run(silent_listener):
    result = run_functions('start_postgres "$1" "$2"', debian_pg_bin(), str(silent_listener))
    assert_failed(result, f"PostgreSQL: the server did not start on 127.0.0.1:{silent_listener}",
                  "Address already in use")


def test_a_throwaway_postgres_answers_and_is_stopped_with_the_run():
    port = free_port()
    result = run_functions('start_postgres "$1" "$2" && psql -h 127.0.0.1 -p "$2" -U postgres -Atc "select 6*7"',
                           debian_pg_bin(), str(port))
    assert result.returncode == 0, result
    assert f"[test.sh] PostgreSQL: started a throwaway cluster on 127.0.0.1:{port}" in result.stdout
    assert result.stdout.splitlines()[-1] == "42"
    assert subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0


@pytest.mark.parametrize("occupant", ["silent_listener", "other_redis"])
def test_a_redis_that_cannot_take_its_port_stops_the_run(occupant, request):
    port = request.getfixturevalue(occupant)
    result = run_functions('start_redis "$1"', str(port))
    assert_failed(result, f"Redis: redis-server exited before answering on 127.0.0.1:{port}", "Address already in use")


def test_a_redis_that_never_answers_stops_the_run_in_its_time(fake_bin):
    write_program(fake_bin, "redis-server", "exec sleep 60")
    write_program(fake_bin, "redis-cli", "exit 1")
    result = run_functions('PATH="$1:$PATH" READY_TIMEOUT_S=1 start_redis', str(fake_bin), timeout=30)
    assert_failed(result, "Redis: no answer on 127.0.0.1:", "in 1 s")


def test_a_seaweedfs_that_exits_stops_the_run_with_its_log(fake_bin):
    (fake_bin / "python").symlink_to(ROOT / ".venv" / "bin" / "python")
    write_program(fake_bin, "weed", "echo 'weed: cannot create the data folder' >&2; exit 2")
    result = run_functions('VENV_BIN="$1" start_s3', str(fake_bin))
    assert_failed(result, "S3: SeaweedFS exited before answering", "cannot create the data folder")


def test_a_run_in_which_no_test_ran_fails():
    result = subprocess.run(["bash", "scripts/test.sh", "tests/test_scripts.py", "-k", "no_test_has_this_name"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result
    assert "[test.sh] FAILED: no test ran" in result.stdout
