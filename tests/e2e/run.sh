#!/usr/bin/env bash
# End to end: a real kube-apiserver and etcd store real Secrets through kekd.
#
#   tests/e2e/run.sh
#
# Builds kube-apiserver + kubectl (k8s.io/kubernetes v1.37.2), etcd + etcdctl
# (go.etcd.io/etcd v3.7.3) and a small helper once into a cache, kekd with
# `cargo build --release --locked` (unless KEKD_BIN is set), then runs the
# scenario of tests/e2e/README.md against our shipped deploy/encryption-config.yaml
# (only its endpoint rewritten) and deploy/kekd-pkcs11.toml (only its paths
# rewritten). Prints PASS/FAIL lines and ends with "N passed, M failed".
#
# Environment:
#   KEKD_BIN=PATH        use this kekd instead of building it
#   KEKD_REQUIRE_ALL=1   a missing tool or a failed build is a failure, never a skip
#   KEKD_E2E_CACHE=DIR   binary cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/kekd-e2e)
#   KEKD_E2E_SECRETS=N   Secrets created in step 1 (default 200)
#   KEKD_E2E_STEPS="1 2 3 4 5 6 7 8 9"  which steps to run (1-3 always run with 4, 5 or 8; 6, 7, 9 stand alone)
#   KEKD_E2E_KEEP=1      keep etcd's data directory after a passing run
#   KEKD_E2E_BUILD_ONLY=1  only build (or find cached) kube-apiserver, kubectl, etcd, etcdctl and
#                        e2ehelper, then stop: CI runs this before `cargo test` (tests/integration/scan.rs needs etcd)

# Functions are called through check/wait_for: shellcheck cannot see that.
# shellcheck disable=SC2317
set -uo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$E2E_DIR/../.." && pwd)
K8S_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
CACHE=${KEKD_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kekd-e2e}
REQUIRE_ALL=${KEKD_REQUIRE_ALL:-0}
N_SECRETS=${KEKD_E2E_SECRETS:-200}
STEPS=${KEKD_E2E_STEPS:-1 2 3 4 5 6 7 8 9}
export GOTOOLCHAIN=local # go.mod files say go 1.26.0: never download a toolchain

