#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for SECONDS (default 60):
#
#   bash fuzz/run.sh [SECONDS]
#
# Each target starts from its committed seeds (fuzz/corpus/<target>/, read
# only) plus a scratch corpus under the fuzz target dir, runs for SECONDS with
# libFuzzer's -max_total_time, and the script fails as soon as one target
# crashes, panics, times out or runs out of memory, naming the input that
# did it. At the end it prints each target's executions. Installs the nightly
# toolchain and cargo-fuzz when missing. docs/fuzzing.md explains the targets.
#
# FUZZ_TARGETS="envelope grpc" limits the run to some targets.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)

seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]* | 0) echo "usage: fuzz/run.sh [SECONDS]  (a whole number of seconds, at least 1)" >&2; exit 64 ;;
esac
read -r -a targets <<<"${FUZZ_TARGETS:-envelope keyring_file config backup grpc}"

# cargo fuzz needs -Z flags (sanitizers): the nightly toolchain, installed
# when missing. Where no toolchain can be downloaded, the stable one serves
# with RUSTC_BOOTSTRAP=1: it ships the same sanitizer runtimes.
cargo=(cargo +nightly)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  if ! rustup toolchain install nightly --profile minimal; then
    echo "fuzz/run.sh: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1" >&2
    cargo=(cargo)
    export RUSTC_BOOTSTRAP=1
  fi
fi
if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# CI keeps a cargo target dir in its cache: build the fuzz targets beside it
# (sanitizer builds cannot share its artifacts) so reruns are incremental.
target_dir="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}"
target_dir="${target_dir:-$here/target}"
unset CARGO_TARGET_DIR
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# cargo fuzz has no --locked: check that fuzz/Cargo.lock is current first.
"${cargo[@]}" metadata --locked --format-version 1 >/dev/null

echo "=== building ${targets[*]} (${cargo[*]} fuzz build, debug assertions on)"
if [ -z "${FUZZ_TARGETS:-}" ]; then
  "${cargo[@]}" fuzz build --debug-assertions --target-dir "$target_dir"
else
  for t in "${targets[@]}"; do
    "${cargo[@]}" fuzz build --debug-assertions --target-dir "$target_dir" "$t"
  done
fi

declare -A execs
for t in "${targets[@]}"; do
  work="$target_dir/corpus-work/$t"
  artifacts="$target_dir/artifacts/$t"
  log="$target_dir/logs/$t.log"
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  echo "=== fuzzing $t for ${seconds}s (log: $log)"
  status=0
  "${cargo[@]}" fuzz run --debug-assertions --target-dir "$target_dir" "$t" "$work" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  execs[$t]="${n:-?}"
  if [ "$status" -ne 0 ]; then
    echo "FAIL: fuzz target $t exited with status $status; the end of its log:" >&2
    tail -n 40 "$log" >&2
    echo "inputs that failed (reproduce: cargo +nightly fuzz run $t FILE):" >&2
    ls -1 "$artifacts" >&2 || true
    exit 1
  fi
  echo "ok: $t ran ${execs[$t]} inputs in ${seconds}s without a failure"
done

echo "=== fuzzing summary (${seconds}s per target)"
for t in "${targets[@]}"; do
  printf '  %-14s %s executions\n' "$t" "${execs[$t]}"
done
echo "${#targets[@]} passed, 0 failed"
