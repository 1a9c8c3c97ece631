import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestRam } from '../../../virtio/frontend/guest-ram.js';
import { GuestMemory, MappedRegion } from '../../../virtio/memory/guest-memory.js';
import { Access, QpState, QpType, SendOp, WcFlag, WcOpcode, WcStatus } from '../../abi/constants.js';
import { GuestMemoryAccess } from '../../device/memory-access.js';
import { MrTable } from '../../device/mr-table.js';
import type { QpAttributes, Sge } from '../../engine/engine.js';
import { RecordingHost } from '../../engine/recording-host.js';
import { PcapCapture, type RoceCapture } from './capture.js';
import { FrameInfo, headersLength, parseFrame } from './frame.js';
import { checkIcrc } from './icrc.js';
import { Opcode } from './opcodes.js';
import { readPcap } from './pcap.js';
import { hasTshark, pattern, runTshark, tsharkArgs } from './test-support.js';
import { postRecv, postSend, until } from './engine-pair.js';
import { SoftRoceEngine, gidToAddress, ipv4Gid, psnAdd, psnDiff } from './soft-roce-engine.js';
import { udpPeer } from './udp-transport.js';

const RAM_GPA = 0x10_0000;
const RAM_SIZE = 16 << 20;
const PAGE = 4096;
const PD = 1;
const ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;

interface Side {
  ram: GuestRam;
  memory: GuestMemory;
  mrs: MrTable;
  host: RecordingHost;
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

function side(address: string): Side {
  const ram = new GuestRam(RAM_GPA, RAM_SIZE);
  const memory = new GuestMemory(8);
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  const mrs = new MrTable(64, memory, 1n << 30n);
  const gid = ipv4Gid(address);
  const host = new RecordingHost(new GuestMemoryAccess(mrs, memory), [gid]);
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
function connect(overA: Partial<QpAttributes> = {}, overB: Partial<QpAttributes> = {}, type = QpType.RC): [number, number] {
  const qa = a.engine.createQp({ type, pdn: PD, maxSendWr: 64, maxRecvWr: 64 }, null, () => false)!;
  const qb = b.engine.createQp({ type, pdn: PD, maxSendWr: 64, maxRecvWr: 64 }, null, () => false)!;
  const av = (gid: Uint8Array) => ({ dgid: gid.slice(), sgidIndex: 0, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 });
  const psnA = 0xfffff0; // wraps during multi-packet tests
  const psnB = 0x123456;
  for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) {
    a.engine.modifyQp(qa, attrs({ state, destQpn: qb, av: av(b.gid), sqPsn: psnA, rqPsn: psnB, ...overA }), 0);
    b.engine.modifyQp(qb, attrs({ state, destQpn: qa, av: av(a.gid), sqPsn: psnB, rqPsn: psnA, ...overB }), 0);
  }
  return [qa, qb];
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

  it('never has more READs in flight than max_rd_atomic', async () => {
    const [qa] = connect({ maxRdAtomic: 2 });
    const remote = mr(b, 8 * 2048);
    const local = mr(a, 8 * 2048);
    const data = pattern(8 * 2048, 11);
    remote.write(0, data);
    let inFlight = 0;
    let peak = 0;
    a.engine.outgoingHook = (x) => {
      if (x[0] === Opcode.RC_RDMA_READ_REQUEST) peak = Math.max(peak, ++inFlight);
      return true;
    };
    b.engine.outgoingHook = (x) => {
      if (x[0] === Opcode.RC_RDMA_READ_RESPONSE_LAST) inFlight--;
      return true;
    };
    for (let i = 0; i < 8; i++) postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [local.sge(i * 2048, 2048)], remoteAddr: remote.iova + BigInt(i * 2048), rkey: remote.rkey });
    await until(() => a.host.sends.length === 8);
    expect(a.host.sends.every((c) => c.status === WcStatus.SUCCESS)).toBe(true);
    expect(peak).toBe(2);
    expect(local.read(0, 8 * 2048)).toEqual(data);
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

  it('RNR NAK: a multi-packet WRITE with immediate waits for a receive like a SEND, then lands once', async () => {
    const [qa, qb] = connect({ accessFlags: ALL }, { accessFlags: ALL });
    const src = mr(a, 3000);
    const dst = mr(b, 4096);
    const data = pattern(3000, 8);
    src.write(0, data);
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE_WITH_IMM, sges: [src.sge(0, 3000)], remoteAddr: dst.iova, rkey: dst.rkey, imm: 0xfeed });
    await until(() => b.engine.stats.rnrNaks >= 2);
    expect(a.host.sends).toEqual([]);
    postRecv(b, qb, []);
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(b.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, byteLen: 3000, imm: 0xfeed });
    expect(dst.read(0, 3000)).toEqual(data);
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

