#!/usr/bin/env bash
# The README's test command: brings its own services, runs the whole suite, stops what it started.
#   PostgreSQL and Redis on loopback are used when they answer; otherwise throwaway ones are started
#   (installed from Debian's packages if missing). A fresh SeaweedFS S3 server is always started.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV_BIN="$ROOT/.venv/bin"
RUN_DIR=$(mktemp -d /tmp/lorajobs-test.XXXXXX)
chmod 755 "$RUN_DIR"
STARTED_PIDS=()
PG_STARTED_DIR=""

log() { echo "[test.sh] $*"; }

cleanup() {
  for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ -n "$PG_STARTED_DIR" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_STARTED_DIR" -m fast stop >/dev/null 2>&1
  fi
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT INT TERM

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
free_port() { free_ports 1; }

apt_install() {
  log "installing $* from Debian's packages"
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL -------------------------------------------------------------------------------
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  export LORAJOBS_TEST_PG_ADMIN_URL="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
  log "PostgreSQL: using the server on 127.0.0.1:5432"
else
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
  PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
  PG_PORT=$(free_port)
  PG_STARTED_DIR="$RUN_DIR/pg"
  mkdir -p "$PG_STARTED_DIR" && chown postgres "$PG_STARTED_DIR"
  runuser -u postgres -- "$PG_BIN/initdb" -q -A trust -U postgres -D "$PG_STARTED_DIR" >/dev/null
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_STARTED_DIR" -w -l "$PG_STARTED_DIR/log" \
    -o "-p $PG_PORT -k $PG_STARTED_DIR -c listen_addresses=127.0.0.1" start >/dev/null
  export LORAJOBS_TEST_PG_ADMIN_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/postgres"
  log "PostgreSQL: started a throwaway cluster on 127.0.0.1:$PG_PORT"
fi

# --- Redis ------------------------------------------------------------------------------------
if "$VENV_BIN/python" -c 'import redis,sys; redis.Redis(host="127.0.0.1",port=6379,socket_timeout=2).ping()' 2>/dev/null; then
  export LORAJOBS_TEST_REDIS_URL="redis://127.0.0.1:6379/15"
  log "Redis: using the server on 127.0.0.1:6379 (database 15)"
else
  command -v redis-server >/dev/null || apt_install redis-server
  REDIS_PORT=$(free_port)
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$RUN_DIR" \
    --logfile "$RUN_DIR/redis.log" &
  STARTED_PIDS+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  export LORAJOBS_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/15"
  log "Redis: started a throwaway server on 127.0.0.1:$REDIS_PORT"
fi

# --- SeaweedFS S3, always our own with a fresh data folder ------------------------------------
read -r S3_PORT S3_GRPC M_PORT M_GRPC V_PORT V_GRPC F_PORT F_GRPC <<<"$(free_ports 8)"
export AWS_ACCESS_KEY_ID="lorajobs-test" AWS_SECRET_ACCESS_KEY="lorajobs-test-secret" AWS_DEFAULT_REGION="us-east-1"
mkdir -p "$RUN_DIR/s3"
GOMEMLIMIT=300MiB "$VENV_BIN/weed" mini -dir="$RUN_DIR/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.telemetry=false -webdav=false -admin.ui=false -s3.port="$S3_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.port.grpc="$S3_GRPC" -master.port="$M_PORT" -master.port.grpc="$M_GRPC" -volume.port="$V_PORT" \
  -volume.port.grpc="$V_GRPC" -filer.port="$F_PORT" -filer.port.grpc="$F_GRPC" \
  >"$RUN_DIR/s3.log" 2>&1 &
STARTED_PIDS+=($!)
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$S3_PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
if ! curl -sf "http://127.0.0.1:$S3_PORT/healthz" >/dev/null 2>&1; then
  log "SeaweedFS did not become ready:"; tail -20 "$RUN_DIR/s3.log"; exit 1
fi
export LORAJOBS_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
log "S3: SeaweedFS on $LORAJOBS_TEST_S3_ENDPOINT"

# --- Chromium for the dashboard's browser tests ------------------------------------------------
[ -x /usr/bin/chromium ] || apt_install chromium

# --- The suite --------------------------------------------------------------------------------
"$VENV_BIN/ruff" check --quiet api core db worker cli tests bench migrations examples || exit 1
mkdir -p test-output
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV_BIN/pytest" -p no:cacheprovider "$@"
status=$?
if [ "$status" = 5 ]; then log "no test ran"; status=1; fi
exit "$status"
