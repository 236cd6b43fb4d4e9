#!/usr/bin/env bash
# Runs a built kdedup binary the way the container image runs it, without a Docker engine.
#
#   scripts/check-image-runtime.sh [BINARY]      BINARY defaults to target/debug/kdedup
#
# The image (Dockerfile) is distroless cc-debian12: glibc, libgcc, libssl3, CA certificates,
# the user `nonroot` (65532), no shell; the Dockerfile adds /usr/local/bin/kdedup plus
# libssl/libcrypto/libz, and the manifests run it as uid/gid 65532 with a read-only root
# filesystem, all capabilities dropped and allowPrivilegeEscalation: false. This script
# builds the same kind of root filesystem from BINARY and the host libraries it links (the
# host must be Debian 12, like both Dockerfile stages, for that to stand for the image),
# and runs `kdedup run` in it:
#   - in a mount and PID namespace of its own (unshare), kdedup being PID 1 as the image's
#     ENTRYPOINT is, so SIGTERM reaches it only through its own handler;
#   - chrooted into that root filesystem, which is bind-mounted read-only; /proc and the
#     /dev nodes are separate mounts, as in a container; /etc/hosts and /etc/resolv.conf
#     are copied from the host (the kubelet mounts them);
#   - as uid 65532, gid 65532, groups [65532], no capabilities, no_new_privs (setpriv +
#     chroot --userspec), with a clean environment;
#   - against Postgres (KDEDUP_TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test)
#     and the broker in KDEDUP_TEST_BROKERS (default 127.0.0.1:19092): `make services`
#     starts both.
# It asserts: the binary needs only the libraries the runtime image has (the Dockerfile's
# list); there is no shell in the root filesystem; the process runs with the uid, gid,
# capabilities and read-only root above; /livez and /metrics answer on a loopback port and
# /readyz turns 200 (Postgres migrated, broker reached, consumer group joined); SIGTERM
# stops it with exit code 0 within the drain deadline; the log has no write error.
#
# Not covered (needs a container engine): the image build itself, distroless' exact file
# set, the seccomp RuntimeDefault profile, cgroup limits, the Kubernetes probes' timing.
#
# Needs root (mount namespaces, chroot), util-linux (unshare, setpriv), coreutils chroot,
# ldd, curl, python3 (to create the input topic). Leaves a log and the root filesystem in
# .tmp/image-runtime/; drops its Postgres schema at the end when psql is on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/.tmp/image-runtime"
ROOTFS="$WORK/rootfs"
LOG="$WORK/kdedup.log"
UID_GID=65532

die() {
  printf 'check-image-runtime: FAIL: %s\n' "$*" >&2
  exit 1
}
say() { printf '==> %s\n' "$*"; }

# --- stage 2: inside the new mount + PID namespace (PID 1 here), as root ----------------------
if [ "${1:-}" = "--in-namespace" ]; then
  rootfs="$2"
  shift 2
  # A mount of its own, so that it can be made read-only without touching the host's view.
  mount --bind "$rootfs" "$rootfs"
  mount -t proc -o nosuid,nodev,noexec proc "$rootfs/proc"
  for d in null zero full random urandom; do
    mount --bind "/dev/$d" "$rootfs/dev/$d"
  done
  mount -o remount,bind,ro "$rootfs"
  # env -i: only what the image and the manifests put in the environment (passed as
  # arguments). setpriv: no_new_privs (allowPrivilegeEscalation: false), no inheritable
  # capabilities, and a bounding set of just what chroot needs; chroot --userspec then
  # drops to 65532, which clears every capability, and execs the binary inside the root
  # filesystem. Every step is an exec, so kdedup ends as PID 1.
  exec /usr/bin/env -i "$@" \
    /usr/bin/setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,+sys_chroot,+setuid,+setgid \
    /usr/sbin/chroot --userspec="$UID_GID:$UID_GID" --groups="$UID_GID" "$rootfs" \
    /usr/local/bin/kdedup run
fi

# --- stage 1: on the host -----------------------------------------------------------------------
BIN="${1:-target/debug/kdedup}"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
BROKERS="${KDEDUP_TEST_BROKERS:-127.0.0.1:19092}"
DATABASE_URL="${KDEDUP_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
READY_TIMEOUT="${KDEDUP_IMAGE_CHECK_READY_TIMEOUT:-90}"

