#!/usr/bin/env bash
# The KMS v2 conformance suite: a real `kekd serve` driven only through
# kube-apiserver's own code (k8s.io/apiserver). CI calls this script.
#
# It builds the release binary once (unless KEKD_BIN names one), exports
# KEKD_BIN, and runs a compatibility matrix, one Go module per row:
#
#   k8s.io/apiserver  module                          runs
#   v0.37.x           tests/conformance               the suite
#   v0.32.x           tests/conformance/compat/v0.32  the same suite: its
#                                                     *_test.go are symlinks
#                                                     to ../../*_test.go
#   v0.31.x           tests/conformance/compat/v0.31  a record: that client is
#                                                     refused (h2 :authority)
#
# The compat rows run in the background while the v0.37 suite runs in the
# foreground (the suites mostly wait on the apiserver's probe timers); their
# logs are printed after it, then a summary. Any failing row fails the script.
#
# Extra arguments go to `go test` of the suite rows (v0.37 and v0.32), e.g.
# `-run 'TestKMSv2Conformance/local'`; the v0.31 record always runs whole.
# KEKD_COMPAT=0 runs the v0.37 suite alone (a local shortcut; CI runs all).
# GOFLAGS, GOCACHE, GOMODCACHE and CARGO_TARGET_DIR are honoured as usual.
#
# With KEKD_REQUIRE_ALL=1 (CI) a missing component — cargo, go, softhsm2 —
# or a skipped row is a failure; otherwise the affected tests say SKIPPED.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

fail_or_skip() {
	if [[ "${KEKD_REQUIRE_ALL:-}" == 1 ]]; then
		echo "conformance: FAIL: $1 (KEKD_REQUIRE_ALL=1 forbids skipping)" >&2
		exit 1
	fi
	echo "conformance: SKIPPED: $1" >&2
}

if ! command -v go >/dev/null 2>&1; then
	fail_or_skip "go is not installed: the conformance suite did not run"
	exit 0
fi

if [[ -z "${KEKD_BIN:-}" ]]; then
	if command -v cargo >/dev/null 2>&1; then
		echo "conformance: cargo build --release --locked" >&2
		(cd "$root" && cargo build --release --locked)
		target=${CARGO_TARGET_DIR:-$root/target}
		[[ "$target" == /* ]] || target=$root/$target
		export KEKD_BIN=$target/release/kekd
	fi
	# Without cargo the tests themselves skip (or fail under KEKD_REQUIRE_ALL=1).
else
	KEKD_BIN=$(cd "$(dirname "$KEKD_BIN")" && pwd)/$(basename "$KEKD_BIN")
	export KEKD_BIN
fi

# apiserver_version DIR: the k8s.io/apiserver version DIR's go.mod pins.
apiserver_version() {
	awk '$1 == "k8s.io/apiserver" { print $2; exit } $1 == "require" && $2 == "k8s.io/apiserver" { print $3; exit }' "$1/go.mod"
}

# -parallel: the scenarios mostly wait on the apiserver's probe timers
# (20 s health cache, 3 s call timeout), so run them side by side.
gotest=(go test -count=1 -timeout 15m -v -parallel 10)

logs=$(mktemp -d "${TMPDIR:-/tmp}/kekd-conformance.XXXXXX")
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do
		pkill -TERM -P "$pid" 2>/dev/null || true
		kill "$pid" 2>/dev/null || true
	done
	rm -rf "$logs"
}
trap cleanup EXIT

# Matrix rows, in order: the module directory and what the row is.
rows=("$here")
what=("suite")
compat=1
if [[ "${KEKD_COMPAT:-1}" == 0 ]]; then
	compat=0
else
	rows+=("$here/compat/v0.32" "$here/compat/v0.31")
	what+=("suite" "record: client refused")
fi

rc=() secs=()
# run_row INDEX ARGS…: go test in the row's module; output to the row's log,
# its wall time to $logs/INDEX.secs.
run_row() {
	local i=$1 start=$SECONDS status=0
	shift
	(cd "${rows[i]}" && "${gotest[@]}" "$@" ./...) >"$logs/$i.log" 2>&1 || status=$?
	echo $((SECONDS - start)) >"$logs/$i.secs"
	return "$status"
}
start_row() { # start_row INDEX ARGS…: run_row in the background
	run_row "$@" &
	pids[$1]=$!
}

echo "conformance: KEKD_BIN=${KEKD_BIN:-unset}" >&2
for ((i = 1; i < ${#rows[@]}; i++)); do
	if [[ "${what[i]}" == suite ]]; then
		start_row "$i" "$@"
	else
		start_row "$i"
	fi
	echo "conformance: started k8s.io/apiserver $(apiserver_version "${rows[i]}") (${rows[i]#"$root"/}) in the background" >&2
done

echo "conformance: go test in $here (k8s.io/apiserver $(apiserver_version "$here"))" >&2
start=$SECONDS
set +e
(cd "$here" && exec "${gotest[@]}" "$@" ./...) 2>&1 | tee "$logs/0.log"
rc[0]=${PIPESTATUS[0]}
set -e
secs[0]=$((SECONDS - start))

for ((i = 1; i < ${#rows[@]}; i++)); do
	set +e
	wait "${pids[i]}"
	rc[$i]=$?
	set -e
	unset 'pids[i]'
	secs[i]=$(cat "$logs/$i.secs" 2>/dev/null || echo '?')
	echo
	echo "==== k8s.io/apiserver $(apiserver_version "${rows[i]}") (${rows[i]#"$root"/}): go test exited ${rc[i]} ===="
	cat "$logs/$i.log"
done

# The summary: one line per row, then a closing count.
passed=0 failed=0 skipped=0
echo
echo "conformance matrix (kekd ← kube-apiserver's own KMS v2 code):"
for ((i = 0; i < ${#rows[@]}; i++)); do
	version=$(apiserver_version "${rows[i]}")
	nskip=$(grep -c -- '--- SKIP' "$logs/$i.log" || true)
	npass=$(grep -c -- '--- PASS' "$logs/$i.log" || true)
	if [[ ${rc[i]} -ne 0 ]]; then
		result="FAIL (go test exited ${rc[i]})"
		failed=$((failed + 1))
	elif [[ $npass -eq 0 ]]; then
		result="FAIL (no test passed)"
		failed=$((failed + 1))
	elif [[ $nskip -gt 0 ]]; then
		result="ok, but $nskip test(s) SKIPPED"
		if [[ "${KEKD_REQUIRE_ALL:-}" == 1 ]]; then
			result="FAIL ($nskip test(s) skipped under KEKD_REQUIRE_ALL=1)"
			failed=$((failed + 1))
		else
			passed=$((passed + 1))
		fi
	else
		result="ok"
		passed=$((passed + 1))
	fi
	printf '  %-8s %-24s %-6s %s\n' "$version" "${what[i]}" "${secs[i]}s" "$result"
done
if [[ $compat == 0 ]]; then
	for dir in "$here/compat/v0.32" "$here/compat/v0.31"; do
		if [[ "${KEKD_REQUIRE_ALL:-}" == 1 ]]; then
			result="FAIL (not run: KEKD_COMPAT=0 under KEKD_REQUIRE_ALL=1)"
			failed=$((failed + 1))
		else
			result="SKIPPED (KEKD_COMPAT=0)"
			skipped=$((skipped + 1))
		fi
		printf '  %-8s %-24s %-6s %s\n' "$(apiserver_version "$dir")" "" "-" "$result"
	done
fi
echo "conformance: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
