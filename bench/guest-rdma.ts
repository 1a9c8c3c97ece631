/**
 * RDMA inside a TCG guest, three transports back to back in one guest and
 * one run (each case in turn, for a number of rounds): the project's device (virtio_rdma0: guest driver → vhost-user →
 * `vrdma serve` → UDP), Linux rdma_rxe on the guest's virtio-net
 * (rxe0 on eth0 → tap), and plain TCP over the same virtio-net.
 *
 *   node dist/bench/guest-rdma.js [bw-iters] [lat-iters] [tcp-MiB] [rounds]
 *   (defaults 4000 × 64 KiB, 2000 × 64 B, 256 MiB, 3 rounds; run as root;
 *   VRDMA_BENCH_CASES=id,... runs only those cases)
 *
 * Set-up: a network namespace with a tap; the guest's eth0 is 10.a.b.2,
 * the namespace's side of the tap 10.a.b.1 (where every host-side peer
 * listens) plus 10.a.b.9 (where the back-end binds RoCEv2, UDP 4791; two
 * engines cannot share one address and port). Everything on the host side
 * runs inside the namespace.
 *
 * - Bandwidth: perftest's ib_write_bw in the guest as the client (64 KiB
 *   RDMA WRITEs), against the same host-side peer, `vrdma perf write` on
 *   10.a.b.1, for both RDMA transports. The out-of-band exchange runs over
 *   virtio-net in both cases; the RoCE packets go back-end → peer (inside
 *   the namespace) for virtio_rdma0 and guest kernel → virtio-net → tap →
 *   peer for rxe0. rxe on a 1500-byte link uses path MTU 1024; the
 *   project's device is measured at its own MTU 4096 and at 1024, and rxe
 *   also with eth0 at MTU 9000 (path MTU 4096; the tap takes 9000 too).
 *   perftest's own "Mtu" line is checked against the intended one.
 * - Latency: perftest's ib_send_lat in the guest as the client (64-byte
 *   RC SENDs ping-ponged, polling the CQ as the tool does by default)
 *   against the same host-side peer, `vrdma perf send-lat` on 10.a.b.1,
 *   for both RDMA transports, wired like the bandwidth cases: for
 *   virtio_rdma0 each message goes SQ virtqueue → back-end → UDP → peer
 *   and the reply peer → back-end → RQ/CQ virtqueue; for rxe0 guest kernel
 *   → virtio-net → tap → peer and back. The guest's line is the result
 *   (half of each round trip, as perftest reports); the peer prints its own.
 * - TCP: native/guest/tools/guest-tcp.c (static; 64 KiB send()s from one buffer, as
 *   perftest sends from its buffers) from the guest to a Node sink on
 *   10.a.b.1, which times first byte to last byte. (busybox `dd | nc`
 *   measured 5 MB/s here: its small copy buffer, not the link.) And a
 *   64-byte TCP ping-pong (TCP_NODELAY) against a Node echo server there:
 *   the cost of one guest → host → guest round trip over virtio-net.
 *
 * Rates are as perftest prints them: MB/s of 2^20 bytes (the TCP sink
 * uses the same unit). ib_send_lat prints half round trips, the TCP
 * ping-pong whole ones; the summary compares round trips. Each case also reports CPU seconds per wall second
 * of QEMU (all threads), the back-end and the `vrdma perf` peer, over the
 * whole case as the host sees it (guest tool start-up and connection
 * included), from /proc and /usr/bin/time.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI, PROJECT_ROOT } from '../test/support/backend-process.js';
import { startGuest, type RunningGuest } from '../test/vm/guest.js';
import { NetNs, canCreateNetNs } from '../test/vm/netns.js';
import { NsVrdma } from '../test/vm/ns-backend.js';
import { QEMU_RDMA, RDMA_SHELL, driverFiles, loadModules, rdmaUserFiles, type GuestFiles } from '../test/vm/vrdma-guest.js';

const BW_SIZE = 65536;
const LAT_SIZE = 64;
const OOB_PORT = 18515;
const TCP_PORT = 5201;
const ECHO_PORT = 5202;
const MIB = 1 << 20;

const [bwIters, latIters, tcpMiB, rounds] = [4000, 2000, 256, 3].map((d, i) => {
  const a = process.argv[2 + i];
  const v = a === undefined ? d : Number(a);
  if (!Number.isInteger(v) || v < 1) throw new Error(`argument ${i + 1} must be a positive integer (got ${a})`);
  return v;
}) as [number, number, number, number];

type Kind = 'bw' | 'lat' | 'tcp' | 'tcplat';
interface Case {
  id: string;
  label: string;
  kind: Kind;
  /** bw: the device, its GID index and the peer's path MTU. */
  dev?: string;
  gidIndex?: number;
  mtu?: number;
  /** Guest shell run before and after the case. */
  pre?: string;
  post?: string;
}

