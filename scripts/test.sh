#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs (Debian packages,
# the VM test bed's kernel), checks formatting, lints and the API docs, then runs every test,
# including those that need root, QEMU, qemu-pr-helper or the VM test bed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
phase() { echo "== $* ($(( $(date +%s) - start )) s)" >&2; }

phase "installing dependencies"
scripts/deps.sh test

phase "cargo fmt --check"
cargo fmt --all -- --check

phase "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

phase "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

phase "layout: no module cycle, a pure reservd-proto"
scripts/check-layout.py

phase "cargo test (all tiers, including root, QEMU and VM tests)"
cargo test --workspace --locked --no-fail-fast -- --include-ignored

phase "done in $(( $(date +%s) - start )) s"
