import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestRam } from '../../../virtio/frontend/guest-ram.js';
import { GuestMemory, MappedRegion } from '../../../virtio/memory/guest-memory.js';
import { Access, FIRST_QPN, QpState, QpType, SendFlag, SendOp, WcFlag, WcOpcode, WcStatus } from '../../abi/constants.js';
import { GuestMemoryAccess } from '../../device/memory-access.js';
import { MrTable } from '../../device/mr-table.js';
import type { AddressVector, QpAttributes, SendWr, Sge } from '../../engine/engine.js';
import { RecordingHost, type RecordedCompletion } from '../../engine/recording-host.js';
import { registerScatteredMr, type ScatteredMr } from '../../device/scattered-mr.js';
import { LoopbackEngine } from './loopback-engine.js';

const RAM_GPA = 0x10_0000;
const RAM_SIZE = 64 << 20;
const PAGE = 4096;
const PD = 1;

/** ::ffff:10.0.0.1 (IPv4-mapped) and fd00::1. */
const GID_V4 = new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
const GID_V6 = new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const FOREIGN_GID = new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99]);

/** An MR with scattered pages and helpers that find its bytes by walking the page list. */

interface Rig {
  ram: GuestRam;
  memory: GuestMemory;
  mrs: MrTable;
  access: GuestMemoryAccess;
  host: RecordingHost;
  engine: LoopbackEngine;
}

let r: Rig;
let nextToken = 1;

function makeRig(): Rig {
  const ram = new GuestRam(RAM_GPA, RAM_SIZE);
  const memory = new GuestMemory(8);
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  const mrs = new MrTable(256, memory, 1n << 30n);
  const access = new GuestMemoryAccess(mrs, memory);
  const host = new RecordingHost(access, [GID_V4, GID_V6]);
  const engine = new LoopbackEngine();
  engine.attach(host);
  return { ram, memory, mrs, access, host, engine };
}

beforeEach(() => {
  r = makeRig();
  nextToken = 1;
});

afterEach(() => {
  r.engine.close();
  expect(r.host.violations).toEqual([]);
  r.memory.clear();
  r.ram.release();
});

function pattern(len: number, seed = 1): Uint8Array {
  const b = new Uint8Array(len);
  let x = seed;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

let iovaBase = 0x5000_0000_0000n;

/**
 * Registers an MR of `length` bytes whose pages are out of order and never
 * adjacent; more than 512 pages use a two-level list.
 */
function mr(length: number, acc: number, opts: { pdn?: number; contiguous?: boolean } = {}): ScatteredMr {
  const iova = iovaBase + 0x123n;
  iovaBase += 0x1_0000_0000n;
  return registerScatteredMr(r.ram, r.mrs, length, acc, { pdn: opts.pdn ?? PD, iova, ...(opts.contiguous !== undefined ? { contiguous: opts.contiguous } : {}) });
}

const LOCAL = Access.LOCAL_WRITE;
const ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;

function av(dgid: Uint8Array = GID_V6, sgidIndex = 1): AddressVector {
  return { dgid: dgid.slice(), sgidIndex, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 };
}

function attrs(over: Partial<QpAttributes>): QpAttributes {
  return {
    state: QpState.RESET,
    pathMtu: 5,
    timeout: 1,
    retryCnt: 2,
    rnrRetry: 7,
    minRnrTimer: 1,
    maxRdAtomic: 4,
    maxDestRdAtomic: 4,
    accessFlags: Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC,
    qkey: 0,
    rqPsn: 0,
    sqPsn: 0,
    destQpn: 0,
    pkeyIndex: 0,
    av: null,
    ...over,
  };
}

function createQp(type: QpType, pdn = PD): number {
  const qpn = r.engine.createQp({ type, pdn, maxSendWr: 64, maxRecvWr: 64 }, null, () => false);
  expect(qpn).not.toBeNull();
  return qpn!;
}

/** Walks a QP RESET -> INIT -> RTR -> RTS (or stops at `until`) with the given attributes. */
function bringUp(qpn: number, over: Partial<QpAttributes>, until: QpState = QpState.RTS): void {
  for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) {
    r.engine.modifyQp(qpn, attrs({ ...over, state }), 1);
    if (state === until) return;
  }
}

/** Two connected QPs of `type` (RC or UC). */
function pair(type: QpType = QpType.RC, over: Partial<QpAttributes> = {}, overB: Partial<QpAttributes> = {}): [number, number] {
  const a = createQp(type);
  const b = createQp(type);
  bringUp(a, { destQpn: b, av: av(), ...over });
  bringUp(b, { destQpn: a, av: av(), ...over, ...overB });
  return [a, b];
}

function wr(over: Partial<SendWr>): SendWr {
  const sges = over.sges ?? [];
  const inline = over.inline ?? null;
  return {
    wrId: 0n,
    opcode: SendOp.SEND,
    flags: SendFlag.SIGNALED,
    sges,
    inline,
    length: inline !== null ? inline.length : sges.reduce((n, s) => n + s.length, 0),
    imm: 0,
    remoteAddr: 0n,
    rkey: 0,
    compareAdd: 0n,
    swap: 0n,
    ud: null,
    ...over,
  };
}

function postSend(qpn: number, over: Partial<SendWr>): number {
  const token = nextToken++;
  r.host.outstandingSends.add(`${qpn}/${token}`);
  r.engine.postSend(qpn, wr(over), token);
  return token;
}

function postRecv(qpn: number, sges: Sge[]): number {
  const token = nextToken++;
  r.host.outstandingRecvs.add(`${qpn}/${token}`);
  r.engine.postRecv(qpn, { wrId: BigInt(token), sges, length: sges.reduce((n, s) => n + s.length, 0) }, token);
  return token;
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Lets queued work run until the engine has nothing scheduled (waits still pending are not waited for). */
async function settle(): Promise<void> {
  for (let i = 0; i < 1000; i++) {
    await tick();
    if (r.engine.idle) return;
  }
  throw new Error('engine never settled');
}

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await sleep(1);
  }
}

/** Byte equality without vitest's element-by-element deep compare (slow for megabytes). */
function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

function summary(d: RecordedCompletion): Partial<RecordedCompletion> {
  return { token: d.token, status: d.status, opcode: d.opcode };
}

// ---------------------------------------------------------------------------

