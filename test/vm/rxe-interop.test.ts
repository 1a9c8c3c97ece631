/**
 * Interop with Linux rdma_rxe: stock rdma-core and perftest tools in a TCG
 * guest (Debian 6.1 kernel, `rdma link add rxe0 type rxe netdev eth0`,
 * the host's own binaries over a read-only 9p root) against `vrdma
 * pingpong` / `vrdma perf` on the host side of a tap inside a network
 * namespace this file creates and removes. Every tool runs in both roles;
 * two more ib_send_bw runs starve the receiver of receive WQEs so each
 * side must send RNR NAKs and the other wait them out.
 * The host peer records its RoCEv2 traffic; tshark must decode all of it
 * without a malformed packet or an expert error, and show the opcodes each
 * test exists to exercise.
 *
 * One guest boot runs every case in turn: the guest prints
 * `CASE-BEGIN <name>` before each tool and `CASE-END <name> rc=<n>` after;
 * the host starts its side on the first marker. Guest clients retry while
 * the host side is not listening yet.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it, onTestFailed } from 'vitest';
import { TSHARK_PAYLOAD_DISSECTORS, TSHARK_PAYLOAD_HEURISTICS } from '../../backend/engines/soft-roce/test-support.js';
import { NetNs } from './netns.js';
import { startRxeGuest } from './rxe-guest.js';

const CLI = fileURLToPath(new URL('../../dist/backend/cli.js', import.meta.url));
const PP_ITERS = 50;
const PERF_ITERS = 200;
const PERF_SIZE = 4096;
const LAT_SIZE = 64;

interface Case {
  name: string;
  /** The guest runs the server (the host peer connects to it). */
  guestServer: boolean;
  guestTool: string[];
  hostArgs: string[];
  /** BTH opcodes the capture must contain. */
  opcodes: number[];
  /** What the guest tool prints on success. */
  guestSays: RegExp;
  /** What the host peer prints on success, when checked. */
  hostSays?: RegExp;
  /** The receiver (guest or host) must have sent RNR NAKs (AETH syndrome 0x20..0x3f). */
  rnrFrom?: 'guest' | 'host';
}