WORK=$(mktemp -d /tmp/kekd-e2e.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
RUNID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
MARKER="e2eplain-$RUNID" # every Secret/ConfigMap value contains it; etcd must not

PASSED=0 FAILED=0 SKIPPED=0
CUR_STEP="-"
declare -a REPORT=()   # "step|seconds|passed|failed" lines for the closing report
declare -a TIMINGS=()  # notable measurements
declare -A PIDS=()     # process name -> pid
declare -A TOTAL=()    # etcd prefix -> labelled Secrets the apiserver must return
FINISHED=0

# ---------------------------------------------------------------- output

now() { echo "${EPOCHREALTIME/,/.}"; }
T0=$(now)
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
stamp() { printf '%6ss' "$(since "$T0")"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS [$(stamp)] $CUR_STEP: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL [$(stamp)] $CUR_STEP: $*"; }
info() { echo "     [$(stamp)] $*"; }
timing() { TIMINGS+=("$1"); info "timing: $1"; }
# check DESCRIPTION COMMAND...: PASS when the command succeeds. A command may
# set REASON to say why it failed.
REASON=
check() {
    local d=$1; shift
    REASON=
    if "$@"; then pass "$d"; else fail "$d${REASON:+ — $REASON}"; return 1; fi
}

STEP_T=0 STEP_P=0 STEP_F=0
begin_step() {
    end_step
    CUR_STEP=$1
    STEP_T=$(now) STEP_P=$PASSED STEP_F=$FAILED
    echo
    echo "=== $1: $2"
}
end_step() {
    [[ $CUR_STEP == "-" ]] && return 0
    REPORT+=("$CUR_STEP|$(since "$STEP_T")|$((PASSED - STEP_P))|$((FAILED - STEP_F))")
    CUR_STEP="-"
}

# A prerequisite is missing: fail with KEKD_REQUIRE_ALL=1, skip otherwise.
# `missing REASON fatal` ends the run.
missing() {
    if [[ $REQUIRE_ALL == 1 ]]; then
        fail "$1 (KEKD_REQUIRE_ALL=1)"
    else
        SKIPPED=$((SKIPPED + 1))
        echo "SKIP [$(stamp)] $CUR_STEP: $1 (set KEKD_REQUIRE_ALL=1 to make this a failure)"
    fi
    [[ ${2:-} == fatal ]] && finish
    return 0
}

# ---------------------------------------------------------------- processes

# start_proc NAME COMMAND...: runs it in the background, output in $LOGS/NAME.log.
start_proc() {
    local name=$1; shift
    echo "--- $(date -u +%FT%TZ) start: $*" >>"$LOGS/$name.log"
    "$@" >>"$LOGS/$name.log" 2>&1 &
    PIDS[$name]=$!
}

alive() { [[ -n ${PIDS[$1]:-} ]] && kill -0 "${PIDS[$1]}" 2>/dev/null; }

# until_up NAME COMMAND...: for wait_for: done when COMMAND succeeds, or when
# process NAME has exited (REASON says so, and the status is then 1).
until_up() {
    local name=$1; shift
    "$@" && return 0
    alive "$name" && return 1
    REASON="$name exited (log $LOGS/$name.log)"
    return 0
}
# wait_up SECONDS NAME COMMAND...: COMMAND succeeded before the time ran out, and NAME runs.
wait_up() {
    local secs=$1 name=$2; shift 2
    wait_for "$secs" until_up "$name" "$@" && alive "$name"
}

# stop_proc NAME [SIGNAL]: signal it (TERM by default), wait up to 20 s, then KILL.
stop_proc() {
    local name=$1 sig=${2:-TERM} pid=${PIDS[$1]:-} i
    [[ -z $pid ]] && return 0
    kill -s "$sig" "$pid" 2>/dev/null
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        info "$name (pid $pid) ignored SIG$sig for 20 s: SIGKILL"
        kill -s KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    unset "PIDS[$name]"
}

cleanup() {
    local name f
    for f in "$WORK"/node*/fs/run/systemd-kekd.pid; do # step 9's systemctl shim
        [[ -s $f ]] && kill -s TERM "$(cat "$f")" 2>/dev/null
    done
    for name in "${!PIDS[@]}"; do
        kill -s TERM "${PIDS[$name]}" 2>/dev/null
    done
    for name in "${!PIDS[@]}"; do
        stop_proc "$name" TERM
    done
}

finish() {
    end_step
    cleanup
    FINISHED=1
    echo
    echo "=== report"
    local r s t p f
    for r in "${REPORT[@]}"; do
        IFS='|' read -r s t p f <<<"$r"
        printf '  %-9s %7ss  %3d passed  %3d failed\n' "$s" "$t" "$p" "$f"
    done
    for r in "${TIMINGS[@]}"; do echo "  $r"; done
    echo "  total $(since "$T0")s; logs of every process: $LOGS"
    if ((FAILED == 0)) && [[ ${KEKD_E2E_KEEP:-0} != 1 ]]; then
        rm -rf "$WORK/etcd" "$WORK/etcd-docs"
    fi
    if ((SKIPPED > 0)); then
        echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
    else
        echo "$PASSED passed, $FAILED failed"
    fi
    ((FAILED == 0))
    exit
}

on_exit() {
    local rc=$?
    if ((FINISHED == 0)); then
        fail "run.sh stopped early (exit $rc)"
        finish
    fi
}
trap on_exit EXIT
trap 'fail "interrupted"; finish' INT TERM

# wait_for SECONDS COMMAND...: polls every 0.5 s until the command succeeds.
wait_for() {
    local deadline=$(($(date +%s) + $1)); shift
    until "$@"; do
        (($(date +%s) >= deadline)) && return 1
        sleep 0.5
    done
}

# ---------------------------------------------------------------- builds

go_key() { # a hash of a tools module's sources and the Go version
    (cd "$1" && cat go.mod go.sum && find . -name '*.go' -print0 | LC_ALL=C sort -z | xargs -0 cat && go version) |
        sha256sum | cut -c1-12
}

# prune DIR: removes older builds of the same family (kubernetes-*, etcd-*).
prune() {
    local d base=${1##*/}
    for d in "${1%/*}/${base%%-*}"-*; do
        [[ $d != "$1" && $d != *.tmp.* && -d $d ]] && rm -rf "$d"
    done
    return 0
}

build_tools() {
    begin_step build "binaries (cache $CACHE/bin)"
    if ! command -v go >/dev/null; then
        missing "go is not installed: cannot build kube-apiserver, kubectl and etcd" fatal
    fi
    local k8s_dir etcd_dir t ld
    k8s_dir="$CACHE/bin/kubernetes-$K8S_VERSION-$(go_key "$E2E_DIR/tools/k8s")"
    etcd_dir="$CACHE/bin/etcd-$ETCD_VERSION-$(go_key "$E2E_DIR/tools/etcd")"
    if [[ -x $k8s_dir/kube-apiserver && -x $k8s_dir/kubectl ]]; then
        info "kube-apiserver, kubectl $K8S_VERSION: cached in $k8s_dir"
    else
        info "building kube-apiserver and kubectl $K8S_VERSION (cold: about 15 minutes on 2 cores)"
        t=$(now)
        ld="-s -w"
        for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ld+=" -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=37 -X $v.gitTreeState=clean"
        done
        rm -rf "$k8s_dir.tmp.$$" && mkdir -p "$k8s_dir.tmp.$$"
        if (cd "$E2E_DIR/tools/k8s" && go build -trimpath -ldflags "$ld" -o "$k8s_dir.tmp.$$/" \
            k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl) >"$LOGS/build-kubernetes.log" 2>&1 &&
            mv "$k8s_dir.tmp.$$" "$k8s_dir"; then
            timing "build of kube-apiserver + kubectl: $(since "$t")s"
            prune "$k8s_dir"
        else
            tail -20 "$LOGS/build-kubernetes.log"
            missing "building kube-apiserver/kubectl failed (log $LOGS/build-kubernetes.log)" fatal
        fi
    fi
    if [[ -x $etcd_dir/etcd && -x $etcd_dir/etcdctl && -x $etcd_dir/e2ehelper ]]; then
        info "etcd, etcdctl $ETCD_VERSION, e2ehelper: cached in $etcd_dir"
    else
        info "building etcd, etcdctl $ETCD_VERSION and e2ehelper"
        t=$(now)
        rm -rf "$etcd_dir.tmp.$$" && mkdir -p "$etcd_dir.tmp.$$"
        if (cd "$E2E_DIR/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$etcd_dir.tmp.$$/" \
            ./cmd/etcd ./cmd/e2ehelper go.etcd.io/etcd/etcdctl/v3) >"$LOGS/build-etcd.log" 2>&1 &&
            mv "$etcd_dir.tmp.$$" "$etcd_dir"; then
            timing "build of etcd + etcdctl + e2ehelper: $(since "$t")s"
            prune "$etcd_dir"
        else
            tail -20 "$LOGS/build-etcd.log"
            missing "building etcd/etcdctl failed (log $LOGS/build-etcd.log)" fatal
        fi
    fi
    KUBE_APISERVER=$k8s_dir/kube-apiserver KUBECTL=$k8s_dir/kubectl
    ETCD=$etcd_dir/etcd ETCDCTL=$etcd_dir/etcdctl HELPER=$etcd_dir/e2ehelper
    if [[ ${KEKD_E2E_BUILD_ONLY:-0} == 1 ]]; then
        # For suites that need only the binaries (tests/integration/scan.rs finds etcd here).
        pass "binaries ready: $ETCD, $KUBE_APISERVER (KEKD_E2E_BUILD_ONLY=1: no scenario run)"
        finish
    fi

    if [[ -n ${KEKD_BIN:-} ]]; then
        KEKD=$KEKD_BIN
        [[ -x $KEKD ]] || { fail "KEKD_BIN=$KEKD is not executable"; finish; }
        info "kekd: $KEKD (KEKD_BIN)"
    else
        if ! command -v cargo >/dev/null; then
            missing "cargo is not installed and KEKD_BIN is not set" fatal
        fi
        info "building kekd: cargo build --release --locked"
        t=$(now)
        if (cd "$ROOT" && cargo build --release --locked) >"$LOGS/build-kekd.log" 2>&1; then
            timing "cargo build --release --locked: $(since "$t")s"
        else
            tail -20 "$LOGS/build-kekd.log"
            fail "cargo build --release --locked failed (log $LOGS/build-kekd.log)"
            finish
        fi
        KEKD=${CARGO_TARGET_DIR:-$ROOT/target}/release/kekd
    fi
    info "$("$KUBE_APISERVER" --version 2>&1 | head -1); etcd $("$ETCD" --version 2>&1 | awk '/etcd Version/{print $3}'); $("$KEKD" --version 2>&1 | head -1)"
}

# ---------------------------------------------------------------- cluster plumbing

make_pki() {
    PKI=$WORK/pki
    mkdir -p "$PKI"
    if command -v openssl >/dev/null; then
        (
            cd "$PKI" || exit 1
            set -e
            ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
            # shellcheck disable=SC2086
            openssl req -x509 $ec -keyout ca.key -out ca.crt -days 2 -subj /CN=kekd-e2e-ca
            # shellcheck disable=SC2086
            openssl req $ec -keyout serving.key -out serving.csr -subj /CN=kube-apiserver
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' >serving.ext
            openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile serving.ext -out serving.crt
            # shellcheck disable=SC2086
            openssl req $ec -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kekd-e2e-admin"
            printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' >admin.ext
            openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile admin.ext -out admin.crt
            openssl genrsa -out sa.key 2048
            openssl rsa -in sa.key -pubout -out sa.pub
        ) >"$LOGS/pki.log" 2>&1
        check "certificates and service-account keys made with openssl" test -s "$PKI/sa.pub" -a -s "$PKI/admin.crt" || finish
    else
        "$HELPER" certs "$PKI" >"$LOGS/pki.log" 2>&1
        check "certificates and service-account keys made by e2ehelper (no openssl)" test -s "$PKI/sa.pub" || finish
    fi
}

start_etcd() {
    local ports
    mapfile -t ports < <("$HELPER" ports 5)
    ETCD_URL=http://127.0.0.1:${ports[0]}
    APISERVER_PORT_A=${ports[2]} APISERVER_PORT_B=${ports[3]} APISERVER_PORT_H=${ports[4]}
    start_proc etcd "$ETCD" --name e2e --data-dir "$WORK/etcd" \
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:${ports[1]}" --initial-advertise-peer-urls "http://127.0.0.1:${ports[1]}" \
        --initial-cluster "e2e=http://127.0.0.1:${ports[1]}" --unsafe-no-fsync --log-level warn
    check "etcd $ETCD_VERSION serves $ETCD_URL" wait_up 30 etcd etcd_healthy || finish
}

etcd_healthy() { etcdctl endpoint health >/dev/null 2>&1; }
etcdctl() { "$ETCDCTL" --endpoints "$ETCD_URL" --command-timeout 20s "$@"; }

declare -A NODE_KIND=() NODE_PORT=() NODE_PREFIX=()
# Step 9's nodes: their own etcd (TLS) and EncryptionConfiguration ("" = none).
declare -A NODE_ETCD=() NODE_ETCD_TLS=() NODE_ENC=()

# The node's copy of OUR deploy/encryption-config.yaml, endpoint rewritten.
encryption_config() {
    local n=$1 src=$ROOT/deploy/encryption-config.yaml dst=$WORK/$1/encryption-config.yaml
    sed "s#endpoint: unix:///var/run/kekd/kms.sock#endpoint: unix://$WORK/$n/kms.sock#" "$src" >"$dst"
    local changed
    changed=$(diff "$src" "$dst" | grep -c '^>')
    check "node $n: deploy/encryption-config.yaml copied with only its endpoint rewritten ($changed line)" \
        test "$changed" = 1
}

kubeconfig() {
    local n=$1
    cat >"$WORK/$n/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $n
  cluster: {server: "https://127.0.0.1:${NODE_PORT[$n]}", certificate-authority: "$PKI/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$PKI/admin.crt", client-key: "$PKI/admin.key"}
contexts:
- name: $n
  context: {cluster: $n, user: admin}
current-context: $n
EOF
}

# kc NODE ARGS...: kubectl against that node's apiserver.
kc() {
    local n=$1; shift
    "$KUBECTL" --kubeconfig "$WORK/$n/kubeconfig" --cache-dir "$WORK/kube-cache" --request-timeout=30s "$@"
}

# kekd_admin NODE ARGS...: `kekd admin ARGS` on that node's keyring.
kekd_admin() {
    local n=$1 cmd=$2; shift 2
    case ${NODE_KIND[$n]} in
    local) "$KEKD" admin "$cmd" "$@" --keyring "$WORK/$n/keyring" ;;
    pkcs11) SOFTHSM2_CONF=$WORK/$n/softhsm2.conf "$KEKD" admin "$cmd" "$@" --config "$WORK/$n/kekd.toml" ;;
    esac
}

# keyring NODE: "VERSION STATE KEY_ID ENCRYPTS DECRYPTS" lines, "primary N", "serving KEY_ID".
keyring() { kekd_admin "$1" list --output json 2>>"$LOGS/admin.log" | "$HELPER" kekdlist; }
key_id() { keyring "$1" | awk -v v="$2" '$1==v{print $3}'; }
state_of() { keyring "$1" | awk -v v="$2" '$1==v{print $2}'; }
primary_of() { keyring "$1" | awk '$1=="primary"{print $2}'; }
# status_key_id NODE: the key_id kekd's Status answers (through `kekd admin probe`).
status_key_id() {
    "$KEKD" admin probe --socket "$WORK/$1/kms.sock" 2>&1 | tee -a "$LOGS/probe-$1.log" |
        awk '$1=="ok" && $2=="status" {for (i = 3; i < NF; i++) if ($i == "key_id") print $(i + 1)}'
}
serving_is() { [[ $(status_key_id "$1") == "$2" ]]; }

probe_ok() { "$KEKD" admin probe --socket "$WORK/$1/kms.sock" >>"$LOGS/probe-$1.log" 2>&1; }

start_kekd() {
    local n=$1
    case ${NODE_KIND[$n]} in
    local) start_proc "kekd-$n" "$KEKD" serve --keyring "$WORK/$n/keyring" --socket "$WORK/$n/kms.sock" \
        --reload-interval 200ms --log-format text ;;
    pkcs11) start_proc "kekd-$n" env "SOFTHSM2_CONF=$WORK/$n/softhsm2.conf" "$KEKD" serve --config "$WORK/$n/kekd.toml" ;;
    esac
    check "node $n: kekd serves $WORK/$n/kms.sock (admin probe: Status, Encrypt, Decrypt ok)" \
        wait_up 30 "kekd-$n" probe_ok "$n" || { tail -3 "$LOGS/kekd-$n.log" | sed 's/^/     | /'; return 1; }
}

start_apiserver() {
    local n=$1 t
    t=$(now)
    mkdir -p "$WORK/$n/certs"
    local etcd_tls=() enc=(--encryption-provider-config="${NODE_ENC[$n]-$WORK/$n/encryption-config.yaml}")
    [[ -n ${NODE_ENC[$n]-x} ]] || enc=()
    # shellcheck disable=SC2206 # paths without spaces
    [[ -n ${NODE_ETCD_TLS[$n]:-} ]] && etcd_tls=(${NODE_ETCD_TLS[$n]})
    start_proc "kube-apiserver-$n" "$KUBE_APISERVER" \
        --etcd-servers="${NODE_ETCD[$n]:-$ETCD_URL}" --etcd-prefix="${NODE_PREFIX[$n]}" "${etcd_tls[@]}" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="${NODE_PORT[$n]}" \
        --cert-dir="$WORK/$n/certs" --tls-cert-file="$PKI/serving.crt" --tls-private-key-file="$PKI/serving.key" \
        --client-ca-file="$PKI/ca.crt" \
        --service-account-issuer=https://kubernetes.default.svc \
        --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
        --service-cluster-ip-range=10.96.0.0/24 --endpoint-reconciler-type=none \
        --authorization-mode=RBAC --profiling=false \
        "${enc[@]}" --v=2
    if check "node $n: kube-apiserver $K8S_VERSION ready on :${NODE_PORT[$n]} (/readyz ok)" wait_up 180 "kube-apiserver-$n" readyz_ok "$n" ""; then
        timing "kube-apiserver $n start to /readyz ok: $(since "$t")s"
    else
        tail -5 "$LOGS/kube-apiserver-$n.log" | sed 's/^/     | /'
        return 1
    fi
}

