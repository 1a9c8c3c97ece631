#!/usr/bin/env bash
# Builds the guest's RDMA user space: rdma-core (libibverbs, the rxe
# provider, the ibv_* tools) together with the project's virtio_rdma
# provider (native/guest/rdma-core-provider) and the in-guest programs
# (native/guest/conformance: vrdma_conformance, and vrdma_stream, the
# data-checking traffic for migration tests), and caches the installed tree.
#
#   bash images/guest/rdma-core.sh [--force]
#   bash images/guest/rdma-core.sh --key
#
# Prints the cached root on stdout (progress goes to stderr). The tree is
# installed under the prefix /opt/vrdma/rdma-core inside that root, so a
# guest gets it by copying (or overlaying) ROOT/opt/vrdma/rdma-core to
# /opt/vrdma/rdma-core and running the tools with
# LD_LIBRARY_PATH=/opt/vrdma/rdma-core/lib: libibverbs then finds its
# providers and .driver files under that prefix. Programs linked against
# Debian's libibverbs.so.1 (perftest) use it the same way.
#
# Why a source build: a provider is built against the exact rdma-core
# sources of the libibverbs that loads it (the provider interface is
# private). Debian 12's rdma-core 44.0 source tarball is no longer on
# deb.debian.org, so the guest runs the rdma-core this script builds
# (Debian 13's 56.1 sources) instead of Debian 12's libibverbs.
#   --force   rebuild even when the cache has this build
#   --key     print the cache key and exit
#
# Host changes: installs missing build tools (cmake, ninja-build,
# pkg-config, libnl-3-dev, libnl-route-3-dev, libudev-dev) with apt-get.
#
# Cache: ${VRDMA_CACHE:-$HOME/.cache/vrdma}/rdma-core/KEY/
#   root/opt/vrdma/rdma-core/...   the installed tree
#   build.log, info
set -euo pipefail
export LC_ALL=C
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROVIDER=$(cd "$HERE/../../native/guest/rdma-core-provider" && pwd)
CONFORMANCE=$(cd "$HERE/../../native/guest/conformance" && pwd)/vrdma_conformance.c
STREAM=$(dirname "$CONFORMANCE")/vrdma_stream.c
CACHE_ROOT=${VRDMA_CACHE:-${HOME:-/root}/.cache/vrdma}
VERSION=56.1
TARBALL=rdma-core_$VERSION.orig.tar.gz
URL=http://deb.debian.org/debian/pool/main/r/rdma-core/$TARBALL
SHA256=63ce7f2baa7242c2dbc76375dac957c420187dd27f8c5e148efc07971ee522a8
PREFIX=/opt/vrdma/rdma-core
SOURCES=("$PROVIDER/virtio_rdma.c" "$PROVIDER/CMakeLists.txt" "$CONFORMANCE" "$STREAM" "$HERE/rdma-core.sh")
# What the guest needs; everything else in rdma-core is not built.
TARGETS=(ibverbs virtio_rdma-rdmav34 rxe-rdmav34 ibv_devices ibv_devinfo ibv_rc_pingpong ibv_uc_pingpong ibv_ud_pingpong)

T0=${EPOCHREALTIME/[.,]/}
step() {
	local now=${EPOCHREALTIME/[.,]/} ms
	ms=$(((now - T0) / 1000))
	printf '[guest-rdma-core %3d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
die() { printf '[guest-rdma-core] ERROR: %s\n' "$*" >&2; exit 1; }

cache_key() { { (cd / && sha256sum "${SOURCES[@]}") | awk '{ print $1 }'; echo "$VERSION $SHA256"; } | sha256sum | cut -c1-16; }

FORCE=0
for arg in "$@"; do
	case "$arg" in
	--key) cache_key; exit 0 ;;
	--force | -f) FORCE=1 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "rdma-core.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
	esac
done

KEY=$(cache_key)
OUT="$CACHE_ROOT/rdma-core/$KEY"
if [ "$FORCE" = 0 ] && [ -f "$OUT/info" ]; then
	step "up to date: $OUT/root"
	printf '%s\n' "$OUT/root"
	exit 0
fi
mkdir -p "$CACHE_ROOT/rdma-core"
exec 9>"$CACHE_ROOT/rdma-core.lock"
if ! flock -n 9; then
	step "another rdma-core.sh holds $CACHE_ROOT/rdma-core.lock; waiting"
	flock 9
	if [ "$FORCE" = 0 ] && [ -f "$OUT/info" ]; then
		printf '%s\n' "$OUT/root"
		exit 0
	fi
fi

# ------------------------------------------------------------------ tools
need=()
for t in cmake:cmake ninja:ninja-build pkg-config:pkg-config gcc:gcc; do
	command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