function cases(): Case[] {
  const out: Case[] = [];
  for (const guestServer of [true, false]) {
    const role = guestServer ? 'guest server, host client' : 'host server, guest client';
    out.push({
      name: `ibv_rc_pingpong (${role})`,
      guestServer,
      guestTool: ['ibv_rc_pingpong', '-d', 'rxe0', '-g', '1', '-n', String(PP_ITERS), '-s', '4096'],
      hostArgs: ['pingpong', '-n', String(PP_ITERS), '-s', '4096'],
      opcodes: [0x00, 0x01, 0x02, 0x11],
      guestSays: new RegExp(`${PP_ITERS} iters in [\\d.]+ seconds`),
    });
    out.push({
      name: `ibv_ud_pingpong (${role})`,
      guestServer,
      guestTool: ['ibv_ud_pingpong', '-d', 'rxe0', '-g', '1', '-n', String(PP_ITERS), '-s', '1024'],
      hostArgs: ['pingpong', '--ud', '-n', String(PP_ITERS), '-s', '1024'],
      opcodes: [0x64],
      guestSays: new RegExp(`${PP_ITERS} iters in [\\d.]+ seconds`),
    });
    for (const [verb, opcodes] of [
      ['write', [0x06, 0x07, 0x08, 0x11]],
      ['read', [0x0c, 0x0d, 0x0e, 0x0f]],
      ['send', [0x00, 0x01, 0x02, 0x11]],
    ] as const) {
      out.push({
        name: `ib_${verb}_bw (${role})`,
        guestServer,
        guestTool: [`ib_${verb}_bw`, '-d', 'rxe0', '-x', '1', '-n', String(PERF_ITERS), '-s', String(PERF_SIZE)],
        hostArgs: ['perf', verb, '-n', String(PERF_ITERS), '-s', String(PERF_SIZE)],
        opcodes: [...opcodes],
        guestSays: new RegExp(`^ ${PERF_SIZE}\\s+${PERF_ITERS}\\s+[\\d.]+\\s+[\\d.]+`, 'm'),
      });
    }
    // SEND ping-pong: both sides send SEND ONLY and ACK; the tool prints t_min .. 99.9% percentile.
    out.push({
      name: `ib_send_lat (${role})`,
      guestServer,
      guestTool: ['ib_send_lat', '-d', 'rxe0', '-x', '1', '-n', String(PERF_ITERS), '-s', String(LAT_SIZE)],
      hostArgs: ['perf', 'send-lat', '-n', String(PERF_ITERS), '-s', String(LAT_SIZE)],
      opcodes: [0x04, 0x11],
      guestSays: new RegExp(`^ ${LAT_SIZE}\\s+${PERF_ITERS}\\s+([\\d.]+\\s+){6}[\\d.]+\\s*$`, 'm'),
      hostSays: new RegExp(`^ ${LAT_SIZE}\\s+${PERF_ITERS}\\s+([\\d.]+\\s+){6}[\\d.]+\\s*$`, 'm'),
    });
    // One RDMA READ at a time from the client; the server only answers (the stock server prints no numbers).
    out.push({
      name: `ib_read_lat (${role})`,
      guestServer,
      guestTool: ['ib_read_lat', '-d', 'rxe0', '-x', '1', '-n', String(PERF_ITERS), '-s', String(LAT_SIZE)],
      hostArgs: ['perf', 'read-lat', '-n', String(PERF_ITERS), '-s', String(LAT_SIZE)],
      opcodes: [0x0c, 0x10],
      guestSays: guestServer ? /RDMA_Read Latency Test/ : new RegExp(`^ ${LAT_SIZE}\\s+${PERF_ITERS}\\s+([\\d.]+\\s+){6}[\\d.]+\\s*$`, 'm'),
      ...(guestServer ? { hostSays: new RegExp(`^ ${LAT_SIZE}\\s+${PERF_ITERS}\\s+([\\d.]+\\s+){6}[\\d.]+\\s*$`, 'm') } : {}),
    });
    // RDMA WRITE ping-pong: each side polls the last byte of the other's write in its own memory.
    out.push({
      name: `ib_write_lat (${role})`,
      guestServer,
      guestTool: ['ib_write_lat', '-d', 'rxe0', '-x', '1', '-n', String(PERF_ITERS), '-s', String(LAT_SIZE)],
      hostArgs: ['perf', 'write-lat', '-n', String(PERF_ITERS), '-s', String(LAT_SIZE)],
      opcodes: [0x0a, 0x11],
      guestSays: new RegExp(`^ ${LAT_SIZE}\\s+${PERF_ITERS}\\s+([\\d.]+\\s+){6}[\\d.]+\\s*$`, 'm'),
      hostSays: new RegExp(`^ ${LAT_SIZE}\\s+${PERF_ITERS}\\s+([\\d.]+\\s+){6}[\\d.]+\\s*$`, 'm'),
    });
  }
  // A receiver with almost no receive WQEs: the sender meets RNR NAKs and must wait them out.
  out.push({
    name: 'ib_send_bw with 2 receives posted (guest server sends RNR NAKs, host client retries)',
    guestServer: true,
    guestTool: ['ib_send_bw', '-d', 'rxe0', '-x', '1', '-n', String(PERF_ITERS), '-s', String(PERF_SIZE), '-r', '2'],
    hostArgs: ['perf', 'send', '-n', String(PERF_ITERS), '-s', String(PERF_SIZE)],
    opcodes: [0x00, 0x02, 0x11],
    guestSays: new RegExp(`^ ${PERF_SIZE}\\s+${PERF_ITERS}\\s+[\\d.]+\\s+[\\d.]+`, 'm'),
    rnrFrom: 'guest',
  });
  out.push({
    name: 'ib_send_bw against 1 receive posted (host server sends RNR NAKs, guest client retries)',
    guestServer: false,
    guestTool: ['ib_send_bw', '-d', 'rxe0', '-x', '1', '-n', String(PERF_ITERS), '-s', String(PERF_SIZE)],
    hostArgs: ['perf', 'send', '-n', String(PERF_ITERS), '-s', String(PERF_SIZE), '-r', '1'],
    opcodes: [0x00, 0x02, 0x11],
    guestSays: new RegExp(`^ ${PERF_SIZE}\\s+${PERF_ITERS}\\s+[\\d.]+\\s+[\\d.]+`, 'm'),
    rnrFrom: 'host',
  });
  return out;
}

