#!/usr/bin/env bash
# kekd's benchmark, in one command:
#
#   bash benches/run.sh                       full run (~12 min on 2 cores):
#                                             rewrites docs/benchmarks.md's
#                                             generated section and
#                                             docs/benchmarks.png
#   KEKD_BENCH_QUICK=1 bash benches/run.sh    smoke test (~2 min with warm
#                                             caches): every server, every
#                                             scenario for 0.3 s, a 2,000-call
#                                             storm; fails on any error or
#                                             wrong answer; writes its report
#                                             under the cargo target dir
#   KEKD_BENCH_BASELINE_REV=80efd62 bash benches/run.sh
#                                             before and after: also builds
#                                             kekd at that revision and
#                                             measures it in the same run,
#                                             beside the current kekd (below)
#
# It builds the release kekd and the transport floor (cargo), the load
# driver and the Go reference plugin (Go, GOTOOLCHAIN=local), creates a
# local keyring and one SoftHSM2 token shared by kekd-pkcs11 and
# goref-pkcs11, then the driver starts each server in turn and measures it
# through kube-apiserver's own KMS v2 client (benches/driver/main.go says
# what).
# The full run also runs the criterion micro-benchmarks (benches/envelope.rs).
#
# Servers, all on a Unix socket:
#   kekd-local      kekd serve --keyring (AES-256-GCM in process)
#   goref-local     benches/goref: k8s.io/kms/pkg/service + crypto/aes GCM
#   floor           benches/floor: tonic answering without crypto
#   kekd-pkcs11     kekd serve --config (CKM_AES_GCM in the SoftHSM2 token)
#   goref-pkcs11    benches/goref -pkcs11-module: crypto11 on the same token
# and, with a baseline (an older kekd to compare with):
#   kekd-before-local   the baseline's serve --keyring, on a keyring of its
#                       own made by the baseline's admin init
#   kekd-before-pkcs11  the baseline's serve --config, same settings as
#                       kekd-pkcs11 but a token of its own in the same
#                       SoftHSM2 directory, initialised by the baseline (a
#                       token holds the keyring's metadata, whose format two
#                       versions need not share)
# The report then pairs each kekd server with its kekd-before twin (ratios of
# throughput, p50, p99 and CPU per call, start, storm, RSS) and the plot
# draws the baseline in a lighter shade of its twin's colour.
#
# Environment: KEKD_BENCH_QUICK=1 (smoke), KEKD_BENCH_ONLY=name,name (run
# some servers; the docs are then not rewritten), KEKD_BENCH_DOCS=1 (let a
# quick or partial run rewrite docs/ anyway), KEKD_BENCH_ARGS (more driver
# flags, e.g. "-duration 3s -rounds 3"), KEKD_BENCH_NO_BUILD=1 (use the
# release binaries already built, to iterate on the Go side), KEKD_REQUIRE_ALL=1 (CI: a missing SoftHSM2 or
# Go is a failure, not a skip), KEKD_BENCH_BASELINE=/path/to/an/older/kekd
# (add the kekd-before servers) or KEKD_BENCH_BASELINE_REV=<git rev> (the
# same, with kekd built at that revision: a git worktree in a temp dir,
# cargo build --release --locked into $CARGO_TARGET_DIR/baseline, the
# worktree removed after; with KEKD_BENCH_NO_BUILD=1 a build of the same
# revision already there is reused). A baseline run writes its report under
# the target dir; only KEKD_BENCH_DOCS=1 lets it rewrite docs/.
# CARGO_TARGET_DIR, GOCACHE, GOMODCACHE are honoured.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
quick=${KEKD_BENCH_QUICK:-0}
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

say() { echo "bench: $*" >&2; }
fail_or_skip() {
	if [[ "${KEKD_REQUIRE_ALL:-}" == 1 ]]; then
		say "FAIL: $1 (KEKD_REQUIRE_ALL=1 forbids skipping)"
		exit 1
	fi
	say "SKIPPED: $1"
}

command -v go >/dev/null 2>&1 || { fail_or_skip "go is not installed: nothing was measured"; exit 0; }
command -v cargo >/dev/null 2>&1 || { fail_or_skip "cargo is not installed: nothing was measured"; exit 0; }

