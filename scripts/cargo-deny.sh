#!/usr/bin/env bash
# Licence, ban and source checks of the dependency tree (deny.toml), installing cargo-deny
# once (from crates.io, cached in ~/.cargo/bin) where missing.
#
# Advisories are not checked here: that needs the RustSec database from GitHub, which these
# machines cannot reach. Run `cargo deny check advisories` where the network allows it.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.20.2
BIN="${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deny"

if ! { [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$VERSION"; }; then
  echo "[cargo-deny] installing cargo-deny $VERSION (once; cached in ~/.cargo/bin)" >&2
  cargo install cargo-deny --locked --version "$VERSION"
fi
exec cargo deny --log-level warn check bans licenses sources
