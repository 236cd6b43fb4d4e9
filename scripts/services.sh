#!/usr/bin/env bash
# Starts what the demo and the tests need on this machine, installing it where missing:
#   postgres  - the local PostgreSQL server on 127.0.0.1:5432 (Debian's `postgresql`)
#   pg-tls    - a second PostgreSQL cluster that requires TLS, on 127.0.0.1:$KDEDUP_TEST_TLS_PG_PORT
#               (default 5433), with its certificates in .tmp/pg-tls/ (scripts/pg-tls.sh)
#   broker    - tansu 0.6.0, a Kafka-protocol broker, in memory, on 127.0.0.1:$KDEDUP_TEST_BROKER_PORT
#   prometheus - Debian's `prometheus` package, for its binaries only: tests/it/prometheus.rs
#               starts its own server on a free port and runs promtool; no service is kept
# Usage: scripts/services.sh postgres|pg-tls|broker|prometheus|all|stop-broker
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TMP="$ROOT/.tmp"
mkdir -p "$TMP"
BROKER_PORT="${KDEDUP_TEST_BROKER_PORT:-19092}"
TANSU_VERSION=0.6.0
TANSU="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"

log() { printf '[services] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-
}

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    return 0
  fi
  if ! command -v pg_lsclusters >/dev/null; then
    log "PostgreSQL is not installed; installing Debian's postgresql package"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    local version
    version="$(ls /etc/postgresql | sort -V | tail -1)"
    # A fresh install only accepts password logins over TCP. The tests connect as
    # postgres over loopback without a password, as on the CI machines: trust loopback.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -1)"
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p 5432; then
      psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
      return 0
    fi
    sleep 0.5
  done
  log "PostgreSQL did not come up on 127.0.0.1:5432; see /var/log/postgresql/"
  exit 1
}

# Whether the installed tansu was built with the postgres storage engine (the broker
# restart and chaos tests run a broker whose data survives its own restart). cargo records
# each install's features in ~/.cargo/.crates2.json.
tansu_has_postgres() {
  local meta="${CARGO_HOME:-$HOME/.cargo}/.crates2.json"
  [ -f "$meta" ] && grep -o "\"tansu $TANSU_VERSION [^}]*}" "$meta" | grep -q '"postgres"'
}

ensure_tansu_installed() {
  if [ -x "$TANSU" ] && "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION" && tansu_has_postgres; then
    return 0
  fi
  log "installing tansu $TANSU_VERSION (a Kafka-protocol broker; takes ~15 minutes once, then cached in ~/.cargo/bin)"
  cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,postgres
}

ensure_broker() {
  ensure_tansu_installed
  if port_open "$BROKER_PORT"; then
    return 0
  fi
  log "starting tansu on 127.0.0.1:$BROKER_PORT (in-memory storage)"
  nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --storage-engine "memory://tansu/" \
    >"$TMP/tansu.log" 2>&1 &
  echo $! >"$TMP/tansu.pid"
  for _ in $(seq 1 100); do
    if port_open "$BROKER_PORT"; then
      return 0
    fi
    sleep 0.2
  done
  log "tansu did not start; see $TMP/tansu.log"
  exit 1
}

ensure_prometheus() {
  if [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; then
    return 0
  fi
  log "installing Debian's prometheus package (prometheus + promtool for tests/it/prometheus.rs)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package enables a system service on :9090. The tests run their own server on a
  # free port with a data dir of their own, so the packaged one is stopped and disabled.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
}

ensure_pg_tls() {
  "$ROOT/scripts/pg-tls.sh"
}

stop_broker() {
  if [ -f "$TMP/tansu.pid" ]; then
    local pid
    pid="$(cat "$TMP/tansu.pid")"
    kill "$pid" 2>/dev/null || true
    # Until it is gone and its port is free: a `broker` right after must start a new one,
    # not find the old one still listening.
    for _ in $(seq 1 50); do
      if ! kill -0 "$pid" 2>/dev/null && ! port_open "$BROKER_PORT"; then
        break
      fi
      sleep 0.2
    done
    rm -f "$TMP/tansu.pid"
  fi
}

case "${1:-all}" in
  postgres) ensure_postgres ;;
  pg-tls) ensure_pg_tls ;;
  broker) ensure_broker ;;
  prometheus) ensure_prometheus ;;
  all) ensure_postgres; ensure_pg_tls; ensure_broker; ensure_prometheus ;;
  stop-broker) stop_broker ;;
  *) echo "usage: $0 postgres|pg-tls|broker|prometheus|all|stop-broker" >&2; exit 64 ;;
esac