[ "$(id -u)" = 0 ] || die "needs root (mount namespaces and chroot); run it with sudo"
for tool in unshare setpriv ldd curl python3 ps; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH"
done
[ -x /usr/sbin/chroot ] || die "/usr/sbin/chroot (coreutils) not found"
[ -x /usr/bin/env ] && [ -x /usr/bin/setpriv ] || die "/usr/bin/env and /usr/bin/setpriv are needed at those paths"
[ -x "$BIN" ] || die "no executable binary at $BIN (build it first: cargo build --locked --bin kdedup)"
if ! grep -q 'VERSION_ID="12"' /etc/os-release 2>/dev/null || ! grep -q '^ID=debian' /etc/os-release; then
  printf '    warning: this host is not Debian 12: the libraries copied below are not those of the image\n'
fi

# --- the root filesystem ------------------------------------------------------------------------
say "building an image-like root filesystem in ${ROOTFS#"$ROOT"/}"
# A previous run's namespace is gone with its process, and its mounts with it.
rm -rf "$WORK"
mkdir -p "$ROOTFS"
install -D -m 0755 "$BIN" "$ROOTFS/usr/local/bin/kdedup"

ldd "$ROOTFS/usr/local/bin/kdedup" >"$WORK/ldd.txt" || die "ldd failed on $BIN (not a dynamic ELF binary?)"
sed 's/^[[:space:]]*/    /' "$WORK/ldd.txt"
if grep -q 'not found' "$WORK/ldd.txt"; then
  die "$BIN has unresolved libraries"
fi
# The libraries the runtime image has: distroless cc-debian12 (glibc, libgcc, libstdc++,
# libssl3) plus what the Dockerfile copies in (libssl, libcrypto, libz). Keep this list the
# same as the Dockerfile's check.
while read -r so _; do
  case "$so" in
    libc.so.* | libm.so.* | libgcc_s.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libstdc++.so.*) ;;
    libssl.so.3 | libcrypto.so.3 | libz.so.1) ;;
    *) die "kdedup links $so, which the runtime image lacks: add it to the Dockerfile's copy list and to both checks" ;;
  esac
done < <(awk '/=>/ { print $1 }' "$WORK/ldd.txt")
# Copy each library, and the dynamic loader, to the path ldd resolved it at.
while read -r path; do
  install -D -m 0644 "$(readlink -f "$path")" "$ROOTFS$path"
done < <(awk '/=>/ { print $3 } !/=>/ && $1 ~ /^\// { print $1 }' "$WORK/ldd.txt")
interp="$(awk '!/=>/ && $1 ~ /^\// { print $1 }' "$WORK/ldd.txt")"
[ -n "$interp" ] && [ -f "$ROOTFS$interp" ] || die "no dynamic loader found in the ldd output"
chmod 0755 "$ROOTFS$interp"

# What distroless ships around it: users, CA bundle, /tmp, the nonroot home.
mkdir -p "$ROOTFS/etc/ssl/certs" "$ROOTFS/proc" "$ROOTFS/dev" "$ROOTFS/home/nonroot"
cat >"$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$ROOTFS/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
printf 'hosts: files dns\n' >"$ROOTFS/etc/nsswitch.conf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/"
fi
# The kubelet mounts these into every container.
cp /etc/hosts "$ROOTFS/etc/hosts"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || : >"$ROOTFS/etc/resolv.conf"
install -d -m 1777 "$ROOTFS/tmp"
chown "$UID_GID:$UID_GID" "$ROOTFS/home/nonroot"
chmod 0700 "$ROOTFS/home/nonroot"
for d in null zero full random urandom; do
  : >"$ROOTFS/dev/$d"
done
for sh in bin/sh bin/bash usr/bin/sh usr/bin/bash bin/busybox; do
  [ ! -e "$ROOTFS/$sh" ] || die "the root filesystem has a shell at /$sh"
done
echo "    $(find "$ROOTFS" -type f | wc -l) files, no shell, no package manager"

# --- services -------------------------------------------------------------------------------------
say "checking Postgres and the broker"
db_hostport="$(printf '%s' "$DATABASE_URL" | sed -E 's#^[a-z]+://([^@/]*@)?([^/?]+).*#\2#')"
case "$db_hostport" in *:*) ;; *) db_hostport="$db_hostport:5432" ;; esac
port_open() {
  local host="${1%:*}" port="${1##*:}"
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}
port_open "$db_hostport" || die "Postgres is not reachable at $db_hostport (run: scripts/services.sh postgres)"
first_broker="${BROKERS%%,*}"
port_open "$first_broker" || die "no broker at $first_broker (run: scripts/services.sh broker, or set KDEDUP_TEST_BROKERS)"

run_id="$(date +%s)-$$"
topic_in="kdedup-image-check-$run_id"
group="kdedup-image-check-$run_id"
schema="kdedup_image_check_${run_id//-/_}"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