describe('RC', () => {
  it('SEND delivers multi-SGE data across scattered pages into multi-SGE receive buffers', async () => {
    const [a, b] = pair();
    const src1 = mr(3 * PAGE, LOCAL);
    const src2 = mr(PAGE, LOCAL);
    const dst = mr(4 * PAGE, LOCAL);
    const p1 = pattern(5000, 1);
    const p2 = pattern(1000, 2);
    src1.write(3000, p1);
    src2.write(10, p2);
    const rt = postRecv(b, [dst.sge(100, 2000), dst.sge(8000, 6000)]);
    const st = postSend(a, { sges: [src1.sge(3000, 5000), src2.sge(10, 1000)] });
    await settle();
    expect(r.host.recvs).toEqual([expect.objectContaining({ qpn: b, token: rt, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 6000, flags: 0, srcQp: a })]);
    expect(r.host.sends).toEqual([expect.objectContaining({ qpn: a, token: st, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, byteLen: 6000 })]);
    const all = new Uint8Array(6000);
    all.set(p1);
    all.set(p2, 5000);
    expect(dst.read(100, 2000)).toEqual(all.subarray(0, 2000));
    expect(dst.read(8000, 4000)).toEqual(all.subarray(2000));
    expect(r.host.failed).toEqual([]);
  });

  it('SEND_WITH_IMM carries the immediate and the solicited bit; the sender completion has WITH_IMM', async () => {
    const [a, b] = pair();
    const buf = mr(PAGE, LOCAL);
    buf.write(0, pattern(16));
    postRecv(b, [buf.sge(1000, 64)]);
    postSend(a, { opcode: SendOp.SEND_WITH_IMM, imm: 0xdeadbeef, flags: SendFlag.SIGNALED | SendFlag.SOLICITED, sges: [buf.sge(0, 16)] });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 16, flags: WcFlag.WITH_IMM, imm: 0xdeadbeef, solicited: true });
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, flags: WcFlag.WITH_IMM });
    expect(buf.read(1000, 16)).toEqual(pattern(16));
  });

  it('inline SEND and inline RDMA WRITE take their data from the WR', async () => {
    const [a, b] = pair();
    const buf = mr(PAGE, ALL);
    postRecv(b, [buf.sge(0, 100)]);
    postSend(a, { inline: pattern(40, 5), flags: SendFlag.INLINE | SendFlag.SIGNALED });
    postSend(a, { opcode: SendOp.RDMA_WRITE, inline: pattern(30, 6), flags: SendFlag.INLINE, remoteAddr: buf.iova + 500n, rkey: buf.mr.rkey });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 40 });
    expect(buf.read(0, 40)).toEqual(pattern(40, 5));
    expect(buf.read(500, 30)).toEqual(pattern(30, 6));
    expect(r.host.sends.map((s) => s.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
  });

  it('zero-length messages: a SEND consumes a receive WQE with byte_len 0; RDMA READ/WRITE of 0 bytes check no rkey', async () => {
    const [a, b] = pair();
    const rt = postRecv(b, []);
    postSend(a, {});
    postSend(a, { opcode: SendOp.RDMA_WRITE, remoteAddr: 0x1234n, rkey: 0xbad });
    postSend(a, { opcode: SendOp.RDMA_READ, remoteAddr: 0x1234n, rkey: 0xbad });
    await settle();
    expect(r.host.recvs).toEqual([expect.objectContaining({ token: rt, status: WcStatus.SUCCESS, byteLen: 0 })]);
    expect(r.host.sends.map((s) => [s.status, s.opcode])).toEqual([
      [WcStatus.SUCCESS, WcOpcode.SEND],
      [WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
      [WcStatus.SUCCESS, WcOpcode.RDMA_READ],
    ]);
    expect(r.host.failed).toEqual([]);
  });

  it('RDMA WRITE lands in the remote MR across scattered pages and consumes no receive WQE', async () => {
    const [a, b] = pair();
    const src = mr(3 * PAGE, LOCAL);
    const dst = mr(5 * PAGE, ALL);
    const data = pattern(3 * PAGE - 7, 9);
    src.write(7, data);
    const rt = postRecv(b, []);
    postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(7, data.length)], remoteAddr: dst.iova + 4000n, rkey: dst.mr.rkey });
    await settle();
    expect(dst.read(4000, data.length)).toEqual(data);
    expect(r.host.sends).toEqual([expect.objectContaining({ status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE, byteLen: data.length })]);
    expect(r.host.recvs).toEqual([]);
    // The receive is still there for a SEND.
    postSend(a, {});
    await settle();
    expect(r.host.recvs).toEqual([expect.objectContaining({ token: rt, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV })]);
  });

  it('RDMA WRITE_WITH_IMM writes the data and completes a receive WQE as RECV_RDMA_WITH_IMM with byte_len = write length', async () => {
    const [a, b] = pair();
    const src = mr(PAGE, LOCAL);
    const dst = mr(2 * PAGE, ALL);
    src.write(0, pattern(3000, 4));
    const rt = postRecv(b, []);
    postSend(a, { opcode: SendOp.RDMA_WRITE_WITH_IMM, imm: 0x01020304, sges: [src.sge(0, 3000)], remoteAddr: dst.iova + 2000n, rkey: dst.mr.rkey });
    await settle();
    expect(dst.read(2000, 3000)).toEqual(pattern(3000, 4));
    expect(r.host.recvs).toEqual([expect.objectContaining({ token: rt, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, byteLen: 3000, flags: WcFlag.WITH_IMM, imm: 0x01020304, srcQp: a })]);
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE, flags: WcFlag.WITH_IMM });
  });

  it('RDMA READ copies the remote range into local multi-SGE buffers', async () => {
    const [a] = pair();
    const remote = mr(4 * PAGE, ALL);
    const local = mr(4 * PAGE, LOCAL);
    const data = pattern(10000, 11);
    remote.write(1500, data);
    postSend(a, { opcode: SendOp.RDMA_READ, sges: [local.sge(0, 4000), local.sge(6000, 6000)], remoteAddr: remote.iova + 1500n, rkey: remote.mr.rkey });
    await settle();
    expect(r.host.sends).toEqual([expect.objectContaining({ status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_READ, byteLen: 10000 })]);
    expect(local.read(0, 4000)).toEqual(data.subarray(0, 4000));
    expect(local.read(6000, 6000)).toEqual(data.subarray(4000));
  });

  it('atomics: compare-and-swap and fetch-and-add return the original into the local SGE', async () => {
    const [a] = pair();
    const remote = mr(PAGE, ALL);
    const local = mr(PAGE, LOCAL);
    // MR offset 0xdd: iova ends in 0x123, so 0x123 + 0xdd = 0x200 is 8-byte aligned.
    const at = remote.iova + 0xddn;
    const word = new DataView(new ArrayBuffer(8));
    word.setBigUint64(0, 100n, true);
    remote.write(0xdd, new Uint8Array(word.buffer));
    const read = (m: ScatteredMr, off: number): bigint => new DataView(m.read(off, 8).buffer).getBigUint64(0, true);
    postSend(a, { opcode: SendOp.ATOMIC_CMP_AND_SWP, sges: [local.sge(0, 8)], remoteAddr: at, rkey: remote.mr.rkey, compareAdd: 100n, swap: 7n });
    postSend(a, { opcode: SendOp.ATOMIC_CMP_AND_SWP, sges: [local.sge(8, 8)], remoteAddr: at, rkey: remote.mr.rkey, compareAdd: 100n, swap: 8n });
    postSend(a, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(16, 8)], remoteAddr: at, rkey: remote.mr.rkey, compareAdd: (1n << 64n) - 1n });
    await settle();
    expect(r.host.sends.map((s) => [s.status, s.opcode, s.byteLen])).toEqual([
      [WcStatus.SUCCESS, WcOpcode.COMP_SWAP, 8],
      [WcStatus.SUCCESS, WcOpcode.COMP_SWAP, 8],
      [WcStatus.SUCCESS, WcOpcode.FETCH_ADD, 8],
    ]);
    expect(read(local, 0)).toBe(100n);
    expect(read(local, 8)).toBe(7n);
    expect(read(local, 16)).toBe(7n);
    expect(read(remote, 0xdd)).toBe(6n);
  });

  it('moves messages larger than the staging chunk (SEND, WRITE, READ of 2.5 MiB over two-level page lists)', async () => {
    const [a, b] = pair();
    const len = 2560 * 1024;
    const src = mr(len, ALL);
    const dst = mr(len + 100, ALL);
    expect(src.pages.length).toBeGreaterThan(512);
    const data = pattern(len, 21);
    src.write(0, data);
    postRecv(b, [dst.sge(0, 100), dst.sge(100, len)]);
    postSend(a, { sges: [src.sge(0, len)] });
    await settle();
    expect(same(dst.read(0, len), data)).toBe(true);
    dst.write(0, new Uint8Array(len));
    postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, len)], remoteAddr: dst.iova + 50n, rkey: dst.mr.rkey });
    await settle();
    expect(same(dst.read(50, len), data)).toBe(true);
    src.write(0, new Uint8Array(len));
    postSend(a, { opcode: SendOp.RDMA_READ, sges: [src.sge(0, len)], remoteAddr: dst.iova + 50n, rkey: dst.mr.rkey });
    await settle();
    expect(same(src.read(0, len), data)).toBe(true);
    expect(r.host.sends.map((s) => s.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS, WcStatus.SUCCESS]);
  });

  it('consumes receive WQEs in order and completes sends in posting order', async () => {
    const [a, b] = pair();
    const src = mr(PAGE, ALL);
    const dst = mr(PAGE, ALL);
    src.write(0, pattern(300, 3));
    const recvTokens = [postRecv(b, [dst.sge(0, 100)]), postRecv(b, [dst.sge(100, 100)]), postRecv(b, [dst.sge(200, 100)])];
    const sendTokens = [
      postSend(a, { sges: [src.sge(0, 100)] }),
      postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, 8)], remoteAddr: dst.iova + 1000n, rkey: dst.mr.rkey }),
      postSend(a, { sges: [src.sge(100, 100)] }),
      postSend(a, { opcode: SendOp.RDMA_READ, sges: [src.sge(1000, 8)], remoteAddr: dst.iova, rkey: dst.mr.rkey }),
      postSend(a, { sges: [src.sge(200, 100)], flags: 0 }),
    ];
    await settle();
    expect(r.host.recvs.map((d) => d.token)).toEqual(recvTokens);
    expect(r.host.sends.map((d) => d.token)).toEqual(sendTokens);
    expect(dst.read(0, 300)).toEqual(pattern(300, 3));
  });

  it('a receive buffer too small gives the receiver LOC_LEN_ERR and the sender REM_INV_REQ_ERR; both go to ERR and flush', async () => {
    const [a, b] = pair();
    const buf = mr(PAGE, LOCAL);
    const small = postRecv(b, [buf.sge(0, 10)]);
    const later = postRecv(b, [buf.sge(100, 100)]);
    const s1 = postSend(a, { sges: [buf.sge(1000, 11)] });
    const s2 = postSend(a, { sges: [buf.sge(1000, 1)] });
    await settle();
    expect(r.host.recvsOf(b).map(summary)).toEqual([
      { token: small, status: WcStatus.LOC_LEN_ERR, opcode: WcOpcode.RECV },
      { token: later, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.RECV },
    ]);
    expect(r.host.sendsOf(a).map(summary)).toEqual([
      { token: s1, status: WcStatus.REM_INV_REQ_ERR, opcode: WcOpcode.SEND },
      { token: s2, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.SEND },
    ]);
    expect(r.host.failed.map((f) => f.qpn).sort()).toEqual([a, b].sort());
  });

  it('remote access errors (bad rkey, missing MR right, QP without the remote right, range, other PD) give REM_ACCESS_ERR and fail both QPs', async () => {
    const ro = mr(PAGE, Access.REMOTE_READ);
    const rw = mr(PAGE, ALL);
    const otherPd = mr(PAGE, ALL, { pdn: 2 });
    const local = mr(PAGE, LOCAL);
    const cases: { over: Partial<SendWr>; qpAccess?: number }[] = [
      { over: { opcode: SendOp.RDMA_WRITE, sges: [local.sge(0, 8)], remoteAddr: rw.iova, rkey: rw.mr.rkey ^ 0x10 } },
      { over: { opcode: SendOp.RDMA_WRITE, sges: [local.sge(0, 8)], remoteAddr: ro.iova, rkey: ro.mr.rkey } },
      { over: { opcode: SendOp.RDMA_WRITE, sges: [local.sge(0, 8)], remoteAddr: rw.iova, rkey: rw.mr.rkey }, qpAccess: Access.REMOTE_READ },
      { over: { opcode: SendOp.RDMA_READ, sges: [local.sge(0, 8)], remoteAddr: rw.iova, rkey: rw.mr.rkey }, qpAccess: Access.REMOTE_WRITE },
      { over: { opcode: SendOp.RDMA_READ, sges: [local.sge(0, 16)], remoteAddr: rw.iova + 4090n, rkey: rw.mr.rkey } },
      { over: { opcode: SendOp.RDMA_READ, sges: [local.sge(0, 8)], remoteAddr: otherPd.iova, rkey: otherPd.mr.rkey } },
      { over: { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(0, 8)], remoteAddr: ro.iova + 0xddn, rkey: ro.mr.rkey } },
      { over: { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(0, 8)], remoteAddr: rw.iova + 0xddn, rkey: rw.mr.rkey }, qpAccess: Access.REMOTE_WRITE },
    ];
    const before = rw.read(0, PAGE);
    for (const c of cases) {
      r.host.sends.length = 0;
      r.host.failed.length = 0;
      const [a, b] = pair(QpType.RC, {}, c.qpAccess !== undefined ? { accessFlags: c.qpAccess } : {});
      const t = postSend(a, c.over);
      const behind = postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [local.sge(0, 8)], remoteAddr: rw.iova, rkey: rw.mr.rkey });
      await settle();
      expect(r.host.sends.map(summary)).toEqual([
        { token: t, status: WcStatus.REM_ACCESS_ERR, opcode: c.over.opcode === SendOp.RDMA_WRITE ? WcOpcode.RDMA_WRITE : c.over.opcode === SendOp.RDMA_READ ? WcOpcode.RDMA_READ : WcOpcode.FETCH_ADD },
        { token: behind, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.RDMA_WRITE },
      ]);
      expect(r.host.failed.map((f) => f.qpn).sort()).toEqual([a, b].sort());
    }
    expect(rw.read(0, PAGE)).toEqual(before);
  });

  it('a READ or atomic to a responder with max_dest_rd_atomic 0 is REM_INV_REQ_ERR', async () => {
    const [a] = pair(QpType.RC, {}, { maxDestRdAtomic: 0 });
    const rw = mr(PAGE, ALL);
    postSend(a, { opcode: SendOp.RDMA_READ, sges: [rw.sge(0, 8)], remoteAddr: rw.iova, rkey: rw.mr.rkey });
    await settle();
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.REM_INV_REQ_ERR });
  });

  it('local errors fail only the sender: bad lkey is LOC_PROT_ERR, a READ into memory without LOCAL_WRITE is LOC_PROT_ERR', async () => {
    const [a, b] = pair();
    const buf = mr(PAGE, LOCAL);
    const ro = mr(PAGE, Access.REMOTE_READ);
    const rw = mr(PAGE, ALL);
    const rt = postRecv(b, [buf.sge(0, 100)]);
    postSend(a, { sges: [{ ...buf.sge(0, 10), lkey: 0x7777 }] });
    await settle();
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.LOC_PROT_ERR, opcode: WcOpcode.SEND });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([a]);
    expect(r.host.recvs).toEqual([]);

    const [c] = pair();
    postSend(c, { opcode: SendOp.RDMA_READ, sges: [ro.sge(0, 8)], remoteAddr: rw.iova, rkey: rw.mr.rkey });
    await settle();
    expect(r.host.sendsOf(c)[0]).toMatchObject({ status: WcStatus.LOC_PROT_ERR, opcode: WcOpcode.RDMA_READ });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([a, c]);
    // b's receive is still posted and untouched; RESET drops it without a completion.
    r.engine.modifyQp(b, attrs({ state: QpState.RESET }), 1);
    r.host.outstandingRecvs.delete(`${b}/${rt}`);
  });

  it('a receive SGE without LOCAL_WRITE gives the receiver LOC_PROT_ERR and the sender REM_OP_ERR', async () => {
    const [a, b] = pair();
    const ro = mr(PAGE, Access.REMOTE_READ);
    const src = mr(PAGE, LOCAL);
    postRecv(b, [ro.sge(0, 100)]);
    postSend(a, { sges: [src.sge(0, 10)] });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.LOC_PROT_ERR });
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.REM_OP_ERR });
    expect(r.host.failed.map((f) => f.qpn).sort()).toEqual([a, b].sort());
  });

  it('RNR: a SEND with no receive posted retries after min_rnr_timer and completes once a receive is posted; WRs behind it wait', async () => {
    const [a, b] = pair(QpType.RC, { rnrRetry: 7, minRnrTimer: 1 });
    const buf = mr(PAGE, ALL);
    buf.write(0, pattern(32, 8));
    const first = postSend(a, { sges: [buf.sge(0, 16)] });
    const second = postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [buf.sge(0, 4)], remoteAddr: buf.iova + 2000n, rkey: buf.mr.rkey });
    await sleep(30);
    expect(r.host.sends).toEqual([]);
    expect(buf.read(2000, 4)).toEqual(new Uint8Array(4));
    postRecv(b, [buf.sge(1000, 16)]);
    await waitFor(() => r.host.sends.length === 2);
    expect(r.host.sends.map(summary)).toEqual([
      { token: first, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND },
      { token: second, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE },
    ]);
    expect(buf.read(1000, 16)).toEqual(pattern(16, 8));
    expect(r.host.failed).toEqual([]);
  });

  it('RNR retries exhausted: RNR_RETRY_EXC_ERR after rnr_retry waits of the responder’s min_rnr_timer; the sender goes to ERR and flushes', async () => {
    // min_rnr_timer 18 = 5.12 ms; 3 retries.
    const [a, b] = pair(QpType.RC, { rnrRetry: 3 }, { minRnrTimer: 18 });
    const t0 = performance.now();
    const s1 = postSend(a, {});
    const s2 = postSend(a, {});
    await waitFor(() => r.host.sends.length === 2);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(3 * 4);
    expect(r.host.sends.map(summary)).toEqual([
      { token: s1, status: WcStatus.RNR_RETRY_EXC_ERR, opcode: WcOpcode.SEND },
      { token: s2, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.SEND },
    ]);
    expect(r.host.failed.map((f) => f.qpn)).toEqual([a]);
    expect(b).not.toBe(a);
  });

  it('rnr_retry 0 fails at the first RNR NAK without waiting', async () => {
    const [a] = pair(QpType.RC, { rnrRetry: 0, minRnrTimer: 0 });
    postSend(a, {});
    await settle();
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.RNR_RETRY_EXC_ERR });
    expect(r.engine.waiting).toBe(0);
  });

  it('an RNR wait on one QP does not hold up another QP', async () => {
    const [a] = pair(QpType.RC, { rnrRetry: 7, minRnrTimer: 0 });
    const [c, d] = pair();
    postSend(a, {});
    postRecv(d, []);
    const t = postSend(c, {});
    await settle();
    expect(r.host.sends.map((s) => s.token)).toEqual([t]);
  });

  it('to a missing, unready, unconnected or foreign destination, RC retries retry_cnt times and fails with RETRY_EXC_ERR', async () => {
    const lonely = createQp(QpType.RC);
    bringUp(lonely, { destQpn: 0xabcd, av: av(), retryCnt: 2, timeout: 1 });
    const notReady = createQp(QpType.RC);
    const target = createQp(QpType.RC);
    bringUp(notReady, { destQpn: target, av: av(), retryCnt: 1 });
    bringUp(target, { destQpn: notReady, av: av() }, QpState.INIT);
    const [x] = pair();
    const third = createQp(QpType.RC);
    bringUp(third, { destQpn: x, av: av() }); // x is connected to someone else
    const foreign = createQp(QpType.RC);
    const foreignPeer = createQp(QpType.RC);
    bringUp(foreign, { destQpn: foreignPeer, av: av(FOREIGN_GID) });
    bringUp(foreignPeer, { destQpn: foreign, av: av() });
    const uc = createQp(QpType.UC);
    const rcToUc = createQp(QpType.RC);
    bringUp(rcToUc, { destQpn: uc, av: av() });
    bringUp(uc, { destQpn: rcToUc, av: av() });
    const senders = [lonely, notReady, third, foreign, rcToUc];
    for (const q of senders) postSend(q, {});
    await waitFor(() => r.host.sends.length === senders.length);
    for (const q of senders) expect(r.host.sendsOf(q)[0]).toMatchObject({ status: WcStatus.RETRY_EXC_ERR, opcode: WcOpcode.SEND });
    expect(r.host.failed.map((f) => f.qpn).sort()).toEqual([...senders].sort());
  });

  it('with timeout 0 (infinite) an unanswered WR waits until the QP is moved to ERR', async () => {
    const a = createQp(QpType.RC);
    bringUp(a, { destQpn: 0x5555, av: av(), timeout: 0, retryCnt: 7 });
    const t = postSend(a, {});
    await sleep(20);
    expect(r.host.sends).toEqual([]);
    expect(r.engine.waiting).toBe(1);
    r.engine.modifyQp(a, attrs({ state: QpState.ERR }), 1);
    expect(r.host.sends).toEqual([expect.objectContaining({ token: t, status: WcStatus.WR_FLUSH_ERR })]);
    expect(r.engine.waiting).toBe(0);
  });

  it('a destination that becomes ready during the retries receives the message', async () => {
    const a = createQp(QpType.RC);
    const b = createQp(QpType.RC);
    // timeout 12 = 16.8 ms, 7 retries.
    bringUp(a, { destQpn: b, av: av(), retryCnt: 7, timeout: 12 });
    bringUp(b, { destQpn: a, av: av() }, QpState.INIT);
    const rt = postRecv(b, []); // posting receives in INIT is allowed
    const st = postSend(a, {});
    await sleep(5);
    bringUp(b, { destQpn: a, av: av() });
    await waitFor(() => r.host.sends.length === 1);
    expect(r.host.sends[0]).toMatchObject({ token: st, status: WcStatus.SUCCESS });
    expect(r.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS });
  });
});

