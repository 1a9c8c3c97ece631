/**
 * Two guests, each with the guest driver on its own vhost-user-rdma-pci
 * device and its own `vrdma serve` (soft-RoCE on 127.0.0.2 and 127.0.0.3,
 * one UDP port): the stock rdma-core and perftest tools run between them,
 * then one guest is killed mid-transfer and a new guest takes its place.
 *
 * The RDMA traffic goes guest A -> A's vhost-user device -> back-end A ->
 * UDP 127.0.0.2 <-> 127.0.0.3 -> back-end B -> B's device -> guest B. The
 * tools' out-of-band TCP exchange needs a network between the guests: both
 * QEMUs run inside a network namespace this file creates and removes, each
 * guest with a virtio-net NIC on a tap of the namespace's bridge. The
 * back-ends stay in the host namespace (the vhost-user socket is a path, so
 * QEMU reaches it from inside the namespace).
 *
 * One boot per guest runs every tool in turn; the server role alternates
 * between the guests. Each guest prints `CASE-BEGIN <name>` before a case
 * and `CASE-END <name> rc=<n>` after it, with the tool's output between;
 * clients retry while their server is not listening yet. Each case has its
 * own TCP port, so a client can only meet its own server.
 *
 * After the six cases, guest B runs `ib_write_bw -b --run_infinitely`
 * against guest A — both directions, so A's back-end holds requester state
 * (WRITEs waiting for ACKs) as well as responder state when A dies; once B
 * has reported bandwidth twice, the test SIGKILLs A's QEMU, boots A' on A's
 * socket and tap, and runs ibv_rc_pingpong between A' and B. (This
 * transfer, with every WR signalled and the send queue kept full, is what
 * found the device returning a WQE chain after its CQE:
 * backend/device/completion-order.test.ts.)
 *
 * FAILS when the patched QEMU is missing (`bash images/qemu/build.sh`), the
 * guest image is not built, or this process may not create namespaces.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { BackendProcess, CLI } from '../support/backend-process.js';
import { startGuest, type RunningGuest } from './guest.js';
import { NetNs, canCreateNetNs } from './netns.js';
import { QEMU_RDMA, driverFiles, guestPrologue as prologue, rdmaUserFiles, type GuestFiles } from './vrdma-guest.js';

const CQ_SLOTS = 4;
const QP_SLOTS = 4;
const GID = { A: '127.0.0.2', B: '127.0.0.3' } as const;
type Side = keyof typeof GID;
const other = (s: Side): Side => (s === 'A' ? 'B' : 'A');

const PP_ITERS = 20;
const PERF_ITERS = 100;
/** 16 packets at the path MTU of 4096 perftest uses */
const PERF_SIZE = 65536;
const LAT_ITERS = 50;
const LAT_SIZE = 8192;
const KILL_PORT = 18600;
/** The transfer guest A dies in: both directions, a bandwidth report each second, until it fails. */
const KILL_ARGS = `-d virtio_rdma0 -x 0 -s ${PERF_SIZE} -t 16 -b -D 1 --run_infinitely`;
const AFTER_PORT = 18601;

interface ToolCase {
  /** The tool, and the name of its `it`. */
  tool: string;
  /** Arguments both sides pass (besides -p and the client's server address). */
  args: string;
  server: Side;
  port: number;
  /** What each side prints on success. */
  says: { server: RegExp; client: RegExp };
  /** Transport of the QP each side creates, as the back-end logs it. */
  qpType: 'RC' | 'UD';
}

const bwLine = (iters: string): RegExp => new RegExp(`^\\s*${PERF_SIZE}\\s+${iters}\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s*$`, 'm');
const latLine = new RegExp(`^\\s*${LAT_SIZE}\\s+${LAT_ITERS}\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+`, 'm');
const ppLine = new RegExp(`^${PP_ITERS} iters in [\\d.]+ seconds = [\\d.]+ usec/iter$`, 'm');

