/**
 * What a VM test needs to run RDMA programs in a guest on the project's
 * device: the guest driver and the kernel modules it needs, and the user
 * space — as files the VM harness puts under /vrdma, so the busybox guest
 * needs no root file system.
 *
 * User space is the rdma-core that images/guest/rdma-core.sh builds
 * (libibverbs 56.1 with the project's virtio_rdma provider built in the
 * same tree, the ibv_* examples, vrdma_conformance), plus the host's
 * Debian 12 perftest binaries and iproute2's `rdma`, which link
 * libibverbs.so.1 and so load the same library. Everything runs through
 * the dynamic loader in /vrdma/lib with --library-path, and the guest
 * links /opt/vrdma/rdma-core (the build's prefix, where libibverbs finds
 * its providers and .driver files) to /vrdma/rdma-core.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { PROJECT_ROOT } from '../support/backend-process.js';
import type { GuestFile } from './guest.js';

export type GuestFiles = Record<string, Uint8Array | GuestFile>;

/** The QEMU with vhost-user-rdma-pci (images/qemu/build.sh). */
export const QEMU_RDMA =
  process.env.VRDMA_QEMU_RDMA ||
  join(process.env.VRDMA_CACHE || join(homedir(), '.cache', 'vrdma'), 'qemu', 'current', 'bin', 'qemu-system-x86_64');

/** The host tools the guest gets besides rdma-core's own (Debian 12: perftest, iproute2). */
export const HOST_TOOLS = ['/usr/bin/ib_write_bw', '/usr/bin/ib_read_bw', '/usr/bin/ib_send_bw', '/usr/bin/ib_write_lat', '/usr/bin/ib_send_lat', '/usr/bin/ib_read_lat', '/usr/bin/rdma'];

/** The guest kernels images/guest/flavour.sh knows: Debian 12's own (6.1) and its backports kernel (6.12). */
export type GuestFlavour = 'bookworm' | 'backports';

/** Guest files: the driver and the RDMA core modules it needs, with their load order, for the flavour's kernel. */
export function driverFiles(flavour: GuestFlavour = 'bookworm'): { files: GuestFiles; order: string[] } {
  const ko = execFileSync('bash', [join(PROJECT_ROOT, 'images', 'guest', 'virtio-rdma.sh')], {
    encoding: 'utf8',
    env: { ...process.env, VRDMA_GUEST_FLAVOUR: flavour },
  }).trim();
  const deps = join(dirname(ko), 'deps');
  const order = readFileSync(join(deps, 'order'), 'utf8').split('\n').filter(Boolean).map((f) => `deps/${f}`);
  const files: GuestFiles = {
    'virtio_rdma.ko': readFileSync(ko),
    'vrdma_kselftest.ko': readFileSync(join(dirname(ko), 'vrdma_kselftest.ko')),
  };
  for (const f of readdirSync(deps)) files[`deps/${f}`] = readFileSync(join(deps, f));
  return { files, order: [...order, 'virtio_rdma.ko'] };
}

function addTree(files: GuestFiles, from: string, to: string): void {
  for (const name of readdirSync(from)) {
    const src = join(from, name);
    const st = statSync(src);
    if (st.isDirectory()) addTree(files, src, `${to}/${name}`);
    else files[`${to}/${name}`] = { data: readFileSync(src), mode: st.mode & 0o777 };
  }
}

/**
 * Guest files: rdma-core/ (the built tree), bin/ (the host tools) and lib/
 * (the loader and every library the programs load, libibverbs being the
 * built one).
 */