const ALL_CASES: Case[] = [
  { id: 'vrdma-write-4096', label: 'virtio_rdma0 ib_write_bw 64 KiB, MTU 4096', kind: 'bw', dev: 'virtio_rdma0', gidIndex: 0, mtu: 4096 },
  { id: 'vrdma-write-1024', label: 'virtio_rdma0 ib_write_bw 64 KiB, MTU 1024', kind: 'bw', dev: 'virtio_rdma0', gidIndex: 0, mtu: 1024 },
  { id: 'rxe-write-1024', label: 'rxe0 (virtio-net) ib_write_bw 64 KiB, MTU 1024', kind: 'bw', dev: 'rxe0', gidIndex: 1, mtu: 1024 },
  {
    id: 'rxe-write-4096',
    label: 'rxe0 (virtio-net at MTU 9000) ib_write_bw 64 KiB, MTU 4096',
    kind: 'bw',
    dev: 'rxe0',
    gidIndex: 1,
    mtu: 4096,
    // rxe follows its netdev's MTU: 9000 gives path MTU 4096
    pre: 'ip link set eth0 mtu 9000; for i in $(seq 50); do run ibv_devinfo -d rxe0 | grep -q "active_mtu:.*4096" && break; sleep 0.1; done',
    post: 'ip link set eth0 mtu 1500',
  },
  { id: 'tcp', label: `TCP over virtio-net (64 KiB send()s, ${tcpMiB} MiB)`, kind: 'tcp' },
  { id: 'tcp-lat', label: 'TCP over virtio-net 64 B ping-pong (guest ↔ host echo)', kind: 'tcplat' },
  { id: 'vrdma-send-lat', label: 'virtio_rdma0 ib_send_lat 64 B (guest ↔ host peer)', kind: 'lat', dev: 'virtio_rdma0', gidIndex: 0, mtu: 1024 },
  { id: 'rxe-send-lat', label: 'rxe0 (virtio-net) ib_send_lat 64 B (guest ↔ host peer)', kind: 'lat', dev: 'rxe0', gidIndex: 1, mtu: 1024 },
];

/** VRDMA_BENCH_CASES=id,id,... runs only those cases. */
const only = process.env.VRDMA_BENCH_CASES?.split(',').filter(Boolean);
const CASES = only ? ALL_CASES.filter((c) => only.includes(c.id)) : ALL_CASES;
if (CASES.length === 0) throw new Error(`VRDMA_BENCH_CASES names no case of ${ALL_CASES.map((c) => c.id).join(', ')}`);

