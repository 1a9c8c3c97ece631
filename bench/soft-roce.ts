/**
 * soft-RoCE between two back-ends on loopback, each number beside a raw UDP
 * baseline measured in the same run:
 *
 * - RC RDMA WRITE bandwidth, 64 KiB messages, path MTU 4096 and 1024;
 * - 64-byte RC SEND round-trip latency (ping-pong), median and p99, with
 *   the drivers sleeping on CQ interrupts and with busy-polled CQs.
 *
 * RoCE side: two `vrdma serve` processes (soft-RoCE engine, 127.0.0.2 and
 * 127.0.0.3, one random UDP port for both), each driven by a reference
 * driver (the TypeScript "guest") over a real vhost-user socket. Both
 * drivers live in this process: they are the guests, which in a real set-up
 * are QEMU processes beside the back-ends; one process for both keeps the
 * machine's process count at three (two cores here), and the drivers cost
 * little CPU (see the polling notes at each case).
 *
 * Baseline side: two child processes of this script, 127.0.0.2 -> 127.0.0.3,
 * one socket each, on the same batched native calls the engine uses
 * (UdpTransport: recvmmsg/sendmmsg), with datagrams of the size the RoCE
 * case puts on the wire:
 * - bandwidth: datagrams of a RoCE WRITE MIDDLE packet (BTH + MTU payload
 *   + ICRC), at most the engine's SEND_WINDOW datagrams outstanding, the
 *   receiver answering with a 20-byte datagram (an ACK's size) as often
 *   as the RC responder answers (each message's last packet and every
 *   ACK_REQ_EVERY packets) and, like it, at once rather than after the
 *   rest of the receive batch;
 * - latency: ping-pong of a 64-byte SEND_ONLY's datagram (BTH + 64 + ICRC).
 *
 *   node dist/bench/soft-roce.js [seconds-per-measurement] [rounds] [cases: crc,write4096,write1024,latency,latency-poll]
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setImmediate as yieldTurn } from 'node:timers/promises';
import { crc32Update, crc32UpdateTables, crc32UpdateZlib } from '../backend/engines/soft-roce/crc32.js';
import { ACK_REQ_EVERY, SEND_WINDOW } from '../backend/engines/soft-roce/requester.js';
import { UdpTransport, udpPeer, type UdpPeer } from '../backend/engines/soft-roce/udp-transport.js';
import { RefDriver } from '../guest-driver-tests/driver/ref-driver.js';
import { Access, QpAttrMask, QpState, QpType, SendFlag, WcStatus, WrOpcode, wcStatusName, type Cq, type Qp, type RecvWr, type SendWr, type Verbs } from '../guest-driver-tests/verbs.js';
import { VhostUserFrontend } from '../virtio/frontend/frontend.js';

const ADDRESS_A = '127.0.0.2';
const ADDRESS_B = '127.0.0.3';
const MSG = 64 * 1024;
/** WRITEs outstanding: 64 × 64 KiB = 4 MiB in flight, several ms of work at any rate seen here. */
const DEPTH = 64;
/** Every SIGNAL_EVERY-th WRITE asks for a completion (perftest's cq_mod idea). */
const SIGNAL_EVERY = 8;
const PING = 64;
/** The RC requester asks for an ACK on each message's last packet and every ACK_REQ_EVERY packets inside it. */
const ackEvery = (mtu: number): number => Math.min(ACK_REQ_EVERY, MSG / mtu);
/** RoCEv2 sizes on the wire (UDP payload): BTH 12, RETH 16, AETH 4, ICRC 4. */
const BTH = 12;
const ICRC = 4;
const ACK_DATAGRAM = BTH + 4 + ICRC;
const middleDatagram = (mtu: number): number => BTH + mtu + ICRC;
const SEND_ONLY_DATAGRAM = BTH + PING + ICRC;
/** ibv_mtu enum: 3 = 1024, 5 = 4096. */
const MTU_ENUM: Readonly<Record<number, number>> = { 1024: 3, 4096: 5 };

