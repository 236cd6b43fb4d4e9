#!/usr/bin/env bash
# Builds kdedup's container image offline with buildah, FROM scratch, out of files on this
# machine: no registry, no Docker engine.
#
#   scripts/image.sh [TAG]        TAG defaults to localhost/kdedup:<version>
#
# The layout is scripts/image-rootfs.sh's (the Dockerfile's final stage is the same), from
# the release binary (`cargo build --release --locked`). OCI labels: version, revision
# (the commit, `-dirty` with uncommitted sources), source (KDEDUP_IMAGE_SOURCE, else the
# origin remote), licence, created; user 65532:65532; entrypoint kdedup, command run; port 9464.
# Prints the image's name, id and size. Needs root (buildah), ldd, strip, Debian's
# ca-certificates; installs Debian's buildah, podman and runc where missing.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
TAG="${1:-localhost/kdedup:$VERSION}"
WORK="$ROOT/.tmp/image"

log() { printf '[image] %s\n' "$*" >&2; }
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v buildah >/dev/null || ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  log "installing Debian's buildah, podman and runc"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc >/dev/null
fi

log "building the release binary"
cargo build --release --locked --bin kdedup

log "laying out the root filesystem in ${WORK#"$ROOT"/}/rootfs"
mkdir -p "$WORK"
scripts/image-rootfs.sh target/release/kdedup "$WORK/rootfs"

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock migrations 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi

# Where the sources live: KDEDUP_IMAGE_SOURCE, else this clone's origin remote.
source="${KDEDUP_IMAGE_SOURCE:-$(git config --get remote.origin.url 2>/dev/null || echo unknown)}"

log "assembling $TAG with buildah"
ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah copy --quiet "$ctr" "$WORK/rootfs/" / >/dev/null
buildah config \
  --user 65532:65532 \
  --workingdir /home/nonroot \
  --env PATH=/usr/local/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --entrypoint '["/usr/local/bin/kdedup"]' \
  --cmd run \
  --port 9464 \
  --label org.opencontainers.image.title=kdedup \
  --label "org.opencontainers.image.description=Kafka consumer-side deduplication sidecar" \
  --label "org.opencontainers.image.version=$VERSION" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.source=$source" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$TAG" >/dev/null
trap - EXIT

id="$(podman image inspect --format '{{.Id}}' "$TAG")"
size="$(podman image inspect --format '{{.Size}}' "$TAG")"
printf '%s %s %s bytes (%s MiB)\n' "$TAG" "${id:0:12}" "$size" "$((size / 1024 / 1024))"
