/**
 * A guest on the project's device against a guest with Linux rdma_rxe:
 * two TCG guests on the bridge of one network namespace this file creates
 * and removes, the stock tools on both, each in both roles.
 *
 * - Guest R (rxe-guest.ts): Debian's QEMU, the host's root over 9p,
 *   rxe0 on its eth0 (guest address 0 of the namespace, 10.a.b.2),
 *   rdma-core 44's ibv_rc_pingpong and perftest 4.5's ib_write_bw with
 *   `-g 1`/`-x 1` (its ::ffff:IPv4 GID).
 * - Guest V: the project's QEMU with vhost-user-rdma-pci, the virtio_rdma
 *   driver and libibverbs 56.1 with the virtio_rdma provider
 *   (vrdma-guest.ts), `-g 0`/`-x 0`. Its `vrdma serve` runs inside the
 *   namespace, bound to the bridge address 10.a.b.1 on UDP 4791 (rxe's
 *   fixed port), so V's GID is ::ffff:10.a.b.1 and R's RoCE packets reach
 *   the back-end over the bridge. V also has a virtio-net NIC on the bridge
 *   (guest address 1, 10.a.b.3), which carries only the tools' TCP
 *   exchange.
 *
 * Each guest runs its side of every case in order, printing
 * `CASE-BEGIN <slug>` / `CASE-END <slug> rc=<n>`; every case has its own
 * TCP port, and a client retries while its server is not listening yet.
 * The back-end records the RoCEv2 traffic; tshark must decode all of it
 * with no malformed or expert-flagged packet.
 *
 * FAILS when the patched QEMU, the guest image, rdma-core's guest build or
 * the host's rdma-core/perftest/tshark are missing.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, onTestFailed } from 'vitest';
import { tsharkArgs } from '../../backend/engines/soft-roce/test-support.js';
import { CLI } from '../support/backend-process.js';
import { startGuest, type RunningGuest } from './guest.js';
import { NetNs } from './netns.js';
import { NsVrdma } from './ns-backend.js';
import { startRxeGuest } from './rxe-guest.js';
import { QEMU_RDMA, RDMA_SHELL, driverFiles, loadModules, rdmaUserFiles } from './vrdma-guest.js';

const CQ_SLOTS = 4;
const QP_SLOTS = 4;
const PP_ITERS = 50;
const PP_SIZE = 4096;
const BW_ITERS = 200;
const BW_SIZE = 65536;
const BASE_PORT = 18600;

interface Case {
  name: string;
  slug: string;
  /** V runs the server (R's tool connects to V's virtio-net address). */
  vServer: boolean;
  port: number;
  /** The tool and its arguments, without device, GID index and server address. */
  tool: string[];
  /** The GID-index option: -g (rdma-core examples) or -x (perftest). */
  gidOpt: string;
  /** What both sides print on success. */
  says: RegExp;
  /** BTH opcodes the capture must contain. */
  opcodes: number[];
}

function cases(): Case[] {
  const out: Case[] = [];
  let port = BASE_PORT;
  for (const vServer of [true, false]) {
    const role = vServer ? 'vrdma guest server, rxe guest client' : 'rxe guest server, vrdma guest client';
    out.push({
      name: `ibv_rc_pingpong (${role})`,
      slug: `rc-pingpong-${vServer ? 'v' : 'r'}-server`,
      vServer,
      port: port++,
      tool: ['ibv_rc_pingpong', '-n', String(PP_ITERS), '-s', String(PP_SIZE)],
      gidOpt: '-g',
      says: new RegExp(`^${PP_ITERS} iters in [\\d.]+ seconds`, 'm'),
      opcodes: [0x00, 0x01, 0x02, 0x11], // SEND FIRST/MIDDLE/LAST (4 KiB at MTU 1024), ACK
    });
    out.push({
      name: `ib_write_bw (${role})`,
      slug: `write-bw-${vServer ? 'v' : 'r'}-server`,
      vServer,
      port: port++,
      tool: ['ib_write_bw', '-n', String(BW_ITERS), '-s', String(BW_SIZE)],
      gidOpt: '-x',
      // #bytes #iterations BW-peak BW-average MsgRate
      says: new RegExp(`^\\s*${BW_SIZE}\\s+${BW_ITERS}\\s+[\\d.]+\\s+[\\d.]+\\s+[\\d.]+\\s*$`, 'm'),
      opcodes: [0x06, 0x07, 0x08, 0x11], // RDMA WRITE FIRST/MIDDLE/LAST, ACK
    });
  }
  return out;
}

const CASES = cases();

/**
 * One guest's part: every case in order. `exec` runs a tool by name (with a
 * 60 s timeout); clients retry while their server does not listen yet.
 */
