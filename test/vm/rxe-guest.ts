/**
 * A TCG guest running Linux rdma_rxe with the host's own rdma-core and
 * perftest: the host's root is mounted read-only over 9p and used as a
 * chroot (bind-mounted /dev, /proc, /sys, tmpfs /tmp and /run), the guest's
 * eth0 sits on the tap of a {@link NetNs}, and rxe0 is added on eth0. The
 * caller's script runs after that set-up, with `$HOSTROOT` naming the
 * chroot and `inhost CMD...` running a host binary inside it.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startGuest, type RunningGuest } from './guest.js';
import type { NetNs } from './netns.js';

export interface RxeGuestOptions {
  ns: NetNs;
  /** Shell run after the set-up (busybox sh). */
  script: string;
  timeoutMs: number;
  logFile?: string;
  memMiB?: number;
}

/** Shell that prepares the guest: modules, eth0, the host root chroot, rxe0. Fails (exit 90+) with a reason line. */
export function rxeSetupScript(ns: NetNs): string {
  return `
set -u
die() { echo "rxe-guest: $1"; exit "$2"; }
for m in 9pnet_virtio 9p crc32_generic ib_uverbs rdma_rxe; do modprobe "$m" || die "modprobe $m failed" 90; done
ip link set eth0 up || die "no eth0" 91
ip addr add ${ns.guestAddress}/24 dev eth0 || die "ip addr failed" 91
HOSTROOT=/hostroot
mkdir -p $HOSTROOT
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot $HOSTROOT || die "9p mount failed" 92
for d in dev proc sys; do mount -o bind /$d $HOSTROOT/$d || die "bind /$d failed" 92; done
mount -t tmpfs tmpfs $HOSTROOT/tmp || die "tmpfs /tmp failed" 92
mount -t tmpfs tmpfs $HOSTROOT/run || die "tmpfs /run failed" 92
mount -t tmpfs tmpfs $HOSTROOT/var/tmp 2>/dev/null
inhost() { chroot $HOSTROOT /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp "$@"; }
inhost rdma link add rxe0 type rxe netdev eth0 || { dmesg | tail -5; die "rdma link add failed" 93; }
echo "rxe-guest: ready $(inhost rdma link show | tr '\\n' ' ')"
`;
}

/** Boots the guest inside the namespace. */
export function startRxeGuest(opts: RxeGuestOptions): { guest: RunningGuest; cleanup: () => void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vrdma-rxe-'));
  const qemu = opts.ns.wrapQemu(dir);
  try {
    const guest = startGuest({
      command: rxeSetupScript(opts.ns) + opts.script,
      qemu,
      memMiB: opts.memMiB ?? 512,
      timeoutMs: opts.timeoutMs,
      logFile: opts.logFile,
      extraArgs: ['-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap', ...opts.ns.nicArgs()],
    });
    return { guest, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}
