#!/usr/bin/env bash
# Builds the vrdma test guest: a Debian bookworm kernel + a busybox initramfs.
#
#   bash images/guest/build.sh [--force]
#
# Output (see images/README.md):
#   ${VRDMA_CACHE:-$HOME/.cache/vrdma}/guest/
#     vmlinux        uncompressed kernel (ELF, PVH entry) - booted by default
#     vmlinuz        the package's bzImage (fallback; ~3 s slower under TCG)
#     config         the kernel's config
#     initrd.img     busybox + /init + modules from modules.txt
#     manifest.json  what was built (read by test/vm/guest.ts)
#     stamp          cache key; a warm cache returns at once
#
# Environment:
#   VRDMA_CACHE             cache root (default $HOME/.cache/vrdma)
#   VRDMA_GUEST_KERNEL_PKG  pin the kernel package, e.g. linux-image-6.1.0-50-amd64
#                           (default: what linux-image-amd64 depends on)
#   VRDMA_GUEST_INITRD_COMPRESS  gzip (default) or none
#   VRDMA_GUEST_FLAVOUR     bookworm (default: Debian 12's 6.1 kernel, into
#                           guest/) or backports (Debian 12's backports kernel,
#                           6.12 today, into guest-backports/; see flavour.sh)
#
# The host system is not changed except for installing missing build tools
# (cpio, kmod, xz-utils, zstd) with apt-get: the kernel and busybox packages
# are fetched with `apt-get download` and unpacked with `dpkg -x`.
set -euo pipefail
export LC_ALL=C
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${VRDMA_CACHE:-${HOME:-/root}/.cache/vrdma}
# shellcheck source=flavour.sh
. "$HERE/flavour.sh"
export VRDMA_GUEST_FLAVOUR=$FLAVOUR # virtio-rdma.sh builds for the same kernel
OUT="$CACHE_ROOT/guest$FLAVOUR_SUFFIX"
DEBS="$CACHE_ROOT/debs$FLAVOUR_SUFFIX"
# Initramfs compression: gzip|none. gzip boots ~0.25 s faster than an
# uncompressed archive under TCG here (measured; see images/README.md).
INITRD_COMPRESS=${VRDMA_GUEST_INITRD_COMPRESS:-gzip}
# Default kernel command line, recorded in manifest.json for the harness.
# loglevel=1: only KERN_EMERG on the console (panics and oopses still print);
# panic=-1 + QEMU -no-reboot: a panic ends the VM at once;
# cryptomgr.notests: skips the crypto self-tests (~0.7 s under TCG).
APPEND="console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init cryptomgr.notests mitigations=off tsc=reliable no_timer_check i8042.nokbd i8042.noaux i8042.nopnp"
INPUTS=(build.sh flavour.sh init lspci modules.txt)

FORCE=0
for arg in "$@"; do
	case "$arg" in
	--force | -f) FORCE=1 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
	*) echo "build.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
	esac
done

