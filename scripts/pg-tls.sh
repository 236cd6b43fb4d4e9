#!/usr/bin/env bash
# Sets up, idempotently, a second local PostgreSQL cluster that only accepts TLS over TCP,
# for the integration tests of the sidecar's TLS connection options:
#   cluster   - Debian's postgresql, cluster `kdedup_tls`, on 127.0.0.1:$KDEDUP_TEST_TLS_PG_PORT
#               (default 5433); pg_hba trusts hostssl on loopback and rejects every hostnossl
#   certs     - in <repo>/.tmp/pg-tls/, from a throwaway CA, remade when missing or when the
#               server certificate expires within a day:
#                 ca.crt/ca.key             the CA that signs everything below
#                 server.crt/server.key     CN localhost, SAN DNS:localhost,IP:127.0.0.1
#                 client.crt/client.key     CN postgres, for sslcert/sslkey
#                 wrong-ca.crt/wrong-ca.key an unrelated CA, for "a wrong CA is refused"
# Usage: scripts/pg-tls.sh [start|env|stop]
#   start (default) - set up and start; prints nothing on stdout
#   env             - the same, then prints KDEDUP_TEST_TLS_DIR=... and KDEDUP_TEST_TLS_PG_PORT=...
#   stop            - stop the cluster (errors ignored)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TLS_DIR="$ROOT/.tmp/pg-tls"
PORT="${KDEDUP_TEST_TLS_PG_PORT:-5433}"
CLUSTER=kdedup_tls
SOCKET_DIR=/var/run/postgresql
CERT_DAYS=30