/** The guest's part: every case of every round in order, between PHASE markers. */
function guestScript(peer: string, guestAddress: string, order: string[]): string {
  const body: string[] = [];
  for (let r = 1; r <= rounds; r++) {
    for (const c of CASES) {
      const tag = `${c.id}#${r}`;
      body.push(`echo "PHASE-BEGIN ${tag}"`);
      if (c.pre !== undefined) body.push(c.pre);
      if (c.kind === 'bw' || c.kind === 'lat') {
        const cmd =
          c.kind === 'bw'
            ? `trun ib_write_bw -d ${c.dev} -x ${c.gidIndex} -s ${BW_SIZE} -n ${bwIters} -p ${OOB_PORT} ${peer}`
            : `trun ib_send_lat -d ${c.dev} -x ${c.gidIndex} -s ${LAT_SIZE} -n ${latIters} -p ${OOB_PORT + 1} ${peer}`;
        body.push(
          `i=0; while :; do ${cmd} > /tmp/p.out 2>&1; rc=$?; ` +
            `if [ $rc -ne 0 ] && grep -q -i -E "couldn.t connect|Unable to open file descriptor" /tmp/p.out && [ $i -lt 200 ]; then i=$((i+1)); sleep 0.1; continue; fi; break; done`,
        );
      } else if (c.kind === 'tcp') {
        body.push(`timeout 300 ./guest-tcp send ${peer} ${TCP_PORT} ${tcpMiB * MIB} > /tmp/p.out 2>&1; rc=$?`);
      } else {
        body.push(`timeout 300 ./guest-tcp pingpong ${peer} ${ECHO_PORT} ${latIters} ${LAT_SIZE} > /tmp/p.out 2>&1; rc=$?`);
      }
      if (c.post !== undefined) body.push(c.post);
      body.push('cat /tmp/p.out 2>/dev/null; rm -f /tmp/p.out', '[ $rc -eq 0 ] || dmesg | tail -20', `echo "PHASE-END ${tag} rc=$rc"`);
    }
  }
  return `set -e
${loadModules(order)}
modprobe crc32_generic
modprobe rdma_rxe
ip link set eth0 up
ip addr add ${guestAddress}/24 dev eth0
${RDMA_SHELL}
trun() { t=$1; shift; b=/vrdma/rdma-core/bin/$t; [ -e $b ] || b=/vrdma/bin/$t; timeout 120 /vrdma/lib/ld-linux-x86-64.so.2 --library-path /vrdma/rdma-core/lib:/vrdma/lib $b "$@"; }
run rdma link add rxe0 type rxe netdev eth0
echo "guest: ready $(run ibv_devices | grep -c -E 'virtio_rdma0|rxe0') RDMA devices; rxe0 $(run ibv_devinfo -d rxe0 | grep active_mtu | tr -s ' \t' ' ')"
set +e
${body.join('\n')}
echo "ALL-PHASES-DONE"
`;
}

/** A TCP sink inside the namespace: times each connection from its first byte to the expected total. */
const SINK = String.raw`
const net = require('node:net');
const [host, port, total] = process.argv.slice(1);
const want = Number(total);
net.createServer((s) => {
  let n = 0, t0 = 0n;
  s.on('data', (d) => {
    if (n === 0) t0 = process.hrtime.bigint();
    n += d.length;
    if (n >= want) {
      const ns = process.hrtime.bigint() - t0;
      console.log('SINK bytes=' + n + ' ns=' + ns);
      s.destroy();
    }
  });
  s.on('error', () => {});
}).listen(Number(port), host, () => console.log('SINK listening'));
net.createServer((s) => {
  s.setNoDelay(true);
  s.on('data', (d) => s.write(d));
  s.on('error', () => {});
}).listen(Number(port) + 1, host, () => console.log('ECHO listening'));
`;

function spawnInNs(ns: NetNs, argv: string[]): { child: ChildProcess; out: () => string; closed: Promise<number | null> } {
  const [cmd, ...rest] = ns.exec(argv);
  const child = spawn(cmd!, rest, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  // 'close', not 'exit': only then have both pipes delivered the last lines (time(1)'s PEER-CPU among them).
  const closed = new Promise<number | null>((res) => child.on('close', (code) => res(code)));
  return { child, out: () => out, closed };
}

interface Measured {
  id: string;
  round: number;
  /** MB/s (2^20) for bw and tcp; µs for lat. */
  value: number;
  p99?: number;
  detail: string;
  /** CPU seconds per wall second over the phase: QEMU (all its threads), the back-end, the host-side peer. */
  cpu: { qemu: number; backend: number; peer: number };
}

/** utime + stime of a process, in seconds. */
function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / 100; // fields 14 and 15, in clock ticks (USER_HZ 100)
  } catch {
    return NaN;
  }
}

