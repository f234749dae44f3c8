#!/usr/bin/env bash
# hack/bench-operator.sh: the operator at scale. N DatabasePolicy objects (each with its own
# Secret and its own flags table, in its own schema, spread over a few databases) against
# the real kube-apiserver 1.20 of hack/envtest.sh and a real `dbpolicy run` (release build),
# on the local PostgreSQL. Not run in CI. Prints a markdown table for docs/performance.md:
#
#   - time from the operator's start until every policy is Ready for its generation
#   - reconciles per second (dbpolicy_reconciles_total from /metrics) while converging and
#     in the steady state that follows
#   - API requests per reconcile: kube-apiserver's audit log (level Metadata, one line per
#     request received) counts the requests of the operator's ServiceAccount only, so the
#     script's own kubectl polling is not counted
#   - CPU (utime + stime from /proc/PID/stat) and RSS (VmRSS, VmHWM from /proc/PID/status)
#     of the operator process, while converging and in the steady state
#   - the release binary's size
#
# Usage: hack/bench-operator.sh [N]           (default 500)
# Environment:
#   BENCH_DATABASES      databases the policies are spread over (default 10); the policies
#                        never conflict: each manages the flags table of its own schema
#   BENCH_STEADY_SECONDS length of the steady-state window (default 60)
#   BENCH_DRIFT          spec.driftCheckInterval of every policy (default 5m, the default)
#   BENCH_CONCURRENCY    --concurrency of the operator (default 8, the default)
#   DBPOLICY_BENCH_ADMIN_URL  superuser URL (default postgres://postgres@127.0.0.1:5432/postgres)
#   DBPOLICY_BIN         the binary (default: cargo build --release, target/release/dbpolicy)
#   KEEP=1               leave the run directory (logs, audit log) in place
# Needs: hack/envtest.sh setup (binaries), kubectl, psql, curl, python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

