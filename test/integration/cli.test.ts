/**
 * `vrdma serve` as a user meets it: help, the QEMU arguments it prints, a
 * clear refusal of impossible limits, and the soft-roce engine's bind.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readPcap } from '../../backend/engines/soft-roce/pcap.js';
import { BackendProcess, CLI } from '../support/backend-process.js';
import { randomRocePort } from '../../guest-driver-tests/harness.js';

describe('vrdma serve', () => {
  it('explains its options for a QEMU user', () => {
    const r = spawnSync(process.execPath, [CLI, 'serve', '--help'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    for (const word of ['--socket', '--engine', 'soft-roce', '--roce-port', '--pcap', '--gid', '--cq-slots', '--qp-slots', '--max-pd', '--log-level', 'QEMU']) expect(r.stdout).toContain(word);
  });

  it('prints QEMU arguments that match its slots, for the project device and for stock QEMU', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-cli-'));
    const b = new BackendProcess(['serve', '--socket', join(dir, 's.sock'), '--cq-slots', '4', '--qp-slots', '8', '--gid', '127.0.0.2', '--roce-port', String(randomRocePort())]);
    try {
      // QEMU arguments go to stdout, the log to stderr: two pipes, no order between them.
      await b.waitFor(/listening on/);
      await b.waitFor(/vhost-user-test-device-pci/);
      expect(b.output).toContain('-device vhost-user-rdma-pci,chardev=vrdma0,cq-slots=4,qp-slots=8');
      expect(b.output).toContain('virtio-id=42,num_vqs=21,config_size=128');
      expect(b.output).toContain('memory-backend-memfd');
    } finally {
      await b.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('serves with the soft-roce engine bound to the first --gid, and says where', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-cli-'));
    const port = 20000 + Math.floor(Math.random() * 20000);
    const b = new BackendProcess(['serve', '--engine', 'soft-roce', '--socket', join(dir, 's.sock'), '--gid', '127.0.0.2', '--roce-port', String(port)]);
    try {
      await b.waitFor(/listening on/);
      expect(b.output).toContain(`soft-roce engine bound to UDP 127.0.0.2:${port}`);
      await b.waitFor(/-device vhost-user-rdma-pci/);
    } finally {
      await b.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a soft-roce address that is not on this host, or is not IPv4, with a one-line reason and exit 2', () => {
    const port = String(20000 + Math.floor(Math.random() * 20000));
    const cases: [string[], RegExp][] = [
      [['--gid', '192.0.2.1', '--roce-port', port], /^vrdma: soft-roce engine cannot bind UDP 192\.0\.2\.1:\d+: EADDRNOTAVAIL \(the address is not on this host\)$/m],
      [['--gid', 'fd00::1'], /^vrdma: the soft-roce engine binds the first --gid, which must be an IPv4 address/m],
    ];
    for (const [args, message] of cases) {
      const r = spawnSync(process.execPath, [CLI, 'serve', '--engine', 'soft-roce', '--socket', '/tmp/vrdma-never.sock', ...args], { encoding: 'utf8' });
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.trim().split('\n'), 'one line').toHaveLength(1);
      expect(r.stdout, 'no QEMU arguments for a back-end that did not start').toBe('');
    }
  });

  it('refuses --pcap with the loopback engine with a one-line reason and exit 2, creating no file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-cli-'));
    try {
      const file = join(dir, 'x.pcap');
      const r = spawnSync(process.execPath, [CLI, 'serve', '--engine', 'loopback', '--socket', join(dir, 's.sock'), '--pcap', file], { encoding: 'utf8' });
      expect(r.status).toBe(2);
      expect(r.stderr).toMatch(/^vrdma: --pcap records the soft-roce engine's RoCEv2 datagrams; the loopback engine sends none/m);
      expect(r.stderr.trim().split('\n'), 'one line').toHaveLength(1);
      expect(r.stdout).toBe('');
      expect(existsSync(file)).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('with --pcap, the soft-roce engine says where it captures and leaves a valid pcap file after SIGTERM', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-cli-'));
    const port = 20000 + Math.floor(Math.random() * 20000);
    const file = join(dir, 'roce.pcap');
    const b = new BackendProcess(['serve', '--engine', 'soft-roce', '--socket', join(dir, 's.sock'), '--gid', '127.0.0.2', '--roce-port', String(port), '--pcap', file]);
    try {
      await b.waitFor(/listening on/);
      expect(b.output).toContain(`capturing RoCEv2 packets to pcap ${file}`);
      await b.stop();
      expect(b.output).toMatch(/pcap .*roce\.pcap: 0 packets/);
      expect(readPcap(new Uint8Array(readFileSync(file)))).toMatchObject({ linkType: 1, records: [] });
    } finally {
      await b.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses impossible limits with a one-line reason', () => {
    for (const args of [['--max-pd', '0'], ['--qp-slots', '600'], ['--cq-slots', '4', '--qp-slots', '511']]) {
      const r = spawnSync(process.execPath, [CLI, 'serve', '--socket', '/tmp/vrdma-never.sock', ...args], { encoding: 'utf8' });
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(/^vrdma: .*limit|virtqueues|numQpSlots/m);
    }
  });
});