# readyz_ok NODE [CHECK]: /readyz or /readyz/CHECK answers "ok".
readyz_ok() { [[ $(kc "$1" get --raw "/readyz${2:+/$2}" 2>/dev/null) == ok ]]; }
readyz_fails() { ! kc "$1" get --raw "/readyz/$2" >/dev/null 2>&1; }

setup_node() { # NODE KIND PORT ETCD_PREFIX
    NODE_KIND[$1]=$2 NODE_PORT[$1]=$3 NODE_PREFIX[$1]=$4
    mkdir -p "$WORK/$1"
    chmod 700 "$WORK/$1"
    encryption_config "$1"
    kubeconfig "$1"
}

# ---------------------------------------------------------------- data

# create_secrets NODE NAMESPACE NAME-PREFIX FROM TO: labelled Secrets whose
# value is "$MARKER-<name>"; adds them to TOTAL.
create_secrets() {
    local n=$1 ns=$2 p=$3 i f=$WORK/secrets-$RANDOM.yaml count
    {
        echo "apiVersion: v1"
        echo "kind: List"
        echo "items:"
        for ((i = $4; i <= $5; i++)); do
            printf -- '- apiVersion: v1\n  kind: Secret\n  type: Opaque\n  metadata: {name: %s-%04d, namespace: %s, labels: {kekd-e2e: "1"}}\n  stringData: {token: "%s-%s-%04d"}\n' \
                "$p" "$i" "$ns" "$MARKER" "$p" "$i"
        done
    } >"$f"
    count=$(kc "$n" create -f "$f" -o name 2>>"$LOGS/kubectl.log" | grep -c '^secret/')
    rm -f "$f"
    local prefix=${NODE_PREFIX[$n]}
    TOTAL[$prefix]=$((${TOTAL[$prefix]:-0} + count))
    [[ $count == $(($5 - $4 + 1)) ]]
}

create_configmaps() { # NODE NAMESPACE COUNT
    local n=$1 i f=$WORK/configmaps.yaml
    {
        echo "apiVersion: v1"
        echo "kind: List"
        echo "items:"
        for ((i = 1; i <= $3; i++)); do
            printf -- '- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: cm-%04d, namespace: %s, labels: {kekd-e2e: "1"}}\n  data: {token: "%s-cm-%04d"}\n' \
                "$i" "$2" "$MARKER" "$i"
        done
    } >"$f"
    [[ $(kc "$n" create -f "$f" -o name 2>>"$LOGS/kubectl.log" | grep -c '^configmap/') == "$3" ]]
}

# verify_reads NODE: every labelled Secret reads back with its own value, and
# there are exactly TOTAL of them. Prints a reason on failure.
verify_reads() {
    local n=$1 out expected=${TOTAL[${NODE_PREFIX[$1]}]:-0} got bad
    if ! out=$(kc "$n" get secrets -A -l kekd-e2e -o go-template \
        --template='{{range .items}}{{.metadata.name}} {{index .data "token" | base64decode}}{{"\n"}}{{end}}' 2>&1); then
        REASON="kubectl get secrets failed: $(echo "$out" | tail -1)"
        return 1
    fi
    got=$(grep -c . <<<"$out")
    bad=$(awk -v m="$MARKER" '$2 != m"-"$1' <<<"$out" | grep -c .)
    if [[ $got != "$expected" || $bad != 0 ]]; then
        REASON="read $got Secrets (expected $expected), $bad with a wrong value"
        return 1
    fi
}

# verify_gets NODE: GETs every Secret of steps 1 and 2 by name. A GET without
# resourceVersion is read from etcd and decrypted (the LISTs of verify_reads
# come from the apiserver's watch cache). e2ehelper does the GETs: kubectl's
# client-side rate limit (5/s) would make 220 of them take 40 s.
verify_gets() {
    local n=$1 half=$((N_SECRETS / 2)) out
    # shellcheck disable=SC2046
    out=$("$HELPER" gets --server "https://127.0.0.1:${NODE_PORT[$n]}" --ca "$PKI/ca.crt" \
        --cert "$PKI/admin.crt" --key "$PKI/admin.key" --marker "$MARKER" \
        $(seq -f 'default/s-%04g' 1 "$half") $(seq -f 'kekd-e2e/s-%04g' $((half + 1)) "$N_SECRETS") \
        $(seq -f 'kekd-e2e/r-%04g' 1 20) 2>&1) || { REASON="$(head -2 <<<"$out" | tr '\n' ' ')$(tail -1 <<<"$out")"; return 1; }
}

verify_configmaps() { # NODE COUNT
    local out
    out=$(kc "$1" get configmaps -A -l kekd-e2e -o go-template \
        --template='{{range .items}}{{.metadata.name}} {{.data.token}}{{"\n"}}{{end}}' 2>&1) || return 1
    [[ $(grep -c . <<<"$out") == "$2" && $(awk -v m="$MARKER" '$2 != m"-"$1' <<<"$out" | grep -c .) == 0 ]]
}

# scan NODE RESOURCE: "KEY VERDICT KEY_ID SOURCE_TYPE" per stored object, read raw from etcd.
scan() {
    etcdctl get --prefix "${NODE_PREFIX[$1]}/$2/" -w json | "$HELPER" scan --provider kekd --marker "$MARKER"
}

# assert_stored NODE RESOURCE MIN_COUNT KEY_ID: every stored object of that
# resource starts with k8s:enc:kms:v2:kekd:, parses as an EncryptedObject, does
# not contain its plaintext, and carries KEY_ID ("" = any).
assert_stored() {
    local n=$1 res=$2 min=$3 kid=$4 out total ok wrongkid
    out=$(scan "$n" "$res")
    total=$(grep -c . <<<"$out")
    ok=$(awk -F'\t' '$2=="ok"' <<<"$out" | grep -c .)
    wrongkid=$(awk -F'\t' -v k="$kid" 'k!="" && $3!=k' <<<"$out" | grep -c .)
    local summary
    summary=$(awk -F'\t' '{c[$2" "$3]++} END{for (k in c) printf "%s×%d; ", k, c[k]}' <<<"$out")
    if ((total >= min)) && [[ $ok == "$total" && $wrongkid == 0 ]]; then
        pass "etcd: all $total $res under ${NODE_PREFIX[$n]}/$res/ start with k8s:enc:kms:v2:kekd:, hold no plaintext${kid:+, key_id $kid}"
    else
        fail "etcd: $res under ${NODE_PREFIX[$n]}/$res/: $total stored (want ≥ $min), $ok encrypted, $wrongkid not under ${kid:-any}: $summary"
        awk -F'\t' -v k="$kid" '$2!="ok" || (k!="" && $3!=k)' <<<"$out" | head -5 | sed 's/^/     | /'
        return 1
    fi
}

stored_key_id() { # NODE RESOURCE NAMESPACE NAME
    etcdctl get "${NODE_PREFIX[$1]}/$2/$3/$4" -w json | "$HELPER" scan --provider kekd --marker "$MARKER" | awk -F'\t' '{print $2 == "ok" ? $3 : "INVALID:" $2}'
}

sha() { printf 'sha256:%s' "$(printf '%s' "$1" | sha256sum | cut -d' ' -f1)"; }

# status_saw NODE KEY_ID: the apiserver recorded KEY_ID from a Status call
# (apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds).
status_saw() {
    kc "$1" get --raw /readyz/kms-providers >/dev/null 2>&1 # a probe calls Status (cached 20 s)
    kc "$1" get --raw /metrics 2>/dev/null |
        grep '^apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{' |
        grep -q "key_id_hash=\"$(sha "$2")\""
}
to_storage_seen() {
    kc "$1" get --raw /metrics 2>/dev/null | grep '^apiserver_envelope_encryption_key_id_hash_total{' |
        grep 'transformation_type="to_storage"' | grep -q "key_id_hash=\"$(sha "$2")\""
}
decrypt_calls() {
    kc "$1" get --raw /metrics 2>/dev/null |
        awk '/^apiserver_envelope_encryption_kms_operations_latency_seconds_count\{/ && /Decrypt/ {s += $NF} END {print s + 0}'
}

PROBE_SEQ=0 LAST_KID=
# new_write NODE: creates one labelled Secret; LAST_KID = the key_id etcd shows for it.
new_write() {
    local n=$1 name
    PROBE_SEQ=$((PROBE_SEQ + 1)) LAST_KID=
    create_secrets "$n" default "probe-$n" "$PROBE_SEQ" "$PROBE_SEQ" || return 1
    name=$(printf 'probe-%s-%04d' "$n" "$PROBE_SEQ")
    LAST_KID=$(stored_key_id "$n" secrets default "$name")
}
writes_under() { new_write "$1" && [[ $LAST_KID == "$2" ]]; }

# wait_rotation NODE KEY_ID: the apiserver saw KEY_ID in Status and new writes carry it.
wait_rotation() {
    local n=$1 kid=$2 t
    t=$(now)
    if check "node $n: kube-apiserver saw key_id $kid in Status (metric key_id_hash_status_last_timestamp_seconds)" \
        wait_for 90 status_saw "$n" "$kid"; then
        timing "node $n: rotation to $kid noticed by the apiserver after $(since "$t")s"
    else
        return 1
    fi
    check "node $n: new writes are stored under $kid" wait_for 30 writes_under "$n" "$kid"
}

# migrate NODE: rewrites stale Secrets and ConfigMaps; retries on conflicts.
migrate() {
    local n=$1 res try ok
    for res in secrets configmaps; do
        for try in 1 2 3; do
            if kc "$n" get "$res" -A -o json 2>>"$LOGS/kubectl.log" | kc "$n" replace -f - >>"$LOGS/migrate.log" 2>&1; then
                ok=1 && break
            fi
            ok=0
            info "kubectl replace of $res reported errors (try $try, see $LOGS/migrate.log)"
            sleep 1
        done
        check "node $n: \`kubectl get $res -A -o json | kubectl replace -f -\` succeeded" test "$ok" = 1
    done
}

# ---------------------------------------------------------------- steps 1-4

# KID[node:version] = key_id
declare -A KID=()