function caseScript(side: 'v' | 'r', exec: string, device: string, gidIndex: number, peer: string): string {
  const lines: string[] = [];
  for (const c of CASES) {
    const server = (side === 'v') === c.vServer;
    const cmd = [exec, ...c.tool, '-d', device, c.gidOpt, String(gidIndex), '-p', String(c.port), ...(server ? [] : [peer])].join(' ');
    lines.push(`echo "CASE-BEGIN ${c.slug}"`);
    if (server) lines.push(`${cmd} > /tmp/case.out 2>&1; rc=$?`);
    else
      lines.push(
        `i=0; while :; do ${cmd} > /tmp/case.out 2>&1; rc=$?; ` +
          `if [ $rc -ne 0 ] && grep -q -i -E "couldn.t connect|Unable to open file descriptor" /tmp/case.out && [ $i -lt 120 ]; then i=$((i+1)); sleep 0.25; continue; fi; break; done`,
      );
    lines.push('cat /tmp/case.out', `echo "CASE-END ${c.slug} rc=$rc"`);
  }
  lines.push('echo "ALL-CASES-DONE"');
  return lines.join('\n') + '\n';
}

interface SideResult {
  rc: number;
  output: string;
}

async function caseResult(g: RunningGuest, c: Case, timeoutMs: number): Promise<SideResult> {
  const m = await g.waitForOutput(new RegExp(`CASE-BEGIN ${c.slug}\\n([\\s\\S]*?)CASE-END ${c.slug} rc=(\\d+)`), timeoutMs);
  return { rc: Number(m[2]), output: m[1]! };
}

