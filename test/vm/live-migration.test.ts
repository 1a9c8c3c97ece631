/**
 * Live migration of VMs with live RDMA connections, with real QEMU (TCG),
 * the project's guest driver and unmodified tools.
 *
 * Guests A and B, each on its own `vrdma serve` (soft-RoCE on 127.0.0.2 and
 * 127.0.0.3), run `ib_write_bw -b --run_infinitely` (both directions, a
 * report a second) and `ibv_rc_pingpong -c` (every received buffer
 * checked) between them. While both run, A is migrated over QMP to A' — a
 * new QEMU with `-incoming` and a new back-end started with `--incoming` on
 * A's address, the VM's — then A' to A'' (a second hop), then B to B'. The
 * bandwidth reports must go on on both sides after every move, no tool may
 * report an error, and the pingpong must end with rc 0 after all its
 * iterations.
 *
 * The QEMUs run in a network namespace this file creates (a bridge with a
 * tap per QEMU; the migrated guest keeps its MAC, and QEMU's announce after
 * the move teaches the bridge its new port). The back-ends stay in the host
 * namespace, on loopback.
 *
 * FAILS when the patched QEMU is missing, the guest image is not built, or
 * this process may not create namespaces.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { BackendProcess, CLI } from '../support/backend-process.js';
import { startGuest, type RunningGuest } from './guest.js';
import { NetNs, canCreateNetNs } from './netns.js';
import { Qmp, migrate, migrationEnd } from './qmp.js';
import { QEMU_RDMA, driverFiles, guestPrologue as prologue, rdmaUserFiles, type GuestFiles } from './vrdma-guest.js';

const CQ_SLOTS = 12;
const QP_SLOTS = 6;
const GID = { A: '127.0.0.2', B: '127.0.0.3' } as const;
type Side = keyof typeof GID;
const BW_PORT = 18700;
const PP_PORT = 18701;
const BW_ARGS = `-d virtio_rdma0 -x 0 -s 65536 -t 16 -b -D 1 --run_infinitely -p ${BW_PORT}`;
const PP_ITERS = 3000;
const PP_ARGS = `-d virtio_rdma0 -g 0 -n ${PP_ITERS} -s 4096 -r 16 -c -p ${PP_PORT}`;
const BW_LINE = /^\s*65536\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$/gm;
/** What perftest and rdma-core's examples print when a completion fails. */
const TOOL_ERROR = /Completion with error|Failed status|completion error|parse WC failed|poll CQ failed|error on QP/i;

/** B serves both tools; its bandwidth reports go to the console. */
function scriptB(order: string[], ns: NetNs): string {
  return (
    prologue(order, ns.guestAddressOf(1)) +
    String.raw`
trun 900 ibv_rc_pingpong ${PP_ARGS} > /tmp/pp.out 2>&1 &
pp=$!
trun 900 ib_write_bw ${BW_ARGS} 2> /tmp/bw.err &
echo "SERVERS-UP"
wait $pp; rc=$?
echo "PP-BEGIN"; cat /tmp/pp.out; echo "PP-END rc=$rc"
wait
echo "BW-ENDED"; cat /tmp/bw.err
sleep 600
`
  );
}

/** A: the clients (retrying while B's servers come up). */
function scriptA(order: string[], ns: NetNs): string {
  const b = ns.guestAddressOf(1);
  return (
    prologue(order, ns.guestAddressOf(0)) +
    String.raw`
( i=0; while :; do trun 900 ib_write_bw ${BW_ARGS} ${b} 2> /tmp/bw.err; rc=$?; if [ $rc -ne 0 ] && refused /tmp/bw.err && [ $i -lt 240 ]; then i=$((i+1)); sleep 0.25; continue; fi; break; done; echo "BW-ENDED rc=$rc"; cat /tmp/bw.err ) &
sleep 2
client pp 900 ibv_rc_pingpong ${PP_ARGS} ${b}
echo "PP-BEGIN"; cat /tmp/pp.out; echo "PP-END rc=$rc"
echo "--- kernel"; dmesg | grep -E 'WARNING|BUG|Call Trace' || true; echo "--- end kernel"
sleep 600
`
  );
}

const count = (text: string, re: RegExp): number => [...text.matchAll(re)].length;