  it('a receive the SEND does not fit: LOC_LEN_ERR and REM_INV_REQ_ERR; one the receiver cannot write: LOC_PROT_ERR and REM_OP_ERR', async () => {
    const cases: [string, number, WcStatus, WcStatus][] = [
      ['too small', ALL, WcStatus.LOC_LEN_ERR, WcStatus.REM_INV_REQ_ERR],
      ['no LOCAL_WRITE', 0, WcStatus.LOC_PROT_ERR, WcStatus.REM_OP_ERR],
    ];
    for (const [what, access, receiver, sender] of cases) {
      a.host.sends.length = 0;
      b.host.recvs.length = 0;
      const [qa, qb] = connect();
      const src = mr(a, 64);
      const dst = mr(b, 64, access);
      postRecv(b, qb, [dst.sge(0, what === 'too small' ? 16 : 64)]);
      postSend(a, qa, { sges: [src.sge(0, 64)] });
      await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
      expect(b.host.recvs[0]!.status, what).toBe(receiver);
      expect(a.host.sends[0]!.status, what).toBe(sender);
      expect(dst.read(0, 64), what).toEqual(new Uint8Array(64));
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
    a.engine.link.queue(to, new Uint8Array([1, 2, 3])); // shorter than a BTH
    const junk = pattern(64, 9);
    junk[0] = 0x04; // RC SEND_ONLY
    junk[1] = 0;
    a.engine.link.queue(to, junk); // ICRC wrong
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

function le64(v: bigint): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, v, true);
  return out;
}

const av = (gid: Uint8Array) => ({ dgid: gid.slice(), sgidIndex: 0, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 });

describe('SoftRoceEngine RC atomics', () => {
  it('CMP_AND_SWP (hit and miss) and FETCH_AND_ADD: original values scattered, remote memory updated', async () => {
    const [qa] = connect({ accessFlags: ALL }, { accessFlags: ALL });
    const remote = mr(b, 64);
    const local = mr(a, 64);
    remote.write(8, le64(100n));
    const at = remote.iova + 8n;
    postSend(a, qa, { opcode: SendOp.ATOMIC_CMP_AND_SWP, sges: [local.sge(0, 8)], remoteAddr: at, rkey: remote.rkey, compareAdd: 100n, swap: 7n });
    postSend(a, qa, { opcode: SendOp.ATOMIC_CMP_AND_SWP, sges: [local.sge(8, 8)], remoteAddr: at, rkey: remote.rkey, compareAdd: 100n, swap: 8n });
    postSend(a, qa, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(16, 8)], remoteAddr: at, rkey: remote.rkey, compareAdd: (1n << 64n) - 1n });
    await until(() => a.host.sends.length === 3);
    expect(a.host.sends.map((d) => [d.status, d.opcode, d.byteLen])).toEqual([
      [WcStatus.SUCCESS, WcOpcode.COMP_SWAP, 8],
      [WcStatus.SUCCESS, WcOpcode.COMP_SWAP, 8],
      [WcStatus.SUCCESS, WcOpcode.FETCH_ADD, 8],
    ]);
    expect(local.read(0, 8)).toEqual(le64(100n));
    expect(local.read(8, 8)).toEqual(le64(7n));
    expect(local.read(16, 8)).toEqual(le64(7n));
    expect(remote.read(8, 8)).toEqual(le64(6n));
  });

  it('atomic request and ATOMIC_ACK bytes on the wire (AtomicETH / AtomicAckETH)', async () => {
    const [qa, qb] = connect({ accessFlags: ALL }, { accessFlags: ALL });
    const remote = mr(b, 16);
    const local = mr(a, 16);
    remote.write(0, le64(0x1122_3344_5566_7788n));
    const sent: Uint8Array[] = [];
    const acks: Uint8Array[] = [];
    a.engine.outgoingHook = (x) => (sent.push(x.slice()), true);
    b.engine.outgoingHook = (x) => (acks.push(x.slice()), true);
    postSend(a, qa, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(0, 8)], remoteAddr: remote.iova, rkey: remote.rkey, compareAdd: 0x10n });
    await until(() => a.host.sends.length === 1);
    const req = sent[0]!;
    expect(req.length).toBe(12 + 28 + 4);
    expect(req[0]).toBe(0x14);
    expect((req[5]! << 16) | (req[6]! << 8) | req[7]!).toBe(qb);
    const dv = new DataView(req.buffer);
    expect(dv.getBigUint64(12, false)).toBe(remote.iova);
    expect(dv.getUint32(20, false)).toBe(remote.rkey >>> 0);
    expect(dv.getBigUint64(24, false)).toBe(0x10n);
    expect(dv.getBigUint64(32, false)).toBe(0n);
    const ack = acks[0]!;
    expect(ack.length).toBe(12 + 4 + 8 + 4);
    expect(ack[0]).toBe(0x12);
    expect(ack[12]).toBe(0x1f);
    expect(new DataView(ack.buffer).getBigUint64(16, false)).toBe(0x1122_3344_5566_7788n);
    expect(ack.subarray(9, 12)).toEqual(req.subarray(9, 12)); // same PSN
    expect(local.read(0, 8)).toEqual(le64(0x1122_3344_5566_7788n));
    expect(remote.read(0, 8)).toEqual(le64(0x1122_3344_5566_7798n));
  });

  it('a duplicate atomic (lost ATOMIC_ACK) is answered from the replay record, not executed twice', async () => {
    const [qa] = connect({ accessFlags: ALL, timeout: 10 }, { accessFlags: ALL });
    const remote = mr(b, 16);
    const local = mr(a, 16);
    remote.write(0, le64(1000n));
    let dropped = 0;
    b.engine.outgoingHook = (x) => !(x[0] === 0x12 && dropped++ === 0);
    postSend(a, qa, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(0, 8)], remoteAddr: remote.iova, rkey: remote.rkey, compareAdd: 5n });
    await until(() => a.host.sends.length === 1);
    expect(dropped).toBe(2);
    expect(a.engine.stats.retransmits).toBeGreaterThanOrEqual(1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(local.read(0, 8)).toEqual(le64(1000n));
    expect(remote.read(0, 8)).toEqual(le64(1005n));
  });

  it('keeps a replay record for each of max_dest_rd_atomic atomics: 24 in flight, every ACK lost, each executed once', async () => {
    const n = 24; // more than the 16 records an engine-wide constant once kept
    const [qa] = connect({ accessFlags: ALL, timeout: 10, maxRdAtomic: n }, { accessFlags: ALL, maxDestRdAtomic: n });
    const remote = mr(b, 8);
    const local = mr(a, 8 * n);
    remote.write(0, le64(1000n));
    let dropped = 0;
    b.engine.outgoingHook = (x) => !(x[0] === 0x12 && dropped++ < n);
    for (let i = 0; i < n; i++) {
      postSend(a, qa, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(8 * i, 8)], remoteAddr: remote.iova, rkey: remote.rkey, compareAdd: 5n });
    }
    await until(() => a.host.sends.length === n);
    expect(dropped).toBeGreaterThanOrEqual(n);
    expect(a.host.sends.map((c) => c.status)).toEqual(Array<WcStatus>(n).fill(WcStatus.SUCCESS));
    for (let i = 0; i < n; i++) expect(local.read(8 * i, 8), `atomic ${i}`).toEqual(le64(1000n + 5n * BigInt(i)));
    expect(remote.read(0, 8)).toEqual(le64(1000n + 5n * BigInt(n)));
  });

  it('atomic without REMOTE_ATOMIC on the responder -> REM_ACCESS_ERR, memory untouched', async () => {
    const [qa] = connect({ accessFlags: ALL });
    const remote = mr(b, 16);
    const local = mr(a, 16);
    remote.write(0, le64(9n));
    postSend(a, qa, { opcode: SendOp.ATOMIC_CMP_AND_SWP, sges: [local.sge(0, 8)], remoteAddr: remote.iova, rkey: remote.rkey, compareAdd: 9n, swap: 1n });
    await until(() => a.host.sends.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.REM_ACCESS_ERR);
    expect(remote.read(0, 8)).toEqual(le64(9n));
  });
});

