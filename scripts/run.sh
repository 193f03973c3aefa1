#!/usr/bin/env bash
# Builds reservd (installing the build dependencies if needed) and runs it in
# the foreground with the given arguments, e.g.:
#   sudo scripts/run.sh -k /run/reservd.sock -v
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh build
cargo build --release --locked --bin reservd >&2
exec target/release/reservd "$@"
