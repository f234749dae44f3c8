#!/usr/bin/env bash
# The dbpolicy demo, end to end, on a throwaway PostgreSQL server:
#
#   1. start a private PostgreSQL (initdb in a temporary directory, a free port on
#      127.0.0.1, trust auth; as root the server runs as the `postgres` OS user)
#   2. create the database certquiz, load examples/certquiz/{schema,seed}.sql
#   3. build dbpolicy, show `dbpolicy plan` (exit 2: changes pending)
#   4. `dbpolicy apply`, then show that a second `plan` is empty (exit 0)
#   5. show the result: settings, storage parameters, the ownership ledger, feature flags
#      (feature_enabled), row-level security when this version reconciles it, and drift
#      being detected and repaired
#   6. stop the server and remove its directory, whatever happened
#
# Usage: hack/demo.sh
# Environment:
#   PG_BIN                   directory with initdb and pg_ctl (default: the highest
#                            /usr/lib/postgresql/<v>/bin, then `pg_config --bindir`)
#   DBPOLICY_DEMO_KEEP=1     leave the server running at the end and print how to reach it
#   DBPOLICY_DEMO_NO_INSTALL=1  never call hack/install-deps.sh; just say what is missing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
POLICY=examples/certquiz/policy.yaml
ALICE=a11ce000-0000-4000-8000-000000000001
BOB=b0b00000-0000-4000-8000-000000000002

if [ -t 1 ]; then BOLD=$'\e[1m'; RED=$'\e[31m'; GREEN=$'\e[32m'; RESET=$'\e[0m'; else BOLD=; RED=; GREEN=; RESET=; fi
section() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '%s    ok: %s%s\n' "$GREEN" "$*" "$RESET"; }
die() { printf '%sdemo FAILED: %s%s\n' "$RED" "$*" "$RESET" >&2; exit 1; }

# ------------------------------------------------------------------ prerequisites

find_pg_bin() {
    if [ -n "${PG_BIN:-}" ]; then
        [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && { echo "$PG_BIN"; return 0; }
        echo "PG_BIN=$PG_BIN does not contain initdb and pg_ctl" >&2
        return 1
    fi
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
    done
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir)"
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
    fi
    return 1
}

section "Prerequisites"
if ! PGBIN="$(find_pg_bin)"; then
    if [ "${DBPOLICY_DEMO_NO_INSTALL:-}" != 1 ] && command -v apt-get >/dev/null 2>&1 \
        && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then
        info "PostgreSQL server binaries (initdb, pg_ctl) not found: installing them with hack/install-deps.sh"
        bash "$ROOT/hack/install-deps.sh"
        PGBIN="$(find_pg_bin)" || die "still no initdb/pg_ctl after hack/install-deps.sh"
    else
        die "PostgreSQL server binaries (initdb, pg_ctl) not found.
  Debian/Ubuntu: run hack/install-deps.sh as root (or: apt-get install postgresql postgresql-client)
  elsewhere: install PostgreSQL 15 or later and set PG_BIN to the directory holding initdb and pg_ctl."
    fi
fi
PSQL="$PGBIN/psql"
[ -x "$PSQL" ] || PSQL="$(command -v psql || true)"
[ -n "$PSQL" ] || die "psql not found: apt-get install postgresql-client"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (>= 1.95) from https://rustup.rs"
info "PostgreSQL: $("$PGBIN/pg_ctl" --version) ($PGBIN)"
info "cargo:      $(cargo --version)"

# ------------------------------------------------------------------ throwaway server

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dbpolicy-demo.XXXXXX")"
DATA="$WORK/data"
LOG="$WORK/server.log"
AS=()
if [ "$(id -u)" -eq 0 ]; then
    # initdb refuses to run as root: the server runs as the postgres OS user.
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' OS user to run the server as (install the postgresql package, or run as an ordinary user)"
    chown postgres: "$WORK"
    chmod 700 "$WORK"
    AS=(runuser -u postgres --)
fi
PORT=
STARTED=0

cleanup() {
    local rc=$?
    if [ "$STARTED" = 1 ] && [ "${DBPOLICY_DEMO_KEEP:-}" = 1 ]; then
        printf '\nDBPOLICY_DEMO_KEEP=1: the server is still running.\n'
        printf '  psql postgres://postgres@127.0.0.1:%s/certquiz\n' "$PORT"
        printf '  stop it: %s %s/pg_ctl -D %s stop && rm -rf %s\n' "${AS[*]}" "$PGBIN" "$DATA" "$WORK"
        exit "$rc"
    fi
    if [ "$STARTED" = 1 ]; then
        "${AS[@]}" "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$LOG" ]; then
        printf '\nlast lines of the server log (%s):\n' "$LOG" >&2
        tail -n 20 "$LOG" >&2 || true
    fi
    rm -rf "$WORK"
    if [ "$STARTED" = 1 ]; then printf '\nthrowaway server stopped and removed.\n'; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