describe('SoftRoceEngine UC', () => {
  it('multi-packet SEND and WRITE with immediate, no ACKs, byte-exact', async () => {
    const [qa, qb] = connect({}, {}, QpType.UC);
    const len = 3500;
    const src = mr(a, len);
    const dst = mr(b, 8192);
    const data = pattern(len, 21);
    src.write(0, data);
    const rt1 = postRecv(b, qb, [dst.sge(0, 4096)]);
    const rt2 = postRecv(b, qb, []);
    postSend(a, qa, { opcode: SendOp.SEND_WITH_IMM, sges: [src.sge(0, len)], imm: 0xabcdef01 });
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE_WITH_IMM, sges: [src.sge(0, 2000)], remoteAddr: dst.iova + 5000n, rkey: dst.rkey, imm: 7 });
    await until(() => a.host.sends.length === 2 && b.host.recvs.length === 2);
    expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(b.host.recvs[0]).toMatchObject({ token: rt1, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: len, flags: WcFlag.WITH_IMM, imm: 0xabcdef01, srcQp: qa });
    expect(b.host.recvs[1]).toMatchObject({ token: rt2, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, byteLen: 2000, imm: 7 });
    expect(dst.read(0, len)).toEqual(data);
    expect(dst.read(5000, 2000)).toEqual(data.subarray(0, 2000));
    expect(b.engine.stats.packetsSent).toBe(0); // no ACKs on UC
  });

  it('a PSN gap discards the partial message; the next message reuses the receive WQE', async () => {
    const [qa, qb] = connect({}, {}, QpType.UC);
    const src = mr(a, 8192);
    const dst = mr(b, 8192);
    const data = pattern(8192, 22);
    src.write(0, data);
    let n = 0;
    a.engine.outgoingHook = () => n++ !== 1; // lose the 2nd packet of the first message
    const rt = postRecv(b, qb, [dst.sge(0, 8192)]);
    postSend(a, qa, { sges: [src.sge(0, 3000)] });
    postSend(a, qa, { sges: [src.sge(4000, 2500)] });
    await until(() => a.host.sends.length === 2 && b.host.recvs.length === 1);
    expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(b.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS, byteLen: 2500 });
    expect(dst.read(0, 2500)).toEqual(data.subarray(4000, 6500));
    expect(b.host.failed).toEqual([]);
  });

  it('a bad rkey drops the WRITE silently; the QP keeps working', async () => {
    const [qa, qb] = connect({}, {}, QpType.UC);
    const src = mr(a, 64);
    const dst = mr(b, 64);
    src.write(0, pattern(64, 23));
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, 64)], remoteAddr: dst.iova, rkey: dst.rkey ^ 0x100 });
    postRecv(b, qb, [dst.sge(0, 64)]);
    postSend(a, qa, { sges: [src.sge(0, 64)] });
    await until(() => b.host.recvs.length === 1);
    expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(dst.read(0, 64)).toEqual(pattern(64, 23));
    expect(b.host.failed).toEqual([]);
    expect(b.engine.stats.ignored).toBe(1);
  });
});

