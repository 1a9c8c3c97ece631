#!/usr/bin/env bash
# Builds qemu-system-x86_64 with the vhost-user-rdma device: QEMU 10.0.x from
# Debian's source package plus 0001-vhost-user-rdma-pci.patch.
#
#   bash images/qemu/build.sh [--force] [--keep-build]
#
# Prints progress on stderr and the path of the binary on stdout (last line):
#   ${VRDMA_CACHE:-$HOME/.cache/vrdma}/qemu/current/bin/qemu-system-x86_64
# The binary is relocatable and finds its firmware in ../share/qemu (SeaBIOS,
# option ROMs and iPXE ROMs copied from Debian's packages), so it runs as is.
#
# Cache layout (${VRDMA_CACHE:-$HOME/.cache/vrdma}/qemu/):
#   <upstream>-<key>/  bin/qemu-system-x86_64, share/qemu/, stamp, build-info
#   current            symlink to the newest build
#   src/               the downloaded source package (.dsc, tarballs)
#   tools/             meson >= 1.5 unpacked from bookworm-backports
#   apt/               a private apt configuration for deb-src trixie and
#                      bookworm-backports (the system's sources are untouched)
#   work/              the build tree while building (removed afterwards
#                      unless --keep-build)
# The key is a hash of the source package version, the patch and this script.
# A warm cache returns in well under a second without touching the network.
#
# Environment:
#   VRDMA_CACHE          cache root (default $HOME/.cache/vrdma)
#   VRDMA_QEMU_VERSION   Debian source version to build first, e.g.
#                        1:10.0.13+ds-0+deb13u1 (other 10.0.x are tried after)
#   VRDMA_QEMU_JOBS      ninja jobs (default 2)
#   VRDMA_DEBIAN_MIRROR  mirror for trixie/bookworm-backports (default
#                        http://deb.debian.org/debian)
#
# Host changes: installs missing build dependencies from bookworm with apt-get
# (compiler, pkg-config, ninja-build, flex, bison, libglib2.0-dev,
# libpixman-1-dev, libfdt-dev, libslirp-dev, libattr1-dev, python3-venv, ...)
# and the firmware packages seabios, ipxe-qemu and qemu-system-data. Nothing
# is installed from trixie or bookworm-backports: meson is fetched with
# `apt-get download` and unpacked with `dpkg -x` into the cache.
set -euo pipefail
export LC_ALL=C
# /usr/bin first: QEMU's configure must find Debian's python3 (pyenv shims
# point at an interpreter without meson's dependencies).
export PATH="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin:${PATH:-}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH="$HERE/0001-vhost-user-rdma-pci.patch"
CACHE_ROOT=${VRDMA_CACHE:-${HOME:-/root}/.cache/vrdma}
QDIR="$CACHE_ROOT/qemu"
JOBS=${VRDMA_QEMU_JOBS:-2}
MIRROR=${VRDMA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Known good (built and tested with the patch). Tried first, then any other
# 10.0.x the mirror offers, newest first.
PREFERRED_VERSIONS=("${VRDMA_QEMU_VERSION:-}" "1:10.0.13+ds-0+deb13u1")
# Suites searched for the source package and for meson.
SRC_SUITES="trixie bookworm-backports"
MESON_SUITES=(bookworm-backports trixie)

FORCE=0 KEEP=0
for arg in "$@"; do
	case "$arg" in
	--force | -f) FORCE=1 ;;
	--keep-build) KEEP=1 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "build.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
	esac
done

T0=${EPOCHREALTIME/[.,]/}
elapsed() {
	local now=${EPOCHREALTIME/[.,]/} ms
	ms=$(((now - T0) / 1000))
	printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100))
}
step() { printf '[qemu %6s] %s\n' "$(elapsed)" "$*" >&2; }
warn() { printf '[qemu] WARNING: %s\n' "$*" >&2; }
die() { printf '[qemu] ERROR: %s\n' "$*" >&2; exit 1; }

[ -f "$PATCH" ] || die "patch not found: $PATCH"
mkdir -p "$QDIR"

# ------------------------------------------------------------------ lock
exec 9>"$CACHE_ROOT/qemu.lock"
if ! flock -n 9; then
	step "another build.sh holds $CACHE_ROOT/qemu.lock; waiting"
	flock 9
fi

