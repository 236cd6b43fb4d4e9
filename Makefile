# The commands CI runs are written down here, and only here.
.PHONY: demo test lint unit integration deploy-check services fmt deny

export KDEDUP_TEST_BROKERS ?= 127.0.0.1:19092
export KDEDUP_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test

## The zero-setup demo: embedded mock Kafka cluster + the local Postgres.
demo:
	scripts/services.sh postgres
	cargo run --release --locked -- demo

## Everything CI checks: formatting, lints, dependency licences, unit and integration tests
## (tests/it/image.rs builds the container image and runs it with podman; needs root) and the
## deploy manifests.
test: lint services deny
	cargo test --locked --all-targets --features crash-points
	scripts/check-deploy.sh

## Dependency licences, bans and sources (deny.toml); advisories need a network these
## machines lack.
deny:
	scripts/cargo-deny.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets --all-features -- -D warnings

services:
	scripts/services.sh all

fmt:
	cargo fmt --all

## The container image, offline with buildah FROM scratch (deploy/README.md); prints its
## name and size.
.PHONY: image
image:
	scripts/image.sh

## Benchmark (bench/README.md): kdedup vs its Postgres and Kafka ceilings, a naive
## consumer and a hand-written batched one (Python: scripts/bench-python.sh installs its
## client libraries), two replicas against one, on the local services; writes
## bench/RESULTS.md. Takes 12-20 minutes.
.PHONY: bench bench-quick
bench: services
	scripts/bench-python.sh
	cargo build --release --locked --bin kdedup --examples
	target/release/examples/bench

## The same table with small sizes, under 2 minutes; writes .tmp/bench/RESULTS-quick.md.
bench-quick: services
	scripts/bench-python.sh
	cargo build --release --locked --bin kdedup --examples
	target/release/examples/bench --quick

## Chaos (README "Chaos"): steady load through a tansu of the test's own (Postgres
## storage), 12 SIGKILLs of the sidecar at random moments, one Postgres and one broker
## restart, then the invariants, checked on sets; prints a summary, fails on a violation.
## Under 10 minutes. Restarts the shared Postgres.
.PHONY: chaos
chaos: services
	cargo test --locked --test it chaos:: -- --ignored --nocapture