target=${CARGO_TARGET_DIR:-$root/target}
[[ "$target" == /* ]] || target=$root/$target
out=$target/bench
mkdir -p "$out"
# Sockets live here: short paths, far below the 107-byte limit.
work=$(mktemp -d /tmp/kekd-bench.XXXXXX)
base_tree=""
cleanup() {
	if [[ -n "$base_tree" ]]; then
		git -C "$root" worktree remove --force "$base_tree" >/dev/null 2>&1 || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

baseline=${KEKD_BENCH_BASELINE:-}
baseline_rev=${KEKD_BENCH_BASELINE_REV:-}
if [[ -n "$baseline" && -n "$baseline_rev" ]]; then
	say "FAIL: set KEKD_BENCH_BASELINE or KEKD_BENCH_BASELINE_REV, not both"
	exit 1
fi

if [[ "${KEKD_BENCH_NO_BUILD:-}" == 1 ]]; then
	say "KEKD_BENCH_NO_BUILD=1: using the release kekd and transport-floor already in $target"
else
	say "cargo build --release --locked (kekd, transport-floor)"
	(cd "$root" && cargo build --release --locked --bin kekd --example transport-floor)
fi
kekd=$target/release/kekd
floor=$target/release/examples/transport-floor

# The baseline: an older kekd, given or built here at a revision.
if [[ -n "$baseline_rev" ]]; then
	rev=$(git -C "$root" rev-parse --verify --quiet "$baseline_rev^{commit}") ||
		{ say "FAIL: KEKD_BENCH_BASELINE_REV=$baseline_rev is not a commit in $root"; exit 1; }
	short=$(git -C "$root" rev-parse --short "$rev")
	# A target dir of its own, beside the current build's, kept for the
	# next run (only kekd itself is rebuilt then).
	base_target=$target/baseline
	if [[ "${KEKD_BENCH_NO_BUILD:-}" == 1 && -x "$base_target/release/kekd" &&
		"$(cat "$base_target/kekd.rev" 2>/dev/null)" == "$rev" ]]; then
		say "KEKD_BENCH_NO_BUILD=1: using the baseline kekd ($short) already in $base_target"
	else
		say "baseline: kekd at $short (git worktree in $work, cargo build --release --locked into $base_target)"
		base_tree=$work/baseline-src
		git -C "$root" worktree add --detach --quiet "$base_tree" "$rev"
		rm -f "$base_target/kekd.rev"
		(cd "$base_tree" && CARGO_TARGET_DIR=$base_target cargo build --release --locked --bin kekd)
		echo "$rev" >"$base_target/kekd.rev"
		git -C "$root" worktree remove --force "$base_tree"
		base_tree=""
	fi
	baseline=$base_target/release/kekd
	baseline_what="git $short, built by benches/run.sh"
elif [[ -n "$baseline" ]]; then
	[[ "$baseline" == /* ]] || baseline=$PWD/$baseline
	baseline_what=$baseline
fi
if [[ -n "$baseline" ]]; then
	[[ -f "$baseline" && -x "$baseline" ]] || { say "FAIL: the baseline $baseline is not an executable file"; exit 1; }
	say "baseline: $("$baseline" --version) ($baseline_what), measured as kekd-before-local and kekd-before-pkcs11"
fi
say "go build (driver, goref)"
mkdir -p "$work/bin"
(cd "$here/driver" && go build -o "$work/bin/driver" .)
(cd "$here/goref" && go build -o "$work/bin/goref" .)

# kekd, local backend: a fresh keyring.
mkdir -m 700 "$work/local"
"$kekd" admin init --keyring "$work/local/keyring" >/dev/null
head -c 32 /dev/urandom >"$work/local/goref.key"
chmod 600 "$work/local/goref.key"

servers=()
add_server() { # name role backend socket dir env(json list) argv...
	local name=$1 role=$2 backend=$3 socket=$4 dir=$5 env=$6
	shift 6
	local argv="" a
	for a in "$@"; do argv+="${argv:+, }\"$a\""; done
	servers+=("{\"name\": \"$name\", \"role\": \"$role\", \"backend\": \"$backend\", \"socket\": \"$socket\", \"dir\": \"$dir\", \"env\": [$env], \"argv\": [$argv]}")
}
add_server kekd-local kekd local "$work/local/kekd.sock" "$work/local" "" \
	"$kekd" serve --keyring "$work/local/keyring" --socket "$work/local/kekd.sock"
if [[ -n "$baseline" ]]; then
	# The baseline's own fresh keyring, made by the baseline itself.
	mkdir -m 700 "$work/before"
	"$baseline" admin init --keyring "$work/before/keyring" >/dev/null
	add_server kekd-before-local kekd-before local "$work/before/kekd.sock" "$work/before" "" \
		"$baseline" serve --keyring "$work/before/keyring" --socket "$work/before/kekd.sock"
fi
add_server goref-local goref local "$work/local/goref.sock" "$work/local" "" \
	"$work/bin/goref" -socket "$work/local/goref.sock" -key-file "$work/local/goref.key"
add_server floor floor none "$work/local/floor.sock" "$work/local" "" \
	"$floor" --socket "$work/local/floor.sock"

# One SoftHSM2 token for kekd-pkcs11 and goref-pkcs11, in a directory of our
# own; the baseline gets a second token there.
module=/usr/lib/softhsm/libsofthsm2.so
if [[ -e "$module" ]] && command -v softhsm2-util >/dev/null 2>&1; then
	hsm=$work/hsm
	mkdir -m 700 "$hsm" "$hsm/tokens" "$hsm/state"
	printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$hsm/tokens" >"$hsm/softhsm2.conf"
	label="kekd-bench-$$"
	pin=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
	SOFTHSM2_CONF=$hsm/softhsm2.conf softhsm2-util --init-token --free --label "$label" \
		--pin "$pin" --so-pin "so-$pin" >/dev/null
	(umask 077 && printf '%s\n' "$pin" >"$hsm/pin")
	pkcs11_config() { # socket token-label state-dir
		cat <<EOF
# written by benches/run.sh
socket = "$1"
socket_mode = "0600"
self_check_interval = "10s"

[backend]
kind = "pkcs11"
module = "$module"
token_label = "$2"
pin_file = "$hsm/pin"
key_label_prefix = "kekd-"
pool_size = 4
state_dir = "$3"
EOF
	}
	pkcs11_config "$hsm/kekd.sock" "$label" "$hsm/state" >"$hsm/kekd.toml"
	chmod 600 "$hsm/kekd.toml"
	SOFTHSM2_CONF=$hsm/softhsm2.conf "$kekd" admin init --config "$hsm/kekd.toml" >/dev/null
	env="\"SOFTHSM2_CONF=$hsm/softhsm2.conf\""
	add_server kekd-pkcs11 kekd pkcs11 "$hsm/kekd.sock" "$hsm" "$env" \
		"$kekd" serve --config "$hsm/kekd.toml"
	if [[ -n "$baseline" ]]; then
		# Its own token (same PIN) and state_dir, initialised by the
		# baseline: the token holds the keyring's metadata, and two kekd
		# versions must not share what either may write differently.
		SOFTHSM2_CONF=$hsm/softhsm2.conf softhsm2-util --init-token --free --label "kekd-before-$$" \
			--pin "$pin" --so-pin "so-$pin" >/dev/null
		mkdir -m 700 "$hsm/state-before"
		pkcs11_config "$hsm/kekd-before.sock" "kekd-before-$$" "$hsm/state-before" >"$hsm/kekd-before.toml"
		chmod 600 "$hsm/kekd-before.toml"
		SOFTHSM2_CONF=$hsm/softhsm2.conf "$baseline" admin init --config "$hsm/kekd-before.toml" >/dev/null
		add_server kekd-before-pkcs11 kekd-before pkcs11 "$hsm/kekd-before.sock" "$hsm" "$env" \
			"$baseline" serve --config "$hsm/kekd-before.toml"
	fi
	add_server goref-pkcs11 goref pkcs11 "$hsm/goref.sock" "$hsm" "$env" \
		"$work/bin/goref" -socket "$hsm/goref.sock" -pkcs11-module "$module" \
		-token-label "$label" -pin-file "$hsm/pin" -key-label goref-kek
else
	fail_or_skip "softhsm2 is not installed (apt-get install -y softhsm2): the PKCS#11 servers were not measured"
fi

# What the report says about versions and how to reproduce it.
command=("bash benches/run.sh")
if [[ -n "$baseline_rev" ]]; then
	command=("KEKD_BENCH_BASELINE_REV=$baseline_rev" "${command[@]}")
elif [[ -n "$baseline" ]]; then
	command=("KEKD_BENCH_BASELINE=$baseline" "${command[@]}")
fi
[[ "$quick" == 1 ]] && command=("KEKD_BENCH_QUICK=1" "${command[@]}")
meta=(
	"reproduce" "\`${command[*]}\`"
	"kekd" "$("$kekd" --version) (git $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$root" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ", modified"))"
	"rustc" "$(rustc --version)"
)
[[ -n "$baseline" ]] && meta+=("kekd-before (baseline)" "$("$baseline" --version) ($baseline_what)")
meta+=(
	"tonic" "$(awk '/^name = "tonic"$/ { getline; print $3; exit }' "$root/Cargo.lock" | tr -d '"')"
	"go" "$(go version | awk '{print $3}')"
	"k8s.io/apiserver (driver's client)" "$(awk '$1 == "k8s.io/apiserver" {print $2; exit}' "$here/driver/go.mod")"
	"k8s.io/kms (Go reference server)" "$(awk '$1 == "k8s.io/kms" {print $2; exit}' "$here/goref/go.mod")"
	"google.golang.org/grpc" "$(awk '$1 == "google.golang.org/grpc" {print $2; exit}' "$here/goref/go.mod")"
	"crypto11" "$(awk '$1 == "github.com/ThalesGroup/crypto11" {print $2; exit}' "$here/goref/go.mod")"
	"SoftHSM2" "$(softhsm2-util --version 2>/dev/null || echo 'not installed')"
)
metajson=""
for ((i = 0; i < ${#meta[@]}; i += 2)); do
	metajson+="${metajson:+, }[\"${meta[i]}\", \"${meta[i + 1]//\"/\\\"}\"]"
done
{
	echo '{"servers": ['
	(IFS=,; echo "${servers[*]}")
	echo "], \"meta\": [$metajson]}"
} >"$work/plan.json"

args=(-plan "$work/plan.json" -json "$out/results.json")
[[ "$quick" == 1 ]] && args+=(-quick)
[[ -n "${KEKD_BENCH_ONLY:-}" ]] && args+=(-only "$KEKD_BENCH_ONLY")
# A baseline is compared on the storm too: one storm per server is too
# noisy for that, and which server storms first would count.
[[ -n "$baseline" ]] && args+=(-storm-rounds 3)
docs=0
if [[ "${KEKD_BENCH_DOCS:-}" == 1 ]] || [[ "$quick" != 1 && -z "${KEKD_BENCH_ONLY:-}" && -z "$baseline" ]]; then
	docs=1
fi
if [[ $docs == 1 ]]; then
	args+=(-markdown "$root/docs/benchmarks.md" -png "$root/docs/benchmarks.png")
else
	cp "$root/docs/benchmarks.md" "$out/benchmarks.md" 2>/dev/null || true
	args+=(-markdown "$out/benchmarks.md" -png "$out/benchmarks.png")
fi

if [[ "$quick" == 1 ]]; then
	say "criterion micro-benchmarks, once each (cargo bench -- --test)"
	(cd "$root" && cargo bench --locked --bench envelope -- --test) >"$out/criterion.txt" 2>&1 ||
		{ cat "$out/criterion.txt" >&2; say "FAIL: cargo bench --bench envelope"; exit 1; }
else
	say "criterion micro-benchmarks (cargo bench --bench envelope)"
	(cd "$root" && cargo bench --locked --bench envelope) | tee "$out/criterion.txt" >&2
	args+=(-criterion "$out/criterion.txt")
fi

say "driver ${args[*]} ${KEKD_BENCH_ARGS:-}"
# shellcheck disable=SC2086 # KEKD_BENCH_ARGS is a list of flags
"$work/bin/driver" "${args[@]}" ${KEKD_BENCH_ARGS:-}
if [[ $docs == 1 ]]; then
	say "wrote docs/benchmarks.md and docs/benchmarks.png"
else
	say "wrote $out/benchmarks.md and $out/benchmarks.png (results: $out/results.json)"
	if [[ -n "$baseline" ]]; then
		say "kekd vs the baseline: section \"Before and after\" of $out/benchmarks.md"
	fi
fi