# ------------------------------------------------------- cache key, warm path
PATCH_HASH=$(sha256sum "$PATCH" | cut -c1-16)
SCRIPT_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
# The source version is known once the source package is in src/.
SRC_VERSION=$(cat "$QDIR/src/VERSION" 2>/dev/null || true)
if [ -n "${VRDMA_QEMU_VERSION:-}" ] && [ "$SRC_VERSION" != "$VRDMA_QEMU_VERSION" ]; then
	SRC_VERSION=""
fi

key_of() { # VERSION -> install dir name
	local upstream=${1#*:}
	upstream=${upstream%%+*}
	upstream=${upstream%%-*}
	printf '%s-%s' "$upstream" "$(printf 'source=%s\npatch=%s\nscript=%s\n' "$1" "$PATCH_HASH" "$SCRIPT_HASH" | sha256sum | cut -c1-12)"
}
stamp_text() {
	printf 'source=qemu=%s\npatch=%s\nscript=%s\n' "$1" "$PATCH_HASH" "$SCRIPT_HASH"
}
installed_ok() { # DIR VERSION -> the stamp matches and the binary runs
	[ -f "$1/stamp" ] && [ "$(cat "$1/stamp")" = "$(stamp_text "$2")" ] &&
		"$1/bin/qemu-system-x86_64" --version >/dev/null 2>&1
}
finish() { # DIR
	ln -sfn "$(basename "$1")" "$QDIR/current.tmp" && mv -T "$QDIR/current.tmp" "$QDIR/current"
	printf '%s\n' "$QDIR/current/bin/qemu-system-x86_64"
	exit 0
}

if [ "$FORCE" = 0 ] && [ -n "$SRC_VERSION" ]; then
	DEST="$QDIR/$(key_of "$SRC_VERSION")"
	if installed_ok "$DEST" "$SRC_VERSION"; then
		step "up to date: $DEST (qemu $SRC_VERSION + vhost-user-rdma)"
		finish "$DEST"
	fi
fi

# ---------------------------------------------------------------- host packages
APT_UPDATED=0
apt_update_once() {
	[ "$APT_UPDATED" = 1 ] && return 0
	APT_UPDATED=1
	step "apt-get update (no candidate for a needed package)"
	apt-get update -qq >"$QDIR/apt-update.log" 2>&1 ||
		warn "apt-get update reported errors (see $QDIR/apt-update.log); continuing"
}
apt_candidate() {
	apt-cache policy "$1" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2; exit }'
}
# Build dependencies (bookworm) and the firmware the result uses.
BUILD_DEPS=(gcc g++ make pkg-config ninja-build flex bison patch dpkg-dev xz-utils
	python3 python3-venv python3-setuptools
	libglib2.0-dev libpixman-1-dev libfdt-dev libslirp-dev libattr1-dev zlib1g-dev
	seabios ipxe-qemu qemu-system-data)
missing=()
for p in "${BUILD_DEPS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; run as root or: sudo apt-get install --no-install-recommends ${missing[*]}"
	for p in "${missing[@]}"; do [ -n "$(apt_candidate "$p")" ] || apt_update_once; done
	step "installing build dependencies (bookworm): ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
		"${missing[@]}" >"$QDIR/apt-install.log" 2>&1 ||
		die "apt-get install failed (see $QDIR/apt-install.log)"
fi

# ------------------------------------------------- private apt (trixie, bpo)
# deb + deb-src for trixie and bookworm-backports in a configuration of our
# own (sources, lists and caches under $QDIR/apt): apt-get source and
# apt-get download use it; the system's apt sees none of it, so nothing can
# be upgraded from these suites by accident.
APTDIR="$QDIR/apt"
mkdir -p "$APTDIR/sources.list.d" "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
cat >"$APTDIR/sources.list.d/vrdma-qemu.sources.new" <<EOF
Types: deb deb-src
URIs: $MIRROR
Suites: $SRC_SUITES
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
if ! cmp -s "$APTDIR/sources.list.d/vrdma-qemu.sources.new" "$APTDIR/sources.list.d/vrdma-qemu.sources"; then
	mv "$APTDIR/sources.list.d/vrdma-qemu.sources.new" "$APTDIR/sources.list.d/vrdma-qemu.sources"
	rm -f "$APTDIR/lists/"*_dists_* # sources changed: lists are stale
else
	rm -f "$APTDIR/sources.list.d/vrdma-qemu.sources.new"
