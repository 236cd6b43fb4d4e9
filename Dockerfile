# syntax=docker/dockerfile:1
#
# kdedup container image.
#
#   docker build -t ghcr.io/example/kdedup:0.1.0 .
#
# Two stages: Debian bookworm with the Rust toolchain builds the binary (librdkafka is compiled
# from source by rdkafka-sys), and the image is `FROM scratch` with exactly the tree that
# scripts/image-rootfs.sh lays out: the binary, the shared libraries `ldd` resolves for it
# (glibc, libgcc, OpenSSL 3, zlib) and the dynamic loader, the CA bundle, /etc/passwd and
# /etc/group with the `nonroot` user (uid 65532), /tmp. No shell, no package manager.
# `make image` builds the same image offline with buildah from the same script, and
# `make test` runs it with podman (tests/it/image.rs), so the image tested is the image built.
#
# Shared libraries: rdkafka's features are `ssl`, `zstd` and (by default) `libz`. librdkafka
# is built from source and linked statically, with its built-in lz4 and snappy and a static
# zstd (zstd-sys); curl and GSSAPI (cyrus-sasl) are off (so no OAUTHBEARER OIDC nor
# Kerberos), and SASL PLAIN and SCRAM need nothing more than OpenSSL. openssl-sys is not
# vendored, so OpenSSL 3 (libssl.so.3, libcrypto.so.3) is linked dynamically; the Postgres
# client's TLS (sqlx with native-tls) uses the same OpenSSL. libz-sys links the system zlib
# (libz.so.1) dynamically because zlib1g-dev is installed.

ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS builder

# rust:1-bookworm already has gcc, make and perl; these are the headers librdkafka's configure
# script and openssl-sys look for (already present in the image today, listed so a slimmer
# builder image still works).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev zlib1g-dev pkg-config make ca-certificates binutils \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# sqlx's compile-time checked queries, if any, come from the committed .sqlx/ data and never
# from a live database during the image build.
ENV SQLX_OFFLINE=true

# The cache mounts keep the crates.io download and incremental artifacts across builds; the
# root filesystem is laid out from the cached target/ because cache mounts are not part of
# the image. The release profile keeps line tables (debug = 1, for profiling); the image drops
# them but keeps the symbol table, so backtraces still name functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin kdedup \
 && scripts/image-rootfs.sh target/release/kdedup /out

FROM scratch

COPY --from=builder /out/ /

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="kdedup" \
      org.opencontainers.image.description="Kafka consumer-side deduplication sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/usr/local/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

# The `nonroot` user of /etc/passwd; the Kubernetes manifests pin the same uid
# (runAsUser: 65532) and mount the root filesystem read-only: kdedup writes nothing to disk.
USER 65532:65532
WORKDIR /home/nonroot

# /metrics, /livez, /readyz (KDEDUP_METRICS_ADDR, default port 9464).
EXPOSE 9464

ENTRYPOINT ["/usr/local/bin/kdedup"]
CMD ["run"]