T0=${EPOCHREALTIME/[.,]/}
step() {
	local now=${EPOCHREALTIME/[.,]/} ms
	ms=$(((now - T0) / 1000))
	printf '[guest-image%s %3d.%ds] %s\n' "$FLAVOUR_SUFFIX" $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
warn() { printf '[guest-image] WARNING: %s\n' "$*" >&2; }
die() { printf '[guest-image] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$CACHE_ROOT"

# ------------------------------------------------------------------ lock
# One build at a time per cache (flock is in util-linux, which is essential).
exec 9>"$CACHE_ROOT/guest$FLAVOUR_SUFFIX.lock"
if ! flock -n 9; then
	step "another build.sh holds $CACHE_ROOT/guest$FLAVOUR_SUFFIX.lock; waiting"
	flock 9
fi

# ---------------------------------------------------------------- host tools
APT_UPDATED=0
apt_update_once() {
	[ "$APT_UPDATED" = 1 ] && return 0
	APT_UPDATED=1
	[ "$(id -u)" = 0 ] || { warn "not root: cannot run apt-get update"; return 0; }
	if [ "$FLAVOUR" = backports ]; then
		step "apt-get update of the private backports lists ($FLAVOUR_APT)"
		flavour_apt_update --force || warn "apt-get update of bookworm-backports failed (see $FLAVOUR_APT/update.log)"
	fi
	step "apt-get update (package lists missing or stale)"
	if ! apt-get update -qq >/dev/null 2>"$CACHE_ROOT/apt-update.log"; then
		warn "apt-get update reported errors (see $CACHE_ROOT/apt-update.log); continuing with the lists it got"
	fi
}
# Prints the candidate version of a package, or nothing.
apt_candidate() {
	apt-cache "${APT_OPTS[@]}" policy "$1" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2; exit }'
}
apt_candidate_or_update() {
	local v
	v=$(apt_candidate "$1")
	if [ -z "$v" ]; then
		apt_update_once
		v=$(apt_candidate "$1")
	fi
	printf '%s' "$v"
}

# command -> Debian package providing it
declare -A TOOL_PKG=(
	[cpio]=cpio [depmod]=kmod [modprobe]=kmod [xz]=xz-utils [zstd]=zstd
	[gzip]=gzip [od]=coreutils [sha256sum]=coreutils
	[apt-get]=apt [dpkg-deb]=dpkg
)
missing=()
for tool in "${!TOOL_PKG[@]}"; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("${TOOL_PKG[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	[ "$(id -u)" = 0 ] || die "missing build tools (packages: ${missing[*]}); run as root or: sudo apt-get install ${missing[*]}"
	step "installing build tools: ${missing[*]}"
	for p in "${missing[@]}"; do [ -n "$(apt_candidate "$p")" ] || apt_update_once; done
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 "${missing[@]}" >"$CACHE_ROOT/apt-install.log" 2>&1 ||
		die "apt-get install ${missing[*]} failed (see $CACHE_ROOT/apt-install.log)"
fi

# ------------------------------------------------------- inputs + cache key
step "resolving packages (cache: $OUT)"
inputs_hash=$(cd "$HERE" && sha256sum "${INPUTS[@]}" | sha256sum | cut -c1-16)
stamp_get() { [ -f "$OUT/stamp" ] && sed -n "s/^$1=//p" "$OUT/stamp" | head -n1; }
cache_complete() {
	[ -f "$OUT/stamp" ] && [ -f "$OUT/manifest.json" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/vmlinuz" ]
}

# One apt-cache call (about 0.5 s) resolves everything the key needs.
# Prints "PACKAGE VERSION DEPENDS..." for the candidate of each package.
# The kernel comes through APT_OPTS (the flavour's sources), busybox from the host's.
apt_show() {
	apt-cache "${SHOW_OPTS[@]}" show --no-all-versions "$@" 2>/dev/null | awk '
		/^Package: / { p = $2 } /^Version: / { v = $2 }
		/^Depends: / { d = substr($0, 10) }
		/^$/ { if (p != "") print p, v, d; p = v = d = "" }
		END { if (p != "") print p, v, d }'
}
resolve() {
	local info
	SHOW_OPTS=()
	BBVER=$(apt_show busybox-static | awk '$1 == "busybox-static" { print $2; exit }')
	SHOW_OPTS=("${APT_OPTS[@]}")
	if [ -n "${VRDMA_GUEST_KERNEL_PKG:-}" ]; then
		info=$(apt_show "$VRDMA_GUEST_KERNEL_PKG")
		KPKG=$VRDMA_GUEST_KERNEL_PKG
		KVER=$(awk -v p="$KPKG" '$1 == p { print $2; exit }' <<<"$info")
	else
		info=$(apt_show linux-image-amd64)
		# "Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)"
		read -r KPKG KVER < <(awk '$1 == "linux-image-amd64" {
			n = split(substr($0, length($1 " " $2) + 2), deps, ",")
			for (i = 1; i <= n; i++) if (match(deps[i], /linux-image-[0-9][^ ]*/)) {
				name = substr(deps[i], RSTART, RLENGTH); ver = ""
				if (match(deps[i], /\(= [^)]*\)/)) ver = substr(deps[i], RSTART + 3, RLENGTH - 4)
				print name, ver; exit
			} }' <<<"$info") || true
		# a Depends without an exact version: ask for the candidate
		if [ -n "${KPKG:-}" ] && [ -z "${KVER:-}" ]; then KVER=$(apt_candidate "$KPKG"); fi
	fi
}
KPKG="" KVER="" BBVER="" SHOW_OPTS=()
[ "$FLAVOUR" = bookworm ] || [ "$(id -u)" != 0 ] || flavour_apt_update || warn "apt-get update of bookworm-backports failed (see $FLAVOUR_APT/update.log)"
resolve
if [ -z "$KPKG" ] || [ -z "$KVER" ] || [ -z "$BBVER" ]; then
	apt_update_once
	resolve
fi

if [ -z "$KPKG" ] || [ -z "$KVER" ] || [ -z "$BBVER" ]; then
	if cache_complete && [ "$(stamp_get inputs)" = "$inputs_hash" ]; then
		warn "apt cannot resolve the kernel/busybox packages now; keeping the cached image ($(stamp_get kernel))"
		exit 0
	fi
	[ -n "$KPKG" ] || die "cannot find the kernel package: apt-cache shows no candidate for linux-image-amd64 (is the Debian mirror reachable? try: apt-get update)"
	[ -n "$KVER" ] || die "no candidate version for $KPKG in apt (try: apt-get update, or unset VRDMA_GUEST_KERNEL_PKG)"
	die "no candidate version for busybox-static in apt (try: apt-get update)"
fi

KEY="inputs=$inputs_hash
flavour=$FLAVOUR
kernel=$KPKG=$KVER
busybox=busybox-static=$BBVER
initrd_compress=$INITRD_COMPRESS
virtio_rdma=$(bash "$HERE/virtio-rdma.sh" --key)"

if [ "$FORCE" = 0 ] && cache_complete && [ "$(cat "$OUT/stamp")" = "$KEY" ]; then
	step "up to date: $OUT ($KPKG $KVER)"
	exit 0
fi

# ---------------------------------------------------------------- download
mkdir -p "$DEBS"
WORK=$(mktemp -d "$CACHE_ROOT/guest-build.XXXXXX")
NEW="$WORK/out"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# fetch PKG VERSION [host] -> prints the path of the .deb (cached in $DEBS);
# "host" fetches through the host's apt sources instead of the flavour's
fetch() {
	local pkg=$1 ver=$2 f opts=("${APT_OPTS[@]}")
	[ "${3:-}" = host ] && opts=()
	for f in "$DEBS/${pkg}"_*.deb; do
		[ -f "$f" ] || continue
		if [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$pkg" ] &&
			[ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$ver" ]; then
			printf '%s' "$f"
			return 0
		fi
	done
	step "downloading $pkg $ver"
	local dl="$WORK/dl-$pkg"
	mkdir -p "$dl"
	if ! (cd "$dl" && apt-get "${opts[@]}" download -q -o APT::Sandbox::User=root "$pkg=$ver") >"$WORK/dl-$pkg.log" 2>&1; then
		cat "$WORK/dl-$pkg.log" >&2
		die "download of $pkg=$ver failed (is the Debian mirror reachable? apt-get update may help)"
	fi
	f=$(find "$dl" -name '*.deb' | head -n1)
	[ -n "$f" ] || die "apt-get download $pkg=$ver produced no .deb"
	# keep only the newest download of each package
	rm -f "$DEBS/${pkg}"_*.deb
	mv "$f" "$DEBS/"
	printf '%s' "$DEBS/$(basename "$f")"
}

KDEB=$(fetch "$KPKG" "$KVER")
BBDEB=$(fetch busybox-static "$BBVER" host)
# drop downloads no longer used (e.g. the previous kernel ABI)
for f in "$DEBS"/*.deb; do
	[ "$f" = "$KDEB" ] || [ "$f" = "$BBDEB" ] || rm -f "$f"
done

# ---------------------------------------------------------------- kernel
step "unpacking $KPKG $KVER"
KROOT="$WORK/kernel"
mkdir -p "$KROOT"
dpkg-deb -x "$KDEB" "$KROOT" || die "dpkg -x $KDEB failed"
mapfile -t rels < <(ls "$KROOT/lib/modules" 2>/dev/null)
[ "${#rels[@]}" = 1 ] || die "expected one kernel release in $KPKG, found: ${rels[*]:-none}"
REL=${rels[0]}
VMLINUZ="$KROOT/boot/vmlinuz-$REL"
KCONFIG="$KROOT/boot/config-$REL"
[ -f "$VMLINUZ" ] || die "$KPKG has no /boot/vmlinuz-$REL"
mkdir -p "$NEW"
cp "$VMLINUZ" "$NEW/vmlinuz"
[ -f "$KCONFIG" ] && cp "$KCONFIG" "$NEW/config"

# Extract the uncompressed ELF kernel from the bzImage (boot protocol
# >= 2.08: payload_offset at 0x248, payload_length at 0x24c, relative to the
# protected-mode code at (setup_sects+1)*512). QEMU boots it through the PVH
# entry note when the kernel has CONFIG_PVH: no in-guest decompression.
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
u16() { od -An -tu2 -j "$2" -N2 "$1" | tr -d ' \n'; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' \n'; }
BOOT_KERNEL=vmlinuz
BOOT_MODE=bzImage
if grep -q '^CONFIG_PVH=y' "$KCONFIG" 2>/dev/null; then
	step "extracting vmlinux (ELF, PVH boot) from the bzImage"
	if [ "$(od -An -c -j 0x202 -N4 "$VMLINUZ" | tr -d ' \n')" = "HdrS" ] && [ "$(u16 "$VMLINUZ" 0x206)" -ge $((0x208)) ]; then
		setup_sects=$(u8 "$VMLINUZ" 0x1f1)
		[ "$setup_sects" = 0 ] && setup_sects=4
		off=$(((setup_sects + 1) * 512 + $(u32 "$VMLINUZ" 0x248)))
		len=$(u32 "$VMLINUZ" 0x24c)
		magic=$(od -An -tx1 -j "$off" -N6 "$VMLINUZ" | tr -d ' \n')
		case "$magic" in
		1f8b*) dec=(gzip -dc) ;;
		fd377a585a00) dec=(xz -dc --single-stream) ;;
		28b52ffd*) dec=(zstd -dcq) ;;
		425a68*) dec=(bzip2 -dc) ;;
		5d00*) dec=(xz -dc --format=lzma --single-stream) ;;
		*) dec=() ;;
		esac
		if [ "${#dec[@]}" = 0 ]; then
			warn "bzImage payload compression (magic $magic) not handled; booting the bzImage"
		else
			# The payload ends with a 4-byte size trailer: some decompressors
			# complain about it, so judge by the result, not the exit code.
			tail -c +$((off + 1)) "$VMLINUZ" | head -c "$len" | "${dec[@]}" >"$NEW/vmlinux" 2>"$WORK/vmlinux.err" || true
			if [ "$(od -An -c -N4 "$NEW/vmlinux" | tr -d ' \n')" = '177ELF' ] && [ "$(stat -c %s "$NEW/vmlinux")" -gt 1000000 ]; then
				BOOT_KERNEL=vmlinux
				BOOT_MODE=pvh
			else
				warn "could not extract an ELF kernel from the bzImage ($(head -c 200 "$WORK/vmlinux.err")); booting the bzImage"
				rm -f "$NEW/vmlinux"
			fi
		fi
	else
		warn "bzImage boot protocol too old for payload extraction; booting the bzImage"
	fi
else
	warn "kernel has no CONFIG_PVH; QEMU cannot boot its vmlinux directly, booting the bzImage"
fi

# the out-of-tree guest RDMA driver (virtio-rdma.sh: built against this
# release's headers, cached); placed into the unpacked tree so modules.txt
# can name it, and modprobe brings ib_core/ib_uverbs with it
VRDMA_KO=$(bash "$HERE/virtio-rdma.sh" --release "$REL" --kernel-version "$KVER") || die "building the virtio-rdma driver failed (images/guest/virtio-rdma.sh)"
install -D -m 0644 "$VRDMA_KO" "$KROOT/lib/modules/$REL/extra/virtio_rdma.ko"

# ---------------------------------------------------------------- modules
step "resolving modules for $REL (depmod -b, modprobe --show-depends)"
depmod -b "$KROOT" "$REL" || die "depmod -b $KROOT $REL failed"
MODDIR="lib/modules/$REL"
# path of a module inside the image: compressed modules are stored as .ko
plain_ko() { local p=${1%.xz}; p=${p%.zst}; printf '%s' "${p%.gz}"; }
declare -A SEEN=() LOADED=()
INCLUDE=() # module paths relative to $MODDIR, dependency order
LOAD=()    # "relpath[ params]" lines for /etc/vrdma/modules.load
LOAD_NAMES=()
BUILTIN=()
while read -r line; do
	line=${line%%#*}
	read -r -a words <<<"$line"
	[ "${#words[@]}" -gt 0 ] || continue
	name=${words[0]}
	optional=0 noload=0
	for flag in "${words[@]:1}"; do
		case "$flag" in
		optional) optional=1 ;;
		noload) noload=1 ;;
		*) die "modules.txt: unknown flag '$flag' for $name" ;;
		esac
	done
	if ! deps=$(modprobe -C /dev/null -d "$KROOT" -S "$REL" --show-depends "$name" 2>"$WORK/modprobe.err"); then
		if [ "$optional" = 1 ]; then
			warn "optional module $name is not in $REL; skipped"
			continue
		fi
		die "module $name (modules.txt) not found in $REL: $(head -c 300 "$WORK/modprobe.err")"
	fi
	while read -r kind path params; do
		case "$kind" in
		builtin) BUILTIN+=("$path") ;;
		insmod)
			rel_path=${path#"$KROOT/$MODDIR/"}
			if [ -z "${SEEN[$rel_path]:-}" ]; then
				SEEN[$rel_path]=1
				INCLUDE+=("$rel_path")
			fi
			if [ "$noload" = 0 ] && [ -z "${LOADED[$rel_path]:-}" ]; then
				LOADED[$rel_path]=1
				LOAD+=("$(plain_ko "$rel_path")${params:+ $params}")
				b=${rel_path##*/}
				LOAD_NAMES+=("${b%%.ko*}")
			fi
			;;
		esac
	done <<<"$deps"
done <"$HERE/modules.txt"

# ---------------------------------------------------------------- initramfs
step "assembling initramfs (busybox-static $BBVER, ${#INCLUDE[@]} modules)"
ROOT="$WORK/initramfs"
BBROOT="$WORK/busybox"
mkdir -p "$BBROOT"
dpkg-deb -x "$BBDEB" "$BBROOT" || die "dpkg -x $BBDEB failed"
BB="$BBROOT/bin/busybox"
[ -x "$BB" ] || die "busybox-static package has no bin/busybox"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/vrdma,proc,sys,dev,tmp,run,root,mnt,vrdma,lib/modules}
chmod 1777 "$ROOT/tmp"
cp "$BB" "$ROOT/bin/busybox"
while read -r applet; do
	case "$applet" in
	'' | bin/busybox | linuxrc) continue ;;
	esac
	[ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done < <("$BB" --list-full)
install -m 0755 "$HERE/init" "$ROOT/init"
install -m 0755 "$HERE/lspci" "$ROOT/usr/bin/lspci"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '127.0.0.1 localhost vrdma-guest\n::1 localhost\n' >"$ROOT/etc/hosts"
printf '%s\n' "$REL" >"$ROOT/etc/vrdma/release"
# /dev/console must exist in the archive for init's first stdio (needs root).
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || warn "cannot mknod /dev/console (not root?); init reopens it after mounting devtmpfs"
mknod -m 666 "$ROOT/dev/null" c 1 3 2>/dev/null || true

# modules: decompress if the kernel ships compressed modules; keep the tree
# layout and run depmod so `modprobe NAME` works inside the guest.
for rel_path in "${INCLUDE[@]}"; do
	src="$KROOT/$MODDIR/$rel_path"
	dst="$ROOT/$MODDIR/$(plain_ko "$rel_path")"
	mkdir -p "${dst%/*}"
	case "$rel_path" in
	*.ko.xz) xz -dc "$src" >"$dst" ;;
	*.ko.zst) zstd -dcq "$src" >"$dst" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" ;;
	*) cp "$src" "$dst" ;;
	esac
