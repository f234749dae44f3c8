#!/usr/bin/env bash
# Runs every benchmark of dbpolicy, in release mode, against one PostgreSQL server, and
# prints the machine description and each benchmark's markdown table (the numbers in
# docs/performance.md come from this script):
#
#   examples/bench_engine.rs      observe + plan at 1..5,000 tables, certquiz apply, binary size
#   examples/bench_rls.rs         the row-level security area at 1,000 tables
#   examples/bench_partitions.rs  partition maintenance against pg_partman
#   hack/bench-operator.sh        the operator with 2,000 policies against a real API server
#                                 (set DBPOLICY_BENCH_OPERATOR=0 to skip it)
#
# Usage: hack/bench.sh [output-file]      (default: print only; with a file, also tee to it)
# Environment:
#   DBPOLICY_BENCH_ADMIN_URL  superuser URL of the server to use (default
#                             postgres://postgres@127.0.0.1:5432/postgres); every benchmark
#                             creates its own scratch databases there and drops them
#   CARGO_TARGET_DIR          honoured like by any cargo command
#
# Needs a running PostgreSQL (hack/install-deps.sh installs it on Debian); pg_partman is
# optional (without it bench_partitions measures dbpolicy alone and says so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ADMIN_URL="${DBPOLICY_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export DBPOLICY_BENCH_ADMIN_URL="$ADMIN_URL"
OUT="${1:-/dev/null}"

step() { printf '\n## %s\n\n' "$*"; }

{
  step "machine"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- CPUs: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
  echo "- memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1024/1024}' /proc/meminfo)"
  echo "- kernel: $(uname -sr)"
  echo "- rustc: $(rustc --version)"
  if command -v psql >/dev/null; then
    echo "- PostgreSQL: $(psql "$ADMIN_URL" -Atc 'SHOW server_version' 2>/dev/null || echo 'unreachable')"
  fi
  echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

  step "schemainspect (PyPI), the peer of bench_engine's whole-process comparison"
  # In a venv of its own, installed once (bench_engine looks for it there, or at
  # DBPOLICY_BENCH_SCHEMAINSPECT); without it the comparison says so and goes on.
  VENV="${HOME}/.cache/dbpolicy-bench/venv"
  if [ -z "${DBPOLICY_BENCH_SCHEMAINSPECT:-}" ] && ! "$VENV/bin/python" -c 'import schemainspect, sqlbag' 2>/dev/null; then
    python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet --disable-pip-version-check \
      schemainspect sqlbag psycopg2-binary || echo "could not install schemainspect"
  fi
  "${DBPOLICY_BENCH_SCHEMAINSPECT:-$VENV/bin/python}" -c 'import importlib.metadata as m; print("schemainspect", m.version("schemainspect"))' 2>/dev/null || echo "schemainspect: not installed"

  step "build (release)"
  cargo build --release --bin dbpolicy --example bench_engine --example bench_rls --example bench_partitions 2>&1 | tail -n 1
  # The binaries just built, not `cargo run`: a source edited meanwhile must not trigger a
  # rebuild in the middle of the measurements.
  BIN="${CARGO_TARGET_DIR:-target}/release"

  step "bench_engine"
  "$BIN/examples/bench_engine"

  step "bench_rls"
  # bench_rls reads the server from DATABASE_URL.
  DATABASE_URL="$ADMIN_URL" "$BIN/examples/bench_rls"

  step "bench_partitions"
  "$BIN/examples/bench_partitions"

  if [ "${DBPOLICY_BENCH_OPERATOR:-1}" != 0 ]; then
    step "operator at scale (hack/bench-operator.sh)"
    case "$BIN" in /*) ABS_BIN="$BIN" ;; *) ABS_BIN="$PWD/$BIN" ;; esac
    DBPOLICY_BIN="$ABS_BIN/dbpolicy" hack/bench-operator.sh "${DBPOLICY_BENCH_POLICIES:-2000}"
  fi
} 2>&1 | tee "$OUT"