describe('SoftRoceEngine UD', () => {
  function udQp(s: Side, qkey: number): number {
    const q = s.engine.createQp({ type: QpType.UD, pdn: PD, maxSendWr: 64, maxRecvWr: 64 }, null, () => false)!;
    for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) s.engine.modifyQp(q, attrs({ state, qkey, pathMtu: 0, sqPsn: 5 }), 0);
    return q;
  }

  it('SEND with immediate: DETH on the wire, GRH then payload in the receive buffer, src_qp reported', async () => {
    const qa = udQp(a, 0x1111);
    const qb = udQp(b, 0x2222);
    const src = mr(a, 1000);
    const dst = mr(b, 2048);
    const data = pattern(1000, 31);
    src.write(0, data);
    const sent: Uint8Array[] = [];
    a.engine.outgoingHook = (x) => (sent.push(x.slice()), true);
    const rt = postRecv(b, qb, [dst.sge(0, 2048)]);
    postSend(a, qa, { opcode: SendOp.SEND_WITH_IMM, sges: [src.sge(0, 1000)], imm: 0x55667788, ud: { av: av(b.gid), remoteQpn: qb, remoteQkey: 0x2222 } });
    await until(() => b.host.recvs.length === 1);
    expect(a.host.sends[0]).toMatchObject({ status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, byteLen: 1000 });
    expect(b.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 1040, flags: WcFlag.GRH | WcFlag.WITH_IMM, imm: 0x55667788, srcQp: qa });
    const pkt = sent[0]!;
    expect(pkt[0]).toBe(0x65);
    const dv = new DataView(pkt.buffer);
    expect(dv.getUint32(8, false) & 0xffffff).toBe(5); // PSN
    expect(dv.getUint32(12, false)).toBe(0x2222);
    expect(dv.getUint32(16, false) & 0xffffff).toBe(qa);
    expect(dv.getUint32(20, false)).toBe(0x55667788);
    const grh = dst.read(0, 40);
    expect(grh.subarray(0, 20)).toEqual(new Uint8Array(20));
    expect(grh[20]).toBe(0x45);
    expect(grh[29]).toBe(17);
    expect([...grh.subarray(32, 36)]).toEqual([127, 0, 0, 2]);
    expect([...grh.subarray(36, 40)]).toEqual([127, 0, 0, 3]);
    expect((grh[22]! << 8) | grh[23]!).toBe(20 + 8 + 12 + 8 + 4 + 1000 + 4);
    expect(dst.read(40, 1000)).toEqual(data);
  });

  it('Q_Key: a mismatch is dropped silently; the high bit means the QP own Q_Key', async () => {
    const qa = udQp(a, 0x4242);
    const qb = udQp(b, 0x4242);
    const src = mr(a, 100);
    const dst = mr(b, 4096);
    src.write(0, pattern(100, 32));
    const rt = postRecv(b, qb, [dst.sge(0, 4096)]);
    postSend(a, qa, { sges: [src.sge(0, 50)], ud: { av: av(b.gid), remoteQpn: qb, remoteQkey: 0x4243 } });
    postSend(a, qa, { sges: [src.sge(0, 100)], ud: { av: av(b.gid), remoteQpn: qb, remoteQkey: 0x8000_0000 } });
    await until(() => b.host.recvs.length === 1);
    expect(a.host.sends.map((d) => d.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(b.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS, byteLen: 140, srcQp: qa });
    expect(dst.read(40, 100)).toEqual(pattern(100, 32));
    expect(b.engine.stats.ignored).toBe(1);
  });

  it('a message longer than the path MTU -> LOC_LEN_ERR at post, in order, nothing sent', async () => {
    const qa = udQp(a, 1);
    a.engine.modifyQp(qa, attrs({ state: QpState.RTS, qkey: 1, pathMtu: 1, sqPsn: 5 }), 0); // 256
    const qb = udQp(b, 1);
    const src = mr(a, 300);
    const dst = mr(b, 4096);
    postRecv(b, qb, [dst.sge(0, 4096)]);
    const t1 = postSend(a, qa, { sges: [src.sge(0, 257)], ud: { av: av(b.gid), remoteQpn: qb, remoteQkey: 1 } });
    const t2 = postSend(a, qa, { sges: [src.sge(0, 256)], ud: { av: av(b.gid), remoteQpn: qb, remoteQkey: 1 } });
    await until(() => a.host.sends.length === 2 && b.host.recvs.length === 1);
    expect(a.host.sends.map((d) => [d.token, d.status])).toEqual([
      [t1, WcStatus.LOC_LEN_ERR],
      [t2, WcStatus.SUCCESS],
    ]);
    expect(a.engine.stats.packetsSent).toBe(1);
    expect(b.host.recvs[0]!.byteLen).toBe(296);
  });
});