N=${1:-500}
DBS=${BENCH_DATABASES:-10}
STEADY=${BENCH_STEADY_SECONDS:-60}
DRIFT=${BENCH_DRIFT:-5m}
CONC=${BENCH_CONCURRENCY:-8}
export PGOPTIONS="-c client_min_messages=warning"
ADMIN_URL=${DBPOLICY_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
NS=bench
SA_USER=system:serviceaccount:dbpolicy-system:dbpolicy
TICK=$(getconf CLK_TCK)
log() { echo "[bench-operator $(date -u +%T)] $*" >&2; }

if [ -z "${DBPOLICY_BIN:-}" ]; then
  cargo build --release --bin dbpolicy >&2
  DBPOLICY_BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/dbpolicy
fi

RUN=$(mktemp -d /tmp/dbpolicy-bench-operator-XXXXXX)
OP_PID=""
cleanup() {
  [ -n "$OP_PID" ] && kill "$OP_PID" 2>/dev/null && wait "$OP_PID" 2>/dev/null
  bash hack/envtest.sh stop "$RUN/api" >/dev/null 2>&1 || true
  for i in $(seq 0 $((DBS - 1))); do
    psql "$ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS dbpolicy_bench_op_$i WITH (FORCE)" >/dev/null 2>&1 || true
  done
  if [ "${KEEP:-0}" = 1 ]; then log "kept $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

# --- the API server, with an audit log of every request received
mkdir -p "$RUN/api"
cat > "$RUN/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [ResponseStarted, ResponseComplete]
rules:
- level: Metadata
EOF
log "starting kube-apiserver (run dir $RUN)"
APISERVER=kube ENVTEST_WATCH_PID=$$ READY_TIMEOUT=120 \
  EXTRA_APISERVER_ARGS="--audit-policy-file=$RUN/audit-policy.yaml --audit-log-path=$RUN/audit.log --audit-log-maxsize=0" \
  bash hack/envtest.sh start "$RUN/api" >/dev/null
export KUBECONFIG=$RUN/api/kubeconfig
bash hack/envtest.sh install-crds "$RUN/api" >/dev/null
API_URL=$(sed -n 's/^API_URL=//p' "$RUN/api/env")

# --- the operator's identity: a ServiceAccount (cluster-admin: RBAC is checked by
# tests/e2e_operator.rs; here only its requests are told apart)
kubectl create namespace dbpolicy-system >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl -n dbpolicy-system create serviceaccount dbpolicy >/dev/null
kubectl create clusterrolebinding dbpolicy-bench --clusterrole=cluster-admin \
  --serviceaccount=dbpolicy-system:dbpolicy >/dev/null
TOKEN=$(kubectl -n dbpolicy-system create token dbpolicy --duration=6h)
cat > "$RUN/operator-kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster: {server: $API_URL, certificate-authority: $RUN/api/ca.crt}
users:
- name: dbpolicy
  user: {token: $TOKEN}
contexts:
- name: dbpolicy
  context: {cluster: envtest, user: dbpolicy, namespace: dbpolicy-system}
current-context: dbpolicy
EOF

# --- databases and one schema per policy
log "creating $DBS databases and $N schemas"
for d in $(seq 0 $((DBS - 1))); do
  psql "$ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS dbpolicy_bench_op_$d WITH (FORCE)" >/dev/null
  psql "$ADMIN_URL" -qAtc "CREATE DATABASE dbpolicy_bench_op_$d TEMPLATE template0" >/dev/null
  db_url=${ADMIN_URL%/*}/dbpolicy_bench_op_$d
  for i in $(seq "$d" "$DBS" $((N - 1))); do echo "CREATE SCHEMA p$i;"; done | psql "$db_url" -qAt >/dev/null
done

# --- N Secrets and N policies
log "creating $N Secrets and $N DatabasePolicies"
python3 - "$N" "$DBS" "$ADMIN_URL" "$NS" "$DRIFT" > "$RUN/objects.json" <<'PY'
import base64, json, sys
n, dbs, admin, ns, drift = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
base = admin.rsplit("/", 1)[0]
items = []
for i in range(n):
    uri = f"{base}/dbpolicy_bench_op_{i % dbs}"
    items.append({"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": f"db-{i}", "namespace": ns},
                  "data": {"uri": base64.b64encode(uri.encode()).decode()}})
    items.append({"apiVersion": "dbpolicy.dev/v1alpha1", "kind": "DatabasePolicy",
                  "metadata": {"name": f"p{i}", "namespace": ns},
                  "spec": {"database": {"connectionSecretRef": {"name": f"db-{i}"}},
                           "driftCheckInterval": drift,
                           "featureFlags": {"schema": f"p{i}", "flags": [
                               {"name": "new_engine", "enabled": True, "rolloutPercentage": 25},
                               {"name": "beta_ui", "enabled": False}]}}})
json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout)
PY
kubectl create --validate=false -f "$RUN/objects.json" >/dev/null

# --- the operator
ADMIN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
METRICS=http://127.0.0.1:$ADMIN_PORT/metrics
metric() { curl -fsS "$METRICS" | awk -v m="$1" '$1 == m {print $2}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$OP_PID/stat"; }
status_kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$OP_PID/status"; }
audit_count() { grep -c "\"username\":\"$SA_USER\"" "$RUN/audit.log" || true; }
ready_count() {
  kubectl get dbpol -n "$NS" -o json | python3 -c '
import json, sys
n = 0
for p in json.load(sys.stdin)["items"]:
    st = p.get("status") or {}
    ready = [c for c in st.get("conditions", []) if c["type"] == "Ready"]
    if st.get("observedGeneration") == p["metadata"]["generation"] and ready and ready[0]["status"] == "True":
        n += 1
print(n)'
}

log "starting the operator: $DBPOLICY_BIN run --concurrency $CONC"
AUDIT_BEFORE=$(audit_count)
T0=$(date +%s.%N)
KUBECONFIG=$RUN/operator-kubeconfig RUST_LOG=info "$DBPOLICY_BIN" run \
  --admin-addr "127.0.0.1:$ADMIN_PORT" --lease-namespace dbpolicy-system --concurrency "$CONC" \
  > "$RUN/operator.log" 2>&1 &
OP_PID=$!

ready=0
until [ "$ready" -ge "$N" ]; do
  kill -0 "$OP_PID" 2>/dev/null || { tail -20 "$RUN/operator.log" >&2; echo "the operator exited" >&2; exit 1; }
  sleep 1
  ready=$(ready_count)
  log "ready: $ready / $N"
done
T1=$(date +%s.%N)
R1=$(metric dbpolicy_reconciles_total); C1=$(cpu_ticks); A1=$(audit_count)
RSS1=$(status_kb VmRSS); HWM1=$(status_kb VmHWM)
ERR1=$(curl -fsS "$METRICS" | awk '$1 ~ /^dbpolicy_reconcile_errors_total/ {s += $2} END {print s + 0}')

log "all Ready; steady state for ${STEADY}s"
# Let the converge's tail (the status writes waking the controller once more) pass first.
sleep 10
T2=$(date +%s.%N); R2=$(metric dbpolicy_reconciles_total); C2=$(cpu_ticks); A2=$(audit_count)
sleep "$STEADY"
T3=$(date +%s.%N); R3=$(metric dbpolicy_reconciles_total); C3=$(cpu_ticks); A3=$(audit_count)
RSS3=$(status_kb VmRSS); HWM3=$(status_kb VmHWM)
ERR3=$(curl -fsS "$METRICS" | awk '$1 ~ /^dbpolicy_reconcile_errors_total/ {s += $2} END {print s + 0}')
SIZE=$(stat -c %s "$DBPOLICY_BIN")

python3 - <<PY
n, dbs, conc, drift = $N, $DBS, $CONC, "$DRIFT"
t0, t1, t2, t3 = $T0, $T1, $T2, $T3
r1, r2, r3 = $R1, $R2, $R3
c1, c2, c3, tick = $C1, $C2, $C3, $TICK
a0, a1, a2, a3 = $AUDIT_BEFORE, $A1, $A2, $A3
conv, steady = t1 - t0, t3 - t2
print(f"- {n} policies ({n} Secrets), spread over {dbs} databases (one schema and flags table each), "
      f"driftCheckInterval {drift}, --concurrency {conc}")
print(f"- reconcile errors counted: {$ERR1:.0f} while converging, {$ERR3:.0f} at the end")
print()
print("| | converging (operator start → all Ready) | steady state |")
print("|---|---:|---:|")
print(f"| wall time | {conv:.1f} s | {steady:.0f} s window |")
print(f"| reconciles | {r1:.0f} ({r1 / n:.2f} per policy) | {r3 - r2:.0f} |")
print(f"| reconciles per second | {r1 / conv:.1f} | {(r3 - r2) / steady:.2f} |")
print(f"| API requests (operator's ServiceAccount) | {a1 - a0} | {a3 - a2} |")
print(f"| API requests per reconcile | {(a1 - a0) / max(r1, 1):.2f} | " + (f"{(a3 - a2) / (r3 - r2):.2f}" if r3 > r2 else "n/a") + " |")
print(f"| operator CPU | {(c1) / tick:.1f} s ({100 * c1 / tick / conv:.0f} % of one core) | {(c3 - c2) / tick:.2f} s ({100 * (c3 - c2) / tick / steady:.1f} % of one core) |")
print(f"| operator RSS (VmRSS / peak VmHWM) | {$RSS1 / 1024:.1f} MiB / {$HWM1 / 1024:.1f} MiB | {$RSS3 / 1024:.1f} MiB / {$HWM3 / 1024:.1f} MiB |")
print()
print(f"- binary: {$SIZE} bytes ({$SIZE / 1024 / 1024:.1f} MiB), {'$DBPOLICY_BIN'}")
PY

# Where the operator's requests went, by verb and resource (converging and steady state
# together): the first place to look when requests per reconcile go up.
python3 - "$RUN/audit.log" "$SA_USER" <<'PY'
import collections, json, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("user", {}).get("username") != sys.argv[2]:
        continue
    ref = e.get("objectRef") or {}
    res = ref.get("resource", e.get("requestURI", "?").split("?")[0])
    if ref.get("subresource"):
        res += "/" + ref["subresource"]
    counts[(e.get("verb"), res)] += 1
print()
print("| requests | verb | resource |")
print("|---:|---|---|")
for (verb, res), n in counts.most_common():
    print(f"| {n} | {verb} | {res} |")
PY
