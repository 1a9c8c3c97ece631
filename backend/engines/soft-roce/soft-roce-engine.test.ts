import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestRam } from '../../../virtio/frontend/guest-ram.js';
import { GuestMemory, MappedRegion } from '../../../virtio/memory/guest-memory.js';
import { Logger } from '../../../virtio/log.js';
import { Access, QpState, QpType, SendFlag, SendOp, WcFlag, WcOpcode, WcStatus } from '../../abi/constants.js';
import { GuestMemoryAccess } from '../../device/memory-access.js';
import { MrTable } from '../../device/mr-table.js';
import type { Completion, EngineHost, MemoryAccess, QpAttributes, SendWr, Sge } from '../../engine/engine.js';
import { checkIcrc } from './icrc.js';
import { SoftRoceEngine, gidToAddress, ipv4Gid, psnAdd, psnDiff } from './soft-roce-engine.js';
import { udpPeer } from './udp-transport.js';

const RAM_GPA = 0x10_0000;
const RAM_SIZE = 16 << 20;
const PAGE = 4096;
const PD = 1;
const ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ;

interface Done extends Completion {
  qpn: number;
  token: number;
}

class TestHost implements EngineHost {
  readonly log = new Logger('error');
  readonly sends: Done[] = [];
  readonly recvs: Done[] = [];
  readonly failed: { qpn: number; reason: string }[] = [];
  readonly violations: string[] = [];
  readonly outSends = new Set<string>();
  readonly outRecvs = new Set<string>();
  constructor(
    readonly memory: MemoryAccess,
    private readonly gids: Uint8Array[],
  ) {}
  sendDone(qpn: number, token: number, c: Completion): void {
    if (!this.outSends.delete(`${qpn}/${token}`)) this.violations.push(`send ${qpn}/${token} not outstanding`);
    this.sends.push({ qpn, token, ...c });
  }
  recvDone(qpn: number, token: number, c: Completion): void {
    if (!this.outRecvs.delete(`${qpn}/${token}`)) this.violations.push(`recv ${qpn}/${token} not outstanding`);
    this.recvs.push({ qpn, token, ...c });
  }
  qpFailed(qpn: number, reason: string): void {
    this.failed.push({ qpn, reason });
  }
  gid(index: number): Uint8Array | null {
    return this.gids[index] ?? null;
  }
}

interface Side {
  ram: GuestRam;
  memory: GuestMemory;
  mrs: MrTable;
  host: TestHost;
  engine: SoftRoceEngine;
  gid: Uint8Array;
}

interface Buf {
  iova: bigint;
  lkey: number;
  rkey: number;
  write(off: number, b: Uint8Array): void;
  read(off: number, n: number): Uint8Array;
  sge(off: number, n: number): Sge;
}

const PORT = 20000 + Math.floor(Math.random() * 20000);
let a: Side;
let b: Side;
let token = 1;

function side(address: string): Side {
  const ram = new GuestRam(RAM_GPA, RAM_SIZE);
  const memory = new GuestMemory(8);
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  const mrs = new MrTable(64, memory, 1n << 30n);
  const gid = ipv4Gid(address);
  const host = new TestHost(new GuestMemoryAccess(mrs, memory), [gid]);
  const engine = new SoftRoceEngine({ address, port: PORT });
  engine.attach(host);
  return { ram, memory, mrs, host, engine, gid };
}

