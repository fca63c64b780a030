#!/usr/bin/env bash
# Builds kekd's container image from deploy/Containerfile with Debian's
# buildah and runs kekd inside it:
#
#   bash deploy/image/test.sh            (needs root and buildah)
#
# The Containerfile's build stage compiles kekd in a Rust image from a
# registry; this machine reaches none, so the stage is replaced by a
# directory made here exactly as that stage makes it — deploy/image/rootfs.sh
# on a release build (`--build-context build=DIR`) — and the runtime stage is
# built from the file unchanged. Containers run with chroot isolation (no
# cgroup or network namespace set-up needed): each command below runs in a
# chroot of exactly the image's files. Prints PASS/FAIL lines and ends with
# "N passed, M failed".
#
# Environment: KEKD_BIN (default: target/release/kekd under CARGO_TARGET_DIR
# or ./target, built with `cargo build --release --locked` when missing).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS image: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL image: $*"; }
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}

if ! command -v buildah >/dev/null; then
  fail "buildah is not installed (apt-get install -y buildah)"
  finish
fi
bin=${KEKD_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/kekd}
if [ -z "${KEKD_BIN:-}" ]; then
  cargo build --release --locked --bin kekd >/dev/null 2>&1 || { fail "cargo build --release --locked"; finish; }
fi

work=$(mktemp -d /tmp/kekd-image.XXXXXX)
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null
  [ -n "${ctr:-}" ] && bh umount "$ctr" >/dev/null 2>&1 && bh rm "$ctr" >/dev/null 2>&1
  bh rmi -f localhost/kekd-image-test:ci >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
# A store of its own (vfs: no overlay module needed), removed at the end.
bh() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }
export BUILDAH_ISOLATION=chroot

# 1. The build stage's output, made the way the stage makes it.
if sh deploy/image/rootfs.sh "$bin" "$work/build/rootfs" >"$work/rootfs.log" 2>&1; then
  pass "deploy/image/rootfs.sh assembled the root filesystem"
else
  fail "deploy/image/rootfs.sh: $(cat "$work/rootfs.log")"
  finish
fi

# 2. The runtime stage, from deploy/Containerfile as shipped.
mkdir -p "$work/context"
if bh bud --pull=never --build-context build="$work/build" -f deploy/Containerfile \
  -t localhost/kekd-image-test:ci "$work/context" >"$work/bud.log" 2>&1; then
  pass "buildah bud -f deploy/Containerfile (build stage from rootfs.sh)"
else
  fail "buildah bud: $(tail -5 "$work/bud.log")"
  finish
fi

user=$(bh inspect --type image --format '{{.OCIv1.Config.User}}' localhost/kekd-image-test:ci)
entry=$(bh inspect --type image --format '{{.OCIv1.Config.Entrypoint}}' localhost/kekd-image-test:ci)
[ "$user" = "65532:65532" ] && pass "runs as uid 65532 by default" || fail "image user is '$user', want 65532:65532"
[ "$entry" = '[/usr/local/bin/kekd]' ] && pass "entrypoint is /usr/local/bin/kekd" || fail "entrypoint is $entry"

ctr=$(bh from --pull=never localhost/kekd-image-test:ci)
mnt=$(bh mount "$ctr")

# 3. Exactly the expected files: the binary, its libraries, passwd, group.
want=$(
  {
    echo ./etc/group
    echo ./etc/passwd
    echo ./usr/local/bin/kekd
    ldd "$bin" | awk '/=> \//{print "." $3} /^[[:space:]]*\//{print "." $1}'
  } | sort -u
)
got=$(cd "$mnt" && find . -type f | sort)
if [ "$want" = "$got" ]; then
  pass "the image holds only kekd, its $(echo "$want" | grep -c '\.so') libraries, /etc/passwd and /etc/group"
else
  fail "image files differ: $(diff <(echo "$want") <(echo "$got") | tr '\n' ' ')"
fi
if [ ! -e "$mnt/bin/sh" ] && [ ! -e "$mnt/usr/bin/sh" ]; then
  pass "no shell in the image"
else
  fail "the image has a shell"
fi

# 4. kekd runs in a chroot of those files.
version=$(bh run "$ctr" -- /usr/local/bin/kekd --version 2>"$work/version.err")
if [ "$version" = "$("$bin" --version)" ]; then
  pass "kekd --version in the image: $version"
else
  fail "kekd --version in the image printed '$version' ($(cat "$work/version.err"))"
fi

# 5. serve --dev in the image, as uid 65532 in /tmp; the host probes its socket.
bh run "$ctr" -- /usr/local/bin/kekd serve --dev >"$work/serve.log" 2>&1 &
serve_pid=$!
socket="$mnt/tmp/kekd-dev/kms.sock"
for _ in $(seq 1 300); do
  [ -S "$socket" ] && break
  kill -0 "$serve_pid" 2>/dev/null || break
  sleep 0.1
done
# (A relative path: the store's path is longer than a socket address.)
if [ -S "$socket" ] && (cd "$(dirname "$socket")" && "$bin" admin probe --socket kms.sock) >"$work/probe.log" 2>&1; then
  pass "serve --dev in the image answers Status, Encrypt and Decrypt (admin probe)"
else
  fail "serve --dev in the image: $(tail -5 "$work/serve.log") / $(cat "$work/probe.log" 2>/dev/null)"
fi
owner=$(stat -c %u "$mnt/tmp/kekd-dev/keyring" 2>/dev/null)
[ "$owner" = 65532 ] && pass "the dev keyring belongs to uid 65532" || fail "dev keyring owner is '$owner'"
# The server is a child of buildah's chroot helper: stop it by its pid there.
pid=$(pgrep -f -x '/usr/local/bin/kekd serve --dev' | head -1)
[ -n "$pid" ] && kill -TERM "$pid"
if wait "$serve_pid"; then
  pass "kekd in the image stops cleanly on SIGTERM"
else
  fail "kekd in the image did not exit 0 on SIGTERM: $(tail -3 "$work/serve.log")"
fi
serve_pid=""
finish