function parseBw(out: string): number | null {
  const m = new RegExp(`^\\s*${BW_SIZE}\\s+${bwIters}\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)\\s*$`, 'm').exec(out);
  return m ? Number(m[2]) : null;
}

/** ib_send_lat: #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9% (µs). */
function parseLat(out: string): { typical: number; p99: number; min: number } | null {
  const m = new RegExp(`^\\s*${LAT_SIZE}\\s+${latIters}\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)\\s+([\\d.]+)`, 'm').exec(out);
  return m ? { min: Number(m[1]), typical: Number(m[3]), p99: Number(m[6]) } : null;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length % 2 ? s[h]! : (s[h - 1]! + s[h]!) / 2;
}

async function main(): Promise<void> {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build with npx tsc -p .`);
  if (!existsSync(QEMU_RDMA)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU_RDMA}: run \`bash images/qemu/build.sh\``);
  if (!canCreateNetNs()) throw new Error('needs root with iproute2 (network namespace and tap)');
  const cpu = /model name\s*:\s*(.*)/.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? '?';
  console.log(`guest-rdma: ${cpus().length} CPUs (${cpu}), Node ${process.versions.node}, load ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log(`guest-rdma: ${rounds} round(s); ib_write_bw ${bwIters} × ${BW_SIZE} B, ib_send_lat ${latIters} × ${LAT_SIZE} B, TCP ${tcpMiB} MiB`);
  const drv = driverFiles();
  const files: GuestFiles = { ...drv.files, ...rdmaUserFiles() };

  const dir = mkdtempSync(join(tmpdir(), 'vrdma-bench-guest-'));
  const ns = NetNs.create('vrdma-bench', 1);
  const peer = ns.hostAddress;
  const backendAddress = peer.replace(/\.1$/, '.9');
  let backend: NsVrdma | null = null;
  let sink: ReturnType<typeof spawnInNs> | null = null;
  let guest: RunningGuest | null = null;
  const onSignal = (): void => {
    ns.remove();
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const results: Measured[] = [];
  const loads: string[] = [loadavg()[0]!.toFixed(2)];
  let failed = false;
  try {
    const tcpTool = join(dir, 'guest-tcp');
    execFileSync('gcc', ['-static', '-O2', '-Wall', '-Werror', '-o', tcpTool, join(PROJECT_ROOT, 'native', 'guest', 'tools', 'guest-tcp.c')]);
    files['guest-tcp'] = { data: readFileSync(tcpTool), mode: 0o755 };
    for (const args of [['addr', 'add', `${backendAddress}/24`, 'dev', ns.tap], ['link', 'set', ns.tap, 'mtu', '9000']]) {
      const r = spawnSync('ip', ['-n', ns.name, ...args], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`ip ${args.join(' ')} failed: ${r.stderr}`);
    }
    const socket = join(dir, 'rdma.sock');
    backend = new NsVrdma(ns, ['serve', '--device', 'rdma', '--socket', socket, '--gid', backendAddress, '--roce-port', '4791', '--cq-slots', '8', '--qp-slots', '4']);
    await backend.waitFor(/listening on/);
    sink = spawnInNs(ns, [process.execPath, '-e', SINK, peer, String(TCP_PORT), String(tcpMiB * MIB)]);
    for (let i = 0; !sink.out().includes('SINK listening') || !sink.out().includes('ECHO listening'); i++) {
      if (i > 200 || sink.child.exitCode !== null) throw new Error(`TCP sink did not start: ${sink.out()}`);
      await new Promise((res) => setTimeout(res, 25));
    }

    guest = startGuest({
      qemu: ns.wrapQemu(dir, QEMU_RDMA),
      command: guestScript(peer, ns.guestAddress, drv.order),
      files,
      sharedMemory: true,
      memMiB: 512,
      timeoutMs: 1_800_000,
      logFile: join(dir, 'console.log'),
      extraArgs: ['-chardev', `socket,id=vrdma0,path=${socket}`, '-device', 'vhost-user-rdma-pci,chardev=vrdma0,cq-slots=8,qp-slots=4', ...ns.nicArgs()],
    });
    const ready = await guest.waitForOutput(/guest: ready ([^\n]*)\n/, 120_000);
    console.log(`guest-rdma: guest ${ready[1]}`);

    for (let round = 1; round <= rounds; round++) {
      for (const c of CASES) {
        const tag = `${c.id}#${round}`;
        await guest.waitForOutput(new RegExp(`PHASE-BEGIN ${tag}\\n`), 300_000);
        const t0 = process.hrtime.bigint();
        const q0 = cpuSeconds(guest.pid);
        const b0 = cpuSeconds(backend.child.pid);
        const sinkFrom = sink.out().length;
        let host: ReturnType<typeof spawnInNs> | null = null;
        if (c.kind === 'bw') {
          host = spawnInNs(ns, ['/usr/bin/time', '-f', 'PEER-CPU %U %S', process.execPath, CLI, 'perf', 'write', '--gid', peer, '-s', String(BW_SIZE), '-n', String(bwIters), '-m', String(c.mtu), '-p', String(OOB_PORT), '--timeout', '60000']);
        } else if (c.kind === 'lat') {
          host = spawnInNs(ns, ['/usr/bin/time', '-f', 'PEER-CPU %U %S', process.execPath, CLI, 'perf', 'send-lat', '--gid', peer, '-s', String(LAT_SIZE), '-n', String(latIters), '-m', String(c.mtu), '-p', String(OOB_PORT + 1), '--timeout', '60000']);
        }
        const end = await guest.waitForOutput(new RegExp(`PHASE-BEGIN ${tag}\\n([\\s\\S]*?)PHASE-END ${tag} rc=(-?\\d+)`), 600_000);
        const out = end[1]!;
        const rc = Number(end[2]);
        const wall = Number(process.hrtime.bigint() - t0) / 1e9;
        const cpu = { qemu: (cpuSeconds(guest.pid) - q0) / wall, backend: (cpuSeconds(backend.child.pid) - b0) / wall, peer: NaN };
        if (host !== null) {
          const h = host;
          const code = await h.closed;
          const pc = /PEER-CPU ([\d.]+) ([\d.]+)/.exec(h.out());
          cpu.peer = pc ? (Number(pc[1]) + Number(pc[2])) / wall : NaN;
          if (code !== 0) {
            failed = true;
            console.log(`guest-rdma: ${tag}: host peer exit ${code}:\n${h.out()}`);
          }
        }
        let m: Measured | null = null;
        if (rc !== 0) {
          console.log(`guest-rdma: ${tag}: guest rc=${rc}:\n${out}`);
        } else if (c.kind === 'bw') {
          const bw = parseBw(out);
          const mtu = /^\s*Mtu\s*:\s*(\d+)/m.exec(out)?.[1];
          if (mtu !== String(c.mtu)) console.log(`guest-rdma: ${tag}: perftest ran at MTU ${mtu}, not ${c.mtu}`);
          else if (bw !== null) m = { id: c.id, round, value: bw, cpu, detail: `${bw.toFixed(1)} MB/s` };
        } else if (c.kind === 'lat') {
          const l = parseLat(out);
          const h = host === null ? null : parseLat(host.out());
          const peerSays = h === null ? '' : `; the peer: median ${h.typical.toFixed(1)} µs, p99 ${h.p99.toFixed(1)} µs`;
          if (l !== null) m = { id: c.id, round, value: l.typical, p99: l.p99, cpu, detail: `median ${l.typical.toFixed(1)} µs, p99 ${l.p99.toFixed(1)} µs, min ${l.min.toFixed(1)} µs${peerSays}` };
        } else if (c.kind === 'tcplat') {
          const l = /PINGPONG iters=\d+ size=\d+ median_us=([\d.]+) p99_us=([\d.]+) min_us=([\d.]+)/.exec(out);
          if (l !== null) m = { id: c.id, round, value: Number(l[1]), p99: Number(l[2]), cpu, detail: `median ${l[1]} µs, p99 ${l[2]} µs, min ${l[3]} µs` };
        } else {
          // the sink's line for this connection
          let line: RegExpExecArray | null = null;
          for (let i = 0; i < 100 && line === null; i++) {
            line = /SINK bytes=(\d+) ns=(\d+)/.exec(sink.out().slice(sinkFrom));
            if (line === null) await new Promise((res) => setTimeout(res, 20));
          }
          if (line !== null) {
            const mbs = Number(line[1]) / MIB / (Number(line[2]) / 1e9);
            m = { id: c.id, round, value: mbs, cpu, detail: `${mbs.toFixed(1)} MB/s (${(Number(line[2]) / 1e9).toFixed(2)} s)` };
          }
        }
        if (m === null) {
          failed = true;
          console.log(`guest-rdma: ${tag}: no result (rc=${rc}):\n${out}`);
        } else {
          results.push(m);
          console.log(`guest-rdma: round ${round}: ${c.label}: ${m.detail}; CPU QEMU ${(100 * cpu.qemu).toFixed(0)}%, back-end ${(100 * cpu.backend).toFixed(0)}%, peer ${Number.isNaN(cpu.peer) ? '–' : `${(100 * cpu.peer).toFixed(0)}%`}`);
        }
        loads.push(loadavg()[0]!.toFixed(2));
      }
    }
    await guest.waitForOutput(/ALL-PHASES-DONE/, 60_000);
    await guest.result();
    guest = null;
  } finally {
    await guest?.stop().catch(() => undefined);
    sink?.child.kill('SIGTERM');
    await backend?.stop();
    ns.remove();
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
    if (failed) {
      writeFileSync(join(dir, 'backend.log'), backend?.output ?? '');
      console.log(`guest-rdma: console, back-end log and files kept in ${dir}`);
    }
    else rmSync(dir, { recursive: true, force: true });
  }

  const of = (id: string): Measured[] => results.filter((r) => r.id === id);
  const med = (id: string): number => median(of(id).map((r) => r.value));
  const range = (id: string): string => {
    const v = of(id).map((r) => r.value);
    return v.length > 1 ? ` (${Math.min(...v).toFixed(1)}–${Math.max(...v).toFixed(1)})` : '';
  };
  const tcp = med('tcp');
  const rxeBw = med('rxe-write-1024');
  const rxeLat = med('rxe-send-lat');
  const tcpLat = med('tcp-lat');
  console.log(`\nguest-rdma: medians over ${rounds} round(s); load average (1 min) during the run ${loads.join(' ')}`);
  console.log('| transport | result | vs TCP over virtio-net | vs rxe | CPU: QEMU, back-end, peer |');
  console.log('|---|---|---|---|---|');
  for (const c of CASES) {
    if (of(c.id).length === 0) {
      console.log(`| ${c.label} | (failed) | | | |`);
      continue;
    }
    const v = med(c.id);
    const pct = (k: 'qemu' | 'backend' | 'peer'): string => {
      const v = median(of(c.id).map((r) => r.cpu[k]));
      return Number.isNaN(v) ? '–' : `${(100 * v).toFixed(0)}%`;
    };
    const cpuCol = `${pct('qemu')}, ${pct('backend')}, ${pct('peer')}`;
    if (c.kind === 'lat' || c.kind === 'tcplat') {
      // ib_send_lat reports half of each round trip, the TCP ping-pong whole round trips: compared as round trips.
      const p99 = median(of(c.id).map((r) => r.p99 ?? NaN));
      const rtt = c.kind === 'lat' ? 2 * v : v;
      const what = c.kind === 'lat' ? ' one-way (½ round trip)' : ' round trip';
      console.log(`| ${c.label} | median ${v.toFixed(1)} µs${what}${range(c.id)}, p99 ${p99.toFixed(1)} µs | ${(rtt / tcpLat).toFixed(2)}× | ${(rtt / (2 * rxeLat)).toFixed(2)}× | ${cpuCol} |`);
    } else {
      console.log(`| ${c.label} | ${v.toFixed(1)} MB/s${range(c.id)} | ${((100 * v) / tcp).toFixed(0)}% | ${c.kind === 'bw' ? `${((100 * v) / rxeBw).toFixed(0)}%` : ''} | ${cpuCol} |`);
    }
  }
  if (failed) process.exitCode = 1;
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