done
# modules.builtin lets depmod/modprobe in the guest know what is built in
[ -f "$KROOT/$MODDIR/modules.builtin" ] && cp "$KROOT/$MODDIR/modules.builtin" "$ROOT/$MODDIR/"
mkdir -p "$ROOT/$MODDIR"
depmod -b "$ROOT" "$REL" 2>/dev/null || warn "depmod on the initramfs tree failed; in-guest modprobe may not work"
printf '%s\n' "${LOAD[@]}" >"$ROOT/etc/vrdma/modules.load"

step "writing initrd.img (cpio newc, compression: $INITRD_COMPRESS)"
(cd "$ROOT" && find . -mindepth 1 -print0 | sort -z |
	cpio --null -o -H newc --owner=0:0 --quiet --reproducible) >"$WORK/initrd.cpio" ||
	die "cpio failed"
case "$INITRD_COMPRESS" in
none) mv "$WORK/initrd.cpio" "$NEW/initrd.img" ;;
gzip) gzip -9n <"$WORK/initrd.cpio" >"$NEW/initrd.img" ;;
*) die "VRDMA_GUEST_INITRD_COMPRESS must be none or gzip, not $INITRD_COMPRESS" ;;
esac

json_list() { # prints a JSON array of the arguments (names/paths only: no quoting needed)
	local first=1
	printf '['
	for x in "$@"; do
		[ "$first" = 1 ] || printf ', '
		first=0
		printf '"%s"' "$x"
	done
	printf ']'
}
INCLUDED_NAMES=()
for p in "${INCLUDE[@]}"; do b=${p##*/}; INCLUDED_NAMES+=("${b%%.ko*}"); done
cat >"$NEW/manifest.json" <<EOF
{
  "kernelRelease": "$REL",
  "kernelPackage": "$KPKG",
  "kernelPackageVersion": "$KVER",
  "busyboxVersion": "$BBVER",
  "kernel": "$BOOT_KERNEL",
  "bootMode": "$BOOT_MODE",
  "bzImage": "vmlinuz",
  "initrd": "initrd.img",
  "initrdCompression": "$INITRD_COMPRESS",
  "append": "$APPEND",
  "modulesLoaded": $(json_list "${LOAD_NAMES[@]}"),
  "modulesIncluded": $(json_list "${INCLUDED_NAMES[@]}"),
  "modulesBuiltin": $(json_list "${BUILTIN[@]}"),
  "inputsHash": "$inputs_hash"
}
EOF
printf '%s\n' "$KEY" >"$NEW/stamp"

# ---------------------------------------------------------------- install
# Swap the new directory in (a running QEMU keeps its open files).
step "installing into $OUT"
rm -rf "$OUT.old"
[ -e "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$NEW" "$OUT"
rm -rf "$OUT.old"
step "done: $REL via $BOOT_MODE, initrd $(du -h "$OUT/initrd.img" | cut -f1), loads: ${LOAD_NAMES[*]:-none}"