/** Waits until `guest`'s console holds at least `n` matches of the global `re`. */
async function waitForCount(guest: RunningGuest, re: RegExp, n: number, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (count(guest.console, re) < n) {
    if (Date.now() > deadline) throw new Error(`${what}: ${count(guest.console, re)} of ${n} after ${timeoutMs} ms; console tail:\n${guest.console.slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('live migration of VMs with live RDMA connections (two guests, QMP)', () => {
  let dir = '';
  let ns: NetNs | null = null;
  const running: { guest: RunningGuest; backend: BackendProcess }[] = [];

  afterAll(async () => {
    for (const r of running) {
      await r.guest.stop();
      await r.backend.stop();
    }
    ns?.remove();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('ib_write_bw -b and ibv_rc_pingpong -c run on through A -> A\' -> A\'\' and B -> B\'', async () => {
    if (!existsSync(QEMU_RDMA)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU_RDMA}: run \`bash images/qemu/build.sh\``);
    if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build with npx tsc -p .`);
    if (!canCreateNetNs()) throw new Error('this test creates a network namespace and taps: run it as root with iproute2');
    const d = driverFiles();
    const files: GuestFiles = { ...d.files, ...rdmaUserFiles() };
    dir = mkdtempSync(join(tmpdir(), 'vrdma-live-migration-'));
    const netns = NetNs.create('vrdma-lm', 5);
    ns = netns;
    const qemu = netns.wrapQemu(dir, QEMU_RDMA);
    const rocePort = randomRocePort();
    const scripts: Record<Side, string> = { A: scriptA(d.order, netns), B: scriptB(d.order, netns) };
    const macs: Record<Side, string> = { A: '52:54:00:12:34:56', B: '52:54:00:12:34:57' };
    let tap = 0;
    /** What each VM printed on the QEMUs it left: a tool may finish before or after a move. */
    const earlier: Record<Side, string> = { A: '', B: '' };
    /** Waits for `re` on the VM's whole console history, this QEMU's included. */
    const waitHistory = async (side: Side, host: Host, re: RegExp, timeoutMs: number): Promise<RegExpExecArray> => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const m = re.exec(earlier[side] + host.guest.console);
        if (m !== null) return m;
        if (Date.now() > deadline) throw new Error(`${side}: no ${re} within ${timeoutMs} ms; console tail:\n${host.guest.console.slice(-2000)}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    let serial = 0;

    /** A back-end and a QEMU for `side`; `incoming` makes both the destination of a migration. */
    async function start(side: Side, incoming: boolean, gid: string = GID[side]): Promise<{ guest: RunningGuest; backend: BackendProcess; qmp: string; migrateUri: string }> {
      const n = serial++;
      const socket = join(dir, `${side}${n}.sock`);
      const qmp = join(dir, `${side}${n}.qmp`);
      const migrateUri = `unix:${join(dir, `${side}${n}.migrate`)}`;
      const backend = new BackendProcess([
        'serve', '--device', 'rdma', '--socket', socket, '--gid', gid, '--roce-port', String(rocePort),
        '--cq-slots', String(CQ_SLOTS), '--qp-slots', String(QP_SLOTS), '--log-level', 'info', ...(incoming ? ['--incoming'] : []),
      ]);
      await backend.waitFor(/listening on/);
      const guest = startGuest({
        qemu,
        command: scripts[side],
        files,
        sharedMemory: true,
        timeoutMs: 900_000,
        extraArgs: [
          '-chardev', `socket,id=vrdma0,path=${socket}`,
          '-device', `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${CQ_SLOTS},qp-slots=${QP_SLOTS}`,
          ...netns.nicArgs(macs[side], tap++),
          '-qmp', `unix:${qmp},server=on,wait=off`,
          ...(incoming ? ['-incoming', migrateUri] : []),
        ],
      });
      running.push({ guest, backend });
      return { guest, backend, qmp, migrateUri };
    }

    type Host = Awaited<ReturnType<typeof start>>;
    /** A destination whose back-end serves another GID than the VM's: it must refuse the VM's state. */
    const startMismatched = (side: Side): Promise<Host> => start(side, true, '127.0.0.9');

    /** Moves `from`'s VM to a new QEMU and back-end on the same address; returns the new host once its VM reported `reports` more bandwidth lines. */
    async function move(side: Side, from: Host, others: Host[]): Promise<Host> {
      const to = await start(side, true);
      // QMP answers once QEMU is up, and by then it listens on its -incoming URI.
      const dst = await Qmp.connect(to.qmp);
      const src = await Qmp.connect(from.qmp);
      const before = others.map((o) => count(o.guest.console, BW_LINE));
      try {
        const t0 = Date.now();
        const result = await migrate(src, to.migrateUri);
        expect(result.status, result.error ?? '').toBe('completed');
        expect(await dst.status()).toBe('running');
        const info = result.info as { downtime?: number; 'total-time'?: number };
        process.stderr.write(`[live-migration] ${side} moved in ${Date.now() - t0} ms (QEMU downtime ${String(info.downtime)} ms)\n`);
      } finally {
        src.close();
        dst.close();
      }
      await from.backend.waitFor(/RoCE address \S+ released/);
      await to.backend.waitFor(/RoCE address \S+ held; running/, 30_000);
      // The moved VM reports bandwidth again, and so does its peer.
      await waitForCount(to.guest, BW_LINE, 2, 120_000, `${side} reports bandwidth after the move`);
      for (let i = 0; i < others.length; i++) await waitForCount(others[i]!.guest, BW_LINE, before[i]! + 3, 120_000, `${side}'s peer reports bandwidth after the move`);
      expect(to.guest.console).not.toMatch(TOOL_ERROR);
      earlier[side] += from.guest.console;
      await from.guest.stop();
      await from.backend.stop();
      return to;
    }

    /**
     * A migration that fails: the destination QEMU is killed while RAM is
     * copied (the copy slowed down so that it is), or the destination
     * back-end refuses the state (`refuse`: it serves another GID, a named
     * reason). Either way QMP reports the failure, the source keeps running
     * (or resumes) with its address, and the traffic goes on.
     */
    async function failedMove(side: Side, from: Host, others: Host[], how: 'kill-destination' | 'refuse'): Promise<void> {
      const to = how === 'refuse' ? await startMismatched(side) : await start(side, true);
      const dst = await Qmp.connect(to.qmp);
      const src = await Qmp.connect(from.qmp);
      try {
        if (how === 'kill-destination') {
          await src.execute('migrate-set-parameters', { 'max-bandwidth': 16 << 20 });
          await src.execute('migrate', { uri: to.migrateUri });
          await new Promise((r) => setTimeout(r, 1500));
          expect(String(((await src.execute('query-migrate')) as { status?: string }).status)).toBe('active');
          to.guest.kill('SIGKILL');
          const r = await migrationEnd(src);
          expect(r.status).toBe('failed');
          await src.execute('migrate-set-parameters', { 'max-bandwidth': 128 << 20 });
        } else {
          // The destination refuses after the source sent everything: only with a return path does
          // the source hear of it (and then resume on its own, as QEMU does for a failed migration).
          const returnPath = { capabilities: [{ capability: 'return-path', state: true }] };
          await dst.execute('migrate-set-capabilities', returnPath);
          await src.execute('migrate-set-capabilities', returnPath);
          const r = await migrate(src, to.migrateUri);
          expect(r.status).toBe('failed');
          await to.backend.waitFor(/device state load failed: .*gid/i);
        }
        expect(await src.status()).toBe('running');
      } finally {
        src.close();
        dst.close();
      }
      if (how === 'refuse') await from.backend.waitFor(/RoCE address \S+ held; running/, 30_000);
      const before = [from, ...others].map((o) => count(o.guest.console, BW_LINE));
      await waitForCount(from.guest, BW_LINE, before[0]! + 3, 120_000, `${side} reports bandwidth after the failed migration`);
      for (let i = 0; i < others.length; i++) await waitForCount(others[i]!.guest, BW_LINE, before[i + 1]! + 3, 120_000, `${side}'s peer after the failed migration`);
      expect(from.guest.console).not.toMatch(TOOL_ERROR);
      await to.guest.stop();
      await to.backend.stop();
    }

    let a = await start('A', false);
    let b = await start('B', false);
    await b.guest.waitForOutput(/^SERVERS-UP/m, 180_000);
    // Both sides report bandwidth before anything moves.
    await waitForCount(a.guest, BW_LINE, 2, 180_000, 'A reports bandwidth');
    await waitForCount(b.guest, BW_LINE, 2, 60_000, 'B reports bandwidth');
    expect(a.guest.console).not.toMatch(/PP-END/); // the pingpong is still running: it spans the move

    await failedMove('A', a, [b], 'kill-destination');
    await failedMove('A', a, [b], 'refuse');
    a = await move('A', a, [b]);
    a = await move('A', a, [b]);
    b = await move('B', b, [a]);

    const ppA = await waitHistory('A', a, /PP-BEGIN\n([\s\S]*?)PP-END rc=(\d+)/, 600_000);
    const ppB = await waitHistory('B', b, /PP-BEGIN\n([\s\S]*?)PP-END rc=(\d+)/, 120_000);
    for (const [who, m] of [['A', ppA], ['B', ppB]] as const) {
      expect(m[2], `${who}'s ibv_rc_pingpong:\n${m[1]}`).toBe('0');
      expect(m[1]).toMatch(new RegExp(`^${PP_ITERS} iters in [\\d.]+ seconds`, 'm'));
    }
    // The bandwidth test is still running on both sides, with no error from either.
    const bwA = count(a.guest.console, BW_LINE);
    const bwB = count(b.guest.console, BW_LINE);
    await waitForCount(a.guest, BW_LINE, bwA + 2, 60_000, 'A still reports bandwidth');
    await waitForCount(b.guest, BW_LINE, bwB + 2, 60_000, 'B still reports bandwidth');
    for (const [side, g] of [['A', a.guest], ['B', b.guest]] as const) {
      expect(earlier[side] + g.console).not.toMatch(/BW-ENDED/);
      expect(earlier[side] + g.console).not.toMatch(TOOL_ERROR);
    }
    const kernel = /--- kernel\n([\s\S]*?)--- end kernel/.exec(earlier.A + a.guest.console)?.[1] ?? '';
    expect(kernel.trim(), 'kernel warnings in A after two moves').toBe('');
  }, 900_000);
});
