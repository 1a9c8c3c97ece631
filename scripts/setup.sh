#!/usr/bin/env bash
# Everything vrdma needs on a fresh Debian 12 machine, idempotent and cached:
# Debian packages, npm dependencies, the native addon, the TypeScript build,
# the test guest image and QEMU with the project's vhost-user-rdma-pci
# device. A warm run takes a few seconds; a cold one about 8 minutes.
#
#   bash scripts/setup.sh          (what `npm start` and `npm test` run first)
#
# Heavy artefacts live under ${VRDMA_CACHE:-$HOME/.cache/vrdma}, outside the repo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

step() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------
# qemu-system-x86: Debian's QEMU 7.2 for the VM tests (vhost-user-rng-pci).
# cpio, kmod, xz-utils, zstd: the guest image build (it fetches its own busybox).
# g++, make, python3: node-gyp.
# tshark, python3-scapy, gcc, zlib1g-dev: independent checks of the RoCEv2 codec and ICRC.
# ibverbs-utils, perftest, rdma-core, ibverbs-providers (librxe), iproute2 (ip netns, rdma): the
# stock tools the rxe interop test runs in a guest that mounts this host's root over 9p.
DEBS=(qemu-system-x86 cpio kmod xz-utils zstd g++ make python3 tshark python3-scapy gcc zlib1g-dev
  ibverbs-utils perftest rdma-core ibverbs-providers iproute2)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "[setup] missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  step "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- npm dependencies ------------------------------------------------------
# npm ci installs exactly what package-lock.json says and never rewrites it,
# so a fresh clone stays clean. The committed lockfile lists every
# platform's optional packages (rollup's, esbuild's), which npm ci needs:
# after changing a dependency, check that `git diff package-lock.json` has
# not dropped them. Skipped while node_modules was installed from this very
# lockfile (its hash is kept in node_modules, which npm ci recreates).
lock_stamp=node_modules/.vrdma-package-lock.sha256
if ! sha256sum --status -c "$lock_stamp" 2>/dev/null; then
  step "installing npm dependencies (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  sha256sum package-lock.json >"$lock_stamp"
fi

# --- native addon ----------------------------------------------------------
addon=native/addon/build/Release/vrdma_native.node
if [ ! -f "$addon" ] || [ -n "$(find native/addon/src native/addon/binding.gyp -newer "$addon" -print -quit)" ]; then
  step "building the native addon"
  npx --no-install node-gyp rebuild --directory native/addon --loglevel=error >/dev/null
fi

# --- TypeScript ------------------------------------------------------------
step "compiling TypeScript"
npx --no-install tsc -p tsconfig.json
# vitest strips types without checking them; the tests get the same strict check here.
step "type-checking the tests"
npx --no-install tsc -p tsconfig.tests.json

# --- guest image for the VM tests (kernel, initramfs, guest driver) ---------
bash images/guest/build.sh
# and the same on Debian 12's backports kernel (6.12), for test/vm/backports-kernel.test.ts
VRDMA_GUEST_FLAVOUR=backports bash images/guest/build.sh

# rdma-core 56.1 + the virtio_rdma provider + the in-guest conformance program (cached)
bash images/guest/rdma-core.sh >/dev/null

# --- QEMU 10.0 with vhost-user-rdma-pci (about 6 minutes the first time) -----
bash images/qemu/build.sh >/dev/null

step "ready"
