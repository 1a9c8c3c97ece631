#!/usr/bin/env bash
# Builds native/guest/probe/virtio_rdma_probe.ko (the guest-side virtio-rdma
# probe) against Debian's headers for the guest kernel, and caches it.
#
#   bash images/guest/probe.sh [--release REL] [--kernel-version VER] [--force]
#   bash images/guest/probe.sh --key
#
# Prints the path of the cached .ko on stdout; progress goes to stderr.
#   --release REL         kernel release, e.g. 6.1.0-56-amd64 (default: the
#                         cached guest image's, from guest/manifest.json)
#   --kernel-version VER  Debian version of the guest kernel package; the
#                         headers package should have the same (warns if not)
#   --force               rebuild even when the cache has this build
#   --key                 print the source hash (the cache key's source part)
#                         and exit; build.sh puts it into the image's stamp
#
# images/guest/build.sh runs this for the kernel it puts into the image and
# adds the module to the initramfs (modules.txt: virtio_rdma_probe noload).
#
# Host changes: when /usr/src/linux-headers-REL is missing, installs
# linux-headers-REL with apt-get (it brings linux-headers-*-common,
# linux-kbuild-6.1 and gcc-12, the compiler Debian built the kernel with).
# Nothing else: the build runs in a temp copy of the sources.
#
# Cache: ${VRDMA_CACHE:-$HOME/.cache/vrdma}/probe/REL-HASH/
#   virtio_rdma_probe.ko, build.log, info        (HASH: --key)
# Not under guest/: build.sh replaces that directory on every image rebuild.
set -euo pipefail
export LC_ALL=C
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/../../native/guest/probe" && pwd)
CACHE_ROOT=${VRDMA_CACHE:-${HOME:-/root}/.cache/vrdma}
MOD=virtio_rdma_probe
# what goes into the build: sources + this script (it decides how to build)
SOURCES=("$SRC/$MOD.c" "$SRC/Kbuild" "$HERE/probe.sh")

T0=${EPOCHREALTIME/[.,]/}
step() {
	local now=${EPOCHREALTIME/[.,]/} ms
	ms=$(((now - T0) / 1000))
	printf '[guest-probe %3d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
warn() { printf '[guest-probe] WARNING: %s\n' "$*" >&2; }
die() { printf '[guest-probe] ERROR: %s\n' "$*" >&2; exit 1; }

src_hash() { (cd / && sha256sum "${SOURCES[@]}") | awk '{ print $1 }' | sha256sum | cut -c1-16; }

REL="" KVER="" FORCE=0
while [ $# -gt 0 ]; do
	case "$1" in
	--key) src_hash; exit 0 ;;
	--release) REL=${2:?--release needs a value}; shift ;;
	--kernel-version) KVER=${2:?--kernel-version needs a value}; shift ;;
	--force | -f) FORCE=1 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "probe.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
	shift
done

if [ -z "$REL" ]; then
	manifest="$CACHE_ROOT/guest/manifest.json"
	[ -f "$manifest" ] || die "no --release and no guest image ($manifest); run bash images/guest/build.sh (it builds the probe too)"
	REL=$(sed -n 's/^ *"kernelRelease": "\([^"]*\)".*/\1/p' "$manifest")
	KVER=${KVER:-$(sed -n 's/^ *"kernelPackageVersion": "\([^"]*\)".*/\1/p' "$manifest")}
	[ -n "$REL" ] || die "$manifest has no kernelRelease"