fi
PAPT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
	-o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache"
	-o APT::Sandbox::User=root -o Acquire::Languages=none)
PAPT_UPDATED=0
papt_update() {
	[ "$PAPT_UPDATED" = 1 ] && return 0
	PAPT_UPDATED=1
	step "apt-get update (private lists: $SRC_SUITES)"
	apt-get "${PAPT[@]}" update -qq >"$APTDIR/update.log" 2>&1 ||
		warn "apt-get update of $SRC_SUITES reported errors (see $APTDIR/update.log)"
}
papt_have_lists() { compgen -G "$APTDIR/lists/*Sources*" >/dev/null; }
papt_need_lists() {
	papt_have_lists || papt_update
	papt_have_lists ||
		die "cannot get the package lists of $SRC_SUITES from $MIRROR: $(grep -m2 -E '^(E|Err|W):' "$APTDIR/update.log" | tr '\n' ' ')(see $APTDIR/update.log)"
}

WORK="$QDIR/work"
TMPD=$(mktemp -d "$QDIR/tmp.XXXXXX")
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() { rm -rf "$TMPD"; }
trap cleanup EXIT

# ---------------------------------------------------------------- source
# src/ holds one source package and VERSION; reused while it matches.
src_complete() {
	[ -f "$QDIR/src/VERSION" ] && [ -n "$(find "$QDIR/src" -maxdepth 1 -name 'qemu_*.dsc' -print -quit)" ]
}
if [ -n "$SRC_VERSION" ] && src_complete; then
	step "source package cached: qemu $SRC_VERSION"