describe('QP states', () => {
  it('entering ERR flushes every outstanding WR at once, in order, and later posts flush immediately', async () => {
    const [a, b] = pair(QpType.RC, { rnrRetry: 7, minRnrTimer: 0 });
    const buf = mr(PAGE, LOCAL);
    const s = [postSend(a, {}), postSend(a, { sges: [buf.sge(0, 8)] }), postSend(a, {})];
    const rv = [postRecv(a, []), postRecv(a, [buf.sge(0, 8)])];
    await settle(); // the first send is now in an RNR wait
    expect(r.host.sends).toEqual([]);
    r.engine.modifyQp(a, attrs({ state: QpState.ERR }), 1);
    expect(r.host.sendsOf(a).map(summary)).toEqual(s.map((token) => ({ token, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.SEND })));
    expect(r.host.recvsOf(a).map(summary)).toEqual(rv.map((token) => ({ token, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.RECV })));
    const late = postSend(a, { opcode: SendOp.RDMA_READ, sges: [buf.sge(0, 8)] });
    const lateRecv = postRecv(a, []);
    expect(r.host.sends.at(-1)).toMatchObject({ token: late, status: WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.RDMA_READ });
    expect(r.host.recvs.at(-1)).toMatchObject({ token: lateRecv, status: WcStatus.WR_FLUSH_ERR });
    // The engine did not report a failure of its own: the device moved the QP.
    expect(r.host.failed).toEqual([]);
    await sleep(5);
    expect(r.host.sends).toHaveLength(4);
    expect(b).toBeGreaterThan(0);
    expect(r.engine.waiting).toBe(0);
  });

  it('RESET and destroy drop outstanding WRs without completions, also one parked in an RNR wait', async () => {
    const [a] = pair(QpType.RC, { rnrRetry: 7, minRnrTimer: 1 });
    postSend(a, {});
    postSend(a, {});
    postRecv(a, []);
    await settle();
    r.engine.modifyQp(a, attrs({ state: QpState.RESET }), 1);
    const [c] = pair(QpType.RC, { rnrRetry: 7, minRnrTimer: 1 });
    postSend(c, {});
    postRecv(c, []);
    await settle();
    r.engine.destroyQp(c);
    await sleep(20);
    expect(r.host.sends).toEqual([]);
    expect(r.host.recvs).toEqual([]);
    expect(r.engine.waiting).toBe(0);
    // The device returned those buffers itself.
    r.host.outstandingSends.clear();
    r.host.outstandingRecvs.clear();
  });

  it('a send posted outside RTS or a receive posted in RESET completes with LOC_QP_OP_ERR and moves the QP to ERR', async () => {
    const a = createQp(QpType.RC);
    bringUp(a, { destQpn: 0x99, av: av() }, QpState.RTR);
    const s = postSend(a, {});
    await settle();
    expect(r.host.sends[0]).toMatchObject({ token: s, status: WcStatus.LOC_QP_OP_ERR });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([a]);
    const b = createQp(QpType.UD);
    const early = postRecv(b, []);
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ token: early, status: WcStatus.LOC_QP_OP_ERR });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([a, b]);
  });
});

