#!/usr/bin/env bash
# Builds native/guest/virtio_rdma/virtio_rdma.ko (the guest RDMA driver for
# the virtio-rdma device) against Debian's headers for the guest kernel, and
# caches it.
#
#   bash images/guest/virtio-rdma.sh [--release REL] [--kernel-version VER] [--force]
#   bash images/guest/virtio-rdma.sh --key
#
# Prints the path of the cached .ko on stdout; progress goes to stderr.
#   --release REL         kernel release, e.g. 6.1.0-56-amd64 (default: the
#                         cached guest image's, from guest/manifest.json)
#   --kernel-version VER  Debian version of the guest kernel package; the
#                         headers package should have the same (warns if not)
#   --force               rebuild even when the cache has this build
#   --key                 print the source hash (the cache key's source part)
#                         and exit
#
# Next to the .ko the cache holds vrdma_kselftest.ko (the in-kernel consumer
# test from selftest/, for VM tests; not for the image) and deps/: the in-kernel modules it needs
# (ib_core, ib_uverbs), taken from the guest kernel package build.sh keeps
# in the cache, and deps/order (load order, one file name per line). A test
# can insmod them into an image whose modules.txt does not list them yet.
#
# Host changes: when /usr/src/linux-headers-REL is missing, installs
# linux-headers-REL with apt-get (it brings linux-headers-*-common,
# linux-kbuild-6.1 and gcc-12, the compiler Debian built the kernel with).
# Nothing else: the build runs in a temp copy of the sources.
# With VRDMA_GUEST_FLAVOUR=backports (flavour.sh) nothing on the host
# changes: the headers, common headers and kbuild packages of the backports
# kernel are fetched through the private apt set-up and unpacked into
# ${VRDMA_CACHE:-$HOME/.cache/vrdma}/headers-backports/REL/.
#
# Cache: ${VRDMA_CACHE:-$HOME/.cache/vrdma}/virtio-rdma/REL-HASH/
#   virtio_rdma.ko, vrdma_kselftest.ko, deps/, build.log, info   (HASH: --key)
set -euo pipefail
export LC_ALL=C
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/../../native/guest/virtio_rdma" && pwd)
CACHE_ROOT=${VRDMA_CACHE:-${HOME:-/root}/.cache/vrdma}
# shellcheck source=flavour.sh
. "$HERE/flavour.sh"
MOD=virtio_rdma
DEPS=(ib_core ib_uverbs)
mapfile -t SOURCES < <(cd / && ls "$SRC"/*.c "$SRC"/*.h "$SRC/Kbuild" "$SRC/selftest/vrdma_kselftest.c" "$SRC/selftest/Kbuild" | sort)
SOURCES+=("$HERE/virtio-rdma.sh" "$HERE/flavour.sh")

T0=${EPOCHREALTIME/[.,]/}
step() {
	local now=${EPOCHREALTIME/[.,]/} ms
	ms=$(((now - T0) / 1000))
	printf '[virtio-rdma %3d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
warn() { printf '[virtio-rdma] WARNING: %s\n' "$*" >&2; }
die() { printf '[virtio-rdma] ERROR: %s\n' "$*" >&2; exit 1; }

# names and contents: a renamed or added file changes the key
src_hash() { (cd / && sha256sum "${SOURCES[@]}") | awk '{ n = $2; sub(".*/", "", n); print $1, n }' | sha256sum | cut -c1-16; }

REL="" KVER="" FORCE=0
while [ $# -gt 0 ]; do
	case "$1" in
	--key) src_hash; exit 0 ;;
	--release) REL=${2:?--release needs a value}; shift ;;
	--kernel-version) KVER=${2:?--kernel-version needs a value}; shift ;;
	--force | -f) FORCE=1 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "virtio-rdma.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
	shift
done

manifest="$CACHE_ROOT/guest$FLAVOUR_SUFFIX/manifest.json"
if [ -z "$REL" ]; then
	[ -f "$manifest" ] || die "no --release and no guest image ($manifest); run bash images/guest/build.sh"
	REL=$(sed -n 's/^ *"kernelRelease": "\([^"]*\)".*/\1/p' "$manifest")
	KVER=${KVER:-$(sed -n 's/^ *"kernelPackageVersion": "\([^"]*\)".*/\1/p' "$manifest")}
	[ -n "$REL" ] || die "$manifest has no kernelRelease"