export function rdmaUserFiles(): GuestFiles {
  const root = execFileSync('bash', [join(PROJECT_ROOT, 'images', 'guest', 'rdma-core.sh')], { encoding: 'utf8' }).trim();
  const tree = join(root, 'opt', 'vrdma', 'rdma-core');
  const files: GuestFiles = {};
  addTree(files, tree, 'rdma-core');
  const bins = [...HOST_TOOLS, ...readdirSync(join(tree, 'bin')).map((b) => join(tree, 'bin', b))];
  const libs = new Set<string>();
  const ldd = execFileSync('ldd', bins, { encoding: 'utf8', env: { ...process.env, LD_LIBRARY_PATH: join(tree, 'lib') } });
  for (const line of ldd.split('\n')) {
    const m = /=> (\/\S+)/.exec(line) ?? /^\s*(\/\S*ld-linux\S*)/.exec(line);
    if (m && !m[1]!.startsWith(tree)) libs.add(m[1]!);
  }
  for (const b of HOST_TOOLS) files[`bin/${b.slice(b.lastIndexOf('/') + 1)}`] = { data: readFileSync(b), mode: 0o755 };
  for (const l of libs) {
    const name = l.slice(l.lastIndexOf('/') + 1);
    if (!name.startsWith('libibverbs.so')) files[`lib/${name}`] = { data: readFileSync(l), mode: 0o755 };
  }
  for (const f of readdirSync(join(tree, 'lib')).filter((f) => f.startsWith('libibverbs.so'))) files[`lib/${f}`] = { data: readFileSync(join(tree, 'lib', f)), mode: 0o755 };
  return files;
}

/** Shell: insmod each module file unless a module of that name is already loaded (the image may carry ib_core). */
export function loadModules(order: string[]): string {
  return `for m in ${order.join(' ')}; do n=$(basename $m .ko); grep -q "^$n " /proc/modules || insmod $m; done`;
}

/** Loads the modules, then runs `body` (set -e). */
export function withDriver(order: string[], body: string): string {
  return `set -e\n${loadModules(order)}\n${body}`;
}

/**
 * Shell defining `run TOOL ARGS...` (any program of rdmaUserFiles, through
 * /vrdma/lib's loader) and `wait_listen PORT` (until a TCP listener is up).
 */
export const RDMA_SHELL = String.raw`
mkdir -p /opt/vrdma && ln -sfn /vrdma/rdma-core /opt/vrdma/rdma-core
run() { t=$1; shift; b=/vrdma/rdma-core/bin/$t; [ -e $b ] || b=/vrdma/bin/$t; /vrdma/lib/ld-linux-x86-64.so.2 --library-path /vrdma/rdma-core/lib:/vrdma/lib $b "$@"; }
wait_listen() { p=$(printf '%04X' $1); for i in $(seq 200); do cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ":$p [0-9A-F]*:0000 0A" && return 0; sleep 0.05; done; echo "nothing listens on port $1"; }
`;

/**
 * Shell helpers: `trun SECS TOOL ARGS...` runs a tool of rdmaUserFiles under
 * busybox timeout; `client NAME SECS TOOL ARGS...` runs a client into
 * /tmp/NAME.out, retrying while its server does not listen yet.
 */
export const TOOL_SHELL = String.raw`
trun() { s=$1; shift; t=$1; shift; b=/vrdma/rdma-core/bin/$t; [ -e $b ] || b=/vrdma/bin/$t; timeout $s /vrdma/lib/ld-linux-x86-64.so.2 --library-path /vrdma/rdma-core/lib:/vrdma/lib $b "$@"; }
refused() { grep -q -i -E "couldn.t connect|Unable to open file descriptor" "$1"; }
client() { n=$1; shift; i=0; while :; do trun "$@" > /tmp/$n.out 2>&1; rc=$?; if [ $rc -ne 0 ] && refused /tmp/$n.out && [ $i -lt 240 ]; then i=$((i+1)); sleep 0.25; continue; fi; break; done; }
`;


/** Modules, eth0 on the namespace's bridge, the RDMA user space; `set +e` from here on (each case reports its own rc). */
export function guestPrologue(order: string[], address: string): string {
  return withDriver(order, String.raw`
ip link set lo up
ip link set eth0 up
ip addr add ${address}/24 dev eth0
${RDMA_SHELL}
${TOOL_SHELL}
set +e
echo "GUEST-READY $(cat /sys/class/infiniband/virtio_rdma0/ports/1/gids/0)"
`);
}

