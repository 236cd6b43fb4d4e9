# The commands CI runs are written down here, and only here.
.PHONY: demo test lint unit integration deploy-check services fmt

export KDEDUP_TEST_BROKERS ?= 127.0.0.1:19092
export KDEDUP_TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test

## The zero-setup demo: embedded mock Kafka cluster + the local Postgres.
demo:
	scripts/services.sh postgres
	cargo run --release --locked -- demo

## Everything CI checks: formatting, lints, unit and integration tests, deploy manifests.
test: lint services
	cargo test --locked --all-targets
	scripts/check-deploy.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

services:
	scripts/services.sh all

fmt:
	cargo fmt --all
