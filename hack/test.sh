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
#
# Then the PostgreSQL matrix: the engine's integration suites ($MATRIX_TESTS below) run
# again on each major version of $DBPOLICY_PG_VERSIONS (default "16 17 18"; empty skips the
# matrix), with server binaries from hack/install-postgres.sh (installed when missing).
# DBPOLICY_MATRIX_ONLY=1 runs the matrix alone.
# The versions run concurrently, each as one process per suite in turn: the suites mostly
# wait on PostgreSQL, so three at once cost little more wall time than one. Logs go to
# $DBPOLICY_MATRIX_LOGS (default: a temporary directory); a failed suite's log is printed.
# One version alone, by hand:
#
#   DBPOLICY_PG_BIN="$(hack/install-postgres.sh --bin 17)" cargo test --test rls
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

if [ "${DBPOLICY_MATRIX_ONLY:-0}" != 1 ]; then
    step "cargo fmt --check"
    cargo fmt --all --check

    step "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings

    step "cargo test --all-targets --no-fail-fast"
    cargo test --all-targets --no-fail-fast "$@"
fi

# The suites whose subject is what PostgreSQL does (catalog reads, generated SQL, error
# codes, locks). Not here: backup (Debian's pg_dump 15 cannot dump a newer server),
# replicas (the npm builds have no pg_basebackup), crash (kills the CLI at random
# moments: its subject is the executor's own journal, and at ~3 min a version it alone
# would double the matrix), unit tests and the e2e/API-server suites (they test
# Kubernetes, not PostgreSQL). See README, "PostgreSQL versions".
MATRIX_TESTS=(autovacuum server_settings rls rls_cache partitions indexes matviews feature_flags
    safety certquiz injection)
read -r -a versions <<<"${DBPOLICY_PG_VERSIONS-16 17 18}"
if [ ${#versions[@]} -eq 0 ]; then
    step "PostgreSQL matrix skipped (DBPOLICY_PG_VERSIONS is empty)"
    step "all tests passed"
    exit 0
fi

step "PostgreSQL matrix: ${versions[*]} (hack/install-postgres.sh)"
declare -A bin_of=()
for major in "${versions[@]}"; do
    bin_of[$major]=$(hack/install-postgres.sh --bin "$major")
done

# Build once, then run the test executables directly: concurrent `cargo test` runs would
# only queue on the target directory's lock.
args=()
for t in "${MATRIX_TESTS[@]}" harness; do args+=(--test "$t"); done
executables=$(cargo test --no-run --message-format=json "${args[@]}" \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
exe_of() {
    local exe
    exe=$(grep "/$1-[0-9a-f]*$" <<<"$executables" | head -1)
    [ -n "$exe" ] || { echo "test.sh: no test executable for $1 in cargo's output" >&2; return 1; }
    printf '%s' "$exe"
}

logs=${DBPOLICY_MATRIX_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/dbpolicy-matrix.XXXXXX")}
mkdir -p "$logs"
run_version() {
    local major=$1 failed=0 t exe
    export DBPOLICY_PG_BIN=${bin_of[$major]}
    # First, that the harness really runs this version (and not the shared server).
    exe=$(exe_of harness) || return 1
    "$exe" --exact servers_run_the_chosen_version >"$logs/pg$major-harness.log" 2>&1 \
        || { echo "pg$major-harness"; failed=1; }
    for t in "${MATRIX_TESTS[@]}"; do
        exe=$(exe_of "$t") || return 1
        "$exe" >"$logs/pg$major-$t.log" 2>&1 || { echo "pg$major-$t"; failed=1; }
    done
    return $failed
}

start=$(date +%s)
declare -A pid_of=()
for major in "${versions[@]}"; do
    run_version "$major" >"$logs/pg$major.failed" &
    pid_of[$major]=$!
done
matrix_failed=()
for major in "${versions[@]}"; do
    if wait "${pid_of[$major]}"; then
        echo "PostgreSQL $major: ${#MATRIX_TESTS[@]} suites passed ($(( $(date +%s) - start ))s)"
    else
        while read -r log; do
            [ -n "$log" ] || continue
            matrix_failed+=("$log")
            printf '\n--- %s/%s.log\n' "$logs" "$log"
            tail -n 60 "$logs/$log.log"
        done <"$logs/pg$major.failed"
        echo "PostgreSQL $major: FAILED ($(( $(date +%s) - start ))s)"
    fi
done
if [ ${#matrix_failed[@]} -gt 0 ]; then
    echo "test.sh: failed on the PostgreSQL matrix: ${matrix_failed[*]} (logs in $logs)" >&2
    exit 1
fi
echo "matrix logs: $logs"

step "all tests passed"