describe('a vrdma guest against a Linux rdma_rxe guest (stock rdma-core and perftest tools, one network namespace)', () => {
  let ns: NetNs | null = null;
  let dir = '';
  let backend: NsVrdma | null = null;
  let pcap = '';
  let keep = false;
  let vAddress = '';
  let rAddress = '';
  let bridgeAddress = '';
  let setupError: unknown = null;
  const results = new Map<string, { v: SideResult; r: SideResult }>();

  beforeAll(async () => {
    if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build with npx tsc -p .`);
    if (!existsSync(QEMU_RDMA)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU_RDMA}: run \`bash images/qemu/build.sh\``);
    const missing = ['ibv_rc_pingpong', 'ib_write_bw', 'rdma', 'tshark'].filter((t) => !['/usr/bin', '/usr/sbin', '/bin', '/sbin'].some((d) => existsSync(join(d, t))));
    if (missing.length > 0) throw new Error(`missing on this host: ${missing.join(', ')} (apt-get install ibverbs-utils perftest rdma-core ibverbs-providers iproute2 tshark)`);
    const drv = driverFiles();
    const files = { ...drv.files, ...rdmaUserFiles() };

    dir = mkdtempSync(join(tmpdir(), 'vrdma-rxe-peer-'));
    ns = NetNs.create('vrdma-peer', 2);
    bridgeAddress = ns.hostAddress;
    rAddress = ns.guestAddressOf(0);
    vAddress = ns.guestAddressOf(1);
    pcap = join(dir, 'vrdma-backend.pcap');
    const socket = join(dir, 'rdma.sock');
    backend = new NsVrdma(ns, [
      'serve', '--device', 'rdma', '--socket', socket, '--gid', bridgeAddress, '--roce-port', '4791', '--pcap', pcap,
      '--cq-slots', String(CQ_SLOTS), '--qp-slots', String(QP_SLOTS), '--log-level', 'debug',
    ]);
    await backend.waitFor(/listening on/);

    const vScript = `set -e
${loadModules(drv.order)}
ip link set eth0 up
ip addr add ${vAddress}/24 dev eth0
${RDMA_SHELL}
trun() { t=$1; shift; b=/vrdma/rdma-core/bin/$t; [ -e $b ] || b=/vrdma/bin/$t; timeout 60 /vrdma/lib/ld-linux-x86-64.so.2 --library-path /vrdma/rdma-core/lib:/vrdma/lib $b "$@"; }
echo "vrdma-guest: ready gid0=$(cat /sys/class/infiniband/virtio_rdma0/ports/1/gids/0)"
set +e
${caseScript('v', 'trun', 'virtio_rdma0', 0, rAddress)}`;
    const rScript = caseScript('r', 'inhost timeout 60 stdbuf -oL -eL', 'rxe0', 1, vAddress);

    const { guest: r, cleanup } = startRxeGuest({ ns, script: rScript, timeoutMs: 170_000, logFile: join(dir, 'rxe-console.log') });
    let v: RunningGuest | null = null;
    try {
      v = startGuest({
        qemu: ns.wrapQemu(dir, QEMU_RDMA),
        command: vScript,
        files,
        sharedMemory: true,
        timeoutMs: 170_000,
        logFile: join(dir, 'vrdma-console.log'),
        extraArgs: [
          '-chardev', `socket,id=vrdma0,path=${socket}`,
          '-device', `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${CQ_SLOTS},qp-slots=${QP_SLOTS}`,
          ...ns.nicArgs(undefined, 1),
        ],
      });
      await r.waitForOutput(/rxe-guest: ready/, 90_000);
      await v.waitForOutput(/vrdma-guest: ready/, 90_000);
      for (const c of CASES) {
        const [vr, rr] = await Promise.all([caseResult(v, c, 120_000), caseResult(r, c, 120_000)]);
        results.set(c.name, { v: vr, r: rr });
        if (process.env.VRDMA_TEST_VERBOSE) console.log(`=== ${c.name}\n--- vrdma guest rc=${vr.rc}\n${vr.output}--- rxe guest rc=${rr.rc}\n${rr.output}`);
      }
      await Promise.all([v.result(), r.result()]);
    } catch (e) {
      // Reported by every case below, with what each side printed.
      setupError = e;
      keep = true;
    } finally {
      await Promise.all([v?.stop(), r.stop()].map((p) => p?.catch(() => undefined)));
      cleanup();
      // SIGTERM closes the pcap.
      await backend.stop();
    }
  }, 200_000);

  afterAll(async () => {
    await backend?.stop();
    ns?.remove();
    if (dir === '') return;
    if (keep) {
      writeFileSync(join(dir, 'backend.log'), backend?.output ?? '');
      process.stderr.write(`vrdma-rxe-peer: consoles, capture and back-end log kept in ${dir}\n`);
    }
    else rmSync(dir, { recursive: true, force: true });
  });

  const tshark = (...extra: string[]): string => {
    const r = spawnSync('tshark', tsharkArgs(pcap, ...extra), { encoding: 'utf8', timeout: 60_000, maxBuffer: 256 << 20 });
    if (r.status !== 0) throw new Error(`tshark failed (${r.status ?? r.signal}): ${r.stderr}`);
    return r.stdout;
  };

  for (const c of CASES) {
    it(`${c.name} completes on both guests`, () => {
      onTestFailed(() => {
        keep = true;
      });
      const res = results.get(c.name);
      expect(res, `no result for ${c.name}: ${String(setupError)}\n--- back-end ---\n${backend?.output.slice(-3000)}`).toBeDefined();
      const { v, r } = res!;
      const both = `--- vrdma guest (rc=${v.rc}) ---\n${v.output}\n--- rxe guest (rc=${r.rc}) ---\n${r.output}`;
      expect(v.rc, both).toBe(0);
      expect(r.rc, both).toBe(0);
      expect(v.output, both).toMatch(c.says);
      expect(r.output, both).toMatch(c.says);
      if (c.gidOpt === '-g') {
        // each side names the other's GID: V's is the back-end's bridge address, R's its eth0
        expect(v.output, both).toMatch(new RegExp(`remote address: .*GID ::ffff:${rAddress.replace(/\./g, '\\.')}$`, 'm'));
        expect(r.output, both).toMatch(new RegExp(`remote address: .*GID ::ffff:${bridgeAddress.replace(/\./g, '\\.')}$`, 'm'));
      }
    });
  }

  it("the back-end's capture holds both directions of every case's traffic, and tshark decodes all of it cleanly", () => {
    onTestFailed(() => {
      keep = true;
    });
    expect(results.size, String(setupError)).toBe(CASES.length);
    expect(existsSync(pcap)).toBe(true);
    const problems = tshark('-Y', '_ws.malformed || _ws.expert.severity >= "warning" || !infiniband');
    expect(problems, 'tshark flagged packets').toBe('');
    const rows = tshark('-T', 'fields', '-e', 'ip.src', '-e', 'ip.dst', '-e', 'udp.dstport', '-e', 'infiniband.bth.opcode')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => l.split('\t'));
    const pairs = new Set(rows.map(([src, dst, port]) => `${src}>${dst}:${port}`));
    expect([...pairs].sort()).toEqual([`${bridgeAddress}>${rAddress}:4791`, `${rAddress}>${bridgeAddress}:4791`].sort());
    const opcodes = new Set(rows.map((r) => Number(r[3])));
    for (const op of new Set(CASES.flatMap((c) => c.opcodes))) expect([...opcodes], `opcode 0x${op.toString(16)} in the capture`).toContain(op);
  });
});