describe('SoftRoceEngine saveState/loadState', () => {
  /** Saves `s`'s engine, closes it and loads the state into a fresh engine bound to the same address. */
  function migrate(s: Side, address: string): Uint8Array {
    const state = s.engine.saveState();
    s.engine.close();
    s.engine = new SoftRoceEngine({ address, port: PORT });
    s.engine.attach(s.host);
    s.engine.loadState(state);
    return state;
  }

  it('mid-transfer (multi-packet SEND in flight, partial message at the responder): both sides move, the transfer completes byte-exact', async () => {
    const [qa, qb] = connect({ timeout: 16 });
    const len = 40 * 1024;
    const src = mr(a, len);
    const dst = mr(b, len);
    const data = pattern(len, 41);
    src.write(0, data);
    let passed = 0;
    a.engine.outgoingHook = () => passed++ < 3;
    const rt = postRecv(b, qb, [dst.sge(0, len)]);
    const st = postSend(a, qa, { sges: [src.sge(0, len)] });
    await new Promise((r) => setTimeout(r, 40));
    expect(a.host.sends).toEqual([]);
    const savedA = JSON.parse(new TextDecoder().decode(migrate(a, '127.0.0.2')));
    const savedB = JSON.parse(new TextDecoder().decode(migrate(b, '127.0.0.3')));
    expect(savedA.qps[0].sq[0]).toMatchObject({ token: st, npkts: 40 });
    expect(savedA.qps[0].retryMs).toBeGreaterThan(0);
    expect(savedB.qps[0].inMsg).toMatchObject({ kind: 'send', hasEntry: true, offset: 3 * 1024 });
    expect(savedB.qps[0].rq[0].token).toBe(rt);
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(a.host.sends[0]).toMatchObject({ token: st, status: WcStatus.SUCCESS, byteLen: len });
    expect(b.host.recvs[0]).toMatchObject({ token: rt, status: WcStatus.SUCCESS, byteLen: len, srcQp: qa });
    expect(dst.read(0, len)).toEqual(data);
    expect(a.engine.stats.retransmits).toBeGreaterThanOrEqual(1);
  });

  it('during an RNR wait: the wait resumes with the time it had left and the SEND completes', async () => {
    const [qa, qb] = connect({}, { minRnrTimer: 18 }); // 5.12 ms
    const src = mr(a, 3000);
    const dst = mr(b, 4096);
    const data = pattern(3000, 42);
    src.write(0, data);
    postSend(a, qa, { sges: [src.sge(0, 3000)] });
    await until(() => b.engine.stats.rnrNaks >= 1);
    const saved = JSON.parse(new TextDecoder().decode(migrate(a, '127.0.0.2')));
    migrate(b, '127.0.0.3');
    expect(saved.qps[0].rnrWaitMs === null && saved.qps[0].retryMs === null).toBe(false);
    postRecv(b, qb, [dst.sge(0, 4096)]);
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(b.host.recvs[0]).toMatchObject({ status: WcStatus.SUCCESS, byteLen: 3000 });
    expect(dst.read(0, 3000)).toEqual(data);
  });

  it('atomic replay records and PSNs survive a move', async () => {
    const [qa] = connect({ accessFlags: ALL }, { accessFlags: ALL });
    const remote = mr(b, 16);
    const local = mr(a, 16);
    remote.write(0, le64(1n));
    postSend(a, qa, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(0, 8)], remoteAddr: remote.iova, rkey: remote.rkey, compareAdd: 2n });
    await until(() => a.host.sends.length === 1);
    const saved = JSON.parse(new TextDecoder().decode(migrate(b, '127.0.0.3')));
    expect(saved.qps[0].atomicReplay).toEqual([{ psn: 0xfffff0, original: '1' }]);
    postSend(a, qa, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(8, 8)], remoteAddr: remote.iova, rkey: remote.rkey, compareAdd: 2n });
    await until(() => a.host.sends.length === 2);
    expect(local.read(8, 8)).toEqual(le64(3n));
    expect(remote.read(0, 8)).toEqual(le64(5n));
  });

  it('loads a version-1 state (no READs in progress recorded) and writes version 2', async () => {
    const [qa] = connect();
    const src = mr(a, 16);
    postSend(a, qa, { sges: [src.sge(0, 16)] });
    const v2 = JSON.parse(new TextDecoder().decode(a.engine.saveState()));
    expect(v2.version).toBe(2);
    expect(v2.qps[0].readJobs).toEqual([]);
    const v1 = structuredClone(v2);
    v1.version = 1;
    for (const q of v1.qps) {
      delete q.readJobs;
      delete q.droppedWhileReading;
    }
    a.engine.loadState(new TextEncoder().encode(JSON.stringify(v1)));
    const again = JSON.parse(new TextDecoder().decode(a.engine.saveState()));
    expect(again.qps.map((q: { qpn: number }) => q.qpn)).toEqual(v2.qps.map((q: { qpn: number }) => q.qpn));
    expect(again.qps[0].sq).toEqual(v2.qps[0].sq);
  });

  it('refuses garbage with the path of the bad field and keeps its QPs', async () => {
    const [qa, qb] = connect();
    const src = mr(a, 16);
    postSend(a, qa, { sges: [src.sge(0, 16)] }); // waits for a receive (RNR)
    const good = JSON.parse(new TextDecoder().decode(a.engine.saveState()));
    const enc = (x: unknown) => new TextEncoder().encode(JSON.stringify(x));
    expect(() => a.engine.loadState(new Uint8Array([0xff, 0]))).toThrow(/blob/);
    expect(() => a.engine.loadState(enc({ ...good, version: 3 }))).toThrow(/version: 3 is not one this back-end reads \(1, 2; it writes 2\)/);
    const bad = structuredClone(good);
    bad.qps[0].sq[0].wr.opcode = 99;
    expect(() => a.engine.loadState(enc(bad))).toThrow(/qps\[0\]\.sq\[0\]\.wr\.opcode/);
    const bad2 = structuredClone(good);
    bad2.qps[0].attrs.sqPsn = -1;
    expect(() => a.engine.loadState(enc(bad2))).toThrow(/qps\[0\]\.attrs\.sqPsn/);
    const bad3 = structuredClone(good);
    bad3.qps[0].retryMs = 'soon';
    expect(() => a.engine.loadState(enc(bad3))).toThrow(/qps\[0\]\.retryMs/);
    const dst = mr(b, 16);
    postRecv(b, qb, [dst.sge(0, 16)]);
    await until(() => a.host.sends.length === 1);
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
  });
});