# The input topic must exist (kdedup creates only its output and dead-letter topics). A
# CreateTopics v2 request, written out here so that no Kafka client needs installing.
create_topics=true
if python3 - "$first_broker" "$topic_in" <<'PYEOF'; then
import socket, struct, sys

host, port = sys.argv[1].rsplit(":", 1)
topic = sys.argv[2].encode()


def string(b):
    return struct.pack(">h", len(b)) + b


# CreateTopics (api key 19) v2: topics [name, partitions, replication factor, no
# assignments, no configs], timeout_ms, validate_only. Request header v1.
body = struct.pack(">i", 1) + string(topic) + struct.pack(">ihii", 1, 1, 0, 0)
body += struct.pack(">ib", 10000, 0)
request = struct.pack(">hhi", 19, 2, 1) + string(b"kdedup-image-check") + body
with socket.create_connection((host, int(port)), timeout=15) as s:
    s.sendall(struct.pack(">i", len(request)) + request)

    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise SystemExit("broker closed the connection")
            buf += chunk
        return buf

    (size,) = struct.unpack(">i", read(4))
    resp = read(size)
# Response header v0 (correlation id), then throttle_time_ms, topics [name, error_code, message].
corr, _throttle, count = struct.unpack(">iii", resp[:12])
pos, errors = 12, []
for _ in range(count):
    (n,) = struct.unpack(">h", resp[pos : pos + 2])
    name = resp[pos + 2 : pos + 2 + n].decode()
    pos += 2 + n
    (code,) = struct.unpack(">h", resp[pos : pos + 2])
    errors.append((name, code))
    pos += 2
    (m,) = struct.unpack(">h", resp[pos : pos + 2])
    pos += 2 + max(m, 0)
# 0: created, 36: TOPIC_ALREADY_EXISTS.
bad = [(n, c) for n, c in errors if c not in (0, 36)]
if corr != 1 or not errors or bad:
    raise SystemExit("CreateTopics answered %r" % (bad or errors))
print("    created input topic %s" % topic.decode())
PYEOF
  :
else
  # kdedup then starts without creating topics and subscribes to a topic that does not
  # exist: it still joins its group (with no partitions) and gets ready.
  printf '    warning: could not create the input topic; running with KDEDUP_CREATE_TOPICS=false\n'
  create_topics=false
fi

# --- run ------------------------------------------------------------------------------------------
env_args=(
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  HOME=/home/nonroot
  HOSTNAME=kdedup-image-check
  KDEDUP_BROKERS="$BROKERS"
  KDEDUP_GROUP_ID="$group"
  KDEDUP_INPUT_TOPICS="$topic_in"
  KDEDUP_OUTPUT_TOPIC="$topic_in.dedup"
  KDEDUP_DLQ_TOPIC="$topic_in.dlq"
  KDEDUP_DATABASE_URL="$DATABASE_URL"
  KDEDUP_DB_SCHEMA="$schema"
  KDEDUP_MIGRATE_ON_START=true
  KDEDUP_CREATE_TOPICS="$create_topics"
  KDEDUP_TOPIC_REPLICATION_FACTOR=1
  KDEDUP_METRICS_ADDR="127.0.0.1:$port"
  KDEDUP_SHUTDOWN_TIMEOUT=5s
  # A group join on tansu takes session.timeout.ms / 2.
  KDEDUP_KAFKA_SESSION_TIMEOUT_MS=6000
  KDEDUP_KAFKA_HEARTBEAT_INTERVAL_MS=500
  KDEDUP_LOG=info
  KDEDUP_LOG_FORMAT=json
)

say "starting kdedup run as $UID_GID:$UID_GID, read-only root, PID 1 of its own namespace (log: ${LOG#"$ROOT"/})"
unshare --mount --propagation private --pid --fork -- \
  "$ROOT/scripts/check-image-runtime.sh" --in-namespace "$ROOTFS" "${env_args[@]}" \
  </dev/null >"$LOG" 2>&1 &
outer=$!
kpid=""

