/**
 * The in-guest conformance program (native/guest/conformance,
 * vrdma_conformance.c), twice: first against a verbs implementation nobody
 * here wrote — Linux rdma_rxe in a TCG guest, looping back on its own
 * eth0 — which proves the program's expectations; then against the
 * project's guest driver on vhost-user-rdma-pci and `vrdma serve`.
 *
 * The guest mounts the host's root read-only over 9p and runs the
 * rdma-core build from images/guest/rdma-core.sh (libibverbs 56.1 with the
 * rxe and virtio_rdma providers, and the program) from it; eth0 is QEMU
 * user networking with `restrict=on`, so nothing leaves the guest.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { BackendProcess } from '../support/backend-process.js';
import { runInGuest } from './guest.js';
import { QEMU_RDMA, RDMA_SHELL, driverFiles, rdmaUserFiles, withDriver } from './vrdma-guest.js';

const ROOT = join(import.meta.dirname, '..', '..');

/** The cached rdma-core tree (built by the set-up; a warm call returns at once). */
function rdmaCoreTree(): string {
  const r = spawnSync('bash', [join(ROOT, 'images', 'guest', 'rdma-core.sh')], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`images/guest/rdma-core.sh failed:\n${r.stderr}`);
  return r.stdout.trim();
}

/** Shell for the guest: rxe on eth0, the host root as a chroot with the rdma-core tree on /opt/vrdma/rdma-core. */
function script(tree: string): string {
  return `
set -u
for m in 9pnet_virtio 9p crc32_generic ib_uverbs rdma_rxe; do modprobe $m || { echo "modprobe $m failed"; exit 90; }; done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || exit 91
H=/hostroot
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot $H || exit 92
for d in dev proc sys; do mount -o bind /$d $H/$d || exit 92; done
# The tree before tmpfs covers /tmp (the cache may live there, e.g. VRDMA_CACHE=/tmp/...).
mount -t tmpfs tmpfs $H/opt || exit 92
mkdir -p $H/opt/vrdma/rdma-core && mount -o bind $H${tree}/opt/vrdma/rdma-core $H/opt/vrdma/rdma-core || exit 93
for d in tmp run; do mount -t tmpfs tmpfs $H/$d || exit 92; done
inhost() { chroot $H /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LD_LIBRARY_PATH=/opt/vrdma/rdma-core/lib "$@"; }
inhost rdma link add rxe0 type rxe netdev eth0 || exit 94
inhost /opt/vrdma/rdma-core/bin/vrdma_conformance -d rxe0 -g 1 -r -v
`;
}

describe('vrdma_conformance (in-guest scenarios over libibverbs) against Linux rdma_rxe', () => {
  it('passes every scenario on rxe0, with rxe\'s documented status deviations (-r)', async () => {
    const tree = rdmaCoreTree();
    const r = await runInGuest({
      command: script(tree),
      memMiB: 512,
      timeoutMs: 180_000,
      extraArgs: ['-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on', '-netdev', 'user,id=n0,restrict=on', '-device', 'virtio-net-pci,netdev=n0'],
    });
    const failed = r.output.split('\n').filter((l) => l.startsWith('not ok'));
    expect(failed, r.output).toEqual([]);
    expect(r.exitCode, r.output).toBe(0);
    const passed = r.output.split('\n').filter((l) => /^ok \d+ /.test(l));
    expect(passed.length).toBeGreaterThanOrEqual(38);
    expect(r.output).toMatch(/^# \d+ passed, 0 failed$/m);
  }, 240_000);
});

describe('vrdma_conformance against the project\'s guest driver (virtio_rdma on vhost-user-rdma-pci + vrdma serve)', () => {
  it('passes every scenario on virtio_rdma0 with the statuses the verbs specification names', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-conformance-'));
    const socket = join(dir, 'rdma.sock');
    const backend = new BackendProcess(['serve', '--socket', socket, '--gid', '127.0.0.1', '--roce-port', String(randomRocePort()), '--cq-slots', '8', '--qp-slots', '8', '--max-pd', '32', '--log-level', 'info']);
    try {
      await backend.waitFor(/listening on/);
      const driver = driverFiles();
      const r = await runInGuest({
        qemu: QEMU_RDMA,
        command: withDriver(driver.order, `${RDMA_SHELL}\nrun vrdma_conformance -d virtio_rdma0 -g 0 -v`),
        files: { ...driver.files, ...rdmaUserFiles() },
        sharedMemory: true,
        extraArgs: ['-chardev', `socket,id=vrdma0,path=${socket}`, '-device', 'vhost-user-rdma-pci,chardev=vrdma0,cq-slots=8,qp-slots=8'],
        timeoutMs: 180_000,
      });
      const failed = r.output.split('\n').filter((l) => l.startsWith('not ok'));
      expect(failed, `${r.output}\n--- backend ---\n${backend.output.slice(-3000)}`).toEqual([]);
      expect(r.exitCode, r.output).toBe(0);
      expect(r.output).toMatch(/^# 38 passed, 0 failed$/m);
      expect(r.output).toMatch(/^info pds_allocated=32$/m);
    } finally {
      await backend.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  }, 240_000);
});
