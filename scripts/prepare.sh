#!/usr/bin/env bash
# Preparation for the test run, the one step that uses the network (`make prepare`, after `make install` has
# made the virtual environment with the SeaweedFS S3 server package): Debian's packages for the suite's
# services (PgBouncer too, for tests/ops/test_pgbouncer.py) and browser tests, installed when missing, and
# the cache of real tokenizer vocabularies. Run again on a prepared machine it downloads nothing, so
# `make test` runs it every time.
#
# Arguments add "command-or-path:debian-package" pairs to check (`.ci/run` adds its network-namespace tools).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[prepare.sh] $*"; }
fail() { echo "[prepare.sh] FAILED: $*" >&2; exit 1; }

# What the test run uses (a command on PATH, or a path that may hold a glob) and the package that brings it.
NEEDED=(
  "/usr/lib/postgresql/*/bin/initdb:postgresql"
  "pg_isready:postgresql-client"
  "redis-server:redis-server"
  "redis-cli:redis-tools"
  "/usr/sbin/pgbouncer:pgbouncer"
  "/usr/bin/chromium:chromium"
  "curl:curl"
  "timeout:coreutils"
  "runuser:util-linux"
  "$@"
)

present() {
  case $1 in
    */*) compgen -G "$1" >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

missing_packages() {
  local entry
  for entry in "${NEEDED[@]}"; do
    present "${entry%:*}" || echo "${entry##*:}"
  done | sort -u
}

[ -x .venv/bin/python ] || fail "no virtual environment in .venv: run \`make prepare\`, which makes it first"

mapfile -t packages < <(missing_packages)
if [ "${#packages[@]}" -gt 0 ]; then
  log "installing ${packages[*]} from Debian's packages"
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || fail "installing ${packages[*]} needs root: run \`apt-get install ${packages[*]}\` as root"
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq || fail "apt-get update failed"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null ||
    fail "apt-get install ${packages[*]} failed"
  mapfile -t packages < <(missing_packages)
  [ "${#packages[@]}" = 0 ] || fail "still missing after apt-get install: ${packages[*]}"
fi

.venv/bin/python -m tests.helpers.vocabs || fail "could not cache the tokenizer vocabularies"
log "ready"