describe('UC', () => {
  it('SEND, RDMA WRITE and RDMA WRITE_WITH_IMM work between connected UC QPs', async () => {
    const [a, b] = pair(QpType.UC);
    const src = mr(PAGE, LOCAL);
    const dst = mr(2 * PAGE, ALL);
    src.write(0, pattern(500, 2));
    postRecv(b, [dst.sge(0, 500)]);
    postRecv(b, []);
    postSend(a, { sges: [src.sge(0, 500)] });
    postSend(a, { opcode: SendOp.RDMA_WRITE_WITH_IMM, imm: 5, sges: [src.sge(0, 300)], remoteAddr: dst.iova + 4000n, rkey: dst.mr.rkey });
    postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, 200)], remoteAddr: dst.iova + 6000n, rkey: dst.mr.rkey });
    await settle();
    expect(dst.read(0, 500)).toEqual(pattern(500, 2));
    expect(dst.read(4000, 300)).toEqual(pattern(300, 2));
    expect(dst.read(6000, 200)).toEqual(pattern(200, 2));
    expect(r.host.recvs.map((d) => [d.opcode, d.byteLen])).toEqual([
      [WcOpcode.RECV, 500],
      [WcOpcode.RECV_RDMA_WITH_IMM, 300],
    ]);
    expect(r.host.sends.map((d) => [d.status, d.opcode])).toEqual([
      [WcStatus.SUCCESS, WcOpcode.SEND],
      [WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
      [WcStatus.SUCCESS, WcOpcode.RDMA_WRITE],
    ]);
  });

  it('without a receive WQE, to a missing QP, or on a remote access error the message is dropped and the sender still succeeds', async () => {
    const [a, b] = pair(QpType.UC);
    const dst = mr(PAGE, LOCAL | Access.REMOTE_READ);
    const src = mr(PAGE, LOCAL);
    src.write(0, pattern(64));
    postSend(a, { sges: [src.sge(0, 64)] });
    postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, 64)], remoteAddr: dst.iova, rkey: dst.mr.rkey });
    postSend(a, { opcode: SendOp.RDMA_WRITE_WITH_IMM, sges: [src.sge(0, 64)], remoteAddr: dst.iova, rkey: dst.mr.rkey });
    const lonely = createQp(QpType.UC);
    bringUp(lonely, { destQpn: 0x4444, av: av() });
    postSend(lonely, { sges: [src.sge(0, 64)] });
    await settle();
    expect(r.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS, WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(dst.read(0, 64)).toEqual(new Uint8Array(64));
    expect(r.host.failed).toEqual([]);
    // A receive posted now does not get the dropped SEND.
    postRecv(b, [dst.sge(0, 64)]);
    await settle();
    expect(r.host.recvs).toEqual([]);
    r.engine.destroyQp(b);
    r.host.outstandingRecvs.clear();
  });

  it('a receive buffer too small fails the receiver with LOC_LEN_ERR while the UC sender succeeds', async () => {
    const [a, b] = pair(QpType.UC);
    const buf = mr(PAGE, LOCAL);
    postRecv(b, [buf.sge(0, 4)]);
    postSend(a, { sges: [buf.sge(100, 5)] });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.LOC_LEN_ERR });
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([b]);
  });
});