step1() { # NODE LABEL
    local n=$1 t v1
    begin_step "$2" "encrypt: 200 Secrets through kekd (${NODE_KIND[$n]} backend)"
    check "node $n: /readyz/kms-providers is ok" wait_for 60 readyz_ok "$n" kms-providers || return 1
    v1=$(primary_of "$n")
    KID[$n:1]=$(key_id "$n" "$v1")
    info "kekd primary: version $v1, key_id ${KID[$n:1]}"
    check "node $n: kekd's Status answers key_id ${KID[$n:1]}" serving_is "$n" "${KID[$n:1]}"
    kc "$n" create namespace kekd-e2e >>"$LOGS/kubectl.log" 2>&1
    t=$(now)
    local half=$((N_SECRETS / 2))
    check "created $N_SECRETS Secrets ($half in default, $((N_SECRETS - half)) in kekd-e2e) with kubectl create" \
        create_two_halves "$n" "$half"
    timing "node $n: created $N_SECRETS Secrets in $(since "$t")s"
    check "created 10 ConfigMaps" create_configmaps "$n" kekd-e2e 10
    assert_stored "$n" secrets "$N_SECRETS" "${KID[$n:1]}"
    assert_stored "$n" configmaps 10 "${KID[$n:1]}"
    info "the bytes etcd holds for default/s-0001 (first 96):"
    etcdctl get "${NODE_PREFIX[$n]}/secrets/default/s-0001" --print-value-only | head -c 96 | od -An -c | head -6 | sed 's/^/     | /'
    check "kubectl get returns the value of all ${TOTAL[${NODE_PREFIX[$n]}]} Secrets" verify_reads "$n"
    check "kubectl get returns the value of all 10 ConfigMaps" verify_configmaps "$n" 10
}

create_two_halves() {
    create_secrets "$1" default s 1 "$2" && create_secrets "$1" kekd-e2e s $(($2 + 1)) "$N_SECRETS"
}

step2() { # NODE LABEL
    local n=$1 old new
    begin_step "$2" "rotate: kekd admin rotate --promote; the apiserver follows"
    old=$(primary_of "$n")
    KID[$n:old]=$(key_id "$n" "$old")
    check "node $n: kekd admin rotate --promote" kekd_admin "$n" rotate --promote >>"$LOGS/admin.log" 2>&1 || return 1
    new=$(primary_of "$n")
    KID[$n:2]=$(key_id "$n" "$new")
    OLD_V[$n]=$old
    check "version $new is primary, version $old decrypt-only" \
        test "$(state_of "$n" "$new")/$(state_of "$n" "$old")" = primary/decrypt-only
    check "kekd's Status switched to ${KID[$n:2]} without a restart" wait_for 15 serving_is "$n" "${KID[$n:2]}"
    wait_rotation "$n" "${KID[$n:2]}" || return 1
    local before=${TOTAL[${NODE_PREFIX[$n]}]}
    create_secrets "$n" kekd-e2e r 1 20 || fail "creating 20 Secrets after the rotation"
    local kids
    kids=$(for i in $(seq 1 20); do stored_key_id "$n" secrets kekd-e2e "$(printf 'r-%04d' "$i")"; done | sort | uniq -c | awk '{printf "%s×%s ", $2, $1}')
    check "20 new Secrets are stored under ${KID[$n:2]} ($kids)" test "$kids" = "${KID[$n:2]}×20 "
    check "apiserver metric key_id_hash_total{to_storage} counts ${KID[$n:2]}" to_storage_seen "$n" "${KID[$n:2]}"
    check "all $((before + 20)) Secrets read (old ones through decrypt-only version $old)" verify_reads "$n"
}
declare -A OLD_V=()

step3() { # NODE LABEL
    local n=$1 old=${OLD_V[$1]:-1} t saved_old saved_new
    begin_step "$2" "migrate, retire the old version, restart kube-apiserver (cold cache)"
    # Keep the bytes of one value under the old key to prove retirement below.
    saved_old=$WORK/$n/s-0001.old saved_new=$WORK/$n/s-0001.new
    etcdctl get "${NODE_PREFIX[$n]}/secrets/default/s-0001" -w json | "$HELPER" value >"$saved_old"
    migrate "$n"
    assert_stored "$n" secrets "$N_SECRETS" "${KID[$n:2]}"
    assert_stored "$n" configmaps 10 "${KID[$n:2]}"
    etcdctl get "${NODE_PREFIX[$n]}/secrets/default/s-0001" -w json | "$HELPER" value >"$saved_new"
    local out rc scan=$WORK/$n/scan-step3.json
    out=$(kekd_admin "$n" retire "$old" 2>&1)
    rc=$?
    check "retire $old without --scan is refused (exit 1: it was primary, so Decrypt counts prove nothing)" test "$rc" = 1
    echo "$out" | head -2 | cut -c1-400 | sed 's/^/     | /'
    check "…and the refusal gives the procedure: rewrite secrets and configmaps, scan, retire --scan" \
        grep -qF "kubectl get configmaps -A -o json | kubectl replace -f -" <<<"$out"
    # The procedure the hint printed: migrated above, now scan and retire with it.
    check "kekd admin scan --etcd-endpoints $ETCD_URL --prefix ${NODE_PREFIX[$n]}/ --output json > scan.json" \
        scan_to "$n" "$scan" || return 1
    check "kekd admin retire $old --scan scan.json" kekd_admin "$n" retire "$old" --scan "$scan" >>"$LOGS/admin.log" 2>&1
    check "version $old is retired" test "$(state_of "$n" "$old")" = retired
    sleep 3 # kekd reloads within reload_interval (200 ms local, 2 s pkcs11)
    t=$(now)
    stop_proc "kube-apiserver-$n" TERM
    start_apiserver "$n" || return 1
    check "cold cache: all ${TOTAL[${NODE_PREFIX[$n]}]} Secrets read after the restart (LIST)" verify_reads "$n"
    if check "cold cache: GET of each Secret by name (from etcd)" verify_gets "$n"; then
        timing "node $n: kube-apiserver restart to every Secret read (cold cache): $(since "$t")s, $(decrypt_calls "$n") Decrypt calls"
    fi
    check "cold cache: all 10 ConfigMaps read" verify_configmaps "$n" 10
    # A value still under the retired version must not read any more.
    etcdctl put "${NODE_PREFIX[$n]}/secrets/default/s-0001" <"$saved_old" >/dev/null
    check "a value put back under retired version $old no longer reads (kekd refuses it)" \
        wait_for 15 not_readable "$n" default s-0001
    etcdctl put "${NODE_PREFIX[$n]}/secrets/default/s-0001" <"$saved_new" >/dev/null
    # The watch events of both puts carry the undecryptable value (as object or
    # previous object): the apiserver's watch retries them until etcd compacts
    # them away, which it does every 5 minutes. Compact now, so the steps that
    # follow see a healthy watch cache.
    local rev
    rev=$(etcdctl get "${NODE_PREFIX[$n]}/secrets/default/s-0001" -w json | grep -o '"revision":[0-9]*' | head -1 | cut -d: -f2)
    etcdctl compact "$rev" >/dev/null 2>&1
    check "the current value reads again" wait_for 30 verify_reads "$n"
}
write_and_read() { writes_under "$1" "$2" && [[ $(read_token "$1" default "$(printf 'probe-%s-%04d' "$1" "$PROBE_SEQ")") == "$MARKER-$(printf 'probe-%s-%04d' "$1" "$PROBE_SEQ")" ]]; }
# not_readable NODE NS NAME: GET fails, and because kekd refused to decrypt.
not_readable() {
    local out
    if out=$(kc "$1" get secret -n "$2" "$3" -o name 2>&1); then
        REASON="it still reads"
        return 1
    fi
    [[ $out == *rpc\ error* ]] || { REASON="not a KMS error: $out"; return 1; }
    info "apiserver: $(tail -1 <<<"$out" | cut -c1-400)"
}

step4() { # NODE LABEL
    local n=$1 pid t
    begin_step "$2" "kill -9 kekd while kube-apiserver runs; restart it"
    pid=${PIDS[kube-apiserver-$n]}
    kill -s KILL "${PIDS[kekd-$n]}"
    wait "${PIDS[kekd-$n]}" 2>/dev/null
    unset "PIDS[kekd-$n]"
    t=$(now)
    info "kekd killed with SIGKILL; socket file left behind: $([[ -S $WORK/$n/kms.sock ]] && echo yes || echo no)"
    local calls
    calls=$(decrypt_calls "$n")
    check "LIST of all Secrets keeps working (watch cache)" verify_reads "$n"
    check "GET of each of the $((N_SECRETS + 20)) Secrets keeps working (read from etcd, decrypted with cached seeds)" verify_gets "$n"
    check "…without a single KMS call (apiserver Decrypt calls stay at $calls)" test "$(decrypt_calls "$n")" = "$calls"
    check "a new Secret is written (cached seed, within the apiserver's 3-minute window) and reads back" \
        write_and_read "$n" "${KID[$n:2]}"
    if check "/readyz/kms-providers reports the failure" wait_for 60 readyz_fails "$n" kms-providers; then
        timing "node $n: kekd death reported by /readyz/kms-providers after $(since "$t")s"
        info "/readyz?verbose: $(kc "$n" get --raw '/readyz?verbose' 2>&1 | grep -o '\[-\][^\\]*' | head -3 | tr '\n' ' ')"
    fi
    check "/readyz fails as a whole while kekd is down" readyz_fails "$n" ""
    check "reads still work while readyz fails" verify_reads "$n"
    start_kekd "$n" || return 1
    t=$(now)
    if check "the apiserver recovers: /readyz/kms-providers ok" wait_for 60 readyz_ok "$n" kms-providers; then
        timing "node $n: recovery after kekd restart: $(since "$t")s"
    fi
    check "…without restarting kube-apiserver (same pid $pid, alive)" \
        test "${PIDS[kube-apiserver-$n]}" = "$pid" -a -d "/proc/$pid"
    check "a new write after the recovery is stored under ${KID[$n:2]}" writes_under "$n" "${KID[$n:2]}"
    check "all Secrets read (LIST, and GET of each)" verify_reads_and_gets "$n"
}
verify_reads_and_gets() { verify_reads "$1" && verify_gets "$1"; }

# ---------------------------------------------------------------- step 5