const CASES: ToolCase[] = [
  { tool: 'ibv_rc_pingpong', args: `-d virtio_rdma0 -g 0 -n ${PP_ITERS} -s 8192 -r 16`, server: 'A', port: 18520, says: { server: ppLine, client: ppLine }, qpType: 'RC' },
  { tool: 'ibv_ud_pingpong', args: `-d virtio_rdma0 -g 0 -n ${PP_ITERS} -s 2048 -r 16`, server: 'B', port: 18521, says: { server: ppLine, client: ppLine }, qpType: 'UD' },
  { tool: 'ib_write_bw', args: `-d virtio_rdma0 -x 0 -n ${PERF_ITERS} -s ${PERF_SIZE} -t 16`, server: 'A', port: 18522, says: { server: bwLine(String(PERF_ITERS)), client: bwLine(String(PERF_ITERS)) }, qpType: 'RC' },
  { tool: 'ib_read_bw', args: `-d virtio_rdma0 -x 0 -n ${PERF_ITERS} -s ${PERF_SIZE} -t 16`, server: 'B', port: 18523, says: { server: bwLine(String(PERF_ITERS)), client: bwLine(String(PERF_ITERS)) }, qpType: 'RC' },
  // the receiver counts what it received, so its iteration column may differ from -n
  { tool: 'ib_send_bw', args: `-d virtio_rdma0 -x 0 -n ${PERF_ITERS} -s ${PERF_SIZE} -t 16 -r 32`, server: 'A', port: 18524, says: { server: bwLine('\\d+'), client: bwLine(String(PERF_ITERS)) }, qpType: 'RC' },
  // #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
  {
    tool: 'ib_write_lat',
    args: `-d virtio_rdma0 -x 0 -n ${LAT_ITERS} -s ${LAT_SIZE}`,
    server: 'B',
    port: 18525,
    says: { server: latLine, client: latLine },
    qpType: 'RC',
  },
];

function caseScript(c: ToolCase, side: Side, peer: string): string {
  const name = c.tool;
  const run =
    c.server === side
      ? `trun 90 ${c.tool} ${c.args} -p ${c.port} > /tmp/${name}.out 2>&1; rc=$?`
      : `client ${name} 90 ${c.tool} ${c.args} -p ${c.port} ${peer}`;
  return `echo "CASE-BEGIN ${name}"\n${run}\ncat /tmp/${name}.out\necho "CASE-END ${name} rc=$rc"\n`;
}

/** Guest A: the six cases, then the server of the transfer that its death interrupts. */
function scriptA(order: string[], ns: NetNs): string {
  return (
    prologue(order, ns.guestAddressOf(0)) +
    CASES.map((c) => caseScript(c, 'A', ns.guestAddressOf(1))).join('') +
    String.raw`
echo "--- kernel"
dmesg | grep -E 'WARNING|BUG|Call Trace' || true
echo "KILL-SERVER-STARTING"
trun 300 ib_write_bw ${KILL_ARGS} -p ${KILL_PORT} > /tmp/kill.out 2>&1
echo "KILL-SERVER-RETURNED rc=$?"
cat /tmp/kill.out
`
  );
}

/**
 * Guest B: the six cases; then the client of the endless transfer, its
 * standard output on the console (line-buffered: the bandwidth report of
 * each second shows up while it runs), its standard error in a file for
 * the retry check; then the pingpong server for A'.
 */
function scriptB(order: string[], ns: NetNs): string {
  const a = ns.guestAddressOf(0);
  return (
    prologue(order, ns.guestAddressOf(1)) +
    CASES.map((c) => caseScript(c, 'B', a)).join('') +
    String.raw`
echo "CASE-BEGIN killed-transfer"
i=0; while :; do trun 120 ib_write_bw ${KILL_ARGS} -p ${KILL_PORT} ${a} 2> /tmp/kill.err; rc=$?; if [ $rc -ne 0 ] && refused /tmp/kill.err && [ $i -lt 240 ]; then i=$((i+1)); sleep 0.25; continue; fi; break; done
echo "--- stderr"
cat /tmp/kill.err
echo "CASE-END killed-transfer rc=$rc"
echo "CASE-BEGIN after-kill"
trun 120 ibv_rc_pingpong -d virtio_rdma0 -g 0 -n ${PP_ITERS} -s 1024 -r 16 -p ${AFTER_PORT} > /tmp/after.out 2>&1; rc=$?
cat /tmp/after.out
echo "CASE-END after-kill rc=$rc"
echo "--- kernel"
dmesg | grep -E 'WARNING|BUG|Call Trace' || true
echo "GUEST-DONE"
sleep 30
`
  );
}

/**
 * Guest A': the driver on A's back-end again, and a pingpong client to B.
 *
 * B and A' end with GUEST-DONE and then wait to be stopped: /init powers
 * off right after its exit marker (`poweroff -f`), which can drop console
 * output the serial port has not sent yet, so the test reads up to its own
 * marker and then stops QEMU instead of relying on the exit marker.
 */