fi
case "$REL" in
*/* | '' | .*) die "bad kernel release '$REL'" ;;
esac

HASH=$(src_hash)
OUT="$CACHE_ROOT/virtio-rdma/$REL-$HASH"
KO="$OUT/$MOD.ko"
if [ "$FORCE" = 0 ] && [ -s "$KO" ] && [ -s "$OUT/vrdma_kselftest.ko" ] && [ -s "$OUT/deps/order" ]; then
	step "up to date: $KO"
	printf '%s\n' "$KO"
	exit 0
fi

mkdir -p "$CACHE_ROOT/virtio-rdma"
exec 9>"$CACHE_ROOT/virtio-rdma.lock"
if ! flock -n 9; then
	step "another virtio-rdma.sh holds $CACHE_ROOT/virtio-rdma.lock; waiting"
	flock 9
	if [ "$FORCE" = 0 ] && [ -s "$KO" ] && [ -s "$OUT/vrdma_kselftest.ko" ] && [ -s "$OUT/deps/order" ]; then
		printf '%s\n' "$KO"
		exit 0
	fi
fi

# ------------------------------------------------------------------ headers
KDIR=/usr/src/linux-headers-$REL
HPKG=linux-headers-$REL
MAKE_VARS=()
if [ "$FLAVOUR" = backports ]; then
	# Unpacked, not installed: linux-headers-REL and the two packages it needs
	# for building modules. Its Makefile includes the common tree by absolute
	# path; the unpacked copy points it at the unpacked one.
	HROOT="$CACHE_ROOT/headers-backports/$REL"
	KDIR="$HROOT/usr/src/linux-headers-$REL"
	if [ ! -f "$HROOT/.complete" ]; then
		command -v make >/dev/null 2>&1 && command -v gcc-12 >/dev/null 2>&1 || die "the backports kernel's modules need make and gcc-12 (apt-get install make gcc-12)"
		flavour_apt_update || die "apt-get update of bookworm-backports failed (see $FLAVOUR_APT/update.log)"
		deps=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$HPKG" 2>/dev/null | sed -n 's/^Depends: //p')
		[ -n "$deps" ] || die "no $HPKG in bookworm-backports (rebuild the guest image: VRDMA_GUEST_FLAVOUR=backports bash images/guest/build.sh)"
		pkgs=("$HPKG")
		for want in "linux-headers-[^ ,]*-common" "linux-kbuild-[^ ,]*"; do
			p=$(grep -o "$want" <<<"$deps" | head -n1)
			[ -n "$p" ] || die "$HPKG does not depend on a package like $want: $deps"
			pkgs+=("$p")
		done
		step "fetching ${pkgs[*]} (bookworm-backports)"
		rm -rf "$HROOT"
		mkdir -p "$HROOT/debs"
		(cd "$HROOT/debs" && apt-get "${APT_OPTS[@]}" download -q -o APT::Sandbox::User=root "${pkgs[@]}") >"$HROOT/download.log" 2>&1 ||
			die "downloading ${pkgs[*]} failed (see $HROOT/download.log)"
		for f in "$HROOT"/debs/*.deb; do dpkg-deb -x "$f" "$HROOT" || die "dpkg -x $f failed"; done
		sed -i "s|^include /usr/src/|include $HROOT/usr/src/|" "$KDIR/Makefile"
		rm -rf "$HROOT/debs"
		touch "$HROOT/.complete"
		# one backports kernel at a time: drop the headers of earlier ones
		for d in "$CACHE_ROOT/headers-backports"/*/; do [ "$d" = "$HROOT/" ] || rm -rf "$d"; done
	fi
	HVER=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$HPKG" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
	# BTF for modules needs pahole and the kernel's own vmlinux; neither is here, and nothing in the guest wants it
	MAKE_VARS=(CONFIG_DEBUG_INFO_BTF_MODULES=)
elif [ ! -f "$KDIR/Makefile" ] || ! command -v make >/dev/null 2>&1; then
	[ "$(id -u)" = 0 ] || die "$KDIR missing; run as root, or: sudo apt-get install $HPKG make"
	cand() { apt-cache policy "$1" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2; exit }'; }
	if [ -z "$(cand "$HPKG")" ]; then
		step "apt-get update (no candidate for $HPKG)"
		apt-get update -qq >/dev/null 2>"$CACHE_ROOT/virtio-rdma-apt-update.log" || warn "apt-get update reported errors (see $CACHE_ROOT/virtio-rdma-apt-update.log)"
		[ -n "$(cand "$HPKG")" ] || die "no candidate for $HPKG in apt: the mirror no longer has the headers of the guest kernel $REL (rebuild the guest image: bash images/guest/build.sh)"
	fi
	step "installing $HPKG $(cand "$HPKG") (apt-get)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "$HPKG" make \
		>"$CACHE_ROOT/virtio-rdma-apt-install.log" 2>&1 || die "apt-get install $HPKG make failed (see $CACHE_ROOT/virtio-rdma-apt-install.log)"
	[ -f "$KDIR/Makefile" ] || die "$HPKG is installed but $KDIR/Makefile is missing"