# cross TAG KID_A KID_B: each apiserver writes a Secret; the other reads it;
# etcd shows the key ids each node's kekd used.
cross() {
    local tag=$1 ka=$2 kb=$3 got
    if ! { create_secrets a default "x-$tag-a" 1 1 && create_secrets b default "x-$tag-b" 1 1; }; then
        fail "$tag: writing through both apiservers"
        return 1
    fi
    got="$(stored_key_id a secrets default "x-$tag-a-0001") $(stored_key_id b secrets default "x-$tag-b-0001")"
    check "$tag: A writes under $ka, B under $kb (etcd: $got)" test "$got" = "$ka $kb"
    check "$tag: B reads what A wrote, A reads what B wrote" cross_read "$tag"
}
cross_read() {
    [[ $(read_token b default "x-$1-a-0001") == "$MARKER-x-$1-a-0001" &&
        $(read_token a default "x-$1-b-0001") == "$MARKER-x-$1-b-0001" ]]
}
read_token() { kc "$1" get secret -n "$2" "$3" -o go-template --template='{{index .data "token" | base64decode}}' 2>>"$LOGS/kubectl.log"; }

copy_keyring() { # FROM_NODE TO_NODE: what `scp` + `kekd admin import --from` do
    local copy=$WORK/$2/keyring.from-$1
    cp "$WORK/$1/keyring" "$copy"
    kekd_admin "$2" import --from "$copy" >>"$LOGS/admin.log" 2>&1
    local rc=$?
    rm -f "$copy"
    return "$rc"
}
same_versions() { diff <(keyring "$1" | awk '$1 ~ /^[0-9]+$/ {print $1, $2, $3}') <(keyring "$2" | awk '$1 ~ /^[0-9]+$/ {print $1, $2, $3}') >/dev/null; }

step5() {
    begin_step "step 5" "two apiservers on one etcd, each with its own kekd and keyring copy: staged rotation"
    local v2 v3 k2 k3
    setup_node b local "$APISERVER_PORT_B" /registry
    check "node b: kekd admin import --from a copy of node a's keyring" copy_keyring a b || return 1
    check "node b's keyring has node a's versions and states" same_versions a b
    start_kekd b || return 1
    start_apiserver b || return 1
    check "node b: /readyz/kms-providers is ok" wait_for 60 readyz_ok b kms-providers
    v2=$(primary_of a) k2=$(key_id a "$v2")
    check "B (cold) reads all ${TOTAL[/registry]} Secrets written through A" verify_reads b
    cross base "$k2" "$k2"

    check "5.1 rotate on A: kekd admin rotate (pending)" kekd_admin a rotate >>"$LOGS/admin.log" 2>&1 || return 1
    v3=$(keyring a | awk '$2=="pending"{print $1}' | tail -1) k3=$(key_id a "$v3")
    check "A: version $v3 is pending, $v2 still primary" test "$(state_of a "$v3")/$(primary_of a)" = "pending/$v2"
    sleep 1
    cross rotated-on-a "$k2" "$k2"

    check "5.2 import on B: kekd admin import --from A's copy" copy_keyring a b
    check "B: version $v3 is pending" test "$(state_of b "$v3")" = pending
    sleep 1
    cross imported-on-b "$k2" "$k2"

    check "5.3 promote $v3 on A" kekd_admin a promote "$v3" >>"$LOGS/admin.log" 2>&1
    wait_rotation a "$k3"
    cross promoted-on-a "$k3" "$k2"

    check "5.4 promote $v3 on B" kekd_admin b promote "$v3" >>"$LOGS/admin.log" 2>&1
    wait_rotation b "$k3"
    cross promoted-on-b "$k3" "$k3"

    info "5.5 migrate through A"
    migrate a
    assert_stored a secrets "$N_SECRETS" "$k3"
    assert_stored a configmaps 10 "$k3"
    cross migrated "$k3" "$k3"

    check "5.6 retire $v2 --force on A" kekd_admin a retire "$v2" --force >>"$LOGS/admin.log" 2>&1
    check "5.6 retire $v2 --force on B" kekd_admin b retire "$v2" --force >>"$LOGS/admin.log" 2>&1
    check "version $v2 retired on both nodes" test "$(state_of a "$v2")/$(state_of b "$v2")" = retired/retired
    sleep 1
    cross retired "$k3" "$k3"
    stop_proc kube-apiserver-b TERM
    start_apiserver b || return 1
    check "B restarted (cold cache) reads all ${TOTAL[/registry]} Secrets" verify_reads b
    check "A reads all ${TOTAL[/registry]} Secrets" verify_reads a
    cross restarted-b "$k3" "$k3"
}

# ---------------------------------------------------------------- step 8

# scan_q FILE QUERY ARGS...: a number (or word) from a `kekd admin scan
# --output json` document (python3: the run needs no jq).
#   key_id RESOURCE KEY_ID · provider RESOURCE PROVIDER · version V (objects
#   referencing it, then its state) · field NAME
scan_q() {
    python3 - "$@" <<'PY'
import json, sys
f, what, *a = sys.argv[1:]
d = json.load(open(f))
res = {r["resource"]: r for r in d["resources"]}
if what == "key_id":
    print(res.get(a[0], {}).get("key_ids", {}).get(a[1], 0))
elif what == "provider":
    print(res.get(a[0], {}).get("providers", {}).get(a[1], 0))
elif what == "version":
    v = [v for v in d["versions"] if v["keyring_id"] == d["keyring"]["id"] and v["version"] == int(a[0])]
    print(f'{v[0]["objects"] + v[0]["header_mismatches"]} {v[0]["state"]}' if v else "0 -")
elif what == "field":
    print(d[a[0]])
PY
}

# scan_to NODE FILE: `kekd admin scan` of the node's etcd prefix, matched
# against its keyring, as JSON.
scan_to() {
    kekd_admin "$1" scan --etcd-endpoints "$ETCD_URL" --prefix "${NODE_PREFIX[$1]}/" --output json >"$2" 2>>"$LOGS/scan.log"
}

# scan_is FILE QUERY ARGS... WANT: the query answers WANT.
scan_is() {
    local want=${*: -1} got
    got=$(scan_q "${@:1:$#-1}")
    [[ $got == "$want" ]] || { REASON="got $got"; return 1; }
}

create_podtemplates() { # NODE NAMESPACE COUNT
    local n=$1 i f=$WORK/podtemplates.yaml
    {
        echo "apiVersion: v1"
        echo "kind: List"
        echo "items:"
        for ((i = 1; i <= $3; i++)); do
            printf -- '- apiVersion: v1\n  kind: PodTemplate\n  metadata: {name: pt-%04d, namespace: %s}\n  template:\n    metadata: {labels: {app: pt}}\n    spec: {containers: [{name: c, image: "registry.k8s.io/pause:3.10"}]}\n' "$i" "$2"
        done
    } >"$f"
    [[ $(kc "$n" create -f "$f" -o name 2>>"$LOGS/kubectl.log" | grep -c '^podtemplate/') == "$3" ]]
}

# migrate_in NODE NAMESPACE RESOURCE: rewrites one namespace's objects.
migrate_in() { kc "$1" get "$3" -n "$2" -o json 2>>"$LOGS/kubectl.log" | kc "$1" replace -f - >>"$LOGS/migrate.log" 2>&1; }

# count_in NODE RESOURCE AWK_FILTER: objects the apiserver lists, by namespace ($1).
count_in() { kc "$1" get "$2" -A --no-headers 2>>"$LOGS/kubectl.log" | awk "$3" | grep -c .; }

step8() {
    begin_step "step 8" "kekd admin scan of what the apiserver stored: two key versions mid-migration, identity objects; retire --scan"
    local n=a old new k_old k_new f1=$WORK/scan-1.json f2=$WORK/scan-2.json out rc
    if ! command -v python3 >/dev/null; then
        missing "python3 is not installed (step 8 reads the scan's JSON with it)"
        return 0
    fi
    # Node b (step 5) has its own keyring copy and would not learn the new
    # version: this step concerns node a alone.
    stop_proc kube-apiserver-b
    stop_proc kekd-b
    old=$(primary_of $n) k_old=$(key_id $n "$old")
    kc $n create namespace kekd-scan >>"$LOGS/kubectl.log" 2>&1
    check "created 3 PodTemplates (not in the EncryptionConfiguration: stored as identity)" \
        create_podtemplates $n kekd-scan 3
    check "node $n: kekd admin rotate --promote" kekd_admin $n rotate --promote >>"$LOGS/admin.log" 2>&1 || return 1
    new=$(primary_of $n) k_new=$(key_id $n "$new")
    wait_rotation $n "$k_new" || return 1
    check "created 10 Secrets in kekd-scan under $k_new" create_secrets $n kekd-scan n 1 10
    # Half a migration: only namespace default's Secrets are rewritten.
    check "half a migration: \`kubectl get secrets -n default -o json | kubectl replace -f -\`" \
        migrate_in $n default secrets
    local s_all s_new s_old cm
    s_all=$(count_in $n secrets '1')
    # shellcheck disable=SC2016 # an awk program
    s_new=$(count_in $n secrets '$1 == "default" || $1 == "kekd-scan"')
    s_old=$((s_all - s_new))
    cm=$(count_in $n configmaps '1')
    info "the apiserver lists $s_all Secrets ($s_new in default and kekd-scan, $s_old elsewhere) and $cm ConfigMaps"

    local t
    t=$(now)
    check "kekd admin scan --etcd-endpoints $ETCD_URL --prefix ${NODE_PREFIX[$n]}/ --keyring …" scan_to $n "$f1" || return 1
    timing "scan of ${NODE_PREFIX[$n]}/ ($(scan_q "$f1" field keys) keys, $(scan_q "$f1" field pages) pages): $(since "$t")s"
    "$KEKD" admin scan --etcd-endpoints "$ETCD_URL" --prefix "${NODE_PREFIX[$n]}/" --keyring "$WORK/$n/keyring" 2>&1 |
        grep -E '^(scan of|secrets|configmaps|podtemplates) |^ +[0-9]+ +[a-z-]+ ' | sed 's/^/     | /'
    check "scan: the keys it read are the keys etcd counted at its revision" \
        test "$(scan_q "$f1" field keys)" = "$(scan_q "$f1" field expected_keys)"
    check "scan: $s_new Secrets under $k_new (default migrated + 10 new)" scan_is "$f1" key_id secrets "$k_new" "$s_new"
    check "scan: $s_old Secrets still under $k_old (not migrated yet)" scan_is "$f1" key_id secrets "$k_old" "$s_old"
    check "scan: all $s_all Secrets are kms:v2:kekd" scan_is "$f1" provider secrets kms:v2:kekd "$s_all"
    check "scan: all $cm ConfigMaps still under $k_old" scan_is "$f1" key_id configmaps "$k_old" "$cm"
    check "scan: 3 PodTemplates stored as identity" scan_is "$f1" provider podtemplates identity 3
    check "scan: version $old (decrypt-only) is needed by $((s_old + cm)) objects" \
        scan_is "$f1" version "$old" "$((s_old + cm)) decrypt-only"
    check "scan: version $new (primary) by $s_new" scan_is "$f1" version "$new" "$s_new primary"
    check "scan: no value in an unknown form, no key id/header mismatch" \
        test "$(scan_q "$f1" field unparseable_total)/$(scan_q "$f1" field mismatch_total)" = 0/0
    if ((old > 1)); then
        check "scan: version 1 (retired in step 3) is needed by no object" scan_is "$f1" version 1 "0 retired"
    fi

    out=$(kekd_admin $n retire "$old" --scan "$f1" --force 2>&1)
    rc=$?
    check "retire $old --scan (even with --force) is refused while objects reference it (exit 1)" test "$rc" = 1
    echo "$out" | head -2 | cut -c1-600 | sed 's/^/     | /'
    check "…naming how many, the keys and the migration command" \
        grep -q "$((s_old + cm)) stored object(s) under ${NODE_PREFIX[$n]}/ still reference version $old .*e\.g\. ${NODE_PREFIX[$n]}/.*\`kubectl get configmaps,secrets -A -o json | kubectl replace -f -\`" <<<"$out"
    check "version $old is still $(state_of $n "$old")" test "$(state_of $n "$old")" = decrypt-only

    migrate $n
    check "kekd admin scan after the migration" scan_to $n "$f2" || return 1
    check "scan: all $s_all Secrets under $k_new" scan_is "$f2" key_id secrets "$k_new" "$s_all"
    check "scan: version $old is needed by no object" scan_is "$f2" version "$old" "0 decrypt-only"
    out=$(kekd_admin $n retire "$old" --scan "$f2" --force 2>&1)
    rc=$?
    check "retire $old --scan --force with the fresh scan succeeds (exit 0)" test "$rc" = 0
    echo "$out" | head -2 | cut -c1-400 | sed 's/^/     | /'
    check "version $old is retired" test "$(state_of $n "$old")" = retired
    check "all ${TOTAL[${NODE_PREFIX[$n]}]} labelled Secrets still read" wait_for 30 verify_reads $n
}