fi
case "$REL" in
*/* | '' | .*) die "bad kernel release '$REL'" ;;
esac

HASH=$(src_hash)
OUT="$CACHE_ROOT/probe/$REL-$HASH"
KO="$OUT/$MOD.ko"
if [ "$FORCE" = 0 ] && [ -s "$KO" ]; then
	step "up to date: $KO"
	printf '%s\n' "$KO"
	exit 0
fi

mkdir -p "$CACHE_ROOT/probe"
exec 9>"$CACHE_ROOT/probe.lock"
if ! flock -n 9; then
	step "another probe.sh holds $CACHE_ROOT/probe.lock; waiting"
	flock 9
	if [ "$FORCE" = 0 ] && [ -s "$KO" ]; then
		printf '%s\n' "$KO"
		exit 0
	fi
fi

# ------------------------------------------------------------------ headers
KDIR=/usr/src/linux-headers-$REL
HPKG=linux-headers-$REL
if [ ! -f "$KDIR/Makefile" ] || ! command -v make >/dev/null 2>&1; then
	[ "$(id -u)" = 0 ] || die "$KDIR missing; run as root, or: sudo apt-get install $HPKG make"
	cand() { apt-cache policy "$1" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2; exit }'; }
	if [ -z "$(cand "$HPKG")" ]; then
		step "apt-get update (no candidate for $HPKG)"
		apt-get update -qq >/dev/null 2>"$CACHE_ROOT/probe-apt-update.log" || warn "apt-get update reported errors (see $CACHE_ROOT/probe-apt-update.log)"
		[ -n "$(cand "$HPKG")" ] || die "no candidate for $HPKG in apt: the mirror no longer has the headers of the guest kernel $REL (rebuild the guest image for the current kernel: bash images/guest/build.sh)"
	fi
	step "installing $HPKG $(cand "$HPKG") (apt-get)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "$HPKG" make \
		>"$CACHE_ROOT/probe-apt-install.log" 2>&1 || die "apt-get install $HPKG make failed (see $CACHE_ROOT/probe-apt-install.log)"
	[ -f "$KDIR/Makefile" ] || die "$HPKG is installed but $KDIR/Makefile is missing"
fi
HVER=$(dpkg-query -W -f='${Version}' "$HPKG" 2>/dev/null || true)
if [ -n "$KVER" ] && [ -n "$HVER" ] && [ "$HVER" != "$KVER" ]; then
	warn "$HPKG is $HVER but the guest kernel package is $KVER (same ABI name, so symbol versions should match)"
fi
# (Debian's include/config/kernel.release holds the upstream version; UTS_RELEASE is the release)
krel=$(sed -n 's/^#define UTS_RELEASE "\(.*\)"$/\1/p' "$KDIR/include/generated/utsrelease.h" 2>/dev/null || true)
[ "$krel" = "$REL" ] || die "$KDIR is for release '$krel', not $REL"

# ------------------------------------------------------------------ build
step "building $MOD.ko for $REL (headers $HVER, sources $HASH)"
WORK=$(mktemp -d "$CACHE_ROOT/probe/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cp "$SRC/$MOD.c" "$SRC/Kbuild" "$WORK/"
if ! make -C "$KDIR" M="$WORK" modules >"$WORK/build.log" 2>&1; then
	cat "$WORK/build.log" >&2
	die "building $MOD.ko failed (log above)"
fi
[ -s "$WORK/$MOD.ko" ] || die "make succeeded but produced no $MOD.ko"
vermagic=$(modinfo -F vermagic "$WORK/$MOD.ko" 2>/dev/null || true)
case "$vermagic" in
"$REL "*) ;;
*) die "$MOD.ko has vermagic '$vermagic', expected $REL" ;;
esac
kcc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$KDIR/.config" 2>/dev/null || true)
# debug info is 90 % of the file; the initramfs does not need it
strip --strip-debug "$WORK/$MOD.ko" || die "strip --strip-debug $MOD.ko failed"

NEW="$OUT.new.$$"
rm -rf "$NEW"
mkdir -p "$NEW"
cp "$WORK/$MOD.ko" "$WORK/build.log" "$NEW/"
cat >"$NEW/info" <<EOF
release=$REL
headers=$HPKG=$HVER
sources=$HASH
vermagic=$vermagic
kernel_compiler=$kcc
EOF
rm -rf "$OUT"
mv "$NEW" "$OUT"
# keep the 8 newest builds (other checkouts sharing the cache may use older sources)
ls -1dt "$CACHE_ROOT/probe"/*/ 2>/dev/null | tail -n +9 | while read -r d; do rm -rf "$d"; done
step "built $KO ($(stat -c %s "$KO") bytes)"
printf '%s\n' "$KO"