else
	papt_need_lists
	available() {
		apt-cache "${PAPT[@]}" showsrc qemu 2>/dev/null | awk '/^Package: / { p = $2 } /^Version: / && p == "qemu" { print $2 }' | sort -u
	}
	mapfile -t avail < <(available)
	if [ "${#avail[@]}" = 0 ] && [ "$PAPT_UPDATED" = 0 ]; then
		papt_update
		mapfile -t avail < <(available)
	fi
	# candidates: preferred first, then other 10.0.x newest first
	mapfile -t others < <(printf '%s\n' "${avail[@]}" | grep -E '^([0-9]+:)?10\.0\.' | sort -t: -k2 -V -r)
	candidates=()
	for v in "${PREFERRED_VERSIONS[@]}" "${others[@]}"; do
		[ -n "$v" ] || continue
		case " ${candidates[*]} " in *" $v "*) continue ;; esac
		candidates+=("$v")
	done
	[ "${#candidates[@]}" -gt 0 ] || die "no qemu 10.0.x source package in $SRC_SUITES at $MIRROR (apt-cache showsrc qemu shows: ${avail[*]:-nothing}; see $APTDIR/update.log)"
	got=""
	tried=()
	for v in "${candidates[@]}"; do
		step "downloading source package qemu=$v"
		dl="$TMPD/src"
		rm -rf "$dl" && mkdir -p "$dl"
		if (cd "$dl" && apt-get "${PAPT[@]}" source --download-only -q "qemu=$v") >"$TMPD/source.log" 2>&1 &&
			[ -n "$(find "$dl" -maxdepth 1 -name 'qemu_*.dsc' -print -quit)" ]; then
			got=$v
			break
		fi
		tried+=("$v: $(grep -E '^(E|W): ' "$TMPD/source.log" | head -n2 | tr '\n' ' ')")
		if [ "$PAPT_UPDATED" = 0 ]; then # stale lists? refresh once and retry this one
			papt_update
			if (cd "$dl" && apt-get "${PAPT[@]}" source --download-only -q "qemu=$v") >"$TMPD/source.log" 2>&1 &&
				[ -n "$(find "$dl" -maxdepth 1 -name 'qemu_*.dsc' -print -quit)" ]; then
				got=$v
				break
			fi
		fi
	done
	if [ -z "$got" ]; then
		printf '  %s\n' "${tried[@]}" >&2
		die "could not download a complete qemu 10.0.x source package (.dsc + tarballs) from $MIRROR; tried the versions above"
	fi
	rm -rf "$QDIR/src" && mkdir -p "$QDIR/src"
	mv "$dl"/* "$QDIR/src/"
	printf '%s' "$got" >"$QDIR/src/VERSION"
	SRC_VERSION=$got
fi
DEST="$QDIR/$(key_of "$SRC_VERSION")"
if [ "$FORCE" = 0 ] && installed_ok "$DEST" "$SRC_VERSION"; then
	step "up to date: $DEST"
	finish "$DEST"
fi

# ---------------------------------------------------------------- meson
# QEMU 10.0 needs meson >= 1.5; bookworm has 1.0.1. Debian's package is pure
# Python: unpack it and point PYTHONPATH at it.
meson_ok() { # TOOLS_DIR
	[ -f "$1/usr/lib/python3/dist-packages/mesonbuild/__init__.py" ] &&
		PYTHONPATH="$1/usr/lib/python3/dist-packages" /usr/bin/python3 "$1/usr/bin/meson" --version 2>/dev/null |
		awk -F. '{ exit !($1 > 1 || ($1 == 1 && $2 >= 5)) }'
}
TOOLS="$QDIR/tools"
if ! meson_ok "$TOOLS"; then
	papt_need_lists
	got=""
	for suite in "${MESON_SUITES[@]}"; do
		step "downloading meson from $suite"
		rm -rf "$TMPD/meson" && mkdir -p "$TMPD/meson"
		if (cd "$TMPD/meson" && apt-get "${PAPT[@]}" download -q "meson/$suite") >"$TMPD/meson.log" 2>&1 ||
			{ papt_update && (cd "$TMPD/meson" && apt-get "${PAPT[@]}" download -q "meson/$suite") >"$TMPD/meson.log" 2>&1; }; then
			deb=$(find "$TMPD/meson" -name 'meson_*.deb' -print -quit)
			rm -rf "$TOOLS.new" && mkdir -p "$TOOLS.new"
			if [ -n "$deb" ] && dpkg-deb -x "$deb" "$TOOLS.new" && meson_ok "$TOOLS.new"; then
				rm -rf "$TOOLS" && mv "$TOOLS.new" "$TOOLS"
				got=$suite
				break
			fi
		fi
	done
	[ -n "$got" ] || die "could not get meson >= 1.5 from ${MESON_SUITES[*]} (see $TMPD/meson.log)"
fi
MESON_VERSION=$(PYTHONPATH="$TOOLS/usr/lib/python3/dist-packages" /usr/bin/python3 "$TOOLS/usr/bin/meson" --version)
export PYTHONPATH="$TOOLS/usr/lib/python3/dist-packages"
export PATH="$TOOLS/usr/bin:$PATH"

# ---------------------------------------------------------------- unpack + patch
step "unpacking qemu $SRC_VERSION (dpkg-source -x: Debian's patches applied)"
rm -rf "$WORK"
mkdir -p "$WORK"
DSC=$(find "$QDIR/src" -maxdepth 1 -name 'qemu_*.dsc' -print -quit)
dpkg-source -x "$DSC" "$WORK/qemu" >"$WORK/unpack.log" 2>&1 ||
	die "dpkg-source -x $DSC failed (see $WORK/unpack.log); rm -rf $QDIR/src to download it again"
UPSTREAM=$(cat "$WORK/qemu/VERSION")
case "$UPSTREAM" in 10.0.*) ;; *) die "source package $SRC_VERSION is QEMU $UPSTREAM, expected 10.0.x" ;; esac
step "applying $(basename "$PATCH")"
(cd "$WORK/qemu" && patch -p1 --forward --batch --quiet <"$PATCH") >"$WORK/patch.log" 2>&1 ||
	die "the patch does not apply to qemu $SRC_VERSION: $(head -c 600 "$WORK/patch.log")"

# ---------------------------------------------------------------- configure
step "configuring (meson $MESON_VERSION, x86_64-softmmu only)"
mkdir -p "$WORK/build"
(cd "$WORK/build" && ../qemu/configure \
	--python=/usr/bin/python3 \
	--prefix="$DEST" \
	--target-list=x86_64-softmmu \
	--without-default-features \
	--enable-tcg --enable-kvm \
	--enable-vhost-user \
	--enable-slirp \
	--enable-fdt=system \
	--enable-virtfs --enable-attr \
	--disable-docs --disable-werror --disable-install-blobs \
	--disable-download \
	--with-pkgversion="vrdma vhost-user-rdma, Debian $SRC_VERSION") >"$WORK/configure.log" 2>&1 ||
	die "configure failed: $(grep -E 'ERROR' "$WORK/configure.log" | head -n3) (see $WORK/configure.log)"

# ---------------------------------------------------------------- build
step "building qemu-system-x86_64 (ninja -j$JOBS; log: $WORK/build.log)"
set +e
ninja -C "$WORK/build" -j"$JOBS" qemu-system-x86_64 2>&1 | tee "$WORK/build.log" | {
	awk -v t0="$T0" '
		function now() { "date +%s%N" | getline ns; close("date +%s%N"); return int(ns / 1000) }
		match($0, /^\[[0-9]+\/[0-9]+\]/) {
			split(substr($0, 2, RLENGTH - 2), a, "/")
			pct = int(100 * a[1] / a[2])
			if (pct >= next_pct) {
				e = (now() - t0) / 1e6
				printf "[qemu %5.1fs]   %3d%% (%d/%d)\n", e, pct, a[1], a[2] > "/dev/stderr"
				next_pct = pct - pct % 10 + 10
			}
		}'
}
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || die "ninja failed: $(grep -E 'error|FAILED' "$WORK/build.log" | head -n5) (see $WORK/build.log)"

# ---------------------------------------------------------------- install
step "installing into $DEST"
NEW="$DEST.new"
rm -rf "$NEW"
mkdir -p "$NEW/bin" "$NEW/share/qemu"
install -m 0755 "$WORK/build/qemu-system-x86_64" "$NEW/bin/"
strip --strip-debug "$NEW/bin/qemu-system-x86_64"
# Firmware for x86 from Debian's packages (the +ds source has no blobs):
# SeaBIOS, QEMU's option ROMs (linuxboot, pvh, multiboot, kvmvapic) and iPXE.
fw_copied=0
for f in /usr/share/seabios/*.bin \
	/usr/share/qemu/{kvmvapic,linuxboot,linuxboot_dma,multiboot,multiboot_dma,pvh,sgabios}.bin /usr/share/qemu/qboot.rom \
	/usr/lib/ipxe/qemu/*.rom; do
	[ -e "$f" ] || continue
	cp -L "$f" "$NEW/share/qemu/" && fw_copied=$((fw_copied + 1))
done
[ -e "$NEW/share/qemu/bios-256k.bin" ] || die "no SeaBIOS (bios-256k.bin): is the seabios package installed?"
[ -e "$NEW/share/qemu/pvh.bin" ] || warn "no pvh.bin (qemu-system-data): booting an ELF vmlinux with -kernel will fail"
# firmware descriptors and keymaps are not needed for -display none guests
stamp_text "$SRC_VERSION" >"$NEW/stamp.pending"
"$NEW/bin/qemu-system-x86_64" --version | head -n1 >"$TMPD/version" ||
	die "the new binary does not run: $("$NEW/bin/qemu-system-x86_64" --version 2>&1 | head -c 300)"
"$NEW/bin/qemu-system-x86_64" -device help 2>/dev/null | grep -q '"vhost-user-rdma-pci"' ||
	die "the new binary has no vhost-user-rdma-pci device"
cat >"$NEW/build-info" <<EOF
qemu: $(cat "$TMPD/version")
source: qemu $SRC_VERSION (Debian), upstream $UPSTREAM
patch: $(basename "$PATCH") sha256:$PATCH_HASH
script: sha256:$SCRIPT_HASH
meson: $MESON_VERSION
firmware: $fw_copied files from seabios $(dpkg-query -W -f='${Version}' seabios 2>/dev/null), qemu-system-data $(dpkg-query -W -f='${Version}' qemu-system-data 2>/dev/null), ipxe-qemu $(dpkg-query -W -f='${Version}' ipxe-qemu 2>/dev/null)
built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(elapsed)
EOF
cp "$WORK/configure.log" "$NEW/configure.log"
mv "$NEW/stamp.pending" "$NEW/stamp"
rm -rf "$DEST"
mv "$NEW" "$DEST"

# Older builds (other keys) are no longer referenced.
for d in "$QDIR"/*-*/; do
	d=${d%/}
	[ "$d" = "$DEST" ] && continue
	[ -f "$d/stamp" ] || [ -d "$d/bin" ] || continue
	rm -rf "$d"
done
[ "$KEEP" = 1 ] || rm -rf "$WORK"
step "done: $(cat "$TMPD/version") with vhost-user-rdma-pci"
finish "$DEST"