function scriptA2(order: string[], ns: NetNs): string {
  return (
    prologue(order, ns.guestAddressOf(0)) +
    String.raw`
echo "CASE-BEGIN after-kill"
client after 120 ibv_rc_pingpong -d virtio_rdma0 -g 0 -n ${PP_ITERS} -s 1024 -r 16 -p ${AFTER_PORT} ${ns.guestAddressOf(1)}
cat /tmp/after.out
echo "CASE-END after-kill rc=$rc"
echo "--- kernel"
dmesg | grep -E 'WARNING|BUG|Call Trace' || true
echo "GUEST-DONE"
sleep 30
`
  );
}

interface CaseOutput {
  rc: number;
  out: string;
}

/** The output of case `name` on a console, once it ended. */
function caseOf(console: string, name: string): CaseOutput | undefined {
  const m = new RegExp(`CASE-BEGIN ${name}\\n([\\s\\S]*?)CASE-END ${name} rc=(\\d+)`).exec(console);
  return m ? { rc: Number(m[2]), out: m[1]! } : undefined;
}

/** The console up to the script's GUEST-DONE; then the guest is stopped. */
async function done(g: RunningGuest, timeoutMs: number): Promise<string> {
  await g.waitForOutput(/^GUEST-DONE\n/m, timeoutMs);
  const out = g.console;
  await g.stop();
  return out.slice(0, out.indexOf('GUEST-DONE\n') + 'GUEST-DONE\n'.length);
}

/** ::ffff:127.0.0.x as perftest prints a GID (decimal bytes, two digits). */
function perftestGid(ip: string): string {
  const b = ip.split('.').map((x) => x.padStart(2, '0'));
  return `00:00:00:00:00:00:00:00:00:00:255:255:${b.join(':')}`;
}

/** The local and remote QPNs a tool printed (pingpong: 0x000011; perftest: 0x0011). */
function qpns(out: string): { local: number; remote: number } {
  const local = /local address:.*?QPN (0x[0-9a-f]+)/i.exec(out)?.[1];
  const remote = /remote address:.*?QPN (0x[0-9a-f]+)/i.exec(out)?.[1];
  return { local: Number(local), remote: Number(remote) };
}

/** Log lines at `level` (ERROR, WARN). */
function logLines(log: string, level: string): string[] {
  return log.split('\n').filter((l) => new RegExp(`^\\S+ ${level}\\s`).test(l));
}

function startBackend(socket: string, gid: string, rocePort: number): BackendProcess {
  return new BackendProcess([
    'serve', '--device', 'rdma', '--socket', socket, '--gid', gid, '--roce-port', String(rocePort),
    '--cq-slots', String(CQ_SLOTS), '--qp-slots', String(QP_SLOTS), '--log-level', 'info',
  ]);
}