describe('UD', () => {
  function udQp(qkey = 0x1111): number {
    const q = createQp(QpType.UD);
    bringUp(q, { qkey });
    return q;
  }

  function ud(dest: number, qkey = 0x1111, dgid: Uint8Array = GID_V6, sgidIndex = 1): SendWr['ud'] {
    return { av: { ...av(dgid, sgidIndex), hopLimit: 7, trafficClass: 0x20, flowLabel: 0x12345 }, remoteQpn: dest, remoteQkey: qkey };
  }

  it('SEND puts a 40-byte IPv6 GRH before the payload; byte_len counts it; the GRH flag and source QP are set', async () => {
    const a = udQp();
    const b = udQp();
    const buf = mr(2 * PAGE, LOCAL);
    buf.write(0, pattern(1000, 3));
    // The receive buffer crosses a page boundary right inside the GRH.
    postRecv(b, [buf.sge(PAGE - 0x123 - 20, 1040)]);
    postSend(a, { opcode: SendOp.SEND_WITH_IMM, imm: 77, sges: [buf.sge(0, 1000)], ud: ud(b) });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 1040, flags: WcFlag.GRH | WcFlag.WITH_IMM, imm: 77, srcQp: a });
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 1000 });
    const grh = buf.read(PAGE - 0x123 - 20, 40);
    const dv = new DataView(grh.buffer);
    expect(dv.getUint32(0) >>> 28).toBe(6);
    expect((dv.getUint32(0) >>> 20) & 0xff).toBe(0x20);
    expect(dv.getUint32(0) & 0xfffff).toBe(0x12345);
    expect(dv.getUint16(4)).toBe(8 + 12 + 8 + 4 + 1000 + 4); // UDP, BTH, DETH, ImmDt, payload, ICRC
    expect(grh[6]).toBe(17);
    expect(grh[7]).toBe(7);
    expect(grh.subarray(8, 24)).toEqual(GID_V6);
    expect(grh.subarray(24, 40)).toEqual(GID_V6);
    expect(buf.read(PAGE - 0x123 + 20, 1000)).toEqual(pattern(1000, 3));
  });

  it('for IPv4-mapped GIDs the GRH is 20 zero bytes and an IPv4 header with a valid checksum', async () => {
    const a = udQp();
    const b = udQp();
    const buf = mr(PAGE, LOCAL);
    postRecv(b, [buf.sge(0, 100)]);
    postSend(a, { sges: [buf.sge(2000, 10)], ud: ud(b, 0x1111, GID_V4, 0) });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 50, flags: WcFlag.GRH });
    const grh = buf.read(0, 40);
    expect(grh.subarray(0, 20)).toEqual(new Uint8Array(20));
    const ip = grh.subarray(20);
    expect(ip[0]).toBe(0x45);
    expect(ip[9]).toBe(17);
    expect(ip[8]).toBe(7);
    expect((ip[2]! << 8) | ip[3]!).toBe(20 + 8 + 12 + 8 + 12 + 4); // 10 bytes padded to 12
    expect(Array.from(ip.subarray(12, 16))).toEqual([10, 0, 0, 1]);
    expect(Array.from(ip.subarray(16, 20))).toEqual([10, 0, 0, 1]);
    let sum = 0;
    for (let i = 0; i < 20; i += 2) sum += (ip[i]! << 8) | ip[i + 1]!;
    while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
    expect(sum).toBe(0xffff);
  });

  it('with the IB layout negotiated, an IPv4-mapped GID gets an IB GRH: IPv6 format, next header 0x1B, no UDP in the length', async () => {
    r.host.grhLayout = 'ib';
    const a = udQp();
    const b = udQp();
    const buf = mr(PAGE, LOCAL);
    postRecv(b, [buf.sge(0, 100)]);
    postSend(a, { sges: [buf.sge(2000, 10)], ud: ud(b, 0x1111, GID_V4, 0) });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 50, flags: WcFlag.GRH });
    const grh = buf.read(0, 40);
    const dv = new DataView(grh.buffer);
    expect(dv.getUint32(0)).toBe(((6 << 28) | (0x20 << 20) | 0x12345) >>> 0);
    expect(dv.getUint16(4)).toBe(12 + 8 + 12 + 4); // BTH, DETH, 10 bytes padded to 12, ICRC
    expect(grh[6]).toBe(0x1b);
    expect(grh[7]).toBe(7);
    expect(grh.subarray(8, 24)).toEqual(GID_V4);
    expect(grh.subarray(24, 40)).toEqual(GID_V4);
  });

  it('is dropped silently on a Q_Key mismatch, a foreign GID, an unknown QPN, a non-UD QP, or no receive; a high-bit Q_Key uses the QP’s own', async () => {
    const a = udQp(0x2222);
    const b = udQp(0x2222);
    const [rc] = pair();
    const buf = mr(PAGE, LOCAL);
    const sends = [
      { ud: ud(b, 0x1111) },
      { ud: ud(b, 0x2222, FOREIGN_GID) },
      { ud: ud(0x7777, 0x2222) },
      { ud: ud(rc, 0x2222) },
    ];
    const rt = postRecv(b, [buf.sge(0, 100)]);
    for (const s of sends) postSend(a, s);
    await settle();
    expect(r.host.sends.map((d) => d.status)).toEqual(sends.map(() => WcStatus.SUCCESS));
    expect(r.host.recvs).toEqual([]);
    postSend(a, { ud: ud(b, 0x8000_0000) });
    await settle();
    expect(r.host.recvs).toEqual([expect.objectContaining({ token: rt, status: WcStatus.SUCCESS, byteLen: 40 })]);
    postSend(a, { ud: ud(b, 0x2222) });
    await settle();
    expect(r.host.sends.at(-1)).toMatchObject({ status: WcStatus.SUCCESS });
    expect(r.host.failed).toEqual([]);
  });

  it('a UD payload above 4096 bytes is LOC_LEN_ERR; a buffer too small for GRH + payload fails the receiver', async () => {
    const a = udQp();
    const b = udQp();
    const buf = mr(3 * PAGE, LOCAL);
    postRecv(b, [buf.sge(0, 1000)]);
    postSend(a, { sges: [buf.sge(0, 961)], ud: ud(b) });
    await settle();
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.LOC_LEN_ERR });
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([b]);
    postSend(a, { sges: [buf.sge(0, 4097)], ud: ud(b) });
    await settle();
    expect(r.host.sends[1]).toMatchObject({ status: WcStatus.LOC_LEN_ERR });
    expect(r.host.failed.map((f) => f.qpn)).toEqual([b, a]);
  });
});

