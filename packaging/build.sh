#!/usr/bin/env bash
# Builds the isthmus .deb (cargo-deb) and .rpm (cargo-generate-rpm) into OUT
# and shows what they hold. Installs the packaging tools it lacks (Debian).
#
#   packaging/build.sh [--profile release|dev] [--out DIR] [--no-build]
#
# --profile dev packages the debug binary (what the tests build anyway);
# --no-build packages the binary already in target/ without running cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
out=target/packages
build=1
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: $0 [--profile release|dev] [--out DIR] [--no-build]" >&2; exit 64 ;;
    esac
done
# A dev package exists to be checked, not shipped: its 150 MB unstripped
# payload is left uncompressed (zstd takes minutes on it).
case "$profile" in
release) target_dir=release; rpm_compression=zstd ;;
dev) target_dir=debug; rpm_compression=none ;;
*) echo "$0: unknown profile $profile" >&2; exit 64 ;;
esac

source packaging/lib.sh
need_tools dpkg-deb:dpkg lintian:lintian rpm:rpm
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm

if [ "$build" = 1 ]; then
    echo "== cargo build --profile $profile"
    cargo build --profile "$profile" -p isthmus-gateway --bin isthmus
fi
# cargo, cargo-deb and cargo-generate-rpm all honour CARGO_TARGET_DIR (the
# tests under `cargo llvm-cov` package the instrumented build).
binary="${CARGO_TARGET_DIR:-target}/$target_dir/isthmus"
test -x "$binary" || { echo "$0: $binary is missing; build it or drop --no-build" >&2; exit 1; }
mkdir -p "$out"

# Both tools map the assets' target/release/ to the profile's directory.
echo "== cargo deb"
deb=$(cargo deb -p isthmus-gateway --profile "$profile" --no-build -o "$out" 2>&1 \
    | grep -v 'dev profile is not supported\|To enable debug symbols' | tail -n 1)
echo "== cargo generate-rpm"
cargo generate-rpm -p gateway --profile "$profile" --payload-compress "$rpm_compression" -o "$out" >/dev/null
rpm_file=$(ls -t "$out"/isthmus-*.rpm | head -n 1)

echo "== dpkg-deb -I $deb"
dpkg-deb -I "$deb"
echo "== dpkg-deb -c $deb"
dpkg-deb -c "$deb"
echo "== lintian $deb"
# The tags we accept are overridden in the package itself, each with its
# reason (packaging/lintian-overrides); `O:` lines show them.
lintian --fail-on error,warning --tag-display-limit 0 "$deb"
lintian --fail-on none --show-overrides --tag-display-limit 0 "$deb" | grep '^O:' || true
echo "lintian: no errors or warnings"
echo "== rpm -qpi $rpm_file"
rpm -qpi "$rpm_file"
echo "== rpm -qpl $rpm_file"
rpm -qpl "$rpm_file"
echo "== rpm -qpc $rpm_file"
rpm -qpc "$rpm_file"
echo "== rpm -qp --scripts $rpm_file"
rpm -qp --scripts "$rpm_file"
echo "== built"
echo "deb: $deb"
echo "rpm: $rpm_file"
