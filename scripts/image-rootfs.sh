#!/usr/bin/env bash
# Lays out the container image's root filesystem from a built kdedup binary:
#
#   scripts/image-rootfs.sh BINARY OUTDIR
#
# The image is `FROM scratch` plus exactly this tree, whether it is built here by
# `make image` (buildah, no registry) or elsewhere from the Dockerfile (whose builder stage
# runs this same script), so what the tests run is what users build:
#   /usr/local/bin/kdedup     the binary, debug sections stripped (symbols kept)
#   the shared libraries      exactly those `ldd` resolves for it, and the dynamic loader,
#                             at the paths it resolves them at (glibc, libgcc, OpenSSL 3,
#                             zlib on Debian 12)
#   /etc/ssl/certs/ca-certificates.crt   the Mozilla CA bundle (TLS to Postgres and Kafka)
#   /etc/passwd, /etc/group   root, nobody and nonroot (65532), the image's user
#   /etc/nsswitch.conf        hosts: files dns
#   /tmp (1777), /home/nonroot (65532, 0700)
# No shell, no package manager. Needs ldd, strip and the ca-certificates package.
set -euo pipefail

die() {
  printf 'image-rootfs: %s\n' "$*" >&2
  exit 1
}

[ $# -eq 2 ] || die "usage: $0 BINARY OUTDIR"
BIN="$1"
OUT="$2"
[ -x "$BIN" ] || die "no executable binary at $BIN"
[ -f /etc/ssl/certs/ca-certificates.crt ] || die "no CA bundle at /etc/ssl/certs/ca-certificates.crt (install Debian's ca-certificates)"

rm -rf "$OUT"
mkdir -p "$OUT"
install -D -m 0755 "$BIN" "$OUT/usr/local/bin/kdedup"
strip --strip-debug "$OUT/usr/local/bin/kdedup"

ldd_out="$(ldd "$OUT/usr/local/bin/kdedup")" || die "ldd failed on $BIN (not a dynamic ELF binary?)"
if grep -q 'not found' <<<"$ldd_out"; then
  printf '%s\n' "$ldd_out" >&2
  die "$BIN has unresolved libraries"
fi
# Each library, and the dynamic loader, at the path ldd resolved it at.
while read -r path; do
  install -D -m 0644 "$(readlink -f "$path")" "$OUT$path"
done < <(awk '/=>/ { print $3 } !/=>/ && $1 ~ /^\// { print $1 }' <<<"$ldd_out")
interp="$(awk '!/=>/ && $1 ~ /^\// { print $1 }' <<<"$ldd_out")"
[ -n "$interp" ] && [ -f "$OUT$interp" ] || die "no dynamic loader in the ldd output"
chmod 0755 "$OUT$interp"

mkdir -p "$OUT/etc/ssl/certs" "$OUT/home/nonroot" "$OUT/proc" "$OUT/dev" "$OUT/sys"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$OUT/etc/ssl/certs/ca-certificates.crt"
cat >"$OUT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$OUT/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
printf 'hosts: files dns\n' >"$OUT/etc/nsswitch.conf"
install -d -m 1777 "$OUT/tmp"
chown 65532:65532 "$OUT/home/nonroot" 2>/dev/null || true
chmod 0700 "$OUT/home/nonroot"

for sh in bin/sh bin/bash usr/bin/sh usr/bin/bash bin/busybox; do
  [ ! -e "$OUT/$sh" ] || die "the root filesystem has a shell at /$sh"
done
printf '%s\n' "$ldd_out" | sed 's/^[[:space:]]*/    /' >&2
printf 'image-rootfs: %s files, %s, no shell\n' \
  "$(find "$OUT" -type f | wc -l)" "$(du -sh "$OUT" | cut -f1)" >&2