describe('engine', () => {
  it('allocates QPNs from FIRST_QPN upward, skipping those in use, and honours a wanted QPN', () => {
    const cfg = { type: QpType.RC, pdn: PD, maxSendWr: 4, maxRecvWr: 4 };
    const taken = new Set([FIRST_QPN + 1]);
    expect(r.engine.createQp(cfg, null, (n) => taken.has(n))).toBe(FIRST_QPN);
    expect(r.engine.createQp(cfg, null, (n) => taken.has(n))).toBe(FIRST_QPN + 2);
    expect(r.engine.createQp(cfg, 0x1234, () => false)).toBe(0x1234);
    expect(r.engine.createQp(cfg, 0x1234, () => false)).toBeNull();
    expect(r.engine.createQp(cfg, 1, () => false)).toBeNull();
    expect(r.engine.createQp(cfg, 0x100_0000, () => false)).toBeNull();
    expect(r.engine.createQp({ ...cfg, type: 1 as QpType }, null, () => false)).toBeNull();
    r.engine.destroyQp(FIRST_QPN);
    // Numbers are not reused at once: a stale peer does not reach a new QP.
    expect(r.engine.createQp(cfg, null, () => false)).toBe(FIRST_QPN + 3);
  });

  it('while suspended it queues work, touches no guest memory and reports nothing until resume', async () => {
    const [a, b] = pair();
    const src = mr(PAGE, LOCAL);
    const dst = mr(PAGE, ALL);
    src.write(0, pattern(64, 5));
    r.engine.suspend();
    postRecv(b, [dst.sge(0, 64)]);
    postSend(a, { sges: [src.sge(0, 64)] });
    postSend(a, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, 64)], remoteAddr: dst.iova + 100n, rkey: dst.mr.rkey });
    r.engine.modifyQp(a, attrs({ state: QpState.RTS, destQpn: b, av: av() }), 0);
    await sleep(10);
    expect(r.host.sends).toEqual([]);
    expect(r.host.recvs).toEqual([]);
    expect(dst.read(0, 200)).toEqual(new Uint8Array(200));
    r.engine.resume();
    await settle();
    expect(r.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(dst.read(0, 64)).toEqual(pattern(64, 5));
    expect(dst.read(100, 64)).toEqual(pattern(64, 5));
  });

  it('an ERR flush asked for while suspended happens at resume', async () => {
    const [a] = pair();
    r.engine.suspend();
    const s = postSend(a, {});
    r.engine.modifyQp(a, attrs({ state: QpState.ERR }), 1);
    await sleep(5);
    expect(r.host.sends).toEqual([]);
    r.engine.resume();
    expect(r.host.sends).toEqual([expect.objectContaining({ token: s, status: WcStatus.WR_FLUSH_ERR })]);
  });

  it('an RNR wait pauses while suspended and resumes with the time it had left', async () => {
    // min_rnr_timer 22 = 20.48 ms.
    const [a, b] = pair(QpType.RC, { rnrRetry: 7 }, { minRnrTimer: 22 });
    postSend(a, {});
    await settle();
    r.engine.suspend();
    postRecv(b, []);
    await sleep(40);
    expect(r.host.sends).toEqual([]);
    const t0 = performance.now();
    r.engine.resume();
    await waitFor(() => r.host.sends.length === 1);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(5);
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS });
  });

  it('saves mid-RNR and a new engine loaded from the state continues identically: same QPNs, tokens, order and data', async () => {
    const [a, b] = pair(QpType.RC, { rnrRetry: 7 }, { minRnrTimer: 20 });
    const src = mr(PAGE, LOCAL);
    const dst = mr(PAGE, ALL);
    src.write(0, pattern(100, 6));
    const s1 = postSend(a, { sges: [src.sge(0, 100)], wrId: 0xfedc_ba98_7654_3210n });
    const s2 = postSend(a, { opcode: SendOp.RDMA_WRITE_WITH_IMM, imm: 9, inline: pattern(8, 7), flags: SendFlag.INLINE, remoteAddr: dst.iova + 500n, rkey: dst.mr.rkey });
    const extraRecv = postRecv(a, [dst.sge(2000, 10)]);
    await settle();
    r.engine.suspend();
    const saved = r.engine.saveState();
    const json = JSON.parse(new TextDecoder().decode(saved)) as { version: number; qps: { qpn: number; wait: { kind: string; remainingMs: number } | null; sq: unknown[] }[] };
    expect(json.version).toBe(1);
    const qa = json.qps.find((q) => q.qpn === a)!;
    expect(qa.wait?.kind).toBe('rnr');
    expect(qa.wait!.remainingMs).toBeGreaterThan(0);
    expect(qa.wait!.remainingMs).toBeLessThanOrEqual(10.24);
    expect(qa.sq).toHaveLength(2);
    // The source goes away without completing anything.
    r.engine.close();
    const fresh = new LoopbackEngine();
    fresh.attach(r.host);
    fresh.suspend();
    fresh.loadState(saved);
    r.engine = fresh;
    const rt = postRecv(b, [dst.sge(0, 100)]);
    const rt2 = postRecv(b, []);
    await sleep(20);
    expect(r.host.sends).toEqual([]);
    fresh.resume();
    await waitFor(() => r.host.sends.length === 2);
    expect(r.host.sends.map(summary)).toEqual([
      { token: s1, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND },
      { token: s2, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE },
    ]);
    expect(r.host.recvs.map((d) => [d.token, d.opcode])).toEqual([
      [rt, WcOpcode.RECV],
      [rt2, WcOpcode.RECV_RDMA_WITH_IMM],
    ]);
    expect(dst.read(0, 100)).toEqual(pattern(100, 6));
    expect(dst.read(500, 8)).toEqual(pattern(8, 7));
    // The QPN allocator continued where it was.
    expect(fresh.createQp({ type: QpType.UD, pdn: PD, maxSendWr: 1, maxRecvWr: 1 }, null, () => false)).toBe(b + 1);
    // Saving again describes the same QPs.
    const again = JSON.parse(new TextDecoder().decode(fresh.saveState())) as { qps: { qpn: number; rq: { token: number }[] }[] };
    expect(again.qps.find((q) => q.qpn === a)!.rq.map((e) => e.token)).toEqual([extraRecv]);
    r.host.outstandingRecvs.delete(`${a}/${extraRecv}`);
  });

  it('a state load refuses garbage and leaves the engine as it was', async () => {
    const [a, b] = pair();
    postRecv(b, []);
    const good = JSON.parse(new TextDecoder().decode(r.engine.saveState())) as Record<string, unknown> & { qps: Record<string, unknown>[] };
    const q0 = good.qps[0]!;
    const enc = (x: unknown): Uint8Array => new TextEncoder().encode(JSON.stringify(x));
    const bad: Uint8Array[] = [
      new Uint8Array([0xff, 0xfe]),
      enc(null),
      enc({ ...good, format: 'other' }),
      enc({ ...good, version: 2 }),
      enc({ ...good, nextQpn: 0 }),
      enc({ ...good, qps: [q0, q0] }),
      enc({ ...good, qps: [{ ...q0, type: 9 }] }),
      enc({ ...good, qps: [{ ...q0, attrs: { ...(q0.attrs as object), state: 9 } }] }),
      enc({ ...good, qps: [{ ...q0, wait: { kind: 'rnr', remainingMs: 5 } }] }),
      enc({ ...good, qps: [{ ...q0, sq: [{ token: 1, postError: null, wr: { opcode: 2 } }] }] }),
      enc({ ...good, qps: [{ ...q0, rq: [{ token: 1, postError: null, wr: { wrId: '1', sges: [['1', 5, 1]], length: 6 } }] }] }),
      enc({ ...good, qps: [{ ...q0, rq: [{ token: 1, postError: 99, wr: { wrId: '1', sges: [], length: 0 } }] }] }),
    ];
    for (const b2 of bad) expect(() => r.engine.loadState(b2)).toThrow(/loopback engine state/);
    postSend(a, {});
    await settle();
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS });
    expect(r.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS });
  });

  it('without guest memory nothing runs; work waits for the next kick', async () => {
    const [a, b] = pair();
    postRecv(b, []);
    r.host.memoryAvailable = false;
    postSend(a, {});
    await settle();
    expect(r.host.sends).toEqual([]);
    r.host.memoryAvailable = true;
    r.engine.suspend();
    r.engine.resume();
    await settle();
    expect(r.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS });
  });
});
