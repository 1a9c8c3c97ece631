/**
 * The guest driver on the next guest kernel: Debian 12's backports kernel
 * (6.12, the kernel of Debian 13), with the driver built against that
 * kernel's own headers (VRDMA_GUEST_FLAVOUR=backports images/guest/build.sh
 * and virtio-rdma.sh). One boot runs what the 6.1 tests run over the same
 * `vrdma serve`: the device in sysfs and ibv_devinfo, ibv_rc_pingpong and
 * ibv_ud_pingpong, ib_write_bw, the in-guest conformance scenarios, the
 * in-kernel consumer, and unload — and the kernel must log no warning.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { BackendProcess } from '../support/backend-process.js';
import { guestImage, runInGuest } from './guest.js';
import { QEMU_RDMA, RDMA_SHELL, driverFiles, rdmaUserFiles, withDriver } from './vrdma-guest.js';

const FLAVOUR = 'backports';

function script(order: string[]): string {
  return withDriver(
    order,
    String.raw`
set +e
${RDMA_SHELL}
echo "RELEASE $(uname -r)"
D=/sys/class/infiniband/virtio_rdma0
echo "PORT $(cat $D/ports/1/state) $(cat $D/ports/1/link_layer) $(cat $D/ports/1/gids/0)"
run ibv_devinfo -v > devinfo.log 2>&1; echo "DEVINFO rc=$?"; grep -E "state:|max_qp:|max_pd:|active_mtu:" devinfo.log
pair() { # name tool args...: server and client over virtio_rdma0 in this guest
  n=$1; shift
  run "$@" > $n-server.log 2>&1 &
  wait_listen 18515
  run "$@" 127.0.0.1 > $n-client.log 2>&1; c=$?
  wait $!; s=$?
  echo "PAIR $n server=$s client=$c"
  sed "s/^/L $n /" $n-server.log $n-client.log
}
pair rc ibv_rc_pingpong -d virtio_rdma0 -g 0 -n 20 -s 1024 -r 16
pair ud ibv_ud_pingpong -d virtio_rdma0 -g 0 -n 20 -s 512 -r 16
pair bw ib_write_bw -d virtio_rdma0 -x 0 -n 50 -t 16 -s 65536 -p 18515
run vrdma_conformance -d virtio_rdma0 -g 0 -v; echo "CONFORMANCE rc=$?"
insmod vrdma_kselftest.ko; echo "KSELFTEST rc=$?"
rmmod vrdma_kselftest 2>/dev/null
rmmod virtio_rdma; echo "RMMOD rc=$?"
dmesg | grep -E 'virtio_rdma|vrdma_kselftest|BUG|WARNING|Oops|Call Trace|general protection' | sed 's/^\[[ 0-9.]*\] /K /'
`,
  );
}

describe("the guest driver on Debian 12's backports kernel (6.12)", () => {
  it('registers, runs rdma-core tools, perftest, the conformance scenarios and a kernel consumer, and unloads, with no kernel warning', async () => {
    const image = guestImage({ ...process.env, VRDMA_GUEST_FLAVOUR: FLAVOUR });
    expect(image.kernelRelease).toMatch(/^6\.12\./);
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-bpo-'));
    const socket = join(dir, 'rdma.sock');
    const backend = new BackendProcess(['serve', '--socket', socket, '--gid', '127.0.0.1', '--roce-port', String(randomRocePort()), '--cq-slots', '8', '--qp-slots', '8', '--max-pd', '32']);
    try {
      await backend.waitFor(/listening on/);
      const driver = driverFiles(FLAVOUR);
      const r = await runInGuest({
        qemu: QEMU_RDMA,
        image,
        command: script(driver.order),
        files: { ...driver.files, ...rdmaUserFiles() },
        sharedMemory: true,
        extraArgs: ['-chardev', `socket,id=vrdma0,path=${socket}`, '-device', 'vhost-user-rdma-pci,chardev=vrdma0,cq-slots=8,qp-slots=8'],
        timeoutMs: 180_000,
      });
      const out = r.output;
      const context = `${out}\n--- backend ---\n${backend.output.slice(-3000)}`;
      if (process.env.VRDMA_TEST_VERBOSE) console.log(context);
      expect(r.exitCode, context).toBe(0);
      expect(out).toContain(`RELEASE ${image.kernelRelease}`);
      expect(out).toContain('PORT 4: ACTIVE Ethernet 0000:0000:0000:0000:0000:ffff:7f00:0001');
      expect(out).toContain('DEVINFO rc=0');
      expect(out).toMatch(/^\s+max_qp:\s+8$/m);
      expect(out).toMatch(/^\s+max_pd:\s+32$/m);
      for (const p of ['rc', 'ud', 'bw']) expect(out, context).toContain(`PAIR ${p} server=0 client=0`);
      expect(out).toMatch(/^L rc 20 iters in [\d.]+ seconds/m);
      expect(out).toMatch(/^L ud 20 iters in [\d.]+ seconds/m);
      expect(out).toMatch(/^L bw\s+65536\s+50\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$/m);
      expect(out.split('\n').filter((l) => l.startsWith('not ok')), context).toEqual([]);
      expect(out).toMatch(/^# 38 passed, 0 failed$/m);
      expect(out).toContain('CONFORMANCE rc=0');
      expect(out).toContain('KSELFTEST rc=0');
      expect(out).toMatch(/^K vrdma_kselftest: PASSED$/m);
      expect(out).toContain('RMMOD rc=0');
      expect(out).not.toMatch(/^K .*(BUG|WARNING|Oops|Call Trace|general protection)/m);
      expect(r.console).not.toMatch(/BUG:|WARNING:|Oops|Call Trace/);
    } finally {
      await backend.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  }, 240_000);
});