const CASES = cases();

function slug(c: Case): string {
  return c.name.replace(/[^a-z0-9]+/gi, '-').replace(/-+$/, '');
}

/** The guest's part: every case in order, clients retrying until the host side listens. */
function guestScript(ns: NetNs): string {
  const lines: string[] = [];
  for (const c of CASES) {
    const tool = [...c.guestTool, ...(c.guestServer ? [] : [ns.hostAddress])].join(' ');
    lines.push(`echo "CASE-BEGIN ${slug(c)}"`);
    if (c.guestServer) {
      lines.push(`inhost timeout 60 stdbuf -oL -eL ${tool} > /tmp/case.out 2>&1; rc=$?`);
    } else {
      lines.push(
        `i=0; while :; do inhost timeout 60 stdbuf -oL -eL ${tool} > /tmp/case.out 2>&1; rc=$?; ` +
          `if [ $rc -ne 0 ] && grep -q -i -E "couldn.t connect|Unable to open file descriptor" /tmp/case.out && [ $i -lt 60 ]; then i=$((i+1)); sleep 0.25; continue; fi; break; done`,
      );
    }
    lines.push('cat /tmp/case.out', `echo "CASE-END ${slug(c)} rc=$rc"`);
  }
  return lines.join('\n') + '\n';
}

interface HostRun {
  code: number | null;
  output: string;
}

function runHost(ns: NetNs, args: string[], timeoutMs: number): Promise<HostRun> {
  return new Promise((resolve) => {
    const [cmd, ...argv] = ns.exec([process.execPath, CLI, ...args]);
    const child = spawn(cmd!, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr.on('data', (d: Buffer) => (output += d.toString()));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    // 'close', not 'exit': only then have both pipes delivered the tool's last lines.
    child.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, output });
    });
  });
}

interface CaseResult {
  host: HostRun;
  guestRc: number;
  guestOutput: string;
  pcap: string;
}

