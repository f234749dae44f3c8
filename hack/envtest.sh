#!/usr/bin/env bash
# hack/envtest.sh: the project's own offline "envtest", real Kubernetes API servers on
# loopback for the e2e tests, built from Debian's packages (no other download).
#
#   hack/envtest.sh setup [CACHE_DIR] [--crd-only] [--no-warm-cache] [--clean]
#   eval "$(APISERVER=crd hack/envtest.sh start RUN_DIR)"     # or APISERVER=kube
#   hack/envtest.sh install-crds RUN_DIR                     # crds/, adapted for 1.20 if need be
#   kubectl get crd                                          # KUBECONFIG points at RUN_DIR
#   hack/envtest.sh stop RUN_DIR [--purge]
#
# Binaries (CACHE_DIR/bin, outside the repo; default
# ${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy-envtest, or $DBPOLICY_ENVTEST_CACHE):
#   etcd            etcd 3.5 from Debian's etcd-server .deb
#   crd-apiserver   upstream k8s.io/apiextensions-apiserver (CRDs + custom resources only:
#                   schema validation, CEL rules, strict field validation, status
#                   subresource, SSA, watch) with the standalone main in
#                   hack/envtest/crd-apiserver-main.go, built with Debian's Go in GOPATH mode
#                   from the golang-*-dev packages of $ENVTEST_CRD_SUITE (default sid).
#   kube-apiserver  the full kube-apiserver v1.20.2 (Namespaces, Secrets, Events, Leases,
#                   RBAC; no CEL; SSA beta; CronJob only batch/v1beta1), built from
#                   bookworm's kubernetes source package with bookworm's Go 1.19.
#                   Skipped with --crd-only.
#
# setup first looks for a warm cache: ../shared/envtest-bin/*.xz beside the repository
# (or $DBPOLICY_ENVTEST_WARM), whose SHA256SUMS are verified before anything is used.
# Without it (or with --no-warm-cache) it builds: about 3 min for etcd + crd-apiserver and
# 4 more for kube-apiserver on 2 cores, ~2.5 GB of unpacked sources under CACHE_DIR/work
# (--clean removes them afterwards). Needs apt-get, dpkg, xz, openssl, curl, flock.
# Nothing is installed system-wide: packages come through a private apt configuration
# ($APTX, default CACHE_DIR/apt) and are unpacked with dpkg -x.
#
# start: etcd + one API server on 127.0.0.1, random free ports unless ETCD_PORT/API_PORT
# are set. APISERVER=crd (default) or kube. Runs setup first when the binaries are
# missing. Writes RUN_DIR/kubeconfig (client cert in system:masters; context
# envtest-token uses a static bearer token), RUN_DIR/ca.crt, RUN_DIR/env, logs
# RUN_DIR/{etcd,apiserver}.log, and prints `export KUBECONFIG=RUN_DIR/kubeconfig`.
# ENVTEST_WATCH_PID=PID: stop the servers by themselves when that process exits (the
# Rust tests pass their own PID, so a killed test run leaves nothing behind).
# READY_TIMEOUT (s, default 60), EXTRA_APISERVER_ARGS (appended to the server's flags).
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HACK/.." && pwd)
DEFAULT_CACHE=${DBPOLICY_ENVTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy-envtest}
# CI runs a fresh clone with a copy of shared/ beside it: ../shared relative to the repo.
WARM=${DBPOLICY_ENVTEST_WARM:-$ROOT/../shared/envtest-bin}
CRD_SUITE=${ENVTEST_CRD_SUITE:-sid}
T0=$(date +%s)
log() { echo "[envtest $(( $(date +%s) - T0 ))s] $*" >&2; }
die() { echo "envtest: $*" >&2; exit 1; }

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ================================================================ setup
cmd_setup() {
  local cache="" crd_only=0 warm=1 clean=0 a
  for a in "$@"; do
    case $a in
      --crd-only) crd_only=1 ;;
      --no-warm-cache) warm=0 ;;
      --clean) clean=1 ;;
      -*) die "setup: unknown option $a" ;;
      *) [ -z "$cache" ] || die "setup: one CACHE_DIR only"; cache=$a ;;
    esac
  done
  cache=${cache:-$DEFAULT_CACHE}
  mkdir -p "$cache"; cache=$(cd "$cache" && pwd)
  case "$cache/" in "$ROOT"/*) die "CACHE_DIR $cache is inside the repository; use a directory outside it" ;; esac
  BIN=$cache/bin; W=$cache/work
  mkdir -p "$BIN"
  local wanted=(etcd crd-apiserver) missing=() b
  [ $crd_only = 1 ] || wanted+=(kube-apiserver)
  have_all() { for b in "${wanted[@]}"; do [ -x "$BIN/$b" ] || return 1; done; }
  # binaries are moved into place whole, so a present one is complete: no lock needed
  if have_all; then log "binaries ready in $BIN"; return 0; fi
  # Several test binaries may run setup at once: one builds, the others wait.
  exec 9>"$cache/.lock"
  if ! flock -n 9; then
    log "another setup is working on $cache: waiting for it"
    flock -w 1800 9 || die "timed out waiting for another setup holding $cache/.lock"
  fi
  if have_all; then log "binaries ready in $BIN"; return 0; fi
  for b in "${wanted[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
  log "need: ${missing[*]} (cache $BIN)"

  if [ $warm = 1 ]; then
    from_warm_cache "${missing[@]}"
    missing=(); for b in "${wanted[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
    [ ${#missing[@]} = 0 ] && { write_versions; log "done (warm cache)"; return 0; }
    log "still missing after the warm cache: ${missing[*]}; building from Debian packages"
  fi
  mkdir -p "$W"
  local need_crd=0 need_kube=0
  for b in "${missing[@]}"; do
    case $b in etcd|crd-apiserver) need_crd=1 ;; kube-apiserver) need_kube=1 ;; esac
  done
  apt_setup
  [ $need_crd = 1 ] && build_crd_apiserver
  [ $need_kube = 1 ] && build_kube_apiserver
  write_versions
  if [ $clean = 1 ]; then log "removing $W"; rm -rf "$W"; fi
  log "done"
}

# Decompress ../shared/envtest-bin/NAME.xz, check it against SHA256SUMS, install it.
from_warm_cache() {
  local b sum want tmp
  if [ ! -f "$WARM/SHA256SUMS" ]; then
    log "no warm cache at $WARM (no SHA256SUMS)"; return 0
  fi
  command -v xz >/dev/null || { log "xz not installed: cannot use the warm cache"; return 0; }
  for b in "$@"; do
    [ -f "$WARM/$b.xz" ] || { log "warm cache has no $b.xz"; continue; }
    want=$(awk -v n="$b" '$2 == n || $2 == "*"n {print $1}' "$WARM/SHA256SUMS")
    [ -n "$want" ] || { log "warm cache: $b is not in SHA256SUMS, not used"; continue; }
    tmp=$BIN/.$b.tmp
    xz -dc "$WARM/$b.xz" > "$tmp"
    sum=$(sha256sum "$tmp" | cut -d' ' -f1)
    if [ "$sum" != "$want" ]; then
      rm -f "$tmp"; log "warm cache: checksum mismatch for $b ($sum != $want), not used"; continue
    fi
    chmod 755 "$tmp"; mv "$tmp" "$BIN/$b"
    { grep "^$b " "$WARM/VERSIONS" 2>/dev/null || echo "$b"; } | sed 's/$/ [warm cache]/' > "$BIN/VERSIONS.$b"
    log "installed $b from the warm cache (sha256 verified)"
  done
}

write_versions() { cat "$BIN"/VERSIONS.* 2>/dev/null | sort -u > "$BIN/VERSIONS" || true; }

# ---------------------------------------------------------------- private apt config
apt_setup() {
  command -v apt-get >/dev/null || die "building needs apt-get (Debian/Ubuntu); or provide the warm cache"
  APTX=${APTX:-$cache/apt}
  mkdir -p "$APTX/sources" "$APTX/lists/partial" "$APTX/cache/archives/partial"
  cat > "$APTX/sources/x.sources" <<'EOF'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || die "missing /usr/share/keyrings/debian-archive-keyring.gpg (apt-get install debian-archive-keyring)"
  O=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$APTX/sources" -o "Dir::State::Lists=$APTX/lists"
     -o "Dir::Cache=$APTX/cache" -o Debug::NoDropPrivs=true -o APT::Sandbox::User=root)
  if ! ls "$APTX"/lists/*"${CRD_SUITE}"*Packages* >/dev/null 2>&1 || ! ls "$APTX"/lists/*bookworm*Sources* >/dev/null 2>&1; then
    log "apt-get update (private config in $APTX)"
    apt-get "${O[@]}" -qq update
  fi
  OSUITE=("${O[@]}" -o "APT::Default-Release=$CRD_SUITE")
}

fetch_debs() { # dir pkg... : download into dir
  local d=$1; shift; mkdir -p "$d"
  ( cd "$d" && apt-get "${OSUITE[@]}" -qq download "$@" 2>&1 | grep -v 'unsandboxed' >&2 || true )
}

# ---------------------------------------------------------------- etcd + crd-apiserver
build_crd_apiserver() {
  local gopkg gover closure v R apiext_ver k8s_ver k8s_minor etcd_ver ld p
  # the Go that the suite's golang-go points to, e.g. golang-1.27-go
  gopkg=$(apt-cache "${OSUITE[@]}" depends golang-go 2>/dev/null | awk '/Depends: golang-1\.[0-9]+-go/{print $2; exit}')
  [ -n "$gopkg" ] || die "cannot resolve golang-go in $CRD_SUITE"
  gover=${gopkg#golang-}; gover=${gover%-go}
  log "resolving the dependency closure of golang-k8s-apiextensions-apiserver-dev ($CRD_SUITE) + $gopkg"
  closure=$W/closure.txt
  local deps=(--recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances)
  apt-cache "${OSUITE[@]}" depends "${deps[@]}" golang-k8s-apiextensions-apiserver-dev 2>/dev/null \
    | grep -E '^golang-.*-dev$' | sort -u > "$closure"
  [ -s "$closure" ] || die "golang-k8s-apiextensions-apiserver-dev not found in $CRD_SUITE"
  # virtual packages in the closure, resolved to their real providers
  for v in $(apt-cache "${OSUITE[@]}" depends "${deps[@]}" golang-k8s-apiextensions-apiserver-dev 2>/dev/null \
               | sed -n 's/^ *Depends: <\(golang-.*\)>$/\1/p' | sort -u); do
    apt-cache "${OSUITE[@]}" showpkg "$v" 2>/dev/null | sed -n '/^Reverse Provides:/,$p' | awk 'NR==2{print $1}' >> "$closure"
  done
  sort -u -o "$closure" "$closure"
  log "downloading $(wc -l < "$closure") golang-*-dev packages + $gopkg + etcd-server"
  # shellcheck disable=SC2046
  fetch_debs "$W/debs" $(cat "$closure") "$gopkg" "golang-$gover-src" etcd-server
  log "unpacking"
  R=$W/root; rm -rf "$R"; mkdir -p "$R"
  for f in "$W"/debs/*.deb; do dpkg -x "$f" "$R"; done
  apiext_ver=$(dpkg-deb -f "$(ls "$W"/debs/golang-k8s-apiextensions-apiserver-dev_*.deb | tail -1)" Version)
  k8s_ver=v1.${apiext_ver#0.}; k8s_ver=${k8s_ver%%-*}; k8s_minor=$(echo "$k8s_ver" | cut -d. -f2)
  etcd_ver=$(dpkg-deb -f "$(ls "$W"/debs/etcd-server_*.deb | tail -1)" Version)
  mkdir -p "$W/gopath/src/envtest/crd-apiserver"
  cp "$HACK/envtest/crd-apiserver-main.go" "$W/gopath/src/envtest/crd-apiserver/main.go"
  log "building crd-apiserver $k8s_ver with $("$R/usr/lib/go-$gover/bin/go" version | cut -d' ' -f3)"
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$k8s_ver -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ) -X $p.gitCommit=debian-apiextensions-$apiext_ver"
  done
  ( export GOROOT="$R/usr/lib/go-$gover" GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0 \
           GOCACHE="$W/gocache" GOPATH="$W/gopath:$R/usr/share/gocode"
    cd "$W" && "$GOROOT/bin/go" build -trimpath -ldflags="$ld" -o "$BIN/crd-apiserver.tmp" envtest/crd-apiserver )
  mv "$BIN/crd-apiserver.tmp" "$BIN/crd-apiserver"
  cp "$R/usr/bin/etcd" "$BIN/etcd.tmp" && mv "$BIN/etcd.tmp" "$BIN/etcd"
  echo "crd-apiserver $k8s_ver (golang-k8s-apiextensions-apiserver-dev $apiext_ver, $gopkg $(dpkg-deb -f "$(ls "$W"/debs/"${gopkg}"_*.deb | tail -1)" Version))" > "$BIN/VERSIONS.crd-apiserver"
  echo "etcd $etcd_ver (etcd-server .deb)" > "$BIN/VERSIONS.etcd"
}

# ---------------------------------------------------------------- kube-apiserver 1.20.2
build_kube_apiserver() {
  local S=$W/k120 G=$W/go119 src=kubernetes_1.20.5+really1.20.2.orig.tar.gz V=v1.20.2 P=k8s.io/kubernetes/vendor ld p
  log "fetching kubernetes 1.20.2 source (bookworm) + golang-1.19 + golang-github-modern-go-reflect2-dev"
  mkdir -p "$W/src"
  ( cd "$W/src" && [ -f $src ] || \
      apt-get "${O[@]}" -qq source --download-only kubernetes=1.20.5+really1.20.2-1.1+deb12u1 2>&1 | grep -v unsandboxed >&2 || true )
  [ -f "$W/src/$src" ] || die "could not download the kubernetes 1.20.2 source package from bookworm"
  mkdir -p "$W/debs119"
  ( cd "$W/debs119" && apt-get "${O[@]}" -qq download golang-1.19-go/bookworm golang-1.19-src/bookworm \
      golang-github-modern-go-reflect2-dev/bookworm 2>&1 | grep -v unsandboxed >&2 || true )
  rm -rf "$G" "$S"; mkdir -p "$G" "$S"
  for f in "$W"/debs119/*.deb; do dpkg -x "$f" "$G"; done
  tar xzf "$W/src/$src" -C "$S" --strip-components=1
  # the vendored reflect2 1.0.1 crashes at run time with Go >= 1.18; use Debian's 1.0.2
  rm -rf "$S/vendor/github.com/modern-go/reflect2"
  cp -r "$G/usr/share/gocode/src/github.com/modern-go/reflect2" "$S/vendor/github.com/modern-go/reflect2"
  rm -f "$S"/vendor/github.com/modern-go/reflect2/*_test.go
  mkdir -p "$W/gopath119/src/k8s.io"; ln -sfn "$S" "$W/gopath119/src/k8s.io/kubernetes"
  log "generating pkg/generated/openapi (not in the tarball) with the vendored openapi-gen"
  ( export GOROOT="$G/usr/lib/go-1.19" GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0 \
           GOCACHE="$W/gocache119" GOPATH="$W/gopath119"
    cd "$W/gopath119/src/k8s.io/kubernetes"
    "$GOROOT/bin/go" build -o "$W/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
    # the package selection of k8s 1.20's build/root/Makefile.generated_files (KUBE_OPENAPI_DIRS)
    DIRS=$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) -type f -name '*.go' \
      | sed 's|^./staging/src|vendor|; s|^\./||' | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
      | xargs grep -l '^// *+k8s:' | xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u \
      | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
    "$W/openapi-gen" -i "$DIRS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
      -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/openapi-violations.report" )
  log "building kube-apiserver $V with go1.19 (GOPATH mode + vendor/, like k8s 1.20's own build)"
  ld="-s -w"
  for p in $P/k8s.io/component-base/version $P/k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$V -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  ( export GOROOT="$G/usr/lib/go-1.19" GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0 \
           GOCACHE="$W/gocache119" GOPATH="$W/gopath119"
    cd "$W/gopath119/src/k8s.io/kubernetes" && "$GOROOT/bin/go" build -ldflags="$ld" -o "$BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver )
  mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
  echo "kube-apiserver $V (bookworm kubernetes 1.20.5+really1.20.2-1.1+deb12u1 orig tarball, golang-1.19-go, reflect2 1.0.2)" > "$BIN/VERSIONS.kube-apiserver"
}

# ================================================================ start
free_port() {
  python3 - <<'PY' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()
PY
}

cmd_start() {
  local RUN=${1:?usage: envtest.sh start RUN_DIR}
  local cache=${DBPOLICY_ENVTEST_CACHE:-$DEFAULT_CACHE} APIBIN
  local APISERVER=${APISERVER:-crd}
  case $APISERVER in kube) APIBIN=kube-apiserver ;; crd) APIBIN=crd-apiserver ;; *) die "APISERVER must be crd or kube, not $APISERVER" ;; esac
  local BIN=$cache/bin
  if [ ! -x "$BIN/etcd" ] || [ ! -x "$BIN/$APIBIN" ]; then
    log "$APIBIN not in $BIN: running setup first"
    if [ $APISERVER = crd ]; then "$HACK/envtest.sh" setup "$cache" --crd-only >&2; else "$HACK/envtest.sh" setup "$cache" >&2; fi
  fi
  mkdir -p "$RUN"; RUN=$(cd "$RUN" && pwd)
  if [ -f "$RUN/apiserver.pid" ] && kill -0 "$(cat "$RUN/apiserver.pid")" 2>/dev/null; then
    echo "already running in $RUN" >&2; echo "export KUBECONFIG=$RUN/kubeconfig"; return 0
  fi
  local ETCD_PORT=${ETCD_PORT:-$(free_port)} ETCD_PEER_PORT=${ETCD_PEER_PORT:-$(free_port)} API_PORT=${API_PORT:-$(free_port)}

  # PKI: CA, serving cert for 127.0.0.1/localhost, admin client cert in system:masters
  local P=$RUN/pki; mkdir -p "$P"
  if [ ! -f "$P/admin.crt" ]; then
    ( cd "$P"
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=envtest-ca" 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr -subj "/CN=localhost" 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > serving.ext
      openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out serving.crt -days 3650 -extfile serving.ext 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
      printf 'extendedKeyUsage=clientAuth\n' > admin.ext
      openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile admin.ext 2>/dev/null
      rm -f ./*.csr ./*.ext )
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$RUN/token"
    printf '%s,admin,admin-uid,"system:masters"\n' "$(cat "$RUN/token")" > "$P/tokens.csv"
    openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
    openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
  fi
  cp "$P/ca.crt" "$RUN/ca.crt"

  # etcd: loopback only, data in RUN_DIR; its output goes to a log so no caller's pipe is held
  "$BIN/etcd" --name envtest --data-dir "$RUN/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "envtest=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes=8589934592 --log-level=warn \
    < /dev/null > "$RUN/etcd.log" 2>&1 &
  echo $! > "$RUN/etcd.pid"

  local COMMON=(--etcd-servers "http://127.0.0.1:$ETCD_PORT" --bind-address 127.0.0.1 --secure-port "$API_PORT"
                --tls-cert-file "$P/serving.crt" --tls-private-key-file "$P/serving.key"
                --client-ca-file "$P/ca.crt" --token-auth-file "$P/tokens.csv" --cert-dir "$RUN/certs")
  local EXTRA=()
  if [ $APISERVER = kube ]; then
    # the flags of controller-runtime's envtest (+ --insecure-port=0 for servers <= 1.23)
    EXTRA=(--advertise-address 127.0.0.1 --allow-privileged=true --authorization-mode RBAC
           --disable-admission-plugins ServiceAccount --service-cluster-ip-range 10.0.0.0/24
           --service-account-issuer "https://127.0.0.1:$API_PORT" --service-account-key-file "$P/sa.pub"
           --service-account-signing-key-file "$P/sa.key" --storage-backend etcd3
           --endpoint-reconciler-type none)  # no loopback-endpoint sync errors every 10s
    "$BIN/kube-apiserver" --help 2>&1 | grep -q -- '--insecure-port' && EXTRA+=(--insecure-port 0)
  fi
  # shellcheck disable=SC2086
  "$BIN/$APIBIN" "${COMMON[@]}" "${EXTRA[@]}" ${EXTRA_APISERVER_ARGS:-} < /dev/null > "$RUN/apiserver.log" 2>&1 &
  echo $! > "$RUN/apiserver.pid"

  cat > "$RUN/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 < "$P/ca.crt")
users:
- name: envtest-admin
  user:
    client-certificate-data: $(base64 -w0 < "$P/admin.crt")
    client-key-data: $(base64 -w0 < "$P/admin.key")
- name: envtest-token
  user:
    token: $(cat "$RUN/token")
contexts:
- name: envtest
  context: {cluster: envtest, user: envtest-admin, namespace: default}
- name: envtest-token
  context: {cluster: envtest, user: envtest-token, namespace: default}
current-context: envtest
EOF
  cat > "$RUN/env" <<EOF
ETCD_URL=http://127.0.0.1:$ETCD_PORT
API_URL=https://127.0.0.1:$API_PORT
APISERVER=$APISERVER
KUBECONFIG=$RUN/kubeconfig
EOF

  if [ -n "${ENVTEST_WATCH_PID:-}" ]; then
    # the watchdog: when the watched process is gone, stop this run's servers
    ( trap '' HUP; while kill -0 "$ENVTEST_WATCH_PID" 2>/dev/null && [ -f "$RUN/apiserver.pid" ]; do sleep 1; done
      "$HACK/envtest.sh" stop "$RUN" ) < /dev/null > /dev/null 2>&1 &
    echo $! > "$RUN/watchdog.pid"
  fi

  local deadline=$(( $(date +%s) + ${READY_TIMEOUT:-60} )) n
  until curl -fsS --cacert "$P/ca.crt" "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; do
    for n in etcd apiserver; do
      if ! kill -0 "$(cat "$RUN/$n.pid")" 2>/dev/null; then
        echo "envtest: $n exited during start-up; last lines of $RUN/$n.log:" >&2; tail -20 "$RUN/$n.log" >&2
        cmd_stop "$RUN"; exit 1
      fi
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "envtest: $APIBIN not ready after ${READY_TIMEOUT:-60}s; last lines of $RUN/apiserver.log:" >&2
      tail -20 "$RUN/apiserver.log" >&2; cmd_stop "$RUN"; exit 1
    fi
    sleep 0.1
  done
  log "$APIBIN ready: https://127.0.0.1:$API_PORT (etcd 127.0.0.1:$ETCD_PORT), run dir $RUN"
  echo "export KUBECONFIG=$RUN/kubeconfig"
}

# ================================================================ install-crds
# Applies the repository's crds/ to the server of RUN_DIR and waits until they are
# Established. The CRD server takes them as they are (server-side apply). The
# kube-apiserver 1.20 cannot hold two things in them, which are removed on the way:
# CEL rules (x-kubernetes-validations, from 1.25 on; the CRD server checks them) and the
# null member of nullable enums, which 1.20's conversion to its internal CRD type trips
# over ("per-version schemas may not all be set to identical values"). 1.20's beta
# server-side apply mangles CRDs the same way, so client-side apply there, without
# kubectl's client-side validation (1.20 has no server-side field validation, and kubectl
# cannot read nullable enums from its OpenAPI).
cmd_install_crds() {
  local RUN=${1:?usage: envtest.sh install-crds RUN_DIR}
  [ -f "$RUN/env" ] || die "no $RUN/env: start a server first (envtest.sh start $RUN)"
  local APISERVER KUBECONFIG
  APISERVER=$(sed -n 's/^APISERVER=//p' "$RUN/env"); KUBECONFIG=$(sed -n 's/^KUBECONFIG=//p' "$RUN/env")
  export KUBECONFIG
  if [ "$APISERVER" = crd ]; then
    kubectl apply --server-side --field-manager=dbpolicy-envtest -f "$ROOT/crds/"
  else
    command -v python3 >/dev/null || die "install-crds on kube-apiserver 1.20 needs python3"
    kubectl create --dry-run=client --validate=false -o json -f "$ROOT/crds/" | python3 -c '
import json, sys
def adapt(v):
    if isinstance(v, dict):
        v.pop("x-kubernetes-validations", None)
        if isinstance(v.get("enum"), list):
            v["enum"] = [m for m in v["enum"] if m is not None]
        for x in v.values():
            adapt(x)
    elif isinstance(v, list):
        for x in v:
            adapt(x)
    return v
json.dump(adapt(json.load(sys.stdin)), sys.stdout)
' | kubectl apply --validate=false -f -
  fi
  kubectl wait --for=condition=Established --timeout=60s crd --all
}

# ================================================================ stop
cmd_stop() {
  local RUN=${1:?usage: envtest.sh stop RUN_DIR [--purge]} n f pid
  for n in apiserver etcd watchdog; do
    f=$RUN/$n.pid; [ -f "$f" ] || continue
    pid=$(cat "$f"); rm -f "$f"
    [ "$pid" = "${BASHPID:-$$}" ] && continue
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
  done
  [ "${2:-}" = "--purge" ] && rm -rf "$RUN"
  return 0
}

case ${1:-} in
  setup) shift; cmd_setup "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  install-crds) shift; cmd_install_crds "$@" ;;
  -h|--help|help|"") usage ;;
  *) echo "envtest: unknown command $1" >&2; usage ;;
esac