function progress(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

function fail(msg: string): never {
  throw new Error(msg);
}

/** user + system CPU time of a process so far, in ms (from /proc; 100 ticks per second on Linux). */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

// ------------------------------------------------------------ RoCE: set-up

/** `vrdma serve` in a child process, with its log kept for errors. */
class Backend {
  readonly child: ChildProcess;
  output = '';
  private readonly exited: Promise<void>;

  constructor(args: readonly string[]) {
    const cli = fileURLToPath(new URL('../backend/cli.js', import.meta.url));
    // VRDMA_BENCH_BACKEND_NODE_OPTIONS, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof", to profile the back-ends.
    const nodeArgs = (process.env.VRDMA_BENCH_BACKEND_NODE_OPTIONS ?? '').split(' ').filter((x) => x !== '');
    this.child = spawn(process.execPath, [...nodeArgs, cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Uint8Array) => (this.output += String(d)));
    this.child.stderr!.on('data', (d: Uint8Array) => (this.output += String(d)));
    this.exited = new Promise((resolve) => this.child.on('close', () => resolve()));
  }

  get pid(): number {
    return this.child.pid ?? fail('back-end has no pid');
  }

  async waitFor(re: RegExp, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!re.test(this.output)) {
      if (this.child.exitCode !== null) fail(`back-end exited (${this.child.exitCode}) before ${re}:\n${this.output}`);
      if (Date.now() > deadline) fail(`timed out waiting for ${re} in back-end log:\n${this.output}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null) this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}

interface Backends {
  a: Backend;
  b: Backend;
  sockA: string;
  sockB: string;
  dir: string;
}

async function startBackends(): Promise<Backends> {
  for (let attempt = 0; ; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 20000);
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-bench-roce-'));
    const start = (address: string, sock: string): Backend =>
      new Backend(['serve', '--device', 'rdma', '--engine', 'soft-roce', '--gid', address, '--roce-port', String(port), '--socket', sock, '--log-level', 'info']);
    const sockA = join(dir, 'a.sock');
    const sockB = join(dir, 'b.sock');
    const a = start(ADDRESS_A, sockA);
    const b = start(ADDRESS_B, sockB);
    try {
      await a.waitFor(/listening on/);
      await b.waitFor(/listening on/);
      return { a, b, sockA, sockB, dir };
    } catch (err) {
      await a.stop();
      await b.stop();
      rmSync(dir, { recursive: true, force: true });
      // The random port may be taken on this host: try another one.
      if (attempt < 4 && /EADDRINUSE/.test(a.output + b.output)) continue;
      throw err;
    }
  }
}

async function stopBackends(be: Backends): Promise<void> {
  await be.a.stop();
  await be.b.stop();
  rmSync(be.dir, { recursive: true, force: true });
}

interface Side {
  v: RefDriver;
  scq: Cq;
  rcq: Cq;
  qp: Qp;
  psn: number;
}

async function makeSide(v: RefDriver, psn: number, maxSendWr: number, maxRecvWr: number): Promise<Side> {
  const pd = await v.allocPd();
  const scq = await v.createCq(128);
  const rcq = await v.createCq(128);
  const qp = await v.createQp(pd, { qpType: QpType.RC, sendCq: scq, recvCq: rcq, cap: { maxSendWr, maxRecvWr, maxSendSge: 1, maxRecvSge: 1, maxInlineData: 0 } });
  return { v, scq, rcq, qp, psn };
}

/** INIT -> RTR -> RTS towards `peer` with the given path MTU (bytes). */
async function connect(me: Side, peer: Side, peerGid: Uint8Array, mtu: number): Promise<void> {
  const v = me.v;
  await v.modifyQp(
    me.qp,
    { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: Access.LOCAL_WRITE | Access.REMOTE_WRITE },
    QpAttrMask.STATE | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.ACCESS_FLAGS,
  );
  await v.modifyQp(
    me.qp,
    {
      qpState: QpState.RTR,
      ahAttr: { grh: { dgid: peerGid, flowLabel: 0, sgidIndex: 0, hopLimit: 64, trafficClass: 0 }, sl: 0, staticRate: 0, portNum: 1 },
      pathMtu: MTU_ENUM[mtu] ?? fail(`no ibv_mtu for ${mtu}`),
      destQpNum: peer.qp.qpNum,
      rqPsn: peer.psn,
      maxDestRdAtomic: 1,
      minRnrTimer: 1,
    },
    QpAttrMask.STATE | QpAttrMask.AV | QpAttrMask.PATH_MTU | QpAttrMask.DEST_QPN | QpAttrMask.RQ_PSN | QpAttrMask.MAX_DEST_RD_ATOMIC | QpAttrMask.MIN_RNR_TIMER,
  );
  await v.modifyQp(
    me.qp,
    { qpState: QpState.RTS, sqPsn: me.psn, timeout: 14, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 1 },
    QpAttrMask.STATE | QpAttrMask.SQ_PSN | QpAttrMask.TIMEOUT | QpAttrMask.RETRY_CNT | QpAttrMask.RNR_RETRY | QpAttrMask.MAX_QP_RD_ATOMIC,
  );
}

interface Rig {
  be: Backends;
  a: Side;
  b: Side;
}

async function openRig(mtu: number, maxSendWr: number, maxRecvWr: number): Promise<Rig> {
  const be = await startBackends();
  try {
    const va = await RefDriver.open(VhostUserFrontend.connect(be.sockA), { name: 'bench/A', ramBytes: 32 << 20 });
    const vb = await RefDriver.open(VhostUserFrontend.connect(be.sockB), { name: 'bench/B', ramBytes: 32 << 20 });
    const a = await makeSide(va, 0x10000, maxSendWr, maxRecvWr);
    const b = await makeSide(vb, 0x20000, maxSendWr, maxRecvWr);
    await connect(a, b, (await vb.queryGid(1, 0)).raw, mtu);
    await connect(b, a, (await va.queryGid(1, 0)).raw, mtu);
    return { be, a, b };
  } catch (err) {
    await stopBackends(be);
    throw err;
  }
}

async function closeRig(rig: Rig): Promise<void> {
  await rig.a.v.close();
  await rig.b.v.close();
  await stopBackends(rig.be);
}

function pattern(len: number, seed: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

async function expectOk(v: Verbs, cq: Cq, max: number): Promise<number> {
  const wcs = await v.pollCq(cq, max);
  for (const w of wcs) if (w.status !== WcStatus.SUCCESS) fail(`completion wr_id ${w.wrId} failed: ${wcStatusName(w.status)}`);
  return wcs.length;
}

// ------------------------------------------------------ RoCE: WRITE bandwidth

interface BwResult {
  bytesPerSec: number;
  /** Back-end CPU over the measured interval, as a share of one core. */
  cpuA: number;
  cpuB: number;
}

/**
 * DEPTH 64-KiB WRITEs in flight from A into B's MR, in groups of
 * SIGNAL_EVERY with the group's last one signaled. The driver reaps and
 * reposts whole groups. It polls its CQ, sleeping 1 ms when it is empty:
 * 4 MiB in flight outlasts that sleep, and a sleeping front-end leaves both
 * cores to the back-ends.
 */
async function roceWriteBandwidth(mtu: number, seconds: number): Promise<BwResult> {
  // Room for twice the depth: the device may return a WQE's ring slot just after its completion.
  const rig = await openRig(mtu, 2 * DEPTH, 1);
  try {
    const { a, b } = rig;
    const src = await a.v.allocBuffer(DEPTH * MSG, { align: 4096 });
    await a.v.writeBuffer(src, 0, pattern(DEPTH * MSG, 7));
    const dst = await b.v.allocBuffer(DEPTH * MSG, { align: 4096 });
    const srcMr = await a.v.regMr(a.qp.pd, src, Access.LOCAL_WRITE);
    const dstMr = await b.v.regMr(b.qp.pd, dst, Access.LOCAL_WRITE | Access.REMOTE_WRITE);
    // One array of WRs per group, built once and reposted as is.
    const groups: SendWr[][] = [];
    for (let g = 0; g < DEPTH / SIGNAL_EVERY; g++) {
      const wrs: SendWr[] = [];
      for (let k = 0; k < SIGNAL_EVERY; k++) {
        const i = g * SIGNAL_EVERY + k;
        wrs.push({
          wrId: BigInt(g),
          opcode: WrOpcode.RDMA_WRITE,
          sendFlags: k === SIGNAL_EVERY - 1 ? SendFlag.SIGNALED : 0,
          sgList: [{ addr: src.addr + BigInt(i * MSG), length: MSG, lkey: srcMr.lkey }],
          rdma: { remoteAddr: dstMr.addr + BigInt(i * MSG), rkey: dstMr.rkey },
        });
      }
      groups.push(wrs);
    }
    for (const wrs of groups) await a.v.postSend(a.qp, wrs);
    let completedGroups = 0;
    let next = 0;
    const warmUpEnd = performance.now() + 500;
    let t0 = 0;
    let groupsAtT0 = 0;
    let cpuA0 = 0;
    let cpuB0 = 0;
    const pidA = rig.be.a.pid;
    const pidB = rig.be.b.pid;
    let end = Infinity;
    for (;;) {
      const n = await expectOk(a.v, a.scq, DEPTH / SIGNAL_EVERY);
      const now = performance.now();
      if (t0 === 0 && now >= warmUpEnd) {
        t0 = now;
        groupsAtT0 = completedGroups;
        cpuA0 = cpuMs(pidA);
        cpuB0 = cpuMs(pidB);
        end = t0 + seconds * 1000;
      }
      if (now >= end) {
        const span = now - t0;
        const bytes = (completedGroups + n - groupsAtT0) * SIGNAL_EVERY * MSG;
        const cpuA = (cpuMs(pidA) - cpuA0) / span;
        const cpuB = (cpuMs(pidB) - cpuB0) / span;
        // Let the rest complete so the QP is idle, then check the data arrived intact.
        let outstanding = DEPTH / SIGNAL_EVERY - n;
        const deadline = performance.now() + 5000;
        while (outstanding > 0 && performance.now() < deadline) {
          outstanding -= await expectOk(a.v, a.scq, outstanding);
          await new Promise((r) => setTimeout(r, 1));
        }
        const got = await b.v.readBuffer(dst, 0, MSG);
        const want = pattern(DEPTH * MSG, 7).subarray(0, MSG);
        for (let i = 0; i < MSG; i++) if (got[i] !== want[i]) fail(`WRITE data differs at byte ${i} of the first message`);
        return { bytesPerSec: bytes / (span / 1000), cpuA, cpuB };
      }
      for (let k = 0; k < n; k++) {
        await a.v.postSend(a.qp, groups[next]!);
        next = (next + 1) % groups.length;
      }
      completedGroups += n;
      if (n === 0) await new Promise((r) => setTimeout(r, 1));
    }
  } finally {
    await closeRig(rig);
  }
}

// ---------------------------------------------------- RoCE: SEND latency

interface LatResult {
  samples: number;
  medianUs: number;
  p99Us: number;
}

function summarize(rtts: Float64Array, n: number): LatResult {
  const s = rtts.subarray(0, n).sort();
  return { samples: n, medianUs: s[Math.floor(n / 2)]! * 1000, p99Us: s[Math.min(n - 1, Math.floor(n * 0.99))]! * 1000 };
}

/** Polls `cq` until one completion arrives, yielding to the event loop between empty polls (busy polling, as ib_send_lat does). */
async function spinOne(v: Verbs, cq: Cq): Promise<void> {
  for (;;) {
    if ((await expectOk(v, cq, 1)) === 1) return;
    await yieldTurn();
  }
}

/** How a latency driver learns of a completion. */
type Wait = 'event' | 'poll';

/** Takes the one completion an armed CQ's interrupt announced. */
async function eventOne(v: Verbs, cq: Cq): Promise<void> {
  if (!(await v.waitCqEvent(cq, 5000))) fail('no completion interrupt within 5 s');
  if ((await expectOk(v, cq, 1)) !== 1) fail('interrupt without a completion');
}

/**
 * A sends 64 bytes to B, B answers with 64 bytes, A times the round trip.
 * Sends are unsignaled; each side reposts the receive it used. `wait`:
 * - 'event': each side arms its receive CQ and sleeps until the interrupt
 *   (ibv_rc_pingpong -e). Re-arming is outside the timed interval for A
 *   and overlaps the answer's flight for B. Nothing spins, like the UDP
 *   baseline's epoll loop.
 * - 'poll': each side busy-polls its receive CQ, yielding to the event loop
 *   between polls (perftest's ib_send_lat): one core spins.
 */
async function roceSendLatency(seconds: number, wait: Wait): Promise<LatResult> {
  const rig = await openRig(4096, 16, 16);
  try {
    const { a, b } = rig;
    const setup = async (s: Side): Promise<{ send: SendWr[]; recv: RecvWr[] }> => {
      const buf = await s.v.allocBuffer(2 * PING);
      const mr = await s.v.regMr(s.qp.pd, buf, Access.LOCAL_WRITE);
      await s.v.writeBuffer(buf, 0, pattern(PING, s.psn));
      const send: SendWr[] = [{ wrId: 1n, opcode: WrOpcode.SEND, sendFlags: 0, sgList: [{ addr: buf.addr, length: PING, lkey: mr.lkey }] }];
      const recv: RecvWr[] = [{ wrId: 2n, sgList: [{ addr: buf.addr + BigInt(PING), length: PING, lkey: mr.lkey }] }];
      for (let i = 0; i < 8; i++) await s.v.postRecv(s.qp, recv);
      return { send, recv };
    };
    const wa = await setup(a);
    const wb = await setup(b);
    const take = wait === 'event' ? eventOne : spinOne;
    if (wait === 'event') {
      await a.v.reqNotifyCq(a.rcq, false);
      await b.v.reqNotifyCq(b.rcq, false);
    }
    const rtts = new Float64Array(Math.max(1000, Math.ceil(seconds * 100_000)));
    let n = 0;
    const warmUpEnd = performance.now() + 300;
    let end = Infinity;
    for (;;) {
      const t0 = performance.now();
      await a.v.postSend(a.qp, wa.send);
      await take(b.v, b.rcq);
      await b.v.postSend(b.qp, wb.send);
      const armB = wait === 'event' ? b.v.reqNotifyCq(b.rcq, false) : null;
      await b.v.postRecv(b.qp, wb.recv);
      await take(a.v, a.rcq);
      const t1 = performance.now();
      await armB;
      await a.v.postRecv(a.qp, wa.recv);
      if (wait === 'event') await a.v.reqNotifyCq(a.rcq, false);
      if (end === Infinity) {
        if (t1 >= warmUpEnd) end = t1 + seconds * 1000;
        continue;
      }
      rtts[n++] = t1 - t0;
      if (t1 >= end || n === rtts.length) break;
    }
    return summarize(rtts, n);
  } finally {
    await closeRig(rig);
  }
}

// ---------------------------------------------------- raw UDP baselines

type ToChild = { cmd: 'start' } | { cmd: 'stop' };
type FromChild = { ready: number } | { bw: { datagrams: number; spanMs: number; stalls: number; cpuMs: number } } | { lat: { rttMs: number[] } } | { stopped: Record<string, never> };

function processCpuMs(): number {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1000;
}

/**
 * Receiver: counts datagrams and, like the RC responder, answers every
 * `every`-th one at once with an ACK-sized datagram carrying the count,
 * sent before it looks at the rest of the batch.
 */
function udpSink(every: number): void {
  const t = new UdpTransport({ address: ADDRESS_B, port: 0, recvSlots: 64, recvSlotSize: 4096 + 64 });
  const ack = new Uint8Array(ACK_DATAGRAM);
  let received = 0;
  let peer: UdpPeer | null = null;
  t.onBatch((batch) => {
    for (let i = 0; i < batch.count; i++) {
      if (++received % every !== 0) continue;
      peer ??= batch.source(i);
      ack[0] = received & 0xff;
      ack[1] = (received >>> 8) & 0xff;
      ack[2] = (received >>> 16) & 0xff;
      ack[3] = (received >>> 24) & 0xff;
      t.queue(peer, ack);
      t.flush();
    }
  });
  process.on('message', (m: ToChild) => {
    if (m.cmd === 'stop') process.send?.({ stopped: {} } satisfies FromChild, () => process.exit(0));
  });
  process.send?.({ ready: t.local.port } satisfies FromChild);
}

/**
 * Sender: keeps at most SEND_WINDOW datagrams of `size` bytes unacknowledged,
 * refilling the window as counts come back, for `seconds`. A window with no
 * progress for 200 ms is written off (counted as a stall) like a retransmit
 * timeout would. (On loopback nothing is lost below the socket buffer;
 * 200 ms covers a receiver that a loaded machine did not schedule.)
 */
function udpSource(size: number, port: number, seconds: number): void {
  const t = new UdpTransport({ address: ADDRESS_A, port: 0, sendSlots: SEND_WINDOW, sendSlotSize: 4096 + 64, recvSlots: 64, recvSlotSize: 64 });
  const dst = udpPeer(ADDRESS_B, port);
  let sent = 0;
  let acked = 0;
  let stalls = 0;
  let lastProgress = 0;
  let t0 = 0;
  let ackedAtT0 = 0;
  let cpu0 = 0;
  let measuring = false;
  let end = 0;
  let warmUpEnd = 0;
  const fill = (): void => {
    while (sent - acked < SEND_WINDOW) {
      const at = t.reserve(dst, size);
      if (at < 0) break;
      t.sendBuffer[at] = sent & 0xff;
      sent++;
    }
  };
  const finish = (now: number): void => {
    const datagrams = acked - ackedAtT0;
    process.send?.({ bw: { datagrams, spanMs: now - t0, stalls, cpuMs: processCpuMs() - cpu0 } } satisfies FromChild, () => {
      t.close();
      process.exit(0);
    });
  };
  t.onBatch((batch) => {
    for (let i = 0; i < batch.count; i++) {
      const at = batch.offset(i);
      const n = batch.buf[at]! | (batch.buf[at + 1]! << 8) | (batch.buf[at + 2]! << 16) | (batch.buf[at + 3]! * 2 ** 24);
      if (n > acked) acked = n;
    }
    const now = performance.now();
    lastProgress = now;
    if (!measuring && now >= warmUpEnd) {
      measuring = true;
      t0 = now;
      ackedAtT0 = acked;
      cpu0 = processCpuMs();
      end = now + seconds * 1000;
    }
    if (measuring && now >= end) {
      measuring = false;
      end = Infinity;
      finish(now);
      return;
    }
    fill();
  });
  const watchdog = setInterval(() => {
    const now = performance.now();
    if (now - lastProgress > 200) {
      stalls++;
      acked = sent;
      lastProgress = now;
      fill();
    }
  }, 50);
  watchdog.unref();
  process.on('message', (m: ToChild) => {
    if (m.cmd !== 'start') return;
    lastProgress = performance.now();
    warmUpEnd = lastProgress + 500;
    fill();
  });
  process.send?.({ ready: t.local.port } satisfies FromChild);
}

/** Echo side of the ping-pong: sends every datagram straight back. */
function udpEcho(): void {
  const t = new UdpTransport({ address: ADDRESS_B, port: 0, recvSlots: 16, recvSlotSize: 256, sendSlots: 16, sendSlotSize: 256 });
  let peer: UdpPeer | null = null;
  const reply = new Uint8Array(SEND_ONLY_DATAGRAM);
  t.onBatch((batch) => {
    peer ??= batch.source(0);
    for (let i = 0; i < batch.count; i++) t.queue(peer, reply);
  });
  process.on('message', (m: ToChild) => {
    if (m.cmd === 'stop') process.send?.({ stopped: {} } satisfies FromChild, () => process.exit(0));
  });
  process.send?.({ ready: t.local.port } satisfies FromChild);
}

/** Timing side of the ping-pong: one datagram out, wait for the answer, repeat. */
function udpPing(port: number, seconds: number): void {
  const t = new UdpTransport({ address: ADDRESS_A, port: 0, recvSlots: 16, recvSlotSize: 256, sendSlots: 16, sendSlotSize: 256 });
  const dst = udpPeer(ADDRESS_B, port);
  const ping = new Uint8Array(SEND_ONLY_DATAGRAM);
  const rtts = new Float64Array(Math.max(1000, Math.ceil(seconds * 200_000)));
  let n = 0;
  let t0 = 0;
  let warmUpEnd = 0;
  let end = Infinity;
  const send = (): void => {
    t0 = performance.now();
    t.queue(dst, ping);
  };
  t.onBatch(() => {
    const t1 = performance.now();
    if (end === Infinity) {
      if (t1 >= warmUpEnd) end = t1 + seconds * 1000;
    } else {
      rtts[n++] = t1 - t0;
      if (t1 >= end || n === rtts.length) {
        process.send?.({ lat: { rttMs: Array.from(rtts.subarray(0, n)) } } satisfies FromChild, () => {
          t.close();
          process.exit(0);
        });
        return;
      }
    }
    send();
  });
  process.on('message', (m: ToChild) => {
    if (m.cmd !== 'start') return;
    warmUpEnd = performance.now() + 300;
    send();
  });
  process.send?.({ ready: t.local.port } satisfies FromChild);
}

function once<K extends 'ready' | 'bw' | 'lat' | 'stopped'>(child: ChildProcess, key: K): Promise<Extract<FromChild, Record<K, unknown>>> {
  return new Promise((resolve, reject) => {
    const onMessage = (m: FromChild): void => {
      if (key in m) {
        child.off('message', onMessage);
        child.off('exit', onExit);
        resolve(m as Extract<FromChild, Record<K, unknown>>);
      }
    };
    const onExit = (code: number | null): void => reject(new Error(`child exited (${code}) before '${key}'`));
    child.on('message', onMessage);
    child.on('exit', onExit);
  });
}

function forkRole(...args: string[]): ChildProcess {
  return fork(fileURLToPath(import.meta.url), args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
}

interface UdpBwResult {
  /** Payload bytes per second, counting each datagram as one MTU of payload (what a RoCE packet of that size carries). */
  payloadPerSec: number;
  datagramsPerSec: number;
  stalls: number;
  /** Sender CPU over the measured interval, as a share of one core. */
  cpuTx: number;
}

async function udpBandwidth(mtu: number, seconds: number): Promise<UdpBwResult> {
  const rx = forkRole('udp-sink', String(ackEvery(mtu)));
  const port = (await once(rx, 'ready')).ready;
  const tx = forkRole('udp-source', String(middleDatagram(mtu)), String(port), String(seconds));
  await once(tx, 'ready');
  const done = once(tx, 'bw');
  tx.send({ cmd: 'start' } satisfies ToChild);
  const r = (await done).bw;
  const stopped = once(rx, 'stopped');
  rx.send({ cmd: 'stop' } satisfies ToChild);
  await stopped;
  const secs = r.spanMs / 1000;
  return { payloadPerSec: (r.datagrams * mtu) / secs, datagramsPerSec: r.datagrams / secs, stalls: r.stalls, cpuTx: r.cpuMs / r.spanMs };
}

async function udpLatency(seconds: number): Promise<LatResult> {
  const echo = forkRole('udp-echo');
  const port = (await once(echo, 'ready')).ready;
  const ping = forkRole('udp-ping', String(port), String(seconds));
  await once(ping, 'ready');
  const done = once(ping, 'lat');
  ping.send({ cmd: 'start' } satisfies ToChild);
  const r = (await done).lat;
  const stopped = once(echo, 'stopped');
  echo.send({ cmd: 'stop' } satisfies ToChild);
  await stopped;
  return summarize(Float64Array.from(r.rttMs), r.rttMs.length);
}

// ------------------------------------------------- ICRC cost per packet

/**
 * ns per CRC-32 over one MTU-4096 packet's covered bytes, per path: the
 * engine's (native carry-less multiply), zlib.crc32, and the JavaScript
 * tables. Every packet pays this once at the sender and once at the receiver.
 */
function crcCost(): { path: string; ns: number }[] {
  const len = middleDatagram(4096) - ICRC;
  const buf = pattern(len + 64, 1);
  const paths: [string, (c: number, b: Uint8Array, o: number, l: number) => number][] = [
    ['crc32Update (engine: native)', crc32Update],
    ['zlib.crc32', crc32UpdateZlib],
    ['JavaScript tables', crc32UpdateTables],
  ];
  return paths.map(([path, f]) => {
    let sink = 0;
    for (let i = 0; i < 2000; i++) sink ^= f(i >>> 0, buf, i & 31, len);
    // The best of several short runs: on a shared machine a long one mostly measures the other load.
    let ns = Infinity;
    for (let run = 0; run < 7; run++) {
      const n = 3000;
      const t0 = performance.now();
      for (let i = 0; i < n; i++) sink ^= f(i >>> 0, buf, i & 31, len);
      ns = Math.min(ns, ((performance.now() - t0) * 1e6) / n);
    }
    if (sink === 0x5eed) progress('(sink)'); // keeps the loop's result alive
    return { path, ns };
  });
}

// ------------------------------------------------------------------ main

interface Round {
  roce: number;
  udp: number;
  notes: string;
  /** Bandwidth only: CPU µs per packet of back-end A (requester), B (responder) and the UDP sender. */
  cost?: { a: number; b: number; udpTx: number };
}

/** One case measured over several rounds; each round measures RoCE and then its UDP baseline, so both see the same machine load. */
interface Case {
  name: string;
  unit: 'MB/s' | 'µs';
  rounds: Round[];
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const mbps = (bytesPerSec: number): string => `${(bytesPerSec / 1e6).toFixed(0)} MB/s`;
const pct = (x: number): string => `${(x * 100).toFixed(0)}%`;
const show = (unit: Case['unit'], v: number): string => (unit === 'MB/s' ? `${v.toFixed(0)} MB/s` : `${v.toFixed(0)} µs`);
/** Bandwidth: RoCE as a share of UDP; latency: RoCE as a multiple of UDP. */
const ratioText = (unit: Case['unit'], r: number): string => (unit === 'MB/s' ? pct(r) : `${r.toFixed(1)}×`);

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  console.log(line(header));
  for (const row of rows) console.log(line(row));
}

async function main(): Promise<void> {
  const seconds = Number(process.argv[2] ?? 3);
  const runs = Number(process.argv[3] ?? 3);
  const only = process.argv[4]?.split(',') ?? ['crc', 'write4096', 'write1024', 'latency', 'latency-poll'];
  const crc = only.includes('crc') ? crcCost() : [];
  const cases: Case[] = [];
  const caseNamed = (name: string, unit: Case['unit']): Case => {
    let c = cases.find((x) => x.name === name);
    if (c === undefined) cases.push((c = { name, unit, rounds: [] }));
    return c;
  };
  for (let run = 1; run <= runs; run++) {
    for (const mtu of [4096, 1024]) {
      if (!only.includes(`write${mtu}`)) continue;
      progress(`round ${run}/${runs}: RC WRITE 64 KiB, MTU ${mtu}, ${DEPTH} in flight, ${seconds} s...`);
      const roce = await roceWriteBandwidth(mtu, seconds);
      progress(`  ${mbps(roce.bytesPerSec)} (back-end CPU A ${pct(roce.cpuA)}, B ${pct(roce.cpuB)})`);
      progress(`round ${run}/${runs}: UDP ${middleDatagram(mtu)}-byte datagrams, window ${SEND_WINDOW}, ack every ${ackEvery(mtu)}, ${seconds} s...`);
      const udp = await udpBandwidth(mtu, seconds);
      progress(`  ${mbps(udp.payloadPerSec)} payload (${(udp.datagramsPerSec / 1000).toFixed(0)} k datagrams/s, sender CPU ${pct(udp.cpuTx)}, ${udp.stalls} stalls)`);
      const pps = roce.bytesPerSec / mtu;
      const cost = { a: (roce.cpuA / pps) * 1e6, b: (roce.cpuB / pps) * 1e6, udpTx: (udp.cpuTx / udp.datagramsPerSec) * 1e6 };
      caseNamed(`RC WRITE 64 KiB, MTU ${mtu} (UDP ${middleDatagram(mtu)} B)`, 'MB/s').rounds.push({
        roce: roce.bytesPerSec / 1e6,
        udp: udp.payloadPerSec / 1e6,
        notes: `CPU: A ${pct(roce.cpuA)} B ${pct(roce.cpuB)}, UDP sender ${pct(udp.cpuTx)}; CPU µs/packet: A ${cost.a.toFixed(1)} B ${cost.b.toFixed(1)}, UDP sender ${cost.udpTx.toFixed(1)}; UDP stalls ${udp.stalls}`,
        cost,
      });
    }
    for (const wait of ['event', 'poll'] as const) {
      const key = wait === 'event' ? 'latency' : 'latency-poll';
      if (!only.includes(key)) continue;
      const how = wait === 'event' ? 'CQ interrupts' : 'busy-polled CQs';
      progress(`round ${run}/${runs}: RC SEND 64 B ping-pong (${how}), ${seconds} s...`);
      const lat = await roceSendLatency(seconds, wait);
      progress(`  median ${lat.medianUs.toFixed(0)} µs, p99 ${lat.p99Us.toFixed(0)} µs (${lat.samples} round trips)`);
      progress(`round ${run}/${runs}: UDP ${SEND_ONLY_DATAGRAM}-byte ping-pong, ${seconds} s...`);
      const ulat = await udpLatency(seconds);
      progress(`  median ${ulat.medianUs.toFixed(0)} µs, p99 ${ulat.p99Us.toFixed(0)} µs (${ulat.samples} round trips)`);
      const notes = `${lat.samples} / ${ulat.samples} round trips`;
      caseNamed(`RC SEND 64 B round trip (${how}), median (UDP ${SEND_ONLY_DATAGRAM} B)`, 'µs').rounds.push({ roce: lat.medianUs, udp: ulat.medianUs, notes });
      caseNamed(`RC SEND 64 B round trip (${how}), p99 (UDP ${SEND_ONLY_DATAGRAM} B)`, 'µs').rounds.push({ roce: lat.p99Us, udp: ulat.p99Us, notes });
    }
  }
  if (crc.length > 0) {
    console.log(`ICRC over one MTU-4096 packet (${middleDatagram(4096) - ICRC} bytes), in this process:`);
    printTable(['path', 'ns/packet', 'GB/s'], crc.map((c) => [c.path, c.ns.toFixed(0), ((middleDatagram(4096) - ICRC) / c.ns).toFixed(1)]));
    console.log('');
  }
  console.log(`soft-RoCE ${ADDRESS_A} <-> ${ADDRESS_B}: two vrdma serve processes, reference drivers in the bench process; raw UDP baseline: two processes, UdpTransport; ${seconds} s per measurement`);
  console.log('\nEvery round (RoCE, then its UDP baseline):');
  printTable(
    ['round', 'case', 'soft-RoCE', 'raw UDP', 'RoCE/UDP', 'notes'],
    cases.flatMap((c) => c.rounds.map((r, i) => [String(i + 1), c.name, show(c.unit, r.roce), show(c.unit, r.udp), ratioText(c.unit, r.roce / r.udp), r.notes])),
  );
  console.log(`\nMedians over ${runs} round(s) (ratio: median of the per-round ratios, and their range):`);
  const costOf = (c: Case, k: 'a' | 'b' | 'udpTx'): string => (c.rounds[0]?.cost === undefined ? '' : median(c.rounds.map((r) => r.cost![k])).toFixed(1));
  printTable(
    ['case', 'soft-RoCE', 'raw UDP', 'RoCE/UDP', 'range', 'CPU µs/pkt A', 'B', 'UDP tx'],
    cases.map((c) => {
      const ratios = c.rounds.map((r) => r.roce / r.udp);
      return [
        c.name,
        show(c.unit, median(c.rounds.map((r) => r.roce))),
        show(c.unit, median(c.rounds.map((r) => r.udp))),
        ratioText(c.unit, median(ratios)),
        `${ratioText(c.unit, Math.min(...ratios))} – ${ratioText(c.unit, Math.max(...ratios))}`,
        costOf(c, 'a'),
        costOf(c, 'b'),
        costOf(c, 'udpTx'),
      ];
    }),
  );
}

const [role, a, b, c] = process.argv.slice(2);
if (role === 'udp-sink') udpSink(Number(a));
else if (role === 'udp-source') udpSource(Number(a), Number(b), Number(c));
else if (role === 'udp-echo') udpEcho();
else if (role === 'udp-ping') udpPing(Number(a), Number(b));
else
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