const tshark = (file: string, ...extra: string[]): string => {
  const args = ['-r', file, ...TSHARK_PAYLOAD_DISSECTORS.flatMap((p) => ['--disable-protocol', p]), ...TSHARK_PAYLOAD_HEURISTICS.flatMap((h) => ['--disable-heuristic', h]), ...extra];
  const r = spawnSync('tshark', args, { encoding: 'utf8', timeout: 60_000, maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`tshark ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}`);
  return r.stdout;
};

describe('interop with Linux rdma_rxe in a TCG guest (stock rdma-core and perftest tools)', () => {
  let ns: NetNs | null = null;
  let dir = '';
  const results = new Map<string, CaseResult>();
  let guestLog = '';
  let guestAddress = '';
  let hostAddress = '';

  beforeAll(async () => {
    if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build with npx tsc -p .`);
    // The guest runs this host's binaries (read-only 9p root): scripts/setup.sh installs them.
    const missing = ['ibv_rc_pingpong', 'ibv_ud_pingpong', 'ib_write_bw', 'ib_read_bw', 'ib_send_bw', 'ib_send_lat', 'rdma', 'stdbuf', 'tshark'].filter(
      (t) => !['/usr/bin', '/usr/sbin', '/bin', '/sbin'].some((d) => existsSync(join(d, t))),
    );
    if (missing.length > 0) throw new Error(`missing on this host: ${missing.join(', ')} (apt-get install ibverbs-utils perftest rdma-core ibverbs-providers iproute2 tshark)`);
    dir = mkdtempSync(join(tmpdir(), 'vrdma-rxe-interop-'));
    ns = NetNs.create('vrdma-rxe');
    guestAddress = ns.guestAddress;
    hostAddress = ns.hostAddress;
    const { guest, cleanup } = startRxeGuest({ ns, script: guestScript(ns), timeoutMs: 170_000, logFile: join(dir, 'console.log') });
    try {
      await guest.waitForOutput(/rxe-guest: ready/, 60_000);
      for (const c of CASES) {
        const s = slug(c);
        await guest.waitForOutput(new RegExp(`CASE-BEGIN ${s}\\n`), 90_000);
        const pcap = join(dir, `${s}.pcap`);
        const args = [...c.hostArgs, ...(c.guestServer ? [ns.guestAddress] : []), '--gid', ns.hostAddress, '--pcap', pcap, '--timeout', '20000'];
        const host = await runHost(ns, args, 80_000);
        const end = await guest.waitForOutput(new RegExp(`CASE-BEGIN ${s}\\n([\\s\\S]*?)CASE-END ${s} rc=(\\d+)`), 80_000);
        results.set(c.name, { host, guestRc: Number(end[2]), guestOutput: end[1]!, pcap });
      }
      const r = await guest.result();
      guestLog = r.output;
    } finally {
      await guest.stop().catch(() => undefined);
      cleanup();
      if (results.size < CASES.length) keep = true;
    }
  }, 180_000);

  /** Keep the captures and the guest console of a failed run for a post-mortem. */
  let keep = false;

  afterAll(() => {
    ns?.remove();
    if (dir === '') return;
    if (keep) process.stderr.write(`rxe-interop: captures and guest console kept in ${dir}\n`);
    else rmSync(dir, { recursive: true, force: true });
  });

  for (const c of CASES) {
    it(`${c.name} completes on both sides, with a capture tshark decodes cleanly`, () => {
      onTestFailed(() => {
        keep = true;
      });
      const r = results.get(c.name);
      expect(r, `no result for ${c.name}; guest said:\n${guestLog}`).toBeDefined();
      expect(r!.host.code, `host side:\n${r!.host.output}\nguest side:\n${r!.guestOutput}`).toBe(0);
      expect(r!.guestRc, `guest side:\n${r!.guestOutput}\nhost side:\n${r!.host.output}`).toBe(0);
      expect(r!.guestOutput).toMatch(c.guestSays);
      if (c.hostSays !== undefined) expect(r!.host.output).toMatch(c.hostSays);
      const problems = tshark(r!.pcap, '-Y', '_ws.malformed || _ws.expert.severity >= "warning" || !infiniband');
      expect(problems, 'tshark flagged packets').toBe('');
      const opcodes = new Set(tshark(r!.pcap, '-T', 'fields', '-e', 'infiniband.bth.opcode').split('\n').filter((l) => l !== '').map(Number));
      for (const op of c.opcodes) expect([...opcodes], `opcode 0x${op.toString(16)} in the capture`).toContain(op);
      if (c.rnrFrom !== undefined) {
        const from = c.rnrFrom === 'guest' ? guestAddress : hostAddress;
        const rnr = tshark(r!.pcap, '-Y', `ip.src == ${from} && infiniband.aeth.syndrome >= 0x20 && infiniband.aeth.syndrome <= 0x3f`, '-T', 'fields', '-e', 'frame.number');
        expect(rnr.trim().split('\n').filter((l) => l !== '').length, `RNR NAKs from the ${c.rnrFrom}`).toBeGreaterThan(0);
      }
    });
  }
});
