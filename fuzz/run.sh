#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for SECONDS (default 60):
#
#   bash fuzz/run.sh [SECONDS]
#
# Each target starts from its committed seeds (fuzz/corpus/<target>/, read
# only) plus a scratch corpus under the fuzz target dir, runs for SECONDS with
# libFuzzer's -max_total_time; targets run side by side, one per core. The
# script fails if a target crashed, panicked, timed out or ran out of memory,
# naming the input that did it, and prints each target's executions. Installs
# the nightly toolchain and cargo-fuzz when missing. docs/fuzzing.md explains
# the targets.
#
# FUZZ_TARGETS="envelope grpc" limits the run to some targets; FUZZ_JOBS=N
# runs N at a time (default: the number of cores).
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

# Targets run side by side, one per core (FUZZ_JOBS to change it): each
# still gets its full SECONDS, and the stage takes a fraction of the time.
jobs_max="${FUZZ_JOBS:-$(nproc)}"
fuzz_one() {
  local t=$1 status=0
  "${cargo[@]}" fuzz run --debug-assertions --target-dir "$target_dir" "$t" \
    "$target_dir/corpus-work/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 -artifact_prefix="$target_dir/artifacts/$t/" \
    >"$target_dir/logs/$t.log" 2>&1 || status=$?
  echo "$status" >"$target_dir/logs/$t.status"
}
running=0
for t in "${targets[@]}"; do
  mkdir -p "$target_dir/corpus-work/$t" "$target_dir/artifacts/$t" "$target_dir/logs"
  rm -f "$target_dir/logs/$t.status"
  echo "=== fuzzing $t for ${seconds}s (log: $target_dir/logs/$t.log)"
  fuzz_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs_max" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

declare -A execs
failed=0
for t in "${targets[@]}"; do
  log="$target_dir/logs/$t.log"
  artifacts="$target_dir/artifacts/$t"
  status=$(cat "$target_dir/logs/$t.status" 2>/dev/null || echo "no status")
  n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  execs[$t]="${n:-?}"
  if [ "$status" != 0 ]; then
    echo "FAIL: fuzz target $t exited with status $status; the end of its log:" >&2
    tail -n 40 "$log" >&2
    echo "inputs that failed (reproduce: cargo +nightly fuzz run $t FILE):" >&2
    ls -1 "$artifacts" >&2 || true
    failed=$((failed + 1))
    continue
  fi
  echo "ok: $t ran ${execs[$t]} inputs in ${seconds}s without a failure"
done
if [ "$failed" -ne 0 ]; then
  echo "$failed of ${#targets[@]} fuzz targets failed" >&2
  exit 1
fi

echo "=== fuzzing summary (${seconds}s per target)"
for t in "${targets[@]}"; do
  printf '  %-14s %s executions\n' "$t" "${execs[$t]}"
done
echo "${#targets[@]} passed, 0 failed"