# ---------------------------------------------------------------- step 7

step7() {
    begin_step "step 7" "our deploy/kekd-static-pod.yaml is accepted by this apiserver"
    local f=$ROOT/deploy/kekd-static-pod.yaml out
    if [[ ! -f $f ]]; then
        fail "deploy/kekd-static-pod.yaml does not exist"
        return 1
    fi
    # The ServiceAccount admission plugin looks up kube-system/default, which
    # kube-controller-manager (not run here) would have created.
    kc a create serviceaccount default -n kube-system >>"$LOGS/kubectl.log" 2>&1
    if out=$(kc a create --dry-run=server -f "$f" -o name 2>&1); then
        pass "kubectl create --dry-run=server -f deploy/kekd-static-pod.yaml: $out"
    else
        fail "kubectl create --dry-run=server -f deploy/kekd-static-pod.yaml: $out"
    fi
}

# ---------------------------------------------------------------- step 6

setup_hsm_node() {
    local n=h d=$WORK/h
    setup_node h pkcs11 "$APISERVER_PORT_H" /kekd-e2e-hsm
    mkdir -p "$d/tokens" "$d/state"
    printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$d" >"$d/softhsm2.conf"
    SOFTHSM2_CONF=$d/softhsm2.conf softhsm2-util --init-token --free --label kekd --pin 1234 --so-pin 123456 \
        >>"$LOGS/softhsm.log" 2>&1 || { fail "softhsm2-util --init-token"; return 1; }
    (umask 077 && printf '1234\n' >"$d/pin")
    # OUR deploy/kekd-pkcs11.toml with only its paths rewritten.
    sed -e "s#^socket = \"/var/run/kekd/kms.sock\"#socket = \"$d/kms.sock\"#" \
        -e "s#^pin_file = \"/etc/kekd/pin\"#pin_file = \"$d/pin\"#" \
        -e "s#^state_dir = \"/var/lib/kekd\"#state_dir = \"$d/state\"#" \
        "$ROOT/deploy/kekd-pkcs11.toml" >"$d/kekd.toml"
    local changed
    changed=$(diff "$ROOT/deploy/kekd-pkcs11.toml" "$d/kekd.toml" | grep -c '^>')
    check "node h: deploy/kekd-pkcs11.toml copied with only socket, pin_file, state_dir rewritten ($changed lines)" \
        test "$changed" = 3
    check "node h: kekd admin init --config (KEK generated in the SoftHSM token)" \
        kekd_admin h init >>"$LOGS/admin.log" 2>&1
}

# ---------------------------------------------------------------- step 9

# Every command block of docs/runbook.md and docs/rotation.md, verbatim: only
# the paths of tests/e2e/README.md's table are substituted (docblocks.py),
# and scp, ssh and systemctl are shims on PATH. Two nodes, node1 (kekd as the
# systemd unit + kube-apiserver on a TLS etcd, kubeadm's certificate paths)
# and node2 (a keyring: install step 2, the HA rollout); each has a root
# $WORK/NODE/fs for /etc/kekd, /etc/kubernetes, /root, … and runs the blocks
# from $WORK/NODE/src, which holds `kekd` and a copy of deploy/.

DOCS_FILES=(docs/runbook.md docs/rotation.md)
declare -A DOC_NEXT=() DOC_RAN=()
DOC_OUT=

# doc_exec NODE SCRIPT OUT ERR: runs one substituted command as the operator on NODE.
doc_exec() {
    (cd "$WORK/$1/src" && PATH="$WORK/docs/bin:$PATH" DOCS_DIR=$WORK DOCS_NODE=$1 DOCS_LOGS=$LOGS \
        KUBECONFIG=$WORK/$1/fs/etc/kubernetes/admin.conf KEKD_BACKUP_PASSPHRASE=$DOCS_PASS \
        bash -o pipefail "$2") >"$3" 2>"$4" </dev/null
}

