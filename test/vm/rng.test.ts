/**
 * The vhost-user library against things nobody here wrote: Debian's QEMU 7.2
 * (`vhost-user-rng-pci`) and the guest kernel's stock virtio_rng driver,
 * with `vrdma serve --device rng` as the back-end.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BackendProcess } from '../support/backend-process.js';
import { runInGuest, startGuest } from './guest.js';

const READ_BYTES = 64 * 1024;

function rngArgs(socket: string): string[] {
  return ['-chardev', `socket,id=rng0,path=${socket}`, '-device', 'vhost-user-rng-pci,chardev=rng0'];
}

/** Reads READ_BYTES from the hardware RNG and reports how much arrived and how varied it is. */
const READ_SCRIPT = `
set -e
test "$(cat /sys/class/misc/hw_random/rng_current)" = virtio_rng.0
dd if=/dev/hwrng of=/tmp/r bs=4096 count=${READ_BYTES / 4096} 2>/dev/null
echo "read=$(wc -c < /tmp/r)"
echo "distinct=$(od -An -v -tu1 /tmp/r | tr -s ' ' '\\n' | grep -v '^$' | sort -u | wc -l)"
`;

function servedBytes(log: string, nth: number): number {
  const matches = [...log.matchAll(/rng: served (\d+) bytes/g)];
  const m = matches[nth];
  if (m === undefined) throw new Error(`no served-bytes line #${nth} in back-end log:\n${log}`);
  return Number(m[1]);
}

describe('virtio-rng over vhost-user with stock QEMU and the stock guest driver', () => {
  let dir: string;
  let socket: string;
  let backend: BackendProcess;

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vrdma-rng-'));
    socket = join(dir, 'rng.sock');
    backend = new BackendProcess(['serve', '--device', 'rng', '--socket', socket, '--log-level', 'info']);
    await backend.waitFor(/listening on/);
  });

  afterEach(async () => {
    await backend.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves the guest 64 KiB from /dev/hwrng and counts the same bytes', async () => {
    const res = await runInGuest({ command: READ_SCRIPT, sharedMemory: true, extraArgs: rngArgs(socket), timeoutMs: 90_000 });
    expect(res.exitCode, res.console).toBe(0);
    expect(res.output).toContain(`read=${READ_BYTES}`);
    const distinct = Number(/distinct=(\d+)/.exec(res.output)?.[1]);
    expect(distinct).toBeGreaterThan(250);
    await backend.waitFor(/front-end disconnected/);
    await backend.waitFor(/guest memory mappings still held: 0 /);
    const served = servedBytes(backend.output, 0);
    // Everything the guest read came from us; the driver also keeps one
    // request buffered ahead and the RNG core takes a little at registration.
    expect(served).toBeGreaterThanOrEqual(READ_BYTES);
    expect(served - READ_BYTES).toBeLessThanOrEqual(4096);
    expect(backend.output).toMatch(/vq 0: started/);
  });

  it('survives QEMU being killed mid-run and serves a new QEMU', async () => {
    const first = startGuest({
      command: 'while true; do dd if=/dev/hwrng of=/dev/null bs=512 count=64 2>/dev/null; echo chunk-done; done',
      sharedMemory: true,
      extraArgs: rngArgs(socket),
      timeoutMs: 90_000,
    });
    await first.waitForOutput(/chunk-done[\s\S]*chunk-done/, 80_000);
    first.kill('SIGKILL');
    await first.stop();
    const disconnect = await backend.waitFor(/front-end disconnected/);
    expect(disconnect).toMatch(/unmapped [1-9]\d* memory regions/);
    await backend.waitFor(/guest memory mappings still held: 0 /);
    expect(servedBytes(backend.output, 0)).toBeGreaterThanOrEqual(2 * 512 * 64);

    const res = await runInGuest({ command: READ_SCRIPT, sharedMemory: true, extraArgs: rngArgs(socket), timeoutMs: 90_000 });
    expect(res.exitCode, res.console).toBe(0);
    expect(res.output).toContain(`read=${READ_BYTES}`);
    expect([...backend.output.matchAll(/front-end connected/g)]).toHaveLength(2);
  });
});
