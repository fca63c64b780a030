#!/usr/bin/env bash
# The KMS v2 conformance suite: a real `kekd serve` driven only through
# kube-apiserver's own code (k8s.io/apiserver). CI calls this script.
#
# It builds the release binary once (unless KEKD_BIN names one), exports
# KEKD_BIN, and runs `go test` in tests/conformance. Extra arguments go to
# `go test` (e.g. `-run 'TestKMSv2Conformance/local'`). GOFLAGS, GOCACHE,
# GOMODCACHE and CARGO_TARGET_DIR are honoured as usual.
#
# With KEKD_REQUIRE_ALL=1 (CI) a missing component — cargo, go, softhsm2 —
# is a failure; otherwise the affected tests say SKIPPED.
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

cd "$here"
echo "conformance: go test in $here (KEKD_BIN=${KEKD_BIN:-unset})" >&2
# -parallel: the scenarios mostly wait on the apiserver's probe timers
# (20 s health cache, 3 s call timeout), so run them side by side.
exec go test -count=1 -timeout 15m -v -parallel 10 "$@" ./...