cleanup() {
  # Only the processes this script started, by id.
  if [ -n "$kpid" ] && kill -0 "$kpid" 2>/dev/null; then kill -KILL "$kpid" 2>/dev/null || true; fi
  if kill -0 "$outer" 2>/dev/null; then kill -KILL "$outer" 2>/dev/null || true; fi
  if command -v psql >/dev/null; then
    psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP PIPE

fail_with_log() {
  echo "---- last lines of ${LOG#"$ROOT"/} ----" >&2
  tail -n 40 "$LOG" >&2 || true
  die "$*"
}

# unshare's child is kdedup (after its execs); unshare itself only waits for it.
for _ in $(seq 1 100); do
  kpid="$(ps -o pid= --ppid "$outer" 2>/dev/null | tr -d ' ' | head -n 1)"
  if [ -n "$kpid" ] && tr '\0' ' ' <"/proc/$kpid/cmdline" 2>/dev/null | grep -q '^/usr/local/bin/kdedup run'; then
    break
  fi
  kill -0 "$outer" 2>/dev/null || fail_with_log "kdedup exited at once"
  sleep 0.1
done
tr '\0' ' ' <"/proc/$kpid/cmdline" 2>/dev/null | grep -q '^/usr/local/bin/kdedup run' ||
  fail_with_log "kdedup did not start"

say "checking the process (host pid $kpid)"
status="$(cat "/proc/$kpid/status")"
field() { printf '%s\n' "$status" | awk -v k="$1:" '$1 == k { $1 = ""; sub(/^ +/, ""); print }'; }
expect_field() {
  local got
  got="$(field "$1")"
  [ "$got" = "$2" ] || fail_with_log "/proc/$kpid/status $1 is '$got', expected '$2'"
  printf '    %-11s %s\n' "$1:" "$got"
}
expect_field Uid "$UID_GID $UID_GID $UID_GID $UID_GID"
expect_field Gid "$UID_GID $UID_GID $UID_GID $UID_GID"
expect_field Groups "$UID_GID"
expect_field CapInh 0000000000000000
expect_field CapPrm 0000000000000000
expect_field CapEff 0000000000000000
expect_field CapAmb 0000000000000000
expect_field NoNewPrivs 1
nspid="$(field NSpid)"
[ "${nspid##*[[:space:]]}" = 1 ] || fail_with_log "kdedup is not PID 1 of its namespace (NSpid: $nspid)"
printf '    %-11s %s (PID 1 inside)\n' "NSpid:" "$nspid"
# The root mount as kdedup sees it: mount point "/", options read-only.
root_opts="$(awk '$5 == "/" { print $6 }' "/proc/$kpid/mountinfo")"
case ",$root_opts," in
  *,ro,*) printf '    %-11s %s\n' "root mount:" "$root_opts" ;;
  *) fail_with_log "kdedup's root filesystem is mounted '$root_opts', not read-only" ;;
esac

say "probing the admin server on 127.0.0.1:$port"
http() { curl -s -o "$WORK/body" -w '%{http_code}' --max-time 3 "http://127.0.0.1:$port$1" || true; }
code=""
for _ in $(seq 1 100); do
  code="$(http /livez)"
  [ "$code" = 200 ] && break
  kill -0 "$kpid" 2>/dev/null || fail_with_log "kdedup exited before /livez answered"
  sleep 0.2
done
[ "$code" = 200 ] || fail_with_log "/livez answered '$code'"
echo "    /livez 200"
deadline=$((SECONDS + READY_TIMEOUT))
while :; do
  code="$(http /readyz)"
  [ "$code" = 200 ] && break
  kill -0 "$kpid" 2>/dev/null || fail_with_log "kdedup exited before it got ready"
  [ "$SECONDS" -lt "$deadline" ] ||
    fail_with_log "/readyz still '$code' after ${READY_TIMEOUT}s: $(cat "$WORK/body" 2>/dev/null)"
  sleep 0.5
done
echo "    /readyz 200"
code="$(http /metrics)"
[ "$code" = 200 ] || fail_with_log "/metrics answered '$code'"
for series in 'kdedup_postgres_up 1' 'kdedup_broker_up 1' 'kdedup_consumer_joined 1' 'kdedup_ttl_seconds '; do
  grep -q "^$series" "$WORK/body" || fail_with_log "/metrics has no '$series' line"
done
echo "    /metrics 200, $(grep -c '^kdedup_' "$WORK/body") kdedup samples, postgres/broker up, group joined"

say "stopping it with SIGTERM"
kill -TERM "$kpid"
start=$SECONDS
# KDEDUP_SHUTDOWN_TIMEOUT=5s above, plus margin.
for _ in $(seq 1 150); do
  kill -0 "$outer" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$outer" 2>/dev/null; then
  fail_with_log "kdedup did not exit within 15s of SIGTERM"
fi
rc=0
wait "$outer" || rc=$?
[ "$rc" = 0 ] || fail_with_log "kdedup exited with code $rc after SIGTERM, expected 0"
echo "    exit code 0 after $((SECONDS - start))s"
grep -q 'stopped cleanly' "$LOG" || fail_with_log "no 'stopped cleanly' in the log"
if grep -Eiq 'read-only file system|permission denied|EROFS|EACCES' "$LOG"; then
  fail_with_log "the log reports a write or permission error"
fi

say "image runtime check passed"
