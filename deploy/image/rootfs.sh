#!/bin/sh
# Assembles the root filesystem of kekd's container image:
#
#   deploy/image/rootfs.sh KEKD_BINARY DIR
#
# DIR/ receives exactly what kekd needs at run time and nothing else: the
# binary at /usr/local/bin/kekd, the shared libraries `ldd` says it loads
# (glibc's loader, libc, libm, libgcc_s), /etc/passwd and /etc/group naming
# root and the unprivileged user `kekd` (uid/gid 65532), and an empty /tmp
# (mode 1777). No shell, no package manager. deploy/Containerfile runs this
# in its build stage and copies DIR into an empty (`scratch`) image;
# deploy/image/test.sh builds that image and runs kekd in it.
#
# A PKCS#11 module is loaded with dlopen, so `ldd` cannot see it: mount the
# module and its own libraries into the container (docs/deploy.md, "Container
# image").
set -eu

if [ $# -ne 2 ]; then
  echo "usage: deploy/image/rootfs.sh KEKD_BINARY DIR" >&2
  exit 64
fi
bin=$1
dir=$2
if [ ! -x "$bin" ]; then
  echo "rootfs.sh: $bin is not an executable file; build it with: cargo build --release --locked" >&2
  exit 66
fi
if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
  echo "rootfs.sh: $dir is not empty; give a new or empty directory" >&2
  exit 73
fi

mkdir -p "$dir/usr/local/bin" "$dir/etc" "$dir/tmp"
cp "$bin" "$dir/usr/local/bin/kekd"
chmod 0755 "$dir/usr/local/bin/kekd"

# Every library the dynamic loader resolves for kekd, at the same path (the
# loader's own path is hard-coded in the binary). A binary that is not
# dynamic (a static build) needs none.
libs=$(ldd "$bin" 2>/dev/null | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}') || true
for lib in $libs; do
  mkdir -p "$dir$(dirname "$lib")"
  cp -L "$lib" "$dir$lib"
done

cat >"$dir/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
kekd:x:65532:65532:kekd:/nonexistent:/sbin/nologin
PASSWD
cat >"$dir/etc/group" <<'GROUP'
root:x:0:
kekd:x:65532:
GROUP
chmod 0644 "$dir/etc/passwd" "$dir/etc/group"
chmod 1777 "$dir/tmp"