describe('SoftRoceEngine packet capture', () => {
  const dir = mkdtempSync(join(tmpdir(), 'vrdma-capture-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** Replaces a's engine with one built with `capture` (the constructor option). */
  function capturing(capture: RoceCapture): void {
    a.engine.close();
    a.engine = new SoftRoceEngine({ address: '127.0.0.2', port: PORT, capture });
    a.engine.attach(a.host);
  }

  it('records SEND, WRITE and READ traffic both ways; tshark decodes every frame as RoCE with the expected opcodes', async () => {
    if (!hasTshark()) throw new Error('tshark is not installed: run `npm run setup`');
    const file = join(dir, 'rc.pcap');
    const pcap = PcapCapture.toFile(file);
    const seen: { dir: string; op: number }[] = [];
    capturing({
      write: (d, src, dst, payload, ms, wire) => {
        seen.push({ dir: d, op: payload[0]! });
        pcap.write(d, src, dst, payload, ms, wire);
      },
    });
    const [qa, qb] = connect();
    const sendLen = 3 * 1024 + 10; // 4 packets at MTU 1024
    const src = mr(a, 8192);
    const dst = mr(b, 12288);
    src.write(0, pattern(8192, 21));
    dst.write(0, pattern(12288, 22));
    postRecv(b, qb, [dst.sge(0, 4096)]);
    postSend(a, qa, { sges: [src.sge(0, sendLen)] });
    await until(() => a.host.sends.length === 1 && b.host.recvs.length === 1);
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE, sges: [src.sge(0, 2500)], remoteAddr: dst.iova + 4096n, rkey: dst.rkey }); // 3 packets
    await until(() => a.host.sends.length === 2);
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [src.sge(4096, 2100)], remoteAddr: dst.iova + 8192n, rkey: dst.rkey }); // 3 responses
    await until(() => a.host.sends.length === 3);
    await new Promise((r) => setTimeout(r, 50)); // late ACKs
    a.engine.capture = null;
    pcap.close();
    expect(a.host.sends.map((s) => s.status)).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS, WcStatus.SUCCESS]);
    expect(src.read(4096, 2100)).toEqual(pattern(12288, 22).subarray(8192, 8192 + 2100));

    const tx = seen.filter((s) => s.dir === 'tx');
    const rx = seen.filter((s) => s.dir === 'rx');
    expect(tx.length).toBe(a.engine.stats.packetsSent);
    expect(pcap.tx).toBe(tx.length);
    expect(pcap.rx).toBe(rx.length);
    // Requests out, in order (no loss on loopback, so no retransmissions).
    expect(tx.map((s) => s.op)).toEqual([
      Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST,
      Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE, Opcode.RC_RDMA_WRITE_LAST,
      Opcode.RC_RDMA_READ_REQUEST,
    ]);
    // ACKs and the READ responses in.
    const rxOps = rx.map((s) => s.op);
    expect(rxOps.filter((o) => o !== Opcode.RC_ACKNOWLEDGE)).toEqual([Opcode.RC_RDMA_READ_RESPONSE_FIRST, Opcode.RC_RDMA_READ_RESPONSE_MIDDLE, Opcode.RC_RDMA_READ_RESPONSE_LAST]);
    expect(rxOps.filter((o) => o === Opcode.RC_ACKNOWLEDGE).length).toBeGreaterThanOrEqual(2);

    const records = readPcap(new Uint8Array(readFileSync(file))).records;
    expect(records).toHaveLength(seen.length);
    const rroce = ['-o', `infiniband.rroce.port:${PORT}`]; // the engines use a test port, not 4791
    // The rebuilt IP/UDP headers are the ones the ICRC was sealed over.
    for (const r of records) {
      const info = new FrameInfo();
      expect(parseFrame(r.data, info, 0, r.data.length, PORT)).toBe('ok');
      expect(checkIcrc(info.path(r.data), r.data, info.roceOffset, info.roceLength)).toBe(true);
    }
    const out = runTshark(tsharkArgs(file, ...rroce, '-o', 'ip.check_checksum:TRUE', '-T', 'fields', '-E', 'separator=/t', '-e', 'ip.src', '-e', 'ip.dst', '-e', 'udp.dstport', '-e', 'ip.checksum.status', '-e', 'infiniband.bth.opcode', '-e', '_ws.malformed', '-e', '_ws.expert.severity'));
    const rows = out.trim().split('\n').map((l) => l.split('\t'));
    expect(rows).toHaveLength(seen.length);
    rows.forEach((r, i) => {
      const s = seen[i]!;
      const [ipSrc, ipDst, dport, ipck, op, malformed, expert] = r;
      expect([ipSrc, ipDst], `frame ${i + 1}`).toEqual(s.dir === 'tx' ? ['127.0.0.2', '127.0.0.3'] : ['127.0.0.3', '127.0.0.2']);
      expect(dport, `frame ${i + 1}`).toBe(String(PORT));
      expect(ipck, `frame ${i + 1} IP checksum good`).toBe('1'); // 0 bad, 1 good, 2 unverified
      expect(op, `frame ${i + 1} decoded as InfiniBand`).toMatch(/^\d+$/);
      expect(Number(op), `frame ${i + 1} opcode`).toBe(s.op);
      expect(malformed ?? '', `frame ${i + 1} malformed`).toBe('');
      expect(expert ?? '', `frame ${i + 1} expert info`).toBe('');
    });
    // Nothing tshark calls malformed or failed to see as InfiniBand.
    expect(runTshark(tsharkArgs(file, ...rroce, '-Y', '_ws.malformed || !infiniband')).trim()).toBe('');
  });

  it('records received datagrams that are then dropped as malformed, byte for byte', async () => {
    const file = join(dir, 'junk.pcap');
    const pcap = PcapCapture.toFile(file);
    capturing(pcap);
    const junk = new Uint8Array([1, 2, 3]);
    b.engine.link.queue(udpPeer('127.0.0.2', PORT), junk);
    await until(() => a.engine.stats.malformed === 1);
    pcap.close();
    const records = readPcap(new Uint8Array(readFileSync(file))).records;
    expect(records).toHaveLength(1);
    const f = records[0]!.data;
    expect(f.length).toBe(headersLength(4) + 3);
    expect(Array.from(f.subarray(headersLength(4)))).toEqual([1, 2, 3]);
    expect(Array.from(f.subarray(26, 34))).toEqual([127, 0, 0, 3, 127, 0, 0, 2]);
    expect(pcap.rx).toBe(1);
  });

  it('does nothing per packet without a capture, and stops recording when it is removed', () => {
    expect(b.engine.capture).toBeNull();
    const seen: string[] = [];
    capturing({ write: (d) => void seen.push(d) });
    a.engine.capture = null;
    const [qa] = connect();
    const src = mr(a, 64);
    postSend(a, qa, { sges: [src.sge(0, 64)] });
    expect(a.engine.stats.packetsSent).toBe(1);
    expect(seen).toEqual([]);
  });
});