for h in /usr/include/libnl3/netlink/netlink.h:libnl-3-dev /usr/include/libnl3/netlink/route/link.h:libnl-route-3-dev /usr/include/libudev.h:libudev-dev; do
	[ -f "${h%%:*}" ] || need+=("${h#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing build tools (${need[*]}); run as root or install them"
	step "installing ${need[*]} (apt-get)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "${need[@]}" \
		>"$CACHE_ROOT/rdma-core-apt.log" 2>&1 || die "apt-get install ${need[*]} failed (see $CACHE_ROOT/rdma-core-apt.log)"
fi

# ------------------------------------------------------------------ sources
SRCDIR="$CACHE_ROOT/rdma-core/src-$VERSION"
if [ ! -f "$SRCDIR/CMakeLists.txt" ]; then
	tgz="$CACHE_ROOT/rdma-core/$TARBALL"
	if [ ! -f "$tgz" ] || ! echo "$SHA256  $tgz" | sha256sum -c --quiet 2>/dev/null; then
		step "downloading $URL"
		curl -fsSL --retry 3 -o "$tgz.part" "$URL" || die "cannot download $URL"
		mv "$tgz.part" "$tgz"
	fi
	echo "$SHA256  $tgz" | sha256sum -c --quiet || die "$tgz: sha256 mismatch (expected $SHA256)"
	rm -rf "$SRCDIR.new"
	mkdir -p "$SRCDIR.new"
	tar -xzf "$tgz" -C "$SRCDIR.new" --strip-components=1
	mv "$SRCDIR.new" "$SRCDIR"
fi

# ------------------------------------------------------------------ build
WORK=$(mktemp -d "$CACHE_ROOT/rdma-core/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step "configuring rdma-core $VERSION with the virtio_rdma provider (prefix $PREFIX)"
cp -a "$SRCDIR" "$WORK/src"
mkdir -p "$WORK/src/providers/virtio_rdma"
cp "$PROVIDER/virtio_rdma.c" "$PROVIDER/CMakeLists.txt" "$WORK/src/providers/virtio_rdma/"
sed -i 's|^add_subdirectory(providers/siw)$|&\nadd_subdirectory(providers/virtio_rdma)|' "$WORK/src/CMakeLists.txt"
grep -q '^add_subdirectory(providers/virtio_rdma)$' "$WORK/src/CMakeLists.txt" || die "cannot add the provider to rdma-core's CMakeLists.txt"
LOG="$WORK/build.log"
(cd "$WORK" && mkdir build && cd build &&
	cmake -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_INSTALL_SYSCONFDIR="$PREFIX/etc" \
		-DNO_PYVERBS=1 -DNO_MAN_PAGES=1 -DENABLE_VALGRIND=0 ../src) >"$LOG" 2>&1 || { tail -30 "$LOG" >&2; die "cmake failed (log above)"; }
step "building ${TARGETS[*]}"
(cd "$WORK/build" && ninja -j"$(nproc)" "${TARGETS[@]}") >>"$LOG" 2>&1 || { tail -40 "$LOG" >&2; die "build failed (log above)"; }

# Install by hand what was built (ninja install would want every target).
step "installing into the cache"
NEW="$OUT.new.$$"
rm -rf "$NEW"
R="$NEW/root$PREFIX"
mkdir -p "$R/lib/libibverbs" "$R/etc/libibverbs.d" "$R/bin"
B="$WORK/build"
cp -a "$B"/lib/libibverbs.so* "$R/lib/"
for p in virtio_rdma rxe; do
	cp -a "$B/lib/lib$p-rdmav34.so" "$R/lib/libibverbs/"
	echo "driver $p" >"$R/etc/libibverbs.d/$p.driver"
done
for t in ibv_devices ibv_devinfo ibv_rc_pingpong ibv_uc_pingpong ibv_ud_pingpong; do cp "$B/bin/$t" "$R/bin/"; done
step "building vrdma_conformance"
gcc -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter -I"$B/include" -o "$R/bin/vrdma_conformance" "$CONFORMANCE" -L"$B/lib" -libverbs >>"$LOG" 2>&1 ||
	{ tail -30 "$LOG" >&2; die "building vrdma_conformance failed (log above)"; }
step "building vrdma_stream"
gcc -O2 -g -Wall -Wextra -Werror -Wno-unused-parameter -I"$B/include" -o "$R/bin/vrdma_stream" "$STREAM" -L"$B/lib" -libverbs >>"$LOG" 2>&1 ||
	{ tail -30 "$LOG" >&2; die "building vrdma_stream failed (log above)"; }
strip --strip-debug "$R"/lib/*.so* "$R"/lib/libibverbs/*.so "$R"/bin/* 2>/dev/null || true
cp "$LOG" "$NEW/"
cat >"$NEW/info" <<INFO
rdma-core=$VERSION
sha256=$SHA256
prefix=$PREFIX
key=$KEY
INFO
rm -rf "$OUT"
mv "$NEW" "$OUT"
step "built $OUT/root ($(du -sh "$OUT/root" | cut -f1))"
printf '%s\n' "$OUT/root"