section "Starting a throwaway PostgreSQL in $WORK"
"${AS[@]}" "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --no-locale --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
for attempt in 1 2 3 4 5; do
    PORT=$(( 20000 + (RANDOM * 32768 + RANDOM) % 30000 ))
    port_in_use "$PORT" && continue
    # Only TCP on loopback; the socket lives in the private directory.
    if "${AS[@]}" "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$WORK -c fsync=off" \
        start >/dev/null; then
        STARTED=1
        break
    fi
    info "could not start on port $PORT (attempt $attempt), trying another"
done
[ "$STARTED" = 1 ] || die "the server did not start (see the log below)"
ADMIN_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/certquiz"
export DATABASE_URL
ok "PostgreSQL listening on 127.0.0.1:$PORT"

sql() { "$PSQL" "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }

section "Loading the certquiz schema and sample data"
"$PSQL" "$ADMIN_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE certquiz"
sql -f examples/certquiz/schema.sql
sql -f examples/certquiz/seed.sql
sql -c "SELECT count(*) AS tables FROM pg_tables WHERE schemaname = 'public'" \
    -c "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM questions) AS questions, (SELECT count(*) FROM user_progress) AS progress_rows"

# ------------------------------------------------------------------ dbpolicy

section "Building dbpolicy (cargo build)"
# The pg_query crate (PostgreSQL's own parser) needs libclang to build its bindings.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libclang; then
    if [ -n "${DBPOLICY_DEMO_NO_INSTALL:-}" ]; then
        die "libclang not found (the pg_query crate needs it to build): run hack/install-deps.sh as root, or apt-get install libclang-dev"
    fi
    info "libclang not found (the pg_query crate needs it): installing it with hack/install-deps.sh"
    bash "$ROOT/hack/install-deps.sh"
fi
cargo build --bin dbpolicy
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
DBPOLICY="$TARGET_DIR/debug/dbpolicy"
[ -x "$DBPOLICY" ] || die "dbpolicy binary not found at $DBPOLICY"
ok "$DBPOLICY"

# Runs dbpolicy and stores its exit status in RC (exit statuses 1 and 2 are meaningful,
# so they must not trip set -e).
RC=0
dbp() { set +e; "$DBPOLICY" "$@"; RC=$?; set -e; }

section "dbpolicy plan -f $POLICY   (expect exit 2: changes pending)"
dbp plan -f "$POLICY"
info "exit status: $RC"
[ "$RC" = 2 ] || die "the first plan exited $RC, expected 2 (changes pending)"
ok "plan lists the pending changes; areas this version does not reconcile are named as skipped"

section "dbpolicy apply -f $POLICY"
dbp apply -f "$POLICY"
info "exit status: $RC"
[ "$RC" = 0 ] || die "apply exited $RC, expected 0"
ok "applied"

section "dbpolicy plan again   (expect exit 0: nothing to change)"
dbp plan -f "$POLICY"
info "exit status: $RC"
[ "$RC" = 0 ] || die "the plan after apply exited $RC, expected 0: the policy did not converge"
ok "converged: a second plan is empty"

# ------------------------------------------------------------------ what changed

section "What the database looks like now"
info "server settings written by ALTER SYSTEM (postgresql.auto.conf) and in effect:"
sql -c "SELECT f.name, f.setting AS configured, s.setting || coalesce(' ' || s.unit, '') AS in_effect, s.pending_restart
        FROM pg_file_settings f JOIN pg_settings s USING (name)
        WHERE f.sourcefile LIKE '%postgresql.auto.conf' ORDER BY f.name"
info "autovacuum storage parameters:"
sql -c "SELECT relname AS table, array_to_string(reloptions, ', ') AS options
        FROM pg_class WHERE relnamespace = 'public'::regnamespace AND reloptions IS NOT NULL ORDER BY relname"
info "the ownership ledger (what this policy set, so that removing it from the spec resets only that):"
sql -c "SELECT area, target, item, policy FROM dbpolicy.managed ORDER BY area, target, item"

section "Partitions of audit_logs"
parts="$(sql -At -c "SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.audit_logs'::regclass")"
if [ "$parts" -gt 0 ]; then
    sql -c "SELECT c.relname AS partition, pg_get_expr(c.relpartbound, c.oid) AS bounds
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'public.audit_logs'::regclass ORDER BY c.relname"
    info "an audit row written now lands in the current month's partition:"
    sql -c "INSERT INTO audit_logs (user_id, action, entity_type, entity_id) VALUES ('$ALICE', 'login', 'user', '$ALICE')" \
        -c "SELECT tableoid::regclass AS stored_in, action, created_at FROM audit_logs"
    ok "audit_logs has $parts partition(s)"
else
    info "partitions are not reconciled by this build (the plan above says 'skipped'): audit_logs has no partition yet."
fi

section "Feature flags: feature_enabled(flag, subject)"
sql -c "SELECT name, enabled, rollout_percentage AS rollout, description FROM feature_flags ORDER BY name"
info "per user (the same answer on every call):"
sql -c "SELECT display_name,
               feature_enabled('new_quiz_engine', id::text)   AS new_quiz_engine,
               feature_enabled('category_stats_v2', id::text) AS category_stats_v2,
               feature_enabled('ai_explanations', id::text)   AS ai_explanations
        FROM users ORDER BY display_name"
info "over 10000 synthetic subjects, new_quiz_engine (25%) is on for about a quarter:"
sql -c "SELECT count(*) FILTER (WHERE feature_enabled('new_quiz_engine', 'user-' || i)) AS enabled,
               count(*) AS subjects,
               round(100.0 * count(*) FILTER (WHERE feature_enabled('new_quiz_engine', 'user-' || i)) / count(*), 1) AS percent
        FROM generate_series(1, 10000) AS i"
stable="$(sql -At -c "SELECT count(*) FROM generate_series(1, 1000) i
                      WHERE feature_enabled('new_quiz_engine', 'user-' || i) IS DISTINCT FROM feature_enabled('new_quiz_engine', 'user-' || i)")"
[ "$stable" = 0 ] || die "feature_enabled is not deterministic"
ok "deterministic bucketing: repeated calls agree"

section "Row-level security"
rls="$(sql -At -c "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.user_progress'::regclass")"
if [ "$rls" = t ]; then
    # A login role that is not a superuser (superusers bypass RLS).
    sql -c "CREATE ROLE certquiz_app LOGIN;
            GRANT USAGE ON SCHEMA public TO certquiz_app;
            GRANT SELECT, INSERT, UPDATE ON user_progress, problem_reports TO certquiz_app;
            GRANT SELECT ON users TO certquiz_app"
    APP_URL="postgres://certquiz_app@127.0.0.1:$PORT/certquiz"
    sql -c "SELECT tablename, policyname, cmd, qual AS using, with_check FROM pg_policies ORDER BY tablename, policyname"
    info "as certquiz_app with app.current_user_id = Alice:"
    "$PSQL" "$APP_URL" -X -q -v ON_ERROR_STOP=1 \
        -c "SET app.current_user_id = '$ALICE'" \
        -c "SELECT u.display_name, p.exam_id, p.questions_answered FROM user_progress p JOIN users u ON u.id = p.user_id"
    info "as certquiz_app with app.current_user_id = Bob:"
    "$PSQL" "$APP_URL" -X -q -v ON_ERROR_STOP=1 \
        -c "SET app.current_user_id = '$BOB'" \
        -c "SELECT u.display_name, p.exam_id, p.questions_answered FROM user_progress p JOIN users u ON u.id = p.user_id"
    others="$("$PSQL" "$APP_URL" -X -q -At -v ON_ERROR_STOP=1 \
        -c "SET app.current_user_id = '$ALICE'" \
        -c "SELECT count(*) FROM user_progress WHERE user_id <> '$ALICE'")"
    [ "$others" = 0 ] || die "certquiz_app acting as Alice sees $others row(s) of other users"
    ok "a non-superuser sees only its own rows"
    info "as Alice, filing a problem report in Bob's name is refused by the WITH CHECK policy:"
    if "$PSQL" "$APP_URL" -X -q -v ON_ERROR_STOP=1 \
        -c "SET app.current_user_id = '$ALICE'" \
        -c "INSERT INTO problem_reports (user_id, question_id, reason) VALUES ('$BOB', 1, 'typo')" 2>"$WORK/rls.err"; then
        die "certquiz_app acting as Alice could insert a row for Bob"
    fi
    info "$(head -n 1 "$WORK/rls.err")"
    "$PSQL" "$APP_URL" -X -q -v ON_ERROR_STOP=1 \
        -c "SET app.current_user_id = '$ALICE'" \
        -c "INSERT INTO problem_reports (user_id, question_id, reason) VALUES ('$ALICE', 1, 'typo')"
    ok "her own report is accepted"
else
    info "rowLevelSecurity is not reconciled by this build (the plan above says 'skipped'): nothing to show yet."
fi

section "Drift: a manual change is detected and repaired"
sql -c "ALTER TABLE user_progress SET (autovacuum_vacuum_scale_factor = 0.2)"
info "someone ran: ALTER TABLE user_progress SET (autovacuum_vacuum_scale_factor = 0.2)"
dbp plan -f "$POLICY"
info "exit status: $RC"
[ "$RC" = 2 ] || die "drift was not detected (plan exited $RC, expected 2)"
dbp apply -f "$POLICY" >/dev/null
[ "$RC" = 0 ] || die "repairing the drift failed (apply exited $RC)"
dbp plan -f "$POLICY" >/dev/null
[ "$RC" = 0 ] || die "plan after the repair exited $RC, expected 0"
ok "drift detected (exit 2), repaired by apply, plan empty again (exit 0)"

section "Demo passed"
