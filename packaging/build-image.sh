#!/usr/bin/env bash
# Builds the OCI image localhost/isthmus:VERSION from packaging/Containerfile
# with buildah (no registry needed: the image is FROM scratch), then, with
# --check, runs it with podman: non-root, read-only root filesystem, in a
# network namespace of its own; checks /readyz, the health check and a clean
# stop. Installs podman, buildah and runc when missing (Debian).
#
#   packaging/build-image.sh [--profile release|dev] [--no-build] [--check]
#
# Image storage lives in target/oci, with three settings this machine kind
# needs: runc (crun refuses its cgroup layout), vfs storage, and explicit
# ulimits (podman's default rlimits fail without CAP_SYS_RESOURCE).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
check=0
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --check) check=1; shift ;;
    *) echo "usage: $0 [--profile release|dev] [--no-build] [--check]" >&2; exit 64 ;;
    esac
done
case "$profile" in
release) binary=target/release/isthmus ;;
dev) binary=target/debug/isthmus ;;
*) echo "$0: unknown profile $profile" >&2; exit 64 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
image=localhost/isthmus:$version

source packaging/lib.sh
need_tools podman:podman buildah:buildah runc:runc ip:iproute2 curl:curl

oci=$PWD/target/oci
mkdir -p "$oci/storage" "$oci/run"
cat >"$oci/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$oci/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$oci/storage"
runroot = "$oci/run"
EOF
export CONTAINERS_CONF=$oci/containers.conf CONTAINERS_STORAGE_CONF=$oci/storage.conf

if [ "$build" = 1 ]; then
    echo "== cargo build --profile $profile"
    cargo build --profile "$profile" -p isthmus-gateway --bin isthmus
fi
test -x "$binary" || { echo "$0: $binary is missing" >&2; exit 1; }

echo "== staging the image's files"
context=$(mktemp -d /tmp/isthmus-image.XXXXXX)
trap 'rm -rf "$context"' EXIT
rootfs=$context/rootfs
install -D -m 755 "$binary" "$rootfs/usr/bin/isthmus"
strip --strip-debug "$rootfs/usr/bin/isthmus"
# The binary's shared libraries (glibc, libgcc_s, libm) and the loader, at
# the paths the binary asks for.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    install -D -m 755 "$lib" "$rootfs$lib"
done
install -D -m 644 config/isthmus.toml "$rootfs/etc/isthmus/isthmus.toml"
printf 'root:x:0:0:root:/:/sbin/nologin\nisthmus:x:10001:10001:Isthmus mesh gateway:/var/lib/isthmus:/sbin/nologin\n' \
    >"$rootfs/etc/passwd"
printf 'root:x:0:\nisthmus:x:10001:\n' >"$rootfs/etc/group"
install -d -m 755 -o 10001 -g 10001 "$rootfs/var/lib/isthmus"
install -d -m 1777 "$rootfs/tmp"
cp packaging/Containerfile "$context/"

echo "== buildah build $image"
buildah build --quiet --format docker --layers=false -t "$image" "$context"
podman image inspect "$image" --format \
    'image {{.Id}}: user {{.Config.User}}, entrypoint {{.Config.Entrypoint}}, health check {{.Config.Healthcheck.Test}}'
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$image"

[ "$check" = 1 ] || exit 0

echo "== podman run --read-only (non-root, own network namespace)"
ns=isthmus-oci
name=isthmus-oci-check
podman rm -f "$name" >/dev/null 2>&1 || true
ip netns add "$ns"
ip -n "$ns" link set lo up
cleanup() {
    podman rm -f "$name" >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$context"
}
trap cleanup EXIT
# No systemd runs podman's health-check timers here (podman says so on stderr;
# that line is dropped): the check is run by hand below.
quiet_timers() { grep -v 'unable to get systemd connection' >&2 || true; }
podman run -d --name "$name" --read-only --network "ns:/run/netns/$ns" --cap-drop=all \
    --security-opt=no-new-privileges "$image" >/dev/null 2> >(quiet_timers)
ok=0
for _ in $(seq 100); do
    if ip netns exec "$ns" curl -fsS -o /dev/null http://127.0.0.1:15000/readyz 2>/dev/null; then ok=1; break; fi
    sleep 0.1
done
podman logs "$name" 2>&1 | tail -n 3
[ "$ok" = 1 ] || { echo "FAIL: /readyz never answered 200" >&2; exit 1; }
ip netns exec "$ns" curl -sS -w ' (%{http_code})\n' http://127.0.0.1:15000/readyz
podman inspect "$name" --format \
    'user {{.Config.User}}, read-only root {{.HostConfig.ReadonlyRootfs}}, caps {{.EffectiveCaps}}'
echo "process: $(podman top "$name" user pid comm | tail -n 1)"
if podman exec "$name" /usr/bin/isthmus probe 2>/dev/null; then
    echo "in-image probe (the health check command): ok"
fi
podman healthcheck run "$name" && echo "podman healthcheck run: healthy"
if podman exec "$name" /usr/bin/isthmus ca init --trust-domain x.example --out /etc/x 2>/dev/null; then
    echo "FAIL: the root filesystem is writable" >&2; exit 1
fi
echo "writing under / fails: read-only root filesystem"
start=$(date +%s.%N)
podman stop -t 20 "$name" >/dev/null 2> >(quiet_timers)
took=$(echo "$(date +%s.%N) - $start" | bc)
code=$(podman inspect "$name" --format '{{.State.ExitCode}}')
echo "podman stop: exit code $code after ${took}s"
[ "$code" = 0 ] || { echo "FAIL: exit code $code" >&2; exit 1; }
echo "image check passed"
