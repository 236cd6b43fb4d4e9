# syntax=docker/dockerfile:1
#
# kdedup container image.
#
#   docker build -t ghcr.io/example/kdedup:0.1.0 .
#
# Two stages: Debian bookworm with the Rust toolchain builds the binary (librdkafka is compiled
# from source by rdkafka-sys), and distroless cc-debian12 runs it: glibc, libgcc, CA
# certificates and a `nonroot` user (uid 65532), no shell, no package manager.
#
# Shared libraries: rdkafka's features are `ssl` and (by default) `libz`. librdkafka is built
# from source and linked statically, with its built-in lz4; zstd, curl and GSSAPI (cyrus-sasl)
# are off (so no OAUTHBEARER OIDC nor Kerberos), and SASL PLAIN and SCRAM need nothing more
# than OpenSSL. openssl-sys is not vendored, so OpenSSL 3 (libssl.so.3, libcrypto.so.3) is
# linked dynamically, and libz-sys links the system zlib (libz.so.1) dynamically because
# zlib1g-dev is installed.
# cc-debian12 ships libssl3 but not zlib, so libssl, libcrypto and libz are all copied from
# the builder; both stages are Debian 12, so these are the very libraries the binary was
# linked against. The builder stage fails if the binary needs any other library that the
# runtime image lacks. scripts/check-image-runtime.sh runs the same check, and the binary as
# uid 65532 on a read-only root with only these libraries, without a Docker engine.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder

# rust:1-bookworm already has gcc, make and perl; these are the headers librdkafka's configure
# script and openssl-sys look for (already present in the image today, listed so a slimmer
# builder image still works).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev zlib1g-dev pkg-config make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# sqlx's compile-time checked queries, if any, come from the committed .sqlx/ data and never
# from a live database during the image build.
ENV SQLX_OFFLINE=true

# The cache mounts keep the crates.io download and incremental artifacts across builds; the
# binary is copied out of the cached target/ because cache mounts are not part of the image.
# The release profile keeps line tables (debug = 1, for profiling); the image drops them
# but keeps the symbol table, so backtraces still name functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin kdedup \
 && install -D -m 0755 target/release/kdedup /out/usr/local/bin/kdedup \
 && strip --strip-debug /out/usr/local/bin/kdedup

RUN set -eu; \
    multiarch="$(gcc -print-multiarch)"; \
    mkdir -p "/out/usr/lib/${multiarch}"; \
    for lib in libssl.so.3 libcrypto.so.3 libz.so.1; do \
        cp -L "/usr/lib/${multiarch}/${lib}" "/out/usr/lib/${multiarch}/${lib}"; \
    done; \
    ldd /out/usr/local/bin/kdedup | tee /tmp/ldd.txt; \
    if grep -q 'not found' /tmp/ldd.txt; then echo 'kdedup has unresolved libraries' >&2; exit 1; fi; \
    for so in $(awk '/=>/ { print $1 }' /tmp/ldd.txt); do \
        case "$so" in \
            libc.so.*|libm.so.*|libgcc_s.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libstdc++.so.*) ;; \
            libssl.so.3|libcrypto.so.3|libz.so.1) ;; \
            *) echo "kdedup links $so, which the runtime image lacks: copy it into /out as well" >&2; exit 1 ;; \
        esac; \
    done

FROM ${RUNTIME_IMAGE}

COPY --from=builder /out/ /

# The distroless `nonroot` user; the Kubernetes manifests pin the same uid (runAsUser: 65532)
# and mount the root filesystem read-only: kdedup writes nothing to disk.
USER 65532:65532

# /metrics, /livez, /readyz (KDEDUP_METRICS_ADDR, default port 9464).
EXPOSE 9464

ENTRYPOINT ["/usr/local/bin/kdedup"]
CMD ["run"]
