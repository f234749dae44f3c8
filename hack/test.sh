#!/usr/bin/env bash
# Runs every test of dbpolicy: formatting, lints, unit tests and the integration tests
# (which start their own throwaway PostgreSQL servers from /usr/lib/postgresql/<v>/bin, or
# use the server on 127.0.0.1:5432 when it accepts the postgres superuser without a
# password; see tests/support/mod.rs).
#
#   hack/test.sh
#
# Needs the PostgreSQL server binaries (hack/install-deps.sh installs them on Debian).
# Honours CARGO_TARGET_DIR like any cargo command; extra arguments go to `cargo test`
# (e.g. hack/test.sh -- --nocapture).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test --all-targets --no-fail-fast"
cargo test --all-targets --no-fail-fast "$@"

step "all tests passed"
