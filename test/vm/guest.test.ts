// Boots the cached test guest (images/guest/build.sh) in QEMU/TCG.
// These tests FAIL when the image or QEMU is missing: scripts/setup.sh
// builds/installs them before tests run.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { GuestError, guestImage, runInGuest, startGuest } from './guest.js';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** QEMU processes whose command line mentions `needle` (e.g. a run's temp dir). */
function qemuProcessesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmd.includes('qemu-system') && cmd.includes(needle)) pids.push(Number(entry));
    } catch {
      /* process went away */
    }
  }
  return pids;
}

describe('guest image', () => {
  it('is built and cached (run images/guest/build.sh if this fails)', () => {
    const img = guestImage();
    expect(existsSync(img.kernel)).toBe(true);
    expect(existsSync(img.initrd)).toBe(true);
    expect(img.kernelRelease).toMatch(/^6\.1\./);
    expect(img.append).toContain('console=ttyS0');
  });

  it('a missing image is a clear GuestError naming build.sh', () => {
    const empty = mkdtempSync(path.join(os.tmpdir(), 'vrdma-nocache-'));
    try {
      expect(() => guestImage({ ...process.env, VRDMA_CACHE: empty })).toThrowError(/images\/guest\/build\.sh/);
      try {
        guestImage({ ...process.env, VRDMA_CACHE: empty });
      } catch (e) {
        expect(e).toBeInstanceOf(GuestError);
        expect((e as GuestError).kind).toBe('image-missing');
      }
    } finally {
      rmSync(empty, { recursive: true, force: true });
    }
  });

  it('a missing QEMU is a clear GuestError', () => {
    let err: unknown;
    try {
      startGuest({ command: 'true', qemu: '/nonexistent/qemu-system-x86_64' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(GuestError);
    expect((err as GuestError).kind).toBe('qemu-missing');
    expect(String(err)).toMatch(/qemu-system-x86/);
  });
});

describe('runInGuest (QEMU, TCG)', () => {
  it('runs a command: output between the markers, its exit code, the 6.1 kernel', async () => {
    const logFile = path.join(os.tmpdir(), `vrdma-guest-test-${process.pid}.log`);
    const r = await runInGuest({
      command: 'echo hello-from-guest; uname -r; cat data.txt; exit 7',
      files: { 'data.txt': 'file-from-host\n' },
      timeoutMs: 45_000,
      logFile,
    });
    const log = readFileSync(logFile, 'utf8');
    rmSync(logFile, { force: true });
    expect(log).toContain('@@VRDMA-BEGIN@@\nhello-from-guest');
    expect(log).toContain('@@VRDMA-EXIT 7@@');
    console.log(`guest run: ${r.durationMs} ms wall, ${r.bootMs} ms to the command`);
    expect(r.exitCode).toBe(7);
    expect(r.output).toContain('hello-from-guest');
    expect(r.output).toMatch(/^6\.1\.\d+-\d+-amd64$/m);
    expect(r.output).toContain('file-from-host');
    expect(r.output).not.toContain('@@VRDMA');
    expect(r.output).toBe(`hello-from-guest\n${r.output.split('\n')[1]}\nfile-from-host\n`);
    expect(r.console).toContain('@@VRDMA-EXIT 7@@');
    expect(r.warnings).toEqual([]);
  });

  it('the guest sees PCI devices via /sys and lspci, and virtio drivers bind', async () => {
    const r = await runInGuest({
      command: [
        'cat /sys/bus/pci/devices/*/vendor',
        'echo ---',
        'lspci -n',
        'echo ---',
        'ls /sys/bus/virtio/drivers/virtio_rng/',
      ].join('\n'),
      extraArgs: ['-device', 'virtio-rng-pci'],
    });
    expect(r.exitCode).toBe(0);
    const [vendors = '', lspci = '', rng = ''] = r.output.split('---\n');
    expect(vendors.split('\n')).toContain('0x8086'); // q35 host bridge
    expect(vendors.split('\n')).toContain('0x1af4'); // virtio
    expect(lspci).toMatch(/^00:00\.0 0600: 8086:29c0/m);
    expect(lspci).toMatch(/^[0-9a-f]{2}:[0-9a-f]{2}\.\d [0-9a-f]{4}: 1af4:1005/m); // transitional virtio-rng
    expect(rng).toMatch(/virtio\d+/);
  });

  it('boots with vhost-user style shared memory (memfd backend + NUMA node)', async () => {
    const r = await runInGuest({
      command: 'grep MemTotal /proc/meminfo',
      memMiB: 256,
      extraArgs: ['-object', 'memory-backend-memfd,id=mem,size=256M,share=on', '-numa', 'node,memdev=mem'],
    });
    expect(r.exitCode).toBe(0);
    expect(r.output).toMatch(/MemTotal:\s+\d+ kB/);
  });

  it('a command that never finishes is torn down at the timeout; no QEMU is left', async () => {
    // ~2 s boot; 10 s leaves room for a loaded machine
    const g = startGuest({ command: 'echo started; sleep 1000', timeoutMs: 10_000 });
    expect(alive(g.pid)).toBe(true);
    await g.waitForOutput(/^started$/m);
    const err: unknown = await g.result().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(GuestError);
    const ge = err as GuestError;
    expect(ge.kind).toBe('timeout');
    expect(ge.message).toContain('started'); // the console tail
    expect(ge.tempDir).toBeDefined();
    expect(ge.message).toContain(ge.tempDir ?? '<none>');
    expect(alive(g.pid)).toBe(false);
    expect(qemuProcessesMentioning(g.tempDir)).toEqual([]);
    // failures keep the run's files for inspection
    expect(existsSync(path.join(g.tempDir, 'console.log'))).toBe(true);
    rmSync(g.tempDir, { recursive: true, force: true });
  });

  it('a guest that ends before the exit marker is a qemu-exit GuestError with the console', async () => {
    const err: unknown = await runInGuest({ command: 'echo going-down; poweroff -f; sleep 30' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(GuestError);
    const ge = err as GuestError;
    expect(ge.kind).toBe('qemu-exit');
    expect(ge.console).toContain('going-down');
    if (ge.tempDir) rmSync(ge.tempDir, { recursive: true, force: true });
  });

  it('stop() tears a running guest down and cleans up', async () => {
    const g = startGuest({ command: 'sleep 1000' });
    await g.waitForOutput(/@@VRDMA-BEGIN@@/, 30_000);
    await g.stop();
    expect(alive(g.pid)).toBe(false);
    await expect(g.result()).rejects.toMatchObject({ kind: 'stopped' });
    expect(existsSync(g.tempDir)).toBe(false);
  });
});