log() { printf '[pg-tls] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a command with its output kept back unless it fails (openssl prints progress dots).
quietly() {
  local out
  if ! out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" >&2
    return 1
  fi
}

# The version of an existing kdedup_tls cluster, else the newest installed PostgreSQL.
detect_version() {
  local v
  v="$(pg_lsclusters -h 2>/dev/null | awk -v c="$CLUSTER" '$2 == c { print $1; exit }')"
  if [ -z "$v" ] && [ -d /etc/postgresql ]; then
    v="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -1)"
  fi
  if [ -z "$v" ] && [ -d /usr/lib/postgresql ]; then
    v="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -1)"
  fi
  if [ -z "$v" ]; then
    log "cannot find an installed PostgreSQL version (/etc/postgresql, pg_lsclusters)"
    exit 1
  fi
  printf '%s\n' "$v"
}

cluster_exists() {
  pg_lsclusters -h 2>/dev/null | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { f = 1 } END { exit !f }'
}

cluster_running() {
  as_root pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1
}

certs_ok() {
  local f
  for f in ca server client wrong-ca; do
    [ -s "$TLS_DIR/$f.crt" ] && [ -s "$TLS_DIR/$f.key" ] || return 1
  done
  openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.crt" >/dev/null 2>&1 || return 1
  openssl verify -CAfile "$TLS_DIR/ca.crt" "$TLS_DIR/server.crt" "$TLS_DIR/client.crt" >/dev/null 2>&1
}

# Makes every certificate and key anew in a scratch dir, then moves them into $TLS_DIR.
generate_certs() {
  log "generating a throwaway CA and server/client certificates in $TLS_DIR"
  mkdir -p "$TLS_DIR"
  local work
  work="$(mktemp -d "$TLS_DIR/.new.XXXXXX")"
  (
    umask 077
    cd "$work"
    cat >ca.cnf <<'EOF'
[req]
distinguished_name = dn
x509_extensions = v3_ca
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
EOF
    cat >req.cnf <<'EOF'
[req]
distinguished_name = dn
[dn]
EOF
    cat >server.ext <<'EOF'
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
EOF
    cat >client.ext <<'EOF'
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
EOF
    quietly openssl req -x509 -new -config ca.cnf -newkey rsa:2048 -nodes -sha256 \
      -days "$CERT_DAYS" -subj "/CN=kdedup test CA" -keyout ca.key -out ca.crt
    quietly openssl req -x509 -new -config ca.cnf -newkey rsa:2048 -nodes -sha256 \
      -days "$CERT_DAYS" -subj "/CN=kdedup wrong CA" -keyout wrong-ca.key -out wrong-ca.crt
    local name cn
    for name in server client; do
      if [ "$name" = server ]; then cn=localhost; else cn=postgres; fi
      quietly openssl req -new -config req.cnf -newkey rsa:2048 -nodes -sha256 \
        -subj "/CN=$cn" -keyout "$name.key" -out "$name.csr"
      quietly openssl x509 -req -sha256 -in "$name.csr" -CA ca.crt -CAkey ca.key \
        -set_serial "0x$(openssl rand -hex 16)" -days "$CERT_DAYS" \
        -extfile "$name.ext" -out "$name.crt"
    done
    chmod 0644 ./*.crt
    chmod 0600 ./*.key
  )
  local f
  for f in ca server client wrong-ca; do
    mv -f "$work/$f.crt" "$work/$f.key" "$TLS_DIR/"
  done
  rm -rf "$work"
}

# install(1)s $1 as $2 (owned by postgres, mode $3) unless $2 already has that content.
# Returns 0 when it changed something.
install_if_changed() {
  if as_root cmp -s "$1" "$2" 2>/dev/null; then
    return 1
  fi
  as_root install -o postgres -g postgres -m "$3" "$1" "$2"
}

setup() {
  if ! command -v pg_createcluster >/dev/null; then
    log "pg_createcluster is missing; installing PostgreSQL via scripts/services.sh postgres"
    "$ROOT/scripts/services.sh" postgres >&2
  fi
  VERSION="$(detect_version)"
  local conf_dir="/etc/postgresql/$VERSION/$CLUSTER"
  local changed=0

  if ! certs_ok; then
    generate_certs
  fi

  if ! cluster_exists; then
    log "creating PostgreSQL $VERSION cluster $CLUSTER on port $PORT"
    as_root pg_createcluster -p "$PORT" "$VERSION" "$CLUSTER" >/dev/null
    changed=1
  fi

  local scratch
  scratch="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $scratch is local
  trap "rm -rf '$scratch'" EXIT

  # Postgres refuses a server key that others can read: owned by postgres, mode 0600.
  local f cert_changed=0
  for f in server.crt ca.crt; do
    if install_if_changed "$TLS_DIR/$f" "$conf_dir/$f" 0644; then cert_changed=1; fi
  done
  if install_if_changed "$TLS_DIR/server.key" "$conf_dir/server.key" 0600; then cert_changed=1; fi
  if [ "$cert_changed" = 1 ]; then
    log "installed the server certificate, key and CA into $conf_dir"
    changed=1
  fi

  # Settings go into conf.d, read after postgresql.conf, so they override its defaults
  # (Debian's postgresql.conf points ssl_cert_file at the snakeoil certificate). The port
  # is set in postgresql.conf too, where pg_lsclusters and pg_ctlcluster read it.
  cat >"$scratch/kdedup-tls.conf" <<EOF
# Managed by scripts/pg-tls.sh, which overwrites any change to this file.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKET_DIR'
ssl = on
ssl_cert_file = '$conf_dir/server.crt'
ssl_key_file = '$conf_dir/server.key'
ssl_ca_file = '$conf_dir/ca.crt'
EOF
  as_root install -d -o postgres -g postgres -m 0755 "$conf_dir/conf.d"
  if install_if_changed "$scratch/kdedup-tls.conf" "$conf_dir/conf.d/kdedup-tls.conf" 0644; then
    log "wrote $conf_dir/conf.d/kdedup-tls.conf"
    changed=1
  fi
  if [ "$(pg_conftool -s "$VERSION" "$CLUSTER" show port 2>/dev/null || true)" != "$PORT" ]; then
    as_root pg_conftool "$VERSION" "$CLUSTER" set port "$PORT"
    changed=1
  fi

  cat >"$scratch/pg_hba.conf" <<'EOF'
local   all all                trust
hostssl all all 127.0.0.1/32   trust
hostssl all all ::1/128        trust
hostnossl all all 0.0.0.0/0    reject
hostnossl all all ::/0         reject
EOF
  if install_if_changed "$scratch/pg_hba.conf" "$conf_dir/pg_hba.conf" 0640; then
    log "wrote $conf_dir/pg_hba.conf (TLS only over TCP)"
    changed=1
  fi

  if [ ! -d "$SOCKET_DIR" ]; then
    as_root install -d -o postgres -g postgres -m 2775 "$SOCKET_DIR"
  fi

  if cluster_running; then
    if [ "$changed" = 1 ]; then
      log "restarting PostgreSQL $VERSION/$CLUSTER to apply the changes"
      as_root pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$CLUSTER" restart
    fi
  else
    log "starting PostgreSQL $VERSION/$CLUSTER on 127.0.0.1:$PORT"
    as_root pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$CLUSTER" start || true
  fi

  local up=0
  for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p "$PORT"; then
      up=1
      break
    fi
    sleep 0.5
  done
  if [ "$up" != 1 ]; then
    log "PostgreSQL $VERSION/$CLUSTER did not come up on 127.0.0.1:$PORT; see /var/log/postgresql/postgresql-$VERSION-$CLUSTER.log"
    exit 1
  fi

  local psql_local=(psql -X -h "$SOCKET_DIR" -p "$PORT" -U postgres -d postgres)
  if ! "${psql_local[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    log "creating database test"
    "${psql_local[@]}" -qc "CREATE DATABASE test" >/dev/null
  fi
}

stop() {
  command -v pg_lsclusters >/dev/null || return 0
  VERSION="$(pg_lsclusters -h 2>/dev/null | awk -v c="$CLUSTER" '$2 == c { print $1; exit }' || true)"
  [ -n "$VERSION" ] || return 0
  as_root pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$CLUSTER" stop >/dev/null 2>&1 || true
}

case "${1:-start}" in
  start) setup ;;
  env)
    setup
    printf 'KDEDUP_TEST_TLS_DIR=%s\n' "$TLS_DIR"
    printf 'KDEDUP_TEST_TLS_PG_PORT=%s\n' "$PORT"
    ;;
  stop) stop ;;
  *) echo "usage: $0 [start|env|stop]" >&2; exit 64 ;;
esac
