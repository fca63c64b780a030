#!/usr/bin/env bash
# Checks kekd's protoc stand-in, tools/protoc/protoc (README.md there):
#   - the Go program's unit tests, vet and gofmt;
#   - the script's lookup order: $KEKD_PROTOC, a protoc on PATH (never
#     itself), then the Go build, cached and safe to race; and its one-line
#     error when there is neither protoc nor Go;
#   - etcd-client's protos (the version in Cargo.lock) compiled through the
#     stand-in with prost-build's own arguments and a PATH without protoc.
#     With a real protoc on the machine the two descriptor sets are compared
#     (fdscheck: same files, messages, fields, services, options); without
#     one the stand-in's set is decoded and checked for the requested files.
# Prints "N passed, N failed" last; exits 1 on any failure. With
# KEKD_REQUIRE_ALL=1 a check that cannot run here fails instead of skipping.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
shim=$here/protoc
export GOTOOLCHAIN=local

passed=0
failed=0
skipped=0
pass() { printf 'ok      %s\n' "$1"; passed=$((passed + 1)); }
fail() { printf 'FAILED  %s\n' "$1"; [ $# -lt 2 ] || printf '%s\n' "$2" | sed 's/^/        /'; failed=$((failed + 1)); }
skip() {
  if [ "${KEKD_REQUIRE_ALL:-}" = 1 ]; then
    fail "$1" "cannot run here (KEKD_REQUIRE_ALL=1): $2"
  else
    printf 'SKIPPED %s: %s\n' "$1" "$2"
    skipped=$((skipped + 1))
  fi
}
finish() {
  if [ "$skipped" -gt 0 ]; then
    printf '%d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
  else
    printf '%d passed, %d failed\n' "$passed" "$failed"
  fi
  [ "$failed" -eq 0 ]
  exit
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

go_bin=$(type -P go || true)
[ -n "$go_bin" ] || { [ -x /usr/local/go/bin/go ] && go_bin=/usr/local/go/bin/go; } || true
if [ -z "$go_bin" ]; then
  fail "Go toolchain" "no 'go' on PATH nor /usr/local/go/bin/go: the stand-in cannot be built or tested"
  finish
fi
real_protoc=""
while IFS= read -r candidate; do
  if [ "$(realpath -- "$candidate")" != "$shim" ]; then
    real_protoc=$candidate
    break
  fi
done < <(type -aP protoc || true)

# A PATH like this one minus protoc: a directory of links to everything on
# PATH (first one wins, as in a lookup) except protoc.
farm() { # farm DIR EXCLUDED-NAME...
  local dir=$1 d f name
  shift
  mkdir -p "$dir"
  local IFS=:
  for d in $PATH; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
      name=${f##*/}
      for excluded in "$@"; do [ "$name" = "$excluded" ] && continue 2; done
      [ -e "$dir/$name" ] || [ -L "$dir/$name" ] || ln -s "$f" "$dir/$name"
    done
  done
}
nopath=$work/no-protoc
farm "$nopath" protoc
cache=$work/cache
version="libprotoc 27.0 (kekd's Go stand-in: github.com/bufbuild/protocompile v0.14.1)"

# --- the Go program ----------------------------------------------------------
if out=$(cd "$here" && "$go_bin" vet ./... 2>&1 && "$go_bin" test ./... 2>&1); then
  pass "go vet + go test (tools/protoc)"
  printf '%s\n' "$out" | sed 's/^/        /'
else
  fail "go vet + go test (tools/protoc)" "$out"
fi
if out=$(cd "$here" && "$(dirname "$go_bin")/gofmt" -l . 2>&1) && [ -z "$out" ]; then
  pass "gofmt -l is empty"
else
  fail "gofmt -l is empty" "$out"
fi

# --- the script's lookup order -----------------------------------------------
# Two builds race on an empty cache: both succeed, one binary stays.
for i in 1 2; do
  (PATH=$nopath XDG_CACHE_HOME=$cache "$shim" --version >"$work/race$i.out" 2>"$work/race$i.err"
    echo $? >"$work/race$i.rc") &
done
wait
bins=$(find "$cache/kekd/protoc-go" -name protoc -type f | wc -l)
leftovers=$(find "$cache/kekd/protoc-go" -name '.build.*' | wc -l)
if [ "$(cat "$work/race1.rc")$(cat "$work/race2.rc")" = 00 ] &&
  [ "$(cat "$work/race1.out")" = "$version" ] && [ "$(cat "$work/race2.out")" = "$version" ] &&
  [ "$bins" = 1 ] && [ "$leftovers" = 0 ]; then
  pass "no protoc on PATH: two racing first runs build the Go stand-in, one cached binary ($(find "$cache/kekd/protoc-go" -name protoc -type f))"
else
  fail "no protoc on PATH: two racing first runs" "rc $(cat "$work/race1.rc") $(cat "$work/race2.rc"), $bins binaries, $leftovers leftovers
$(cat "$work/race1.out" "$work/race1.err" "$work/race2.out" "$work/race2.err")"
fi

out=$(PATH=$nopath XDG_CACHE_HOME=$cache "$shim" --version 2>"$work/cached.err") || true
if [ "$out" = "$version" ] && [ ! -s "$work/cached.err" ]; then
  pass "second run uses the cached stand-in (nothing built, nothing on stderr)"
else
  fail "second run uses the cached stand-in" "$out $(cat "$work/cached.err")"
fi

printf '#!/bin/sh\necho "fake: $*"\n' >"$work/fake-protoc"
chmod +x "$work/fake-protoc"
out=$(KEKD_PROTOC=$work/fake-protoc "$shim" --version 2>&1) || true
if [ "$out" = "fake: --version" ]; then pass "KEKD_PROTOC comes first"; else fail "KEKD_PROTOC comes first" "$out"; fi

rc=0
out=$(KEKD_PROTOC=$work/missing "$shim" --version 2>&1) || rc=$?
want="kekd tools/protoc: KEKD_PROTOC=$work/missing is not an executable file; point it at a protoc binary or unset it"
if [ "$rc" = 1 ] && [ "$out" = "$want" ]; then
  pass "KEKD_PROTOC that is not executable: exit 1, names the fix"
else
  fail "KEKD_PROTOC that is not executable" "rc $rc: $out"
fi

mkdir -p "$work/path-protoc"
printf '#!/bin/sh\necho "path protoc: $*"\n' >"$work/path-protoc/protoc"
chmod +x "$work/path-protoc/protoc"
out=$(PATH=$work/path-protoc:$nopath XDG_CACHE_HOME=$cache "$shim" --version 2>&1) || true
if [ "$out" = "path protoc: --version" ]; then pass "a protoc on PATH comes before Go"; else fail "a protoc on PATH comes before Go" "$out"; fi

mkdir -p "$work/self"
ln -s "$shim" "$work/self/protoc"
out=$(PATH=$work/self:$nopath XDG_CACHE_HOME=$cache timeout 60 "$shim" --version 2>&1) || true
if [ "$out" = "$version" ]; then
  pass "the script itself on PATH is passed over (no loop)"
else
  fail "the script itself on PATH is passed over" "$out"
fi

if [ -n "$real_protoc" ]; then
  want=$("$real_protoc" --version)
  out=$("$shim" --version 2>&1) || true
  if [ "$out" = "$want" ]; then pass "real protoc on PATH is used: $out"; else fail "real protoc on PATH is used" "$out, want $want"; fi
fi

# Neither protoc nor Go: PATH without either, and /usr/local/go hidden in a
# private mount namespace when it exists (the script looks there too).
bare=$work/bare
farm "$bare" protoc go gofmt
want="kekd tools/protoc: no protoc on PATH and no Go to build a stand-in: apt-get install protobuf-compiler, or install Go (1.24 or newer, 'go' on PATH)"
rc=0
if [ -e /usr/local/go/bin/go ]; then
  if unshare -m true 2>/dev/null; then
    # shellcheck disable=SC2016 # $0 is expanded by the inner bash
    out=$(PATH=$bare XDG_CACHE_HOME=$work/cache-none unshare -m bash -c \
      'mount -t tmpfs tmpfs /usr/local/go && exec "$0" --version' "$shim" 2>&1) || rc=$?
  else
    rc=skip
  fi
else
  out=$(PATH=$bare XDG_CACHE_HOME=$work/cache-none "$shim" --version 2>&1) || rc=$?
fi
if [ "$rc" = skip ]; then
  skip "neither protoc nor Go" "/usr/local/go/bin/go exists and 'unshare -m' (root) is not available to hide it"
elif [ "$rc" = 1 ] && [ "$out" = "$want" ]; then
  pass "neither protoc nor Go: exit 1 with one line naming both fixes"
else
  fail "neither protoc nor Go" "rc $rc: $out"
fi

rc=0
out=$(PATH=$nopath XDG_CACHE_HOME=$cache "$shim" --cpp_out=gen a.proto 2>&1) || rc=$?
if [ "$rc" = 1 ] && [[ "$out" == "protoc (kekd stand-in): unknown option --cpp_out: supported are "* ]]; then
  pass "unknown option: exit 1 with a message"
else
  fail "unknown option" "rc $rc: $out"
fi

# --- etcd-client's protos ----------------------------------------------------
manifest=$(cd "$root" && cargo metadata --locked --format-version 1 2>/dev/null |
  grep -o '"manifest_path":"[^"]*/etcd-client-[0-9][^"]*/Cargo.toml"' | head -n 1 | cut -d'"' -f4) || true
if [ -z "$manifest" ]; then
  fail "etcd-client's protos" "etcd-client is not in $root/Cargo.lock's dependencies (cargo metadata --locked found no manifest)"
  finish
fi
crate=$(dirname "$manifest")
# The files its build.rs passes to tonic-prost-build, in its order.
mapfile -t files < <(grep -o '"proto/[^"]*\.proto"' "$crate/build.rs" | tr -d '"')
(cd "$here" && "$go_bin" build -o "$work/fdscheck" ./fdscheck)

rc=0
# prost-build's exact command line (prost-build src/config.rs, load_fds).
out=$(cd "$crate" && PATH=$nopath XDG_CACHE_HOME=$cache "$shim" --include_imports --include_source_info \
  -o "$work/stand-in.pb" -I proto "${files[@]}" 2>&1) || rc=$?
if [ "$rc" = 0 ] && summary=$("$work/fdscheck" summary "$work/stand-in.pb" 2>&1); then
  missing=()
  for f in "${files[@]}"; do
    grep -qxF "file ${f#proto/}" <<<"$summary" || missing+=("${f#proto/}")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    pass "$(basename "$crate"): ${#files[@]} protos compiled through the stand-in, set decodes: $(head -n 1 <<<"$summary" | cut -d' ' -f2-)"
  else
    fail "$(basename "$crate") through the stand-in" "requested files missing from the set: ${missing[*]}"
  fi
else
  fail "$(basename "$crate") through the stand-in" "rc $rc: $out ${summary:-}"
fi

if [ -n "$real_protoc" ]; then
  if (cd "$crate" && "$real_protoc" --include_imports --include_source_info \
    -o "$work/protoc.pb" -I proto "${files[@]}") &&
    out=$("$work/fdscheck" compare "$work/protoc.pb" "$work/stand-in.pb" 2>&1); then
    pass "stand-in's set matches $("$real_protoc" --version)'s"
    printf '%s\n' "$out" | sed 's/^/        /'
  else
    fail "stand-in's set matches real protoc's" "${out:-}"
  fi
else
  echo "        (no real protoc here: nothing to compare the stand-in's set with)"
fi

finish