describe('two guests on two vrdma serve back-ends (soft-RoCE 127.0.0.2 <-> 127.0.0.3)', () => {
  let dir = '';
  let ns: NetNs | null = null;
  let qemu = '';
  const backend = {} as Record<Side, BackendProcess>;
  const sockets = {} as Record<Side, string>;
  let files: GuestFiles = {};
  let order: string[] = [];
  const guests: RunningGuest[] = [];
  let guestA: RunningGuest;
  let guestB: RunningGuest;
  /** Each side's console and back-end log once the six cases ended (A's still running its last server). */
  const consoles = {} as Record<Side, string>;
  const logs = {} as Record<Side, string>;

  function boot(side: Side, command: string, timeoutMs: number): RunningGuest {
    const g = startGuest({
      qemu,
      command,
      files,
      sharedMemory: true,
      timeoutMs,
      extraArgs: [
        '-chardev', `socket,id=vrdma0,path=${sockets[side]}`,
        '-device', `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${CQ_SLOTS},qp-slots=${QP_SLOTS}`,
        ...ns!.nicArgs(undefined, side === 'A' ? 0 : 1),
      ],
    });
    guests.push(g);
    return g;
  }

  beforeAll(async () => {
    if (!existsSync(QEMU_RDMA)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU_RDMA}: run \`bash images/qemu/build.sh\``);
    if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build with npx tsc -p .`);
    if (!canCreateNetNs()) throw new Error('this test creates a network namespace and taps: run it as root with iproute2');
    const d = driverFiles();
    order = d.order;
    files = { ...d.files, ...rdmaUserFiles() };
    dir = mkdtempSync(join(tmpdir(), 'vrdma-two-guests-'));
    ns = NetNs.create('vrdma-2g', 2);
    qemu = ns.wrapQemu(dir, QEMU_RDMA);
    const rocePort = randomRocePort();
    for (const s of ['A', 'B'] as const) {
      sockets[s] = join(dir, `${s}.sock`);
      backend[s] = startBackend(sockets[s], GID[s], rocePort);
    }
    await Promise.all([backend.A.waitFor(/listening on/), backend.B.waitFor(/listening on/)]);
    guestA = boot('A', scriptA(order, ns), 150_000);
    guestB = boot('B', scriptB(order, ns), 150_000);
    const last = CASES[CASES.length - 1]!.tool;
    const ended = new RegExp(`CASE-END ${last} rc=\\d+\\n`);
    await Promise.all([guestA.waitForOutput(ended, 120_000), guestB.waitForOutput(ended, 120_000)]);
    for (const s of ['A', 'B'] as const) {
      consoles[s] = (s === 'A' ? guestA : guestB).console;
      logs[s] = backend[s].output;
    }
  }, 150_000);

  afterAll(async () => {
    await Promise.all(guests.map((g) => g.stop().catch(() => undefined)));
    await Promise.all(Object.values(backend).map((b) => b.stop()));
    ns?.remove();
    if (dir !== '') rmSync(dir, { recursive: true, force: true });
    if (process.env.VRDMA_TEST_VERBOSE) {
      guests.forEach((g, i) => console.log(`--- guest ${['A', 'B', "A'"][i]} ---\n${g.console}`));
      for (const s of ['A', 'B'] as const) console.log(`--- back-end ${s} ---\n${backend[s]?.output ?? ''}`);
    }
  });

  it('both guests see their own back-end address as GID 0', () => {
    expect(consoles.A).toContain('GUEST-READY 0000:0000:0000:0000:0000:ffff:7f00:0002');
    expect(consoles.B).toContain('GUEST-READY 0000:0000:0000:0000:0000:ffff:7f00:0003');
  });

  for (const c of CASES) {
    it(`${c.tool} completes between the guests (server on ${c.server}), each side naming the other back-end's GID and QPN`, () => {
      const server = caseOf(consoles[c.server], c.tool);
      const client = caseOf(consoles[other(c.server)], c.tool);
      const both = `--- server (${c.server}) ---\n${server?.out}\n--- client (${other(c.server)}) ---\n${client?.out}`;
      expect(server, both).toBeDefined();
      expect(client, both).toBeDefined();
      expect({ server: server!.rc, client: client!.rc }, both).toEqual({ server: 0, client: 0 });
      expect(server!.out, both).toMatch(c.says.server);
      expect(client!.out, both).toMatch(c.says.client);
      for (const [side, out] of [[c.server, server!.out], [other(c.server), client!.out]] as const) {
        const remote = GID[other(side)];
        // the remote GID each side got over TCP is the other back-end's ::ffff:127.0.0.x
        if (c.tool.startsWith('ibv_')) expect(out, both).toMatch(new RegExp(`remote address: .* GID ::ffff:${remote.replace(/\./g, '\\.')}\\s*$`, 'm'));
        else expect(out, both).toMatch(new RegExp(`remote address: [\\s\\S]*?GID: ${perftestGid(remote)}`));
      }
      // each side's QP was made on its own back-end, and each side's remote QPN is the other's local one
      const s = qpns(server!.out);
      const k = qpns(client!.out);
      expect(s.remote, both).toBe(k.local);
      expect(k.remote, both).toBe(s.local);
      for (const [side, qpn] of [[c.server, s.local], [other(c.server), k.local]] as const) {
        const log = logs[side];
        expect(log).toContain(`qpn 0x${qpn.toString(16)}: created (${c.qpType})`);
        expect(log).toContain(`qpn 0x${qpn.toString(16)}: destroyed`);
        expect(log).not.toContain(`qpn 0x${qpn.toString(16)}: -> ERR`);
      }
    });
  }

  it('a guest killed mid-transfer leaves its back-end serving a new guest, and the other back-end and guest unaffected', async () => {
    // B reports bandwidth each second while it writes into A
    const reports = new RegExp(`CASE-BEGIN killed-transfer\\n[\\s\\S]*?^\\s*${PERF_SIZE}\\s+\\d+\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s*$[\\s\\S]*?^\\s*${PERF_SIZE}\\s+\\d+\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s*$`, 'm');
    await guestB.waitForOutput(reports, 60_000);
    const logA = backend.A.output.length;
    const logB = backend.B.output.length;
    guestA.kill('SIGKILL');
    const killed = await guestA.result().then(
      () => 'finished',
      (e: Error) => e.message,
    );
    expect(killed).toMatch(/\[stopped\]/);
    expect(guestA.console).not.toContain('KILL-SERVER-RETURNED');
    // no kernel warning in A up to the transfer it died in
    expect(guestA.console).toContain('--- kernel\nKILL-SERVER-STARTING\n');

    // A's back-end notices, drops the guest's state and waits for the next QEMU
    const gone = await backend.A.waitFor(/front-end disconnected after \d+ requests/, 10_000, logA);
    // a QEMU that dies is an ordinary end of a connection, not a protocol error
    expect(gone).toMatch(/ INFO .*: peer closed the connection; unmapped 1 memory regions \(256\.0 MiB\)$/);
    // B's writer, with nobody answering any more, runs out of retries
    const transfer = caseOf(await guestB.waitForOutput(/CASE-END killed-transfer rc=\d+\n/, 60_000).then(() => guestB.console), 'killed-transfer')!;
    expect(transfer.rc, transfer.out).not.toBe(0);
    expect(transfer.out).toContain('Completion with error at client');
    expect(transfer.out).toMatch(/Failed status 12:/); // IBV_WC_RETRY_EXC_ERR
    // ... on the transfer's own QP, which the back-end put in error and the tool then destroyed
    const writer = qpns(transfer.out).local;
    expect(writer, transfer.out).toBeGreaterThan(0);
    await backend.B.waitFor(new RegExp(`\\[rdma\\] qpn 0x${writer.toString(16)}: destroyed`), 5_000, logB);
    expect(backend.B.output.slice(logB)).toContain(`[rdma] qpn 0x${writer.toString(16)}: -> ERR (send WR failed with RETRY_EXC_ERR)`);
    // A's back-end let go of everything the dead guest had
    expect(backend.A.output.slice(logA)).toMatch(/rdma \(soft-roce engine\): 0 QPs, 0 CQs live; guest memory mappings still held: 0 \(0 bytes\)/);

    // A' on the same socket and tap
    const fresh = backend.A.output.length;
    const guestA2 = boot('A', scriptA2(order, ns!), 90_000);
    const [outA2, outB] = await Promise.all([done(guestA2, 90_000), done(guestB, 90_000)]);
    const a2 = caseOf(outA2, 'after-kill');
    const b = caseOf(outB, 'after-kill');
    const both = `--- A' ---\n${outA2}\n--- B ---\n${b?.out}\n--- back-end A ---\n${backend.A.output.slice(logA)}`;
    expect(a2, both).toBeDefined();
    expect(b, both).toBeDefined();
    expect({ a2: a2!.rc, b: b!.rc }, both).toEqual({ a2: 0, b: 0 });
    expect(a2!.out, both).toMatch(ppLine);
    expect(b!.out, both).toMatch(ppLine);
    expect(a2!.out, both).toMatch(/remote address: .* GID ::ffff:127\.0\.0\.3\s*$/m);
    expect(b!.out, both).toMatch(/remote address: .* GID ::ffff:127\.0\.0\.2\s*$/m);
    // no kernel warning in either guest
    for (const out of [outA2, outB]) expect(out.slice(out.lastIndexOf('--- kernel\n'))).toBe('--- kernel\nGUEST-DONE\n');

    // A's back-end served A' from scratch
    const afterA = backend.A.output.slice(fresh);
    expect(afterA).toMatch(/front-end connected/);
    expect(afterA).toMatch(/status DRIVER_OK/);
    const { local } = qpns(a2!.out);
    expect(afterA).toContain(`qpn 0x${local.toString(16)}: created (RC)`);

    // B's QEMU stayed connected throughout: one connection, which ended only when the test stopped B after the last pingpong
    const { local: bLocal } = qpns(b!.out);
    const bQp = backend.B.output.indexOf(`qpn 0x${bLocal.toString(16)}: created (RC)`, logB);
    expect(bQp).toBeGreaterThan(0);
    await backend.B.waitFor(/front-end disconnected/, 10_000);
    expect(backend.B.output.indexOf('front-end disconnected')).toBeGreaterThan(bQp);
    expect(backend.B.output.match(/front-end connected/g)).toHaveLength(1);

    // neither back-end exited, logged an error or warned
    expect(backend.A.child.exitCode).toBeNull();
    expect(backend.B.child.exitCode).toBeNull();
    expect(logLines(backend.A.output, 'ERROR')).toEqual([]);
    expect(logLines(backend.B.output, 'ERROR')).toEqual([]);
    expect(logLines(backend.A.output, 'WARN')).toEqual([]);
    expect(logLines(backend.B.output, 'WARN')).toEqual([]);
  }, 180_000);
});