# doc_try NODE ID: runs every command of the block; a command ending in
# `# ok` or `# <number>` must print exactly that, any other must exit 0.
doc_try() {
    local n=$1 c r out rc want
    DOC_OUT=
    for c in "$WORK/docs/blocks/$2"/*.cmd; do
        r=${c%.cmd}
        python3 "$E2E_DIR/docblocks.py" subst "$WORK/docs/subst.json" "$n" <"$c" >"$r.run"
        doc_exec "$n" "$r.run" "$r.out" "$r.err"
        rc=$?
        { echo "--- $n \$ $(cat "$r.run")"; cat "$r.out" "$r.err"; echo "--- exit $rc"; } >>"$LOGS/docs.log"
        out=$(cat "$r.out")
        DOC_OUT+=$out$'\n'
        if [[ -f $r.expect ]]; then
            want=$(cat "$r.expect")
            [[ $out == "$want" ]] || { REASON="\`$(head -1 "$c")\` printed '$(head -c 200 <<<"$out")' (exit $rc), the doc says $want"; return 1; }
        elif ((rc != 0)); then
            REASON="\`$(head -1 "$c")\` exited $rc: $(tail -3 "$r.err" | head -c 400)"
            return 1
        fi
    done
}

# doc_block NODE FILE PREFIX [RETRY_SECONDS [CHECK ARGS...]]: runs the next
# block of FILE (in document order; marked blocks are passed over), which
# must start with PREFIX, on NODE. With RETRY_SECONDS the block is run again
# until it and CHECK (which reads DOC_OUT) pass, as the doc says to.
doc_block() {
    local n=$1 file=$2 prefix=$3 retry=${4:-0} i id line skip first deadline ids
    shift 3
    (($#)) && shift
    mapfile -t ids < <(awk -F'\t' -v f="$file" '$2 == f {print $1 "\t" $3 "\t" $4 "\t" $5}' "$WORK/docs/blocks/index.tsv")
    i=${DOC_NEXT[$file]:-0}
    while ((i < ${#ids[@]})); do
        IFS=$'\t' read -r id line skip first <<<"${ids[i]}"
        [[ $skip == - ]] && break
        info "$file:$line: marked not run ($skip)"
        i=$((i + 1))
    done
    if ((i >= ${#ids[@]})); then
        fail "$file: no command block left; the scenario expected \`$prefix…\`"
        return 1
    fi
    DOC_NEXT[$file]=$((i + 1))
    if [[ $first != "$prefix"* ]]; then
        fail "$file:$line: the next command block is \`$first\`, step 9 expected \`$prefix…\` (the doc changed: update step9)"
        return 1
    fi
    deadline=$(($(date +%s) + retry))
    until doc_try "$n" "$id" && { (($# == 0)) || "$@"; }; do
        if (($(date +%s) >= deadline)); then
            fail "$file:$line on $n: \`$first\` — $REASON"
            return 1
        fi
        sleep 1
    done
    DOC_RAN[$id]=1
    pass "$file:$line on $n: \`$first\`$(((${#ids[@]} > 0)) && n_cmds "$id")"
}
n_cmds() {
    local c
    c=$(find "$WORK/docs/blocks/$1" -name '*.cmd' | wc -l)
    ((c > 1)) && echo " (+$((c - 1)) more)"
}

# Checks of what a block printed (DOC_OUT).
out_has() { grep -qF -- "$1" <<<"$DOC_OUT" || { REASON="its output lacks '$1'"; return 1; }; }
# primary_encrypts V: `kekd admin list` shows V primary with ENCRYPTS >= 1.
primary_encrypts() {
    awk -v v="$1" '$1 == v && $2 == "primary" && $6 + 0 >= 1 {ok = 1} END {exit !ok}' <<<"$DOC_OUT" ||
        { REASON="version $1 is not yet primary with ENCRYPTS >= 1"; return 1; }
}
probe_all_ok() { # `kekd admin probe` printed an ok line for each call
    [[ $(awk '$1 == "ok" && ($2 == "status" || $2 == "encrypt" || $2 == "decrypt")' <<<"$DOC_OUT" | grep -c .) == 3 ]] ||
        { REASON="not three ok lines (status, encrypt, decrypt)"; return 1; }
}
no_fail() { ! grep -q FAIL <<<"$DOC_OUT" || { REASON="a FAIL line: $(grep -m1 FAIL <<<"$DOC_OUT")"; return 1; }; }
# hexdump -C shows the prefix in its text column, split over lines.
hexdump_kms() { [[ $(grep -o '|.*|' <<<"$DOC_OUT" | tr -d '|\n') == *k8s:enc:kms:v2:kekd:* ]] || { REASON="no k8s:enc:kms:v2:kekd: in the hexdump"; return 1; }; }

docs_keyring() { "$KEKD" admin list --keyring "$WORK/$1/fs/etc/kekd/keyring" --output json 2>>"$LOGS/admin.log" | "$HELPER" kekdlist; }
docs_state() { docs_keyring "$1" | awk -v v="$2" '$1 == v {print $2}'; }
same_keyring() {
    diff <(docs_keyring "$1" | awk '$1 ~ /^[0-9]+$/ {print $1, $2, $3}') <(docs_keyring "$2" | awk '$1 ~ /^[0-9]+$/ {print $1, $2, $3}') >/dev/null ||
        { REASON="node $1 and node $2 list different versions"; return 1; }
}
docs_etcdctl() {
    local p=$WORK/node1/fs/etc/kubernetes/pki
    "$ETCDCTL" --endpoints "$DOCS_ETCD" --cacert "$p/etcd/ca.crt" --cert "$p/apiserver-etcd-client.crt" --key "$p/apiserver-etcd-client.key" "$@"
}
docs_scan() {
    local p=$WORK/node1/fs/etc/kubernetes/pki
    "$KEKD" admin scan --keyring "$WORK/node1/fs/etc/kekd/keyring" --etcd-endpoints "$DOCS_ETCD" --cacert "$p/etcd/ca.crt" \
        --cert "$p/apiserver-etcd-client.crt" --key "$p/apiserver-etcd-client.key" --output json >"$1" 2>>"$LOGS/scan.log"
}
docs_reads() { # the 20 labelled Secrets and 5 ConfigMaps read back with their values
    local s c
    s=$(kc node1 get secrets -n docs -l kekd-docs -o go-template --template='{{range .items}}{{.metadata.name}} {{index .data "token" | base64decode}}{{"\n"}}{{end}}' 2>&1)
    c=$(kc node1 get configmaps -n docs -l kekd-docs -o go-template --template='{{range .items}}{{.metadata.name}} {{.data.token}}{{"\n"}}{{end}}' 2>&1)
    [[ $(awk -v m="$MARKER" '$2 == m"-"$1' <<<"$s" | grep -c .) == 20 && $(awk -v m="$MARKER" '$2 == m"-"$1' <<<"$c" | grep -c .) == 5 ]] ||
        { REASON="secrets: $(grep -c . <<<"$s") read; configmaps: $(grep -c . <<<"$c")"; return 1; }
}
docs_data() { # an existing cluster's data, written before encryption is on
    local f=$WORK/docs/data.yaml i
    {
        echo "apiVersion: v1"
        echo "kind: List"
        echo "items:"
        for ((i = 1; i <= 20; i++)); do
            printf -- '- {apiVersion: v1, kind: Secret, metadata: {name: d-%02d, namespace: docs, labels: {kekd-docs: "1"}}, stringData: {token: "%s-d-%02d"}}\n' "$i" "$MARKER" "$i"
        done
        for ((i = 1; i <= 5; i++)); do
            printf -- '- {apiVersion: v1, kind: ConfigMap, metadata: {name: c-%02d, namespace: docs, labels: {kekd-docs: "1"}}, data: {token: "%s-c-%02d"}}\n' "$i" "$MARKER" "$i"
        done
    } >"$f"
    kc node1 create namespace docs >>"$LOGS/kubectl.log" 2>&1
    [[ $(kc node1 create -f "$f" -o name 2>>"$LOGS/kubectl.log" | grep -c .) == 25 ]]
}

docs_shims() {
    local b=$WORK/docs/bin
    mkdir -p "$b"
    ln -sf "$KEKD" "$b/kekd"
    ln -sf "$KUBECTL" "$b/kubectl"
    ln -sf "$ETCDCTL" "$b/etcdctl"
    cat >"$b/scp" <<'EOF'
#!/usr/bin/env bash
# scp shim (tests/e2e step 9): the substitution made NODE:/path a local path.
for a in "$@"; do
    [[ $a == *:* ]] && { echo "scp shim: $a: a remote path the substitution did not map" >&2; exit 1; }
done
exec cp -- "$@"
EOF
    cat >"$b/ssh" <<'EOF'
#!/usr/bin/env bash
# ssh shim (tests/e2e step 9): `ssh NODE CMD…` runs CMD as on that node.
host=$1
shift
[[ -d $DOCS_DIR/$host/fs ]] || { echo "ssh shim: unknown node $host" >&2; exit 255; }
cd "$DOCS_DIR/$host/src" || exit 255
DOCS_NODE=$host KUBECONFIG=$DOCS_DIR/$host/fs/etc/kubernetes/admin.conf exec bash -o pipefail -c "$*"
EOF
    cat >"$b/systemctl" <<'EOF'
#!/usr/bin/env bash
# systemctl shim (tests/e2e step 9): the node's kekd.service, started from
# its ExecStart line (RuntimeDirectory made as systemd would).
fs=$DOCS_DIR/$DOCS_NODE/fs
pidf=$fs/run/systemd-kekd.pid
unit=$fs/etc/systemd/system/kekd.service
running() { [[ -s $pidf ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; }
start() {
    running && return 0
    [[ -f $unit ]] || { echo "systemctl shim: $unit not installed" >&2; exit 5; }
    local cmd
    cmd=$(sed -n 's/^ExecStart=//p' "$unit")
    install -d -m 0750 "$fs/var/run/kekd"
    # shellcheck disable=SC2086 # ExecStart is split on spaces, as systemd does here
    setsid $cmd >>"$DOCS_LOGS/kekd-$DOCS_NODE.log" 2>&1 </dev/null &
    echo $! >"$pidf"
}
stop() {
    running || return 0
    local pid i
    pid=$(cat "$pidf")
    kill -s TERM "$pid"
    for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidf"
}
words=()
for a in "$@"; do [[ $a == --* ]] || words+=("$a"); done
if [[ ${words[0]} != daemon-reload && ${words[1]%.service} != kekd ]]; then
    echo "systemctl shim: only kekd(.service): $*" >&2
    exit 1
fi
case ${words[0]} in
daemon-reload) ;;
enable) [[ " $* " == *" --now "* ]] && start ;;
start) start ;;
stop) stop ;;
restart) stop && start ;;
status) running && echo "kekd.service: active (running), pid $(cat "$pidf")" || { echo "kekd.service: inactive"; exit 3; } ;;
*) echo "systemctl shim: unsupported: $*" >&2; exit 1 ;;
esac
EOF
    chmod 755 "$b/scp" "$b/ssh" "$b/systemctl"
}

# docs_node NODE OPS_PORT: the node's root and its release directory.
docs_node() {
    local n=$1 fs=$WORK/$1/fs f
    mkdir -p "$fs"/etc/kubernetes/pki/etcd "$fs"/etc/kubernetes/manifests "$fs"/etc/systemd/system \
        "$fs"/root "$fs"/usr/local/bin "$fs"/var/run "$fs"/run "$WORK/$n/src/deploy"
    chmod 700 "$WORK/$n"
    ln -s "$KEKD" "$WORK/$n/src/kekd"
    for f in "$ROOT"/deploy/*; do
        [[ -f $f ]] || continue
        python3 "$E2E_DIR/docblocks.py" subst "$WORK/docs/subst.json" "$n" <"$f" >"$WORK/$n/src/deploy/${f##*/}"
    done
}

docs_pki() { # kubeadm's etcd certificates, under node1's /etc/kubernetes/pki
    local p=$WORK/node1/fs/etc/kubernetes/pki
    (
        cd "$p" || exit 1
        set -e
        ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        # shellcheck disable=SC2086
        openssl req -x509 $ec -keyout etcd/ca.key -out etcd/ca.crt -days 2 -subj /CN=etcd-ca
        # shellcheck disable=SC2086
        openssl req $ec -keyout etcd/server.key -out etcd/server.csr -subj /CN=etcd
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >etcd/server.ext
        openssl x509 -req -in etcd/server.csr -CA etcd/ca.crt -CAkey etcd/ca.key -CAcreateserial -days 2 -extfile etcd/server.ext -out etcd/server.crt
        # shellcheck disable=SC2086
        openssl req $ec -keyout apiserver-etcd-client.key -out client.csr -subj "/O=system:masters/CN=kube-apiserver-etcd-client"
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA etcd/ca.crt -CAkey etcd/ca.key -CAcreateserial -days 2 -extfile client.ext -out apiserver-etcd-client.crt
    ) >>"$LOGS/pki.log" 2>&1
}

docs_etcd_healthy() { docs_etcdctl endpoint health >/dev/null 2>&1; }