let iova = 0x7000_0000_0000n;
/** An MR over pages in reverse order (so page walks matter). */
function mr(s: Side, length: number, acc = ALL): Buf {
  const base = iova;
  iova += 0x1_0000_0000n;
  const n = Math.ceil(length / PAGE);
  const mem = s.ram.alloc((n + 1) * PAGE, PAGE);
  const pages = Array.from({ length: n }, (_, i) => mem + PAGE * (n - i));
  const list = s.ram.alloc(n * 8, 8);
  const dv = new DataView(s.ram.buffer, list - s.ram.gpa, n * 8);
  pages.forEach((p, i) => dv.setBigUint64(i * 8, BigInt(p), true));
  const rec = s.mrs.register(PD, acc, base, BigInt(length), BigInt(list), n);
  const each = (off: number, len: number, fn: (g: number, at: number, k: number) => void): void => {
    let at = 0;
    while (at < len) {
      const o = off + at;
      const g = pages[Math.floor(o / PAGE)]! + (o % PAGE);
      const k = Math.min(len - at, PAGE - (o % PAGE));
      fn(g, at, k);
      at += k;
    }
  };
  return {
    iova: base,
    lkey: rec.lkey,
    rkey: rec.rkey,
    write: (off, bytes) => each(off, bytes.length, (g, at, k) => s.ram.bytes(g, k).set(bytes.subarray(at, at + k))),
    read: (off, len) => {
      const out = new Uint8Array(len);
      each(off, len, (g, at, k) => out.set(s.ram.bytes(g, k), at));
      return out;
    },
    sge: (off, len) => ({ addr: base + BigInt(off), length: len, lkey: rec.lkey }),
  };
}

function pattern(len: number, seed: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = seed;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

function attrs(over: Partial<QpAttributes>): QpAttributes {
  return {
    state: QpState.RESET,
    pathMtu: 3, // 1024
    timeout: 14, // ~67 ms
    retryCnt: 3,
    rnrRetry: 7,
    minRnrTimer: 12, // 0.64 ms
    maxRdAtomic: 4,
    maxDestRdAtomic: 4,
    accessFlags: Access.REMOTE_WRITE | Access.REMOTE_READ,
    qkey: 0,
    rqPsn: 0,
    sqPsn: 0,
    destQpn: 0,
    pkeyIndex: 0,
    av: null,
    ...over,
  };
}

/** RC QPs on a and b connected to each other. */
function connect(overA: Partial<QpAttributes> = {}, overB: Partial<QpAttributes> = {}): [number, number] {
  const qa = a.engine.createQp({ type: QpType.RC, pdn: PD, maxSendWr: 64, maxRecvWr: 64 }, null, () => false)!;
  const qb = b.engine.createQp({ type: QpType.RC, pdn: PD, maxSendWr: 64, maxRecvWr: 64 }, null, () => false)!;
  const av = (gid: Uint8Array) => ({ dgid: gid.slice(), sgidIndex: 0, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 });
  const psnA = 0xfffff0; // wraps during multi-packet tests
  const psnB = 0x123456;
  for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) {
    a.engine.modifyQp(qa, attrs({ state, destQpn: qb, av: av(b.gid), sqPsn: psnA, rqPsn: psnB, ...overA }), 0);
    b.engine.modifyQp(qb, attrs({ state, destQpn: qa, av: av(a.gid), sqPsn: psnB, rqPsn: psnA, ...overB }), 0);
  }
  return [qa, qb];
}

function wr(over: Partial<SendWr>): SendWr {
  const sges = over.sges ?? [];
  return {
    wrId: 0n,
    opcode: SendOp.SEND,
    flags: SendFlag.SIGNALED,
    sges,
    inline: null,
    length: sges.reduce((n, s) => n + s.length, 0),
    imm: 0,
    remoteAddr: 0n,
    rkey: 0,
    compareAdd: 0n,
    swap: 0n,
    ud: null,
    ...over,
  };
}

function postSend(s: Side, qpn: number, over: Partial<SendWr>): number {
  const t = token++;
  s.host.outSends.add(`${qpn}/${t}`);
  s.engine.postSend(qpn, wr(over), t);
  return t;
}

function postRecv(s: Side, qpn: number, sges: Sge[]): number {
  const t = token++;
  s.host.outRecvs.add(`${qpn}/${t}`);
  s.engine.postRecv(qpn, { wrId: 0n, sges, length: sges.reduce((n, x) => n + x.length, 0) }, t);
  return t;
}

async function until(cond: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 2));
  }
}

beforeEach(() => {
  a = side('127.0.0.2');
  b = side('127.0.0.3');
});

afterEach(() => {
  for (const s of [a, b]) {
    s.engine.close();
    expect(s.host.violations).toEqual([]);
    s.memory.clear();
    s.ram.release();
  }
});