fi
[ "$FLAVOUR" = backports ] || HVER=$(dpkg-query -W -f='${Version}' "$HPKG" 2>/dev/null || true)
if [ -n "$KVER" ] && [ -n "$HVER" ] && [ "$HVER" != "$KVER" ]; then
	warn "$HPKG is $HVER but the guest kernel package is $KVER (same ABI name, so symbol versions should match)"
fi
krel=$(sed -n 's/^#define UTS_RELEASE "\(.*\)"$/\1/p' "$KDIR/include/generated/utsrelease.h" 2>/dev/null || true)
[ "$krel" = "$REL" ] || die "$KDIR is for release '$krel', not $REL"

# ------------------------------------------------------------------ build
step "building $MOD.ko for $REL (headers $HVER, sources $HASH)"
WORK=$(mktemp -d "$CACHE_ROOT/virtio-rdma/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cp "$SRC"/*.c "$SRC"/*.h "$SRC/Kbuild" "$WORK/"
if ! nice -n 10 make -j1 -C "$KDIR" M="$WORK" "${MAKE_VARS[@]}" modules >"$WORK/build.log" 2>&1; then
	cat "$WORK/build.log" >&2
	die "building $MOD.ko failed (log above)"
fi
[ -s "$WORK/$MOD.ko" ] || die "make succeeded but produced no $MOD.ko"
vermagic=$(modinfo -F vermagic "$WORK/$MOD.ko" 2>/dev/null || true)
case "$vermagic" in
"$REL "*) ;;
*) die "$MOD.ko has vermagic '$vermagic', expected $REL" ;;
esac
strip --strip-debug "$WORK/$MOD.ko" || die "strip --strip-debug $MOD.ko failed"

mkdir -p "$WORK/selftest"
cp "$SRC/selftest/vrdma_kselftest.c" "$SRC/selftest/Kbuild" "$WORK/selftest/"
if ! nice -n 10 make -j1 -C "$KDIR" M="$WORK/selftest" "${MAKE_VARS[@]}" modules >>"$WORK/build.log" 2>&1; then
	cat "$WORK/build.log" >&2
	die "building vrdma_kselftest.ko failed (log above)"
fi
strip --strip-debug "$WORK/selftest/vrdma_kselftest.ko" || die "strip --strip-debug vrdma_kselftest.ko failed"

# ------------------------------------------------------------------ deps
KDEB=$(ls "$CACHE_ROOT/debs$FLAVOUR_SUFFIX"/linux-image-"$REL"_*.deb 2>/dev/null | head -n1 || true)
[ -n "$KDEB" ] || die "no linux-image-$REL .deb in $CACHE_ROOT/debs$FLAVOUR_SUFFIX (VRDMA_GUEST_FLAVOUR=$FLAVOUR bash images/guest/build.sh downloads it)"
mkdir -p "$WORK/kroot" "$WORK/deps"
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$WORK/kroot" --wildcards './lib/modules/*/kernel/drivers/infiniband/core/*' \
	|| die "unpacking the RDMA core modules from $KDEB failed"
for m in "${DEPS[@]}"; do
	f=$(find "$WORK/kroot" -name "$m.ko*" -print -quit)
	[ -n "$f" ] || die "$KDEB has no $m module"
	cp "$f" "$WORK/deps/"
	basename "$f" >>"$WORK/deps/order"
done
needs=$(modinfo -F depends "$WORK/$MOD.ko")
for m in ${needs//,/ }; do
	case "$m" in
	virtio | virtio_ring) ;; # in the image (virtio_pci)
	*) grep -q "^$m\.ko" "$WORK/deps/order" || die "$MOD.ko depends on $m, which deps/ lacks" ;;
	esac
done

NEW="$OUT.new.$$"
rm -rf "$NEW"
mkdir -p "$NEW"
cp -r "$WORK/$MOD.ko" "$WORK/selftest/vrdma_kselftest.ko" "$WORK/build.log" "$WORK/deps" "$NEW/"
cat >"$NEW/info" <<INFO
release=$REL
headers=$HPKG=$HVER
sources=$HASH
vermagic=$vermagic
deps=$(tr '\n' ' ' <"$WORK/deps/order")(from $(basename "$KDEB"))
INFO
rm -rf "$OUT"
mv "$NEW" "$OUT"
# keep the 8 newest builds (other checkouts sharing the cache may use older sources)
ls -1dt "$CACHE_ROOT/virtio-rdma"/*/ 2>/dev/null | tail -n +9 | while read -r d; do rm -rf "$d"; done
step "built $KO ($(stat -c %s "$KO") bytes)"
printf '%s\n' "$KO"