step9() {
    begin_step "step 9" "docs/runbook.md and docs/rotation.md: every command block, verbatim, on a real apiserver and etcd"
    if ! command -v python3 >/dev/null || ! command -v openssl >/dev/null; then
        missing "python3 and openssl are needed (docblocks.py; kubeadm-like etcd certificates)"
        return 0
    fi
    local ports t fs1=$WORK/node1/fs p scan=$WORK/docs/scan.json
    mapfile -t ports < <("$HELPER" ports 5)
    DOCS_ETCD=https://127.0.0.1:${ports[0]}
    DOCS_PASS="e2e docs passphrase $RUNID: correct horse battery staple"
    mkdir -p "$WORK/docs"
    printf '{"roots": {"node1": "%s", "node2": "%s"}, "ops": {"node1": %s, "node2": %s}, "etcd": "%s"}\n' \
        "$fs1" "$WORK/node2/fs" "${ports[3]}" "${ports[4]}" "$DOCS_ETCD" >"$WORK/docs/subst.json"
    python3 "$E2E_DIR/docblocks.py" extract "$WORK/docs/blocks" "${DOCS_FILES[@]/#/$ROOT/}" || { fail "docblocks.py extract"; return 1; }
    sed -i "s#\t$ROOT/#\t#" "$WORK/docs/blocks/index.tsv"
    info "$(wc -l <"$WORK/docs/blocks/index.tsv") command blocks in ${DOCS_FILES[*]}; substitutions: $WORK/docs/subst.json"
    docs_shims
    docs_node node1
    docs_node node2
    check "node1: deploy/encryption-config.yaml copy differs only in its endpoint" \
        test "$(diff "$ROOT/deploy/encryption-config.yaml" "$WORK/node1/src/deploy/encryption-config.yaml" | grep -c '^>')" = 1
    check "kubeadm's etcd certificates (etcd/ca.crt, apiserver-etcd-client.crt) made with openssl" docs_pki || return 1
    p=$fs1/etc/kubernetes/pki
    start_proc etcd-docs "$ETCD" --name docs --data-dir "$WORK/etcd-docs" \
        --listen-client-urls "$DOCS_ETCD" --advertise-client-urls "$DOCS_ETCD" \
        --listen-peer-urls "http://127.0.0.1:${ports[1]}" --initial-advertise-peer-urls "http://127.0.0.1:${ports[1]}" \
        --initial-cluster "docs=http://127.0.0.1:${ports[1]}" --unsafe-no-fsync --log-level warn \
        --cert-file "$p/etcd/server.crt" --key-file "$p/etcd/server.key" --trusted-ca-file "$p/etcd/ca.crt" --client-cert-auth
    check "etcd with client-certificate TLS serves $DOCS_ETCD" wait_up 30 etcd-docs docs_etcd_healthy || return 1

    # An existing cluster: the apiserver runs without encryption and holds data.
    NODE_KIND[node1]=local NODE_PORT[node1]=${ports[2]} NODE_PREFIX[node1]=/registry
    NODE_ETCD[node1]=$DOCS_ETCD NODE_ENC[node1]=""
    NODE_ETCD_TLS[node1]="--etcd-cafile=$p/etcd/ca.crt --etcd-certfile=$p/apiserver-etcd-client.crt --etcd-keyfile=$p/apiserver-etcd-client.key"
    kubeconfig node1
    cp "$WORK/node1/kubeconfig" "$fs1/etc/kubernetes/admin.conf"
    start_apiserver node1 || return 1
    check "an existing cluster: 20 Secrets and 5 ConfigMaps written before encryption is on" docs_data || return 1

    local R=docs/runbook.md O=docs/rotation.md
    info "runbook §1 install"
    doc_block node1 $R "install -d -m 0700 /etc/kekd" || return 1
    check "install step 1: the backup is in node1's /root" compgen -G "$fs1/root/kekd-*.backup" >/dev/null
    doc_block node2 $R "install -d -m 0700 /etc/kekd" 0 same_keyring node1 node2 || return 1
    doc_block node1 $R "install -m 0600 deploy/kekd-static-pod.yaml"
    doc_block node1 $R "install -m 0755 kekd /usr/local/bin/kekd" || return 1
    doc_block node1 $R "curl -s http://127.0.0.1:9464/readyz" 30 probe_all_ok || return 1
    doc_block node1 $R "install -D -m 0600 deploy/encryption-config.yaml" || return 1
    doc_block node1 $R "kekd admin doctor" 0 no_fail
    # Install step 6 (kubeadm, the kubelet): the apiserver restarts with the flag,
    # and the kubelet's readiness probe (kubeadm: /readyz every second) runs.
    stop_proc kube-apiserver-node1
    NODE_ENC[node1]=$fs1/etc/kubernetes/enc/encryption-config.yaml
    start_apiserver node1 || return 1
    start_proc kubelet-probe-node1 bash -c "while sleep 1; do '$KUBECTL' --kubeconfig '$WORK/node1/kubeconfig' get --raw /readyz >/dev/null 2>&1; done"
    doc_block node1 $R "kubectl get --raw='/readyz/kms-providers'" 60 || return 1
    local out
    out=$(kc node1 get --raw '/readyz/kms-provider-0' 2>&1)
    check "the check the runbook used to name, /readyz/kms-provider-0, is NotFound on $K8S_VERSION" grep -q NotFound <<<"$out"
    check "/readyz?verbose lists [+]kms-providers ok" grep -qF '[+]kms-providers ok' <<<"$(kc node1 get --raw '/readyz?verbose' 2>&1)"
    check "kekd admin scan: every Secret and ConfigMap is kms:v2:kekd now, none identity" docs_scan "$scan"
    check "scan: secrets and configmaps: 0 identity (install step 7 rewrote what was stored in plaintext)" \
        test "$(scan_q "$scan" provider secrets identity)/$(scan_q "$scan" provider configmaps identity)" = 0/0
    check "…and the 20 + 5 of the existing cluster read back" docs_reads
    info "runbook §2 verify with etcd bytes"
    doc_block node1 $R "kubectl create secret generic x" 0 hexdump_kms
    info "runbook §3 rotate, §4 retire"
    t=$(now)
    doc_block node1 $R "kekd admin rotate --promote" || return 1
    if doc_block node1 $R "kekd admin list --keyring /etc/kekd/keyring" 120 primary_encrypts 2; then
        timing "docs: rotation 1 → 2 confirmed by \`kekd admin list\` (ENCRYPTS ≥ 1) after $(since "$t")s"
    fi
    doc_block node1 $R "kubectl get secrets -A -o json | kubectl replace -f -" || return 1
    check "runbook §4: version 1 is retired" test "$(docs_state node1 1)" = retired
    check "…and every Secret and ConfigMap still reads" docs_reads
    info "runbook §5 back up and restore"
    doc_block node1 $R "kekd admin backup --keyring /etc/kekd/keyring --out /root/kekd-2026-11-28.backup"
    doc_block node1 $R "kekd admin accept-keyring"
    info "rotation.md: one control-plane node"
    t=$(now)
    doc_block node1 $O "kekd admin rotate --promote" || return 1
    if doc_block node1 $O "kekd admin list --keyring /etc/kekd/keyring" 120 primary_encrypts 3; then
        timing "docs: rotation 2 → 3 confirmed by \`kekd admin list\` (ENCRYPTS ≥ 1) after $(since "$t")s"
    fi
    doc_block node1 $O "kubectl get secrets -A -o json | kubectl replace -f -" || return 1
    check "rotation.md: version 2 is retired" test "$(docs_state node1 2)" = retired
    info "rotation.md: several nodes (step 1, \`kekd admin rotate\`, is prose: run here)"
    check "node1: kekd admin rotate (version 4 pending)" "$KEKD" admin rotate --keyring "$fs1/etc/kekd/keyring" >>"$LOGS/admin.log" 2>&1
    doc_block node1 $O "scp /etc/kekd/keyring node2:/root/keyring.new" 0 same_keyring node1 node2
    check "node2: version 4 is pending, the copy is gone" test "$(docs_state node2 4)" = pending -a ! -e "$WORK/node2/fs/root/keyring.new"
    doc_block node1 $O "kekd admin scan --etcd-endpoints" 0 out_has "scan of /registry/"
    # Nothing lost: a restarted apiserver (cold seed cache) reads everything.
    stop_proc kube-apiserver-node1
    start_apiserver node1 || return 1
    check "after all of it, a restarted kube-apiserver reads every Secret and ConfigMap" wait_for 30 docs_reads
    docs_coverage
}

# docs_coverage: a block neither run nor marked is a failure.
docs_coverage() {
    local id file line skip first ran=0 marked=0 missed=0
    while IFS=$'\t' read -r id file line skip first; do
        if [[ -n ${DOC_RAN[$id]:-} ]]; then
            ran=$((ran + 1))
        elif [[ $skip != - ]]; then
            marked=$((marked + 1))
        else
            missed=$((missed + 1))
            fail "$file:$line: command block \`$first\` was not run by step 9 and is not marked <!-- e2e-skip: … -->"
        fi
    done <"$WORK/docs/blocks/index.tsv"
    check "every command block of ${DOCS_FILES[*]} ran ($ran) or is marked not run ($marked)" test "$missed" = 0 -a "$ran" -gt 0
}

# ---------------------------------------------------------------- main

want() { [[ " $STEPS " == *" $1 "* ]]; }

main() {
    echo "kekd end-to-end: kube-apiserver $K8S_VERSION + etcd $ETCD_VERSION + kekd; work dir $WORK"
    build_tools
    begin_step setup "certificates, etcd, node a (kekd + kube-apiserver)"
    make_pki
    start_etcd

    local ok14=0
    if want 1 || want 2 || want 3 || want 4 || want 5 || want 7 || want 8; then
        setup_node a local "$APISERVER_PORT_A" /registry
        check "node a: kekd admin init --keyring" kekd_admin a init >>"$LOGS/admin.log" 2>&1 || finish
        start_kekd a || finish
        start_apiserver a || finish
        if want 1 || want 2 || want 3 || want 4 || want 5 || want 8; then
            if step1 a "step 1" && step2 a "step 2" && step3 a "step 3"; then ok14=1; fi
            end_step
            ((ok14)) || fail "steps 1-3: a step failed, the steps after it were not run"
            if ((ok14)) && want 4; then step4 a "step 4"; end_step; fi
            if ((ok14)) && want 5; then step5; end_step; fi
            if ((ok14)) && want 8; then step8; end_step; fi
        fi
        if want 7; then step7; end_step; fi
        local p
        for p in kube-apiserver-b kekd-b kube-apiserver-a kekd-a; do stop_proc "$p"; done
    fi

    if want 6; then
        begin_step "step 6" "steps 1-4 with the pkcs11 backend on a SoftHSM2 token"
        if ! command -v softhsm2-util >/dev/null || [[ ! -e /usr/lib/softhsm/libsofthsm2.so ]]; then
            missing "softhsm2 is not installed (apt-get install softhsm2)"
        elif setup_hsm_node && start_kekd h && start_apiserver h; then
            end_step
            if step1 h "step 6.1" && step2 h "step 6.2" && step3 h "step 6.3"; then
                step4 h "step 6.4"
            else
                fail "steps 6.1-6.3: a step failed, the steps after it were not run"
            fi
            end_step
        fi
    fi
    if want 9; then
        step9
        end_step
        local q
        for q in kube-apiserver-node1 kubelet-probe-node1 etcd-docs; do stop_proc "$q"; done
        FS=$WORK/node1/fs DOCS_DIR=$WORK DOCS_NODE=node1 "$WORK/docs/bin/systemctl" stop kekd 2>/dev/null
    fi
    finish
}

main "$@"