describe('helpers', () => {
  it('maps GIDs to addresses and does 24-bit PSN arithmetic', () => {
    expect(gidToAddress(ipv4Gid('127.0.0.3'))).toBe('127.0.0.3');
    expect(gidToAddress(new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]))).toBe('fd00:0:0:0:0:0:0:1');
    expect(psnAdd(0xffffff, 2)).toBe(1);
    expect(psnDiff(1, 0xffffff)).toBe(2);
    expect(psnDiff(0xffffff, 1)).toBe(-2);
  });
});

describe('SoftRoceEngine RC over UDP', () => {
  it('SEND with immediate: one packet, byte-exact, completions on both sides', async () => {
    const [qa, qb] = connect();
    const src = mr(a, 300);
    const dst = mr(b, 512);
    const data = pattern(300, 1);
    src.write(0, data);
    const rt = postRecv(b, qb, [dst.sge(0, 512)]);
    const st = postSend(a, qa, { opcode: SendOp.SEND_WITH_IMM, sges: [src.sge(0, 300)], imm: 0xdeadbeef });
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(a.host.sends[0]).toMatchObject({ token: st, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, byteLen: 300 });
    expect(b.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 300, flags: WcFlag.WITH_IMM, imm: 0xdeadbeef, srcQp: qa });
    expect(dst.read(0, 300)).toEqual(data);
  });

  it('multi-packet SEND: 10 KiB at MTU 1024 across scattered SGEs, PSNs wrapping', async () => {
    const [qa, qb] = connect();
    const len = 10 * 1024;
    const src = mr(a, len);
    const dst = mr(b, len + 100);
    const data = pattern(len, 2);
    src.write(0, data);
    postRecv(b, qb, [dst.sge(0, 3000), dst.sge(3000 + 50, len - 3000)]);
    postSend(a, qa, { sges: [src.sge(0, 5000), src.sge(5000, len - 5000)] });
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(b.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: len });
    const got = new Uint8Array(len);
    got.set(dst.read(0, 3000), 0);
    got.set(dst.read(3050, len - 3000), 3000);
    expect(got).toEqual(data);
    expect(a.engine.stats.packetsSent).toBeGreaterThanOrEqual(10);
  });

  it('several messages in flight complete in order', async () => {
    const [qa, qb] = connect();
    const src = mr(a, 8 * 2048);
    const dst = mr(b, 8 * 2048);
    const data = pattern(8 * 2048, 3);
    src.write(0, data);
    const rts = Array.from({ length: 8 }, (_, i) => postRecv(b, qb, [dst.sge(i * 2048, 2048)]));
    const sts = Array.from({ length: 8 }, (_, i) => postSend(a, qa, { sges: [src.sge(i * 2048, 2048 - i)] }));
    await until(() => a.host.sends.length === 8 && b.host.recvs.length === 8);
    expect(a.host.sends.map((d) => d.token)).toEqual(sts);
    expect(b.host.recvs.map((d) => d.token)).toEqual(rts);
    for (let i = 0; i < 8; i++) {
      expect(b.host.recvs[i]!.byteLen).toBe(2048 - i);
      expect(dst.read(i * 2048, 2048 - i)).toEqual(data.subarray(i * 2048, i * 2048 + 2048 - i));
    }
  });

  it('RDMA WRITE (multi-packet) and WRITE with immediate', async () => {
    const [qa, qb] = connect();
    const len = 5000;
    const src = mr(a, len);
    const dst = mr(b, 8192);
    const data = pattern(len, 4);
    src.write(0, data);
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, len)], remoteAddr: dst.iova + 100n, rkey: dst.rkey });
    await until(() => a.host.sends.length === 1);
    expect(a.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE, byteLen: len });
    expect(dst.read(100, len)).toEqual(data);
    expect(b.host.recvs).toEqual([]);

    const rt = postRecv(b, qb, []);
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE_WITH_IMM, sges: [src.sge(0, 1500)], remoteAddr: dst.iova + 6000n, rkey: dst.rkey, imm: 0x01020304 });
    await until(() => a.host.sends.length === 2 && b.host.recvs.length === 1);
    expect(b.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, byteLen: 1500, imm: 0x01020304 });
    expect(dst.read(6000, 1500)).toEqual(data.subarray(0, 1500));
  });

  it('RDMA READ (multi-packet) scatters the responses into local SGEs', async () => {
    const [qa] = connect();
    const len = 4500;
    const remote = mr(b, 8192);
    const local = mr(a, 8192);
    const data = pattern(len, 5);
    remote.write(10, data);
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [local.sge(0, 2000), local.sge(4000, len - 2000)], remoteAddr: remote.iova + 10n, rkey: remote.rkey });
    await until(() => a.host.sends.length === 1);
    expect(a.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_READ, byteLen: len });
    const got = new Uint8Array(len);
    got.set(local.read(0, 2000), 0);
    got.set(local.read(4000, len - 2000), 2000);
    expect(got).toEqual(data);
  });

  it('RNR NAK: the SEND waits until a receive is posted, then succeeds', async () => {
    const [qa, qb] = connect();
    const src = mr(a, 2500);
    const dst = mr(b, 4096);
    const data = pattern(2500, 6);
    src.write(0, data);
    postSend(a, qa, { sges: [src.sge(0, 2500)] });
    await until(() => b.engine.stats.rnrNaks >= 2);
    expect(a.host.sends).toEqual([]);
    postRecv(b, qb, [dst.sge(0, 4096)]);
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(b.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 2500 });
    expect(dst.read(0, 2500)).toEqual(data);
  });

  it('RNR retry exhausted -> RNR_RETRY_EXC_ERR and the QP fails', async () => {
    const [qa] = connect({ rnrRetry: 2 });
    const src = mr(a, 100);
    postSend(a, qa, { sges: [src.sge(0, 100)] });
    postSend(a, qa, { sges: [src.sge(0, 100)] });
    await until(() => a.host.sends.length === 2);
    expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.RNR_RETRY_EXC_ERR, WcStatus.WR_FLUSH_ERR]);
    expect(a.host.failed.map((f) => f.qpn)).toEqual([qa]);
    expect(b.engine.stats.rnrNaks).toBe(3);
  });

  it('bad rkey on WRITE and READ -> REM_ACCESS_ERR, both QPs to ERR, no bytes moved', async () => {
    for (const opcode of [SendOp.RDMA_WRITE, SendOp.RDMA_READ]) {
      a.host.sends.length = 0;
      a.host.failed.length = 0;
      b.host.failed.length = 0;
      const [qa, qb] = connect();
      const src = mr(a, 2048);
      src.write(0, pattern(2048, 7));
      const dst = mr(b, 2048);
      postRecv(b, qb, [dst.sge(0, 8)]);
      postSend(a, qa, { opcode: SendOp.SEND, sges: [src.sge(0, 8)] });
      postSend(a, qa, { opcode, sges: [src.sge(0, 2048)], remoteAddr: dst.iova, rkey: dst.rkey ^ 0x100 });
      postSend(a, qa, { opcode: SendOp.SEND, sges: [src.sge(0, 8)] });
      await until(() => a.host.sends.length === 3);
      expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.REM_ACCESS_ERR, WcStatus.WR_FLUSH_ERR]);
      expect(a.host.failed.map((f) => f.qpn)).toEqual([qa]);
      expect(b.host.failed.map((f) => f.qpn)).toEqual([qb]);
      expect(dst.read(8, 2040)).toEqual(new Uint8Array(2040));
    }
  });

  it('a corrupted packet is dropped and counted; retransmission delivers the message', async () => {
    const [qa, qb] = connect();
    const src = mr(a, 3000);
    const dst = mr(b, 4096);
    const data = pattern(3000, 8);
    src.write(0, data);
    let corrupted = 0;
    a.engine.outgoingHook = (bytes) => {
      // Flip a payload byte of the second packet the first time it goes out.
      if (corrupted === 0 && a.engine.stats.packetsSent === 1) {
        corrupted++;
        bytes[40]! ^= 0x55;
      }
      return true;
    };
    postRecv(b, qb, [dst.sge(0, 4096)]);
    postSend(a, qa, { sges: [src.sge(0, 3000)] });
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(corrupted).toBe(1);
    expect(b.engine.stats.badIcrc).toBe(1);
    expect(a.engine.stats.retransmits).toBeGreaterThanOrEqual(1);
    expect(b.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 3000 });
    expect(dst.read(0, 3000)).toEqual(data);
  });

  it('raw garbage datagrams are dropped and counted without disturbing the QP', async () => {
    const [qa, qb] = connect();
    const to = udpPeer('127.0.0.3', PORT);
    a.engine.transport.queue(to, new Uint8Array([1, 2, 3])); // shorter than a BTH
    const junk = pattern(64, 9);
    junk[0] = 0x04; // RC SEND_ONLY
    junk[1] = 0;
    a.engine.transport.queue(to, junk); // ICRC wrong
    await until(() => b.engine.stats.malformed + b.engine.stats.badIcrc === 2);
    expect(b.engine.stats.malformed).toBe(1);
    expect(b.engine.stats.badIcrc).toBe(1);
    const src = mr(a, 16);
    const dst = mr(b, 16);
    src.write(0, pattern(16, 10));
    postRecv(b, qb, [dst.sge(0, 16)]);
    postSend(a, qa, { sges: [src.sge(0, 16)] });
    await until(() => b.host.recvs.length === 1);
    expect(dst.read(0, 16)).toEqual(pattern(16, 10));
  });

  it('lost packets are retransmitted after the timeout; no ACK at all -> RETRY_EXC_ERR', async () => {
    const [qa, qb] = connect();
    const src = mr(a, 2048);
    const dst = mr(b, 2048);
    src.write(0, pattern(2048, 11));
    let dropped = 0;
    a.engine.outgoingHook = () => (dropped++ < 1 ? false : true);
    postRecv(b, qb, [dst.sge(0, 2048)]);
    postSend(a, qa, { sges: [src.sge(0, 2048)] });
    await until(() => a.host.sends.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(dst.read(0, 2048)).toEqual(pattern(2048, 11));
    // The second packet arrived first: the responder NAKed the PSN gap.
    expect(b.engine.stats.naksSent).toBe(1);

    a.engine.outgoingHook = () => false;
    postSend(a, qa, { sges: [src.sge(0, 10)] });
    await until(() => a.host.sends.length === 2, 5000);
    expect(a.host.sends[1]!.status).toBe(WcStatus.RETRY_EXC_ERR);
    expect(a.host.failed.map((f) => f.qpn)).toEqual([qa]);
  });

  it('messages longer than the send window: 256 KiB SEND and 64 KiB READ', async () => {
    const [qa, qb] = connect();
    const len = 256 * 1024;
    const src = mr(a, len);
    const dst = mr(b, len);
    const data = pattern(len, 12);
    src.write(0, data);
    postRecv(b, qb, [dst.sge(0, len)]);
    postSend(a, qa, { sges: [src.sge(0, len)] });
    const rlen = 64 * 1024;
    const local = mr(a, rlen);
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [local.sge(0, rlen)], remoteAddr: dst.iova + 1000n, rkey: dst.rkey });
    await until(() => a.host.sends.length === 2 && b.host.recvs.length === 1, 10000);
    expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(dst.read(0, len)).toEqual(data);
    expect(local.read(0, rlen)).toEqual(data.subarray(1000, 1000 + rlen));
  });

  it('ICRC of sent packets is sealed with the real path', async () => {
    const [qa, qb] = connect();
    const seen: Uint8Array[] = [];
    a.engine.outgoingHook = (bytes) => {
      seen.push(bytes.slice());
      return true;
    };
    const src = mr(a, 64);
    const dst = mr(b, 64);
    postRecv(b, qb, [dst.sge(0, 64)]);
    postSend(a, qa, { sges: [src.sge(0, 64)] });
    await until(() => a.host.sends.length === 1);
    const path = { family: 4 as const, src: new Uint8Array([127, 0, 0, 2]), dst: new Uint8Array([127, 0, 0, 3]), sport: PORT, dport: PORT, ipId: 0, ipFlagsFragment: 0x4000 };
    expect(seen.length).toBe(1);
    expect(checkIcrc(path, seen[0]!, 0, seen[0]!.length)).toBe(true);
  });
});
