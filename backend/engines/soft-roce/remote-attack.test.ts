/**
 * Issue 4 acceptance: remote attacks from a raw UDP sender. The attacker
 * (a node:dgram socket on 127.0.0.4, see raw-peer.ts) owns the far end of
 * one of the victim's RC QPs and sends crafted requests with correct ICRCs;
 * the victim's guest memory is real and MR-checked, with guard bytes around
 * the MR. Each case checks what the victim answers on the wire (a NAK and
 * its syndrome, or nothing), the victim QP's state afterwards, the bytes
 * of the MR and around it, and that a healthy RC QP pair between the
 * victim and a third engine carries WRITE/SEND/READ traffic unharmed
 * throughout.
 *
 * Behaviour, as rxe_resp.c / rxe_recv.c and the IBTA rules decide it:
 * bad R_Key / range / MR rights → NAK remote access error, responder QP to
 * ERR (class C). QP without the remote right → NAK remote access error
 * here (rxe answers invalid request for this one case; the loopback engine
 * and the conformance scenarios use remote access error, kept for
 * consistency). PSN ahead of the expected one (24-bit serial arithmetic,
 * less than 2^23 ahead) → one PSN-sequence-error NAK, then silence; a PSN
 * "ahead" by more than 2^23 is behind, i.e. a duplicate: a SEND/WRITE is
 * acknowledged again (C9-105) without executing it, a READ that would fail
 * is dropped (rxe: no matching responder resource, class D). Payload longer
 * than the path MTU → NAK invalid request and ERR (rxe since 6.2); longer
 * than any MTU → dropped as malformed. Truncated or inconsistent headers,
 * a bad ICRC, an unknown QPN, a transport the QP does not have, a QP not
 * yet receiving, a source address other than the QP's peer → silent drop,
 * counted.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Access, QpState, QpType, SendOp, WcStatus } from '../../abi/constants.js';
import type { QpAttributes } from '../../engine/engine.js';
import { ALL_ACCESS, PD, type Region, type Side, avTo, closeSide, connectRc, fillPattern, makeSide, postRecv, postSend, randomPort, rcAttrs, region, sleep, until } from './engine-pair.js';
import { ipv4Gid } from './soft-roce-engine.js';
import { Syndrome } from './headers.js';
import { Opcode } from './opcodes.js';
import { RocePacket } from './packet.js';
import { RawPeer, type Reply } from './raw-peer.js';
import { decodeState } from './state.js';
import { type UdpPeer, udpPeer } from './udp-transport.js';

const PORT = randomPort();
const VICTIM = '127.0.0.3';
const HEALTHY = '127.0.0.2';
const ATTACKER = '127.0.0.4';
/** The attacker's (pretend) QPN, the victim QP's destination. */
const ATTACKER_QPN = 0x4242;
/** The victim QP's expected request PSN. */
const EPSN = 0x100000;
const MTU = 1024;
/** The MR under attack starts this far into its first page: the rest of that page is guard bytes. */
const LEAD = 100;
const MR_LEN = 8192;
/** How long "no answer" is waited for. */
const QUIET_MS = 60;

let v: Side;
let h: Side;
let attacker: RawPeer;
let to: UdpPeer;

beforeEach(async () => {
  v = makeSide(VICTIM, PORT, 16 << 20);
  h = makeSide(HEALTHY, PORT, 16 << 20);
  attacker = await RawPeer.open(ATTACKER, PORT);
  to = udpPeer(VICTIM, PORT);
});

afterEach(async () => {
  await attacker.close();
  for (const s of [v, h]) {
    expect(s.host.violations).toEqual([]);
    closeSide(s);
  }
});

/** A victim RC QP whose far end is the attacker, in `state` (RTS unless told). */
function victimQp(over: Partial<QpAttributes> = {}, upTo = QpState.RTS, type = QpType.RC): number {
  const qpn = v.engine.createQp({ type, pdn: PD, maxSendWr: 16, maxRecvWr: 16 }, null, () => false)!;
  bringUpVictim(qpn, over, upTo);
  return qpn;
}

/** RESET -> ... -> `upTo` towards the attacker, expecting PSN EPSN. */
function bringUpVictim(qpn: number, over: Partial<QpAttributes> = {}, upTo = QpState.RTS): void {
  for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) {
    if (state > upTo) break;
    v.engine.modifyQp(qpn, rcAttrs({ state, destQpn: ATTACKER_QPN, av: avTo(ipv4Gid(ATTACKER)), rqPsn: EPSN, sqPsn: 0x200, accessFlags: Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC, qkey: 0x1111, ...over }), 0);
  }
}

/** A victim the fuzz drove to ERR comes back through RESET, so every path stays reachable. */
function reviveVictim(qpn: number, over: Partial<QpAttributes> = {}): void {
  v.engine.modifyQp(qpn, rcAttrs({ state: QpState.RESET }), 0);
  bringUpVictim(qpn, over);
}

/** A seeded generator of integers in [0, n): FUZZ_SEED replays another sequence. */
function seededRandom(defaultSeed: number): (n: number) => number {
  let seed = Number(process.env.FUZZ_SEED ?? defaultSeed);
  return (n) => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
}

function qpState(qpn: number): QpState | undefined {
  return decodeState(v.engine.saveState()).qps.find((q) => q.qpn === qpn)?.attrs.state;
}

/** The MR under attack, filled with a pattern, and a copy of it and its guard bytes. */
function target(access = ALL_ACCESS): { mr: Region; before: Uint8Array } {
  const mr = region(v, MR_LEN, access, LEAD);
  fillPattern(mr.span, 0xa77ac);
  return { mr, before: mr.span.slice() };
}

/** Bytes of the MR's pages that changed, as [offset from the MR start, count] runs. */
function changes(mr: Region, before: Uint8Array): [number, number][] {
  const runs: [number, number][] = [];
  for (let i = 0; i < before.length; i++) {
    if (mr.span[i] === before[i]) continue;
    const last = runs.at(-1);
    if (last !== undefined && last[0] + last[1] === i - mr.spanStart) last[1]++;
    else runs.push([i - mr.spanStart, 1]);
  }
  return runs;
}

interface Request {
  opcode: number;
  psn?: number;
  destQp: number;
  ackReq?: boolean;
  va?: bigint;
  rkey?: number;
  dmaLength?: number;
  payload?: Uint8Array;
  swapAdd?: bigint;
  compare?: bigint;
}

function packet(r: Request): RocePacket {
  const p = new RocePacket().setOpcode(r.opcode);
  p.bth.pkey = 0xffff;
  p.bth.destQp = r.destQp;
  p.bth.psn = r.psn ?? EPSN;
  p.bth.ackReq = r.ackReq ?? true;
  p.reth.va = r.va ?? 0n;
  p.reth.rkey = r.rkey ?? 0;
  p.reth.dmaLength = r.dmaLength ?? r.payload?.length ?? 0;
  p.atomicEth.va = r.va ?? 0n;
  p.atomicEth.rkey = r.rkey ?? 0;
  p.atomicEth.swapAdd = r.swapAdd ?? 0n;
  p.atomicEth.compare = r.compare ?? 0n;
  p.payloadLength = r.payload?.length ?? 0;
  return p;
}

async function send(r: Request): Promise<void> {
  await attacker.sendRaw(attacker.build(packet(r), r.payload ?? null, to), to, VICTIM);
}

async function sendBytes(bytes: Uint8Array): Promise<void> {
  await attacker.sendRaw(bytes, to, VICTIM);
}

/** What came back within QUIET_MS. */
async function replies(): Promise<Reply[]> {
  await sleep(QUIET_MS);
  return attacker.replies.splice(0);
}

const nak = (psn: number, syndrome: number, qpn = ATTACKER_QPN): Partial<Reply> => ({ opcode: Opcode.RC_ACKNOWLEDGE, destQp: qpn, psn, syndrome });

/**
 * Healthy traffic between the victim engine and a third engine on their
 * own RC QP pair, both ways, started before an attack and checked after
 * it: data byte-exact, every WR successful, both QPs still RTS.
 */
function healthyTraffic(): () => Promise<void> {
  const [qh, qv] = connectRc(h, v, { timeout: 14, retryCnt: 7 });
  const len = 256 * 1024;
  const hSrc = region(h, len);
  const hDst = region(h, len);
  const vSrc = region(v, len);
  const vDst = region(v, len);
  const vRecv = region(v, len);
  fillPattern(hSrc.bytes, 11);
  fillPattern(vSrc.bytes, 12);
  postRecv(v, qv, [vRecv.sge(0, len)]);
  postSend(h, qh, { opcode: SendOp.RDMA_WRITE, sges: [hSrc.sge(0, len)], remoteAddr: vDst.iova, rkey: vDst.rkey });
  postSend(h, qh, { opcode: SendOp.SEND, sges: [hSrc.sge(0, len)] });
  postSend(h, qh, { opcode: SendOp.RDMA_READ, sges: [hDst.sge(0, len)], remoteAddr: vSrc.iova, rkey: vSrc.rkey });
  postSend(v, qv, { opcode: SendOp.RDMA_WRITE, sges: [vSrc.sge(0, len)], remoteAddr: hDst.iova, rkey: hDst.rkey });
  return async () => {
    await until(() => h.host.outstandingSends.size + v.host.outstandingSends.size + v.host.outstandingRecvs.size === 0, 10_000, 'healthy traffic');
    expect(h.host.sendsOf(qh).map((c) => WcStatus[c.status])).toEqual(['SUCCESS', 'SUCCESS', 'SUCCESS']);
    expect(v.host.sendsOf(qv).map((c) => WcStatus[c.status])).toEqual(['SUCCESS']);
    expect(v.host.recvsOf(qv).map((c) => [WcStatus[c.status], c.byteLen])).toEqual([['SUCCESS', len]]);
    expect(Buffer.compare(vDst.bytes, hSrc.bytes)).toBe(0);
    expect(Buffer.compare(vRecv.bytes, hSrc.bytes)).toBe(0);
    expect(Buffer.compare(hDst.bytes, vSrc.bytes)).toBe(0);
    expect(h.host.failed).toEqual([]);
    expect(v.host.failed.filter((f) => f.qpn === qv)).toEqual([]);
    expect(qpState(qv)).toBe(QpState.RTS);
  };
}

describe('remote attacks on a soft-RoCE RC responder', () => {
  it('RDMA WRITE with a bad R_Key: NAK remote access error for its PSN, victim QP to ERR, no byte changes', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    await send({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qx, va: mr.iova, rkey: mr.rkey ^ 0x100, payload: new Uint8Array(64).fill(0xee) });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(v.host.failed.map((f) => f.qpn)).toEqual([qx]);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('RDMA READ with a bad R_Key: NAK remote access error, no READ response, victim QP to ERR', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: qx, va: mr.iova, rkey: mr.rkey + 1, dmaLength: 4096 });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('atomic with a bad R_Key: NAK remote access error, victim QP to ERR, the word unchanged', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    await send({ opcode: Opcode.RC_FETCH_ADD, destQp: qx, va: mr.iova + 28n, rkey: 0xdead00, swapAdd: 1n });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('RDMA WRITE starting before the MR (into the guard bytes): NAK remote access error, nothing changes', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    await send({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qx, va: mr.iova - 8n, rkey: mr.rkey, payload: new Uint8Array(64).fill(0xee) });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('RDMA WRITE crossing the MR end: NAK remote access error at the first packet, nothing written at all', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    const va = mr.iova + BigInt(MR_LEN - MTU - 512); // 2 packets: the first fits, the second runs 512 bytes past the end
    await send({ opcode: Opcode.RC_RDMA_WRITE_FIRST, destQp: qx, va, rkey: mr.rkey, dmaLength: 2 * MTU, payload: new Uint8Array(MTU).fill(0xe1), ackReq: false });
    await send({ opcode: Opcode.RC_RDMA_WRITE_LAST, psn: EPSN + 1, destQp: qx, payload: new Uint8Array(MTU).fill(0xe2) });
    // The whole RETH range is checked at the first packet (as rxe does): its NAK names that packet, the second finds the QP in ERR.
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('a 256 KiB READ then at once a SEND: the 256 responses go out paced, then one PSN-sequence NAK asks for the SEND again; other QPs are served meanwhile', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const mr = region(v, 256 * 1024);
    fillPattern(mr.bytes, 0x5eed);
    const rq = region(v, 4096);
    // Posted past the recording host's bookkeeping: it must stay unconsumed, not complete.
    v.engine.postRecv(qx, { wrId: 0n, sges: [rq.sge(0, 4096)], length: 4096 }, 0x7fff_0000);
    // What the victim sends to the attacker, in order (the attacker's socket may not keep up).
    const sent: number[] = [];
    v.engine.outgoingHook = (x) => {
      if (((x[5]! << 16) | (x[6]! << 8) | x[7]!) === ATTACKER_QPN) sent.push(x[0]!);
      return true;
    };
    await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: qx, va: mr.iova, rkey: mr.rkey, dmaLength: 256 * 1024 });
    await send({ opcode: Opcode.RC_SEND_ONLY, psn: EPSN + 256, destQp: qx, payload: new Uint8Array(16).fill(0x5e) });
    await until(() => sent.includes(Opcode.RC_ACKNOWLEDGE), 5000, 'the NAK after the READ');
    const got = await replies();
    expect(sent.filter((op) => op >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && op <= Opcode.RC_RDMA_READ_RESPONSE_ONLY)).toHaveLength(256);
    expect(sent.at(-1)).toBe(Opcode.RC_ACKNOWLEDGE);
    expect(sent.filter((op) => op === Opcode.RC_ACKNOWLEDGE)).toHaveLength(1);
    expect(got.filter((r) => r.opcode === Opcode.RC_ACKNOWLEDGE)).toMatchObject([nak(EPSN + 256, Syndrome.NAK_PSN_SEQ_ERROR)]);
    expect(v.host.recvsOf(qx)).toEqual([]); // the SEND was not taken
    expect(qpState(qx)).toBe(QpState.RTS);
    await healthy();
  });

  it('more READs in progress than max_dest_rd_atomic: NAK invalid request, victim QP to ERR, other QPs unaffected', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp({ maxDestRdAtomic: 2 });
    const mr = region(v, 1 << 20);
    const naks: number[] = [];
    v.engine.outgoingHook = (x) => {
      if (x[0] === Opcode.RC_ACKNOWLEDGE && ((x[5]! << 16) | (x[6]! << 8) | x[7]!) === ATTACKER_QPN) naks.push(x[12]!);
      return true;
    };
    // Three 1 MiB READs (1024 responses each, 64 per turn): the third arrives while two are in progress.
    for (let i = 0; i < 3; i++) await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, psn: EPSN + i * 1024, destQp: qx, va: mr.iova, rkey: mr.rkey, dmaLength: 1 << 20 });
    await until(() => naks.length > 0, 5000, 'a NAK');
    expect(naks).toEqual([Syndrome.NAK_INVALID_REQUEST]);
    expect(qpState(qx)).toBe(QpState.ERR);
    attacker.replies.splice(0);
    await healthy();
  });

  it('RDMA READ past the MR end: NAK remote access error before any response, victim QP to ERR', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: qx, va: mr.iova + BigInt(MR_LEN - 100), rkey: mr.rkey, dmaLength: 101 });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('RDMA READ starting before the MR but ending inside it: NAK remote access error, no response', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr } = target();
    await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: qx, va: mr.iova - 4n, rkey: mr.rkey, dmaLength: 64 });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    await healthy();
  });

  it('MR without REMOTE_WRITE / REMOTE_READ / REMOTE_ATOMIC: each request gets NAK remote access error, nothing changes', async () => {
    const healthy = healthyTraffic();
    const cases: [number, Request][] = [];
    const { mr: noWrite, before: bw } = target(Access.LOCAL_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC);
    const { mr: noRead } = target(Access.LOCAL_WRITE | Access.REMOTE_WRITE);
    const { mr: noAtomic, before: ba } = target(Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ);
    cases.push([victimQp(), { opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: 0, va: noWrite.iova, rkey: noWrite.rkey, payload: new Uint8Array(32).fill(1) }]);
    cases.push([victimQp(), { opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: 0, va: noRead.iova, rkey: noRead.rkey, dmaLength: 32 }]);
    cases.push([victimQp(), { opcode: Opcode.RC_COMPARE_SWAP, destQp: 0, va: noAtomic.iova + 4n, rkey: noAtomic.rkey, compare: 0n, swapAdd: 5n }]);
    for (const [qx, r] of cases) {
      await send({ ...r, destQp: qx });
      expect(await replies(), `${r.opcode}`).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
      expect(qpState(qx)).toBe(QpState.ERR);
    }
    expect(changes(noWrite, bw)).toEqual([]);
    expect(changes(noAtomic, ba)).toEqual([]);
    await healthy();
  });

  it('QP without remote WRITE / READ / ATOMIC access flags: NAK remote access error, victim QP to ERR, nothing changes', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    const cases: [number, Request][] = [
      [Access.REMOTE_READ | Access.REMOTE_ATOMIC, { opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: 0, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(32).fill(1) }],
      [Access.REMOTE_WRITE | Access.REMOTE_ATOMIC, { opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: 0, va: mr.iova, rkey: mr.rkey, dmaLength: 32 }],
      [Access.REMOTE_WRITE | Access.REMOTE_READ, { opcode: Opcode.RC_FETCH_ADD, destQp: 0, va: mr.iova + 4n, rkey: mr.rkey, swapAdd: 5n }],
    ];
    for (const [flags, r] of cases) {
      const qx = victimQp({ accessFlags: flags });
      await send({ ...r, destQp: qx });
      expect(await replies(), `${r.opcode}`).toMatchObject([nak(EPSN, Syndrome.NAK_REMOTE_ACCESS_ERROR)]);
      expect(qpState(qx)).toBe(QpState.ERR);
    }
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('PSN ahead of the expected one (within 2^23): one PSN-sequence-error NAK naming the expected PSN, then silence; no state or memory change', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    const write = (psn: number): Request => ({ opcode: Opcode.RC_RDMA_WRITE_ONLY, psn, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(16).fill(0xab) });
    await send(write(EPSN + 1000));
    await send(write(EPSN + 0x7fffff)); // the farthest PSN that is still "ahead"
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_PSN_SEQ_ERROR)]);
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(changes(mr, before)).toEqual([]);
    // The QP still takes the expected PSN.
    await send(write(EPSN));
    expect(await replies()).toMatchObject([{ opcode: Opcode.RC_ACKNOWLEDGE, psn: EPSN, syndrome: Syndrome.ACK_UNLIMITED }]);
    expect(changes(mr, before)).toEqual([[0, 16]]);
    await healthy();
  });

  it('PSN more than 2^23 ahead, or far behind, is a duplicate: a WRITE is acknowledged again without being executed; QP stays RTS', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    const write = (psn: number): Request => ({ opcode: Opcode.RC_RDMA_WRITE_ONLY, psn: psn & 0xffffff, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(16).fill(0xab) });
    await send(write(EPSN + 0x800001));
    await send(write(EPSN - 5000));
    // C9-105: a duplicate is answered with an ACK of the last PSN executed (EPSN - 1: nothing yet).
    expect(await replies()).toMatchObject([
      { opcode: Opcode.RC_ACKNOWLEDGE, psn: EPSN - 1, syndrome: Syndrome.ACK_UNLIMITED },
      { opcode: Opcode.RC_ACKNOWLEDGE, psn: EPSN - 1, syndrome: Syndrome.ACK_UNLIMITED },
    ]);
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('a duplicate READ (PSN behind) that would fail is dropped silently: no NAK, QP stays RTS', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr } = target();
    await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, psn: EPSN - 10, destQp: qx, va: mr.iova, rkey: mr.rkey ^ 0xff, dmaLength: 64 });
    await send({ opcode: Opcode.RC_RDMA_READ_REQUEST, psn: EPSN - 20, destQp: qx, va: mr.iova + BigInt(MR_LEN), rkey: mr.rkey, dmaLength: 64 });
    expect(await replies()).toEqual([]);
    expect(qpState(qx)).toBe(QpState.RTS);
    await healthy();
  });

  it('truncated headers (shorter than a BTH, than BTH+RETH, pad count beyond the payload, no ICRC) are dropped silently and counted as malformed', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    const good = attacker.build(packet({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(8).fill(0x77) }), new Uint8Array(8).fill(0x77), to);
    const malformed0 = v.engine.stats.malformed;
    await sendBytes(good.slice(0, 8)); // shorter than a BTH
    await sendBytes(good.slice(0, 12 + 8)); // BTH and half a RETH
    const badPad = attacker.build(packet({ opcode: Opcode.RC_SEND_ONLY, destQp: qx, payload: new Uint8Array(0) }), null, to);
    badPad[1] = (badPad[1]! & 0xcf) | (3 << 4); // 3 pad bytes, but nothing between the BTH and the ICRC
    await sendBytes(badPad);
    const read = attacker.build(packet({ opcode: Opcode.RC_RDMA_READ_REQUEST, destQp: qx, va: mr.iova, rkey: mr.rkey, dmaLength: 8 }), null, to);
    await sendBytes(read.slice(0, read.length - 4)); // no ICRC
    expect(await replies()).toEqual([]);
    expect(v.engine.stats.malformed - malformed0).toBe(4);
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('a well-formed WRITE with a wrong ICRC is dropped silently before it touches memory', async () => {
    const healthy = healthyTraffic();
    const qx = victimQp();
    const { mr, before } = target();
    const bytes = attacker.build(packet({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(8).fill(0x77) }), new Uint8Array(8).fill(0x77), to);
    bytes[bytes.length - 1]! ^= 0x01;
    const bad0 = v.engine.stats.badIcrc;
    await sendBytes(bytes);
    expect(await replies()).toEqual([]);
    expect(v.engine.stats.badIcrc - bad0).toBe(1);
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('payload longer than the path MTU: NAK invalid request and ERR (rxe ≥ 6.2); longer than any MTU: dropped as malformed', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    const qx = victimQp();
    v.engine.postRecv(qx, { wrId: 0n, sges: [mr.sge(0, 4096)], length: 4096 }, 0xbeef);
    v.host.outstandingRecvs.add(`${qx}/${0xbeef}`);
    // Longer than 4096: the codec refuses it (or the transport truncates it) before any QP sees it.
    const malformed0 = v.engine.stats.malformed;
    const huge = new Uint8Array(4096 + 64).fill(0x55);
    await send({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: huge.subarray(0, 4096) }); // legal size for the codec: sets up the comparison below
    await sleep(10);
    expect(attacker.replies.splice(0)).toMatchObject([nak(EPSN, Syndrome.NAK_INVALID_REQUEST)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    // A fresh QP for the packet beyond every MTU.
    const qy = victimQp();
    const bytes = new Uint8Array(12 + 16 + huge.length + 4);
    bytes.set(attacker.build(packet({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qy, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(0) }), null, to).subarray(0, 28));
    bytes.set(huge, 28);
    await sendBytes(bytes);
    expect(await replies()).toEqual([]);
    expect(v.engine.stats.malformed - malformed0).toBe(1);
    expect(qpState(qy)).toBe(QpState.RTS);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('a request from an address other than the QP\'s peer is dropped silently even with the right PSN and R_Key (rxe check_addr)', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    // A QP connected to the healthy engine's address; the attacker forges its traffic.
    const qx = victimQp({ av: avTo(ipv4Gid(HEALTHY)) });
    const noQp0 = v.engine.stats.noQp;
    await send({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(16).fill(0x66) });
    await send({ opcode: Opcode.RC_RDMA_WRITE_ONLY, psn: EPSN + 7, destQp: qx, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(16).fill(0x66) });
    expect(await replies()).toEqual([]);
    expect(v.engine.stats.noQp - noQp0).toBe(2);
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('a MIDDLE packet without a FIRST, and a misaligned atomic: NAK invalid request, victim QP to ERR, nothing changes', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    const qx = victimQp();
    await send({ opcode: Opcode.RC_RDMA_WRITE_MIDDLE, destQp: qx, payload: new Uint8Array(MTU).fill(0x31) });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_INVALID_REQUEST)]);
    expect(qpState(qx)).toBe(QpState.ERR);
    const qy = victimQp();
    await send({ opcode: Opcode.RC_COMPARE_SWAP, destQp: qy, va: mr.iova + 3n, rkey: mr.rkey, compare: 0n, swapAdd: 1n });
    expect(await replies()).toMatchObject([nak(EPSN, Syndrome.NAK_INVALID_REQUEST)]);
    expect(qpState(qy)).toBe(QpState.ERR);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('a two-packet WRITE with immediate to a QP with no receive posted: RNR NAK for the last packet, QP stays RTS, the engine keeps running', async () => {
    const healthy = healthyTraffic();
    const { mr } = target();
    const qx = victimQp();
    await send({ opcode: Opcode.RC_RDMA_WRITE_FIRST, destQp: qx, va: mr.iova, rkey: mr.rkey, dmaLength: 2 * MTU, payload: new Uint8Array(MTU).fill(0x41), ackReq: false });
    await send({ opcode: Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE, destQp: qx, psn: EPSN + 1, payload: new Uint8Array(MTU).fill(0x42) });
    const r = await replies();
    expect(r).toHaveLength(1);
    expect(r[0]).toMatchObject({ opcode: Opcode.RC_ACKNOWLEDGE, psn: EPSN + 1 });
    expect(r[0]!.syndrome & 0xe0).toBe(0x20); // RNR NAK
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(v.engine.stats.internalErrors).toBe(0);
    expect(v.host.recvsOf(qx)).toEqual([]);
    await healthy();
  });

  it('2,000 seeded random messages (every request kind, split by the MTU, some packets mutated or dropped, keys and ranges in and around the MR): nothing throws, nothing outside the MR changes, other QPs unaffected', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    const rnd = seededRandom(0x5eed);
    const accessSets = [ALL_ACCESS, Access.REMOTE_READ, Access.REMOTE_WRITE, Access.REMOTE_ATOMIC | Access.REMOTE_WRITE];
    const kinds = [QpType.RC, QpType.RC, QpType.RC, QpType.UC, QpType.UD];
    const victims = kinds.map((type) => victimQp({}, QpState.RTS, type));
    const recvBuf = region(v, 4 * MTU);
    const allOpcodes = [...Object.values(Opcode)].filter((o) => typeof o === 'number') as number[];
    // [first, middle, last, only] opcodes of each message kind (RC numbering; UC adds 0x20)
    const shapes = {
      send: [Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST, Opcode.RC_SEND_ONLY],
      sendImm: [Opcode.RC_SEND_FIRST, Opcode.RC_SEND_MIDDLE, Opcode.RC_SEND_LAST_WITH_IMMEDIATE, Opcode.RC_SEND_ONLY_WITH_IMMEDIATE],
      write: [Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE, Opcode.RC_RDMA_WRITE_LAST, Opcode.RC_RDMA_WRITE_ONLY],
      writeImm: [Opcode.RC_RDMA_WRITE_FIRST, Opcode.RC_RDMA_WRITE_MIDDLE, Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE, Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE],
    } as const;
    const shapeNames = Object.keys(shapes) as (keyof typeof shapes)[];
    const internal0 = v.engine.stats.internalErrors;
    const settle = async (): Promise<void> => {
      for (let j = 0; j < 3; j++) await new Promise<void>((r) => setImmediate(r));
    };
    let packets = 0;
    for (let m = 0; m < 2000; m++) {
      const k = rnd(victims.length);
      const qpn = victims[k]!;
      const type = kinds[k]!;
      await settle();
      const saved = decodeState(v.engine.saveState()).qps.find((q) => q.qpn === qpn)!;
      if (saved.attrs.state === QpState.ERR) {
        reviveVictim(qpn, { accessFlags: accessSets[rnd(accessSets.length)]! });
        continue;
      }
      if (rnd(3) === 0 && saved.rq.length < 8) postRecv(v, qpn, [recvBuf.sge(rnd(2) * MTU, rnd(3) * MTU)]);
      // The message: a request of some kind and length, split as a requester would split it.
      const pick = rnd(10);
      const len = [0, 1, MTU - 1, MTU, MTU + 1, 2 * MTU, 3 * MTU - 5][rnd(7)]!;
      const va = rnd(4) === 0 ? mr.iova + BigInt(rnd(MR_LEN + 400)) - 200n : mr.iova + BigInt(rnd(4) * 8);
      const rkey = rnd(8) === 0 ? rnd(0x1000000) : mr.rkey;
      const reqs: Parameters<typeof packet>[0][] = [];
      if (type === QpType.RC && pick >= 8) {
        // READ or atomic: one request packet
        const op = [Opcode.RC_RDMA_READ_REQUEST, Opcode.RC_COMPARE_SWAP, Opcode.RC_FETCH_ADD][rnd(3)]!;
        reqs.push({ opcode: op, destQp: qpn, va, rkey, dmaLength: len, swapAdd: BigInt(rnd(9)), compare: BigInt(rnd(9)) });
      } else if (type === QpType.UD) {
        reqs.push({ opcode: rnd(2) ? Opcode.UD_SEND_ONLY : Opcode.UD_SEND_ONLY_WITH_IMMEDIATE, destQp: qpn, payload: new Uint8Array(Math.min(len, MTU + rnd(2))) });
      } else {
        const shape = shapes[shapeNames[rnd(shapeNames.length)]!];
        const n = Math.max(1, Math.ceil(len / MTU));
        const uc = type === QpType.UC ? 0x20 : 0;
        for (let i = 0; i < n; i++) {
          const op = (n === 1 ? shape[3] : i === 0 ? shape[0] : i === n - 1 ? shape[2] : shape[1]) | uc;
          const size = i < n - 1 ? MTU : len - (n - 1) * MTU;
          reqs.push({ opcode: op, destQp: qpn, va, rkey, dmaLength: len, payload: new Uint8Array(Math.max(0, size)).fill(0x5a) });
        }
      }
      let psn = saved.rqPsn;
      for (const r of reqs) {
        // Mutations: drop it, another opcode, a PSN one off, a length one off.
        const roll = rnd(40);
        if (roll === 0) {
          psn = (psn + 1) & 0xffffff;
          continue;
        }
        if (roll === 1) r.opcode = allOpcodes[rnd(allOpcodes.length)]!;
        const thisPsn = roll === 2 ? (psn + rnd(3) - 1) & 0xffffff : psn;
        if (roll === 3 && r.payload !== undefined && r.payload.length > 0) r.payload = r.payload.subarray(1);
        try {
          const p = packet({ ...r, psn: thisPsn, ackReq: rnd(3) === 0 });
          p.immDt.imm = rnd(0x7fffffff);
          p.deth.qkey = rnd(6) === 0 ? rnd(0x7fffffff) : 0x1111;
          p.deth.srcQp = rnd(0x1000000);
          p.aeth.syndrome = rnd(256);
          const bytes = attacker.build(p, r.payload !== undefined && r.payload.length > 0 ? r.payload : null, to);
          await attacker.sendRaw(bytes, to, VICTIM);
          packets++;
        } catch {
          // an opcode or header the packet builder refuses: nothing is sent
        }
        psn = (psn + 1) & 0xffffff;
      }
    }
    await sleep(200);
    expect(packets).toBeGreaterThan(2000);
    expect(v.engine.stats.internalErrors - internal0, 'datagrams whose handling threw').toBe(0);
    for (const [off, n] of changes(mr, before)) {
      expect(off, 'a change before the MR').toBeGreaterThanOrEqual(0);
      expect(off + n, 'a change past the MR').toBeLessThanOrEqual(MR_LEN);
    }
    // The victims' leftover receives flush, so the healthy pair's bookkeeping can settle.
    for (const q of victims) v.engine.modifyQp(q, rcAttrs({ state: QpState.ERR }), 0);
    await healthy();
  }, 60_000);

  it('1,500 seeded random responses (ACKs, NAKs of every syndrome, READ responses, ATOMIC ACKs, at and around the PSNs the victim sent) to a requester with WRITEs, READs, SENDs and atomics outstanding: nothing throws, nothing outside the local MR changes, every WR completes once', async () => {
    const healthy = healthyTraffic();
    const rnd = seededRandom(0xacc);
    const local = region(v, 4 * MTU, ALL_ACCESS, LEAD);
    fillPattern(local.span, 0x10ca1);
    const localBefore = local.span.slice();
    const requester: Partial<QpAttributes> = { timeout: 10, retryCnt: 7, rnrRetry: 7, maxRdAtomic: 4 };
    const qx = victimQp(requester);
    const postSome = (): void => {
      for (let i = 0; i < 4; i++) {
        const kind = rnd(4);
        const len = [1, MTU, 2 * MTU + 7, 3 * MTU][rnd(4)]!;
        if (kind === 0) postSend(v, qx, { opcode: SendOp.RDMA_READ, sges: [local.sge(0, len)], remoteAddr: 0x1000n, rkey: 0x77 });
        else if (kind === 1) postSend(v, qx, { opcode: SendOp.RDMA_WRITE, sges: [local.sge(0, len)], remoteAddr: 0x1000n, rkey: 0x77 });
        else if (kind === 2) postSend(v, qx, { opcode: SendOp.SEND, sges: [local.sge(0, len)] });
        else postSend(v, qx, { opcode: SendOp.ATOMIC_FETCH_AND_ADD, sges: [local.sge(8 * rnd(4), 8)], remoteAddr: 0x1000n, rkey: 0x77, compareAdd: 1n });
      }
    };
    const internal0 = v.engine.stats.internalErrors;
    const responses = [Opcode.RC_ACKNOWLEDGE, Opcode.RC_ATOMIC_ACKNOWLEDGE, Opcode.RC_RDMA_READ_RESPONSE_FIRST, Opcode.RC_RDMA_READ_RESPONSE_MIDDLE, Opcode.RC_RDMA_READ_RESPONSE_LAST, Opcode.RC_RDMA_READ_RESPONSE_ONLY];
    const syndromes = [0x1f, 0x00, 0x20, 0x21, 0x3f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x7f, 0x40, 0x80];
    let sentPsns: number[] = [];
    let msn = 0;
    for (let i = 0; i < 1500; i++) {
      await new Promise<void>((r) => setImmediate(r));
      const saved = decodeState(v.engine.saveState()).qps.find((q) => q.qpn === qx)!;
      if (saved.attrs.state === QpState.ERR) {
        await sleep(1);
        reviveVictim(qx, requester);
        sentPsns = [];
        continue;
      }
      if (saved.sq.length < 4) postSome();
      for (const r of attacker.replies.splice(0)) sentPsns.push(r.psn);
      if (sentPsns.length > 64) sentPsns = sentPsns.slice(-64);
      const base = sentPsns.length > 0 ? sentPsns[rnd(sentPsns.length)]! : 0x200;
      const opcode = responses[rnd(responses.length)]!;
      const len = opcode === Opcode.RC_ACKNOWLEDGE || opcode === Opcode.RC_ATOMIC_ACKNOWLEDGE ? 0 : [0, 1, MTU - 1, MTU, MTU + 1][rnd(5)]!;
      try {
        const p = packet({ opcode, destQp: qx, psn: (base + rnd(5) - 2) & 0xffffff, ackReq: false, payload: new Uint8Array(len) });
        p.aeth.syndrome = rnd(4) === 0 ? rnd(256) : syndromes[rnd(syndromes.length)]!;
        p.aeth.msn = rnd(3) === 0 ? rnd(0x1000000) : (msn = (msn + rnd(2)) & 0xffffff);
        p.atomicAckEth.origRemoteData = BigInt(rnd(1000));
        await attacker.sendRaw(attacker.build(p, len > 0 ? new Uint8Array(len).fill(0x33) : null, to), to, VICTIM);
      } catch {
        // an opcode or header the packet builder refuses: nothing is sent
      }
    }
    await sleep(200);
    expect(v.engine.stats.internalErrors - internal0, 'datagrams whose handling threw').toBe(0);
    // Responses land only in the WRs' local buffers: the MR's first 3 pages and nothing around them.
    for (let j = 0; j < local.span.length; j++) {
      const inMr = j >= local.spanStart && j < local.spanStart + 4 * MTU;
      if (!inMr && local.span[j] !== localBefore[j]) throw new Error(`byte ${j - local.spanStart} outside the local MR changed`);
    }
    v.engine.modifyQp(qx, rcAttrs({ state: QpState.ERR }), 0);
    await healthy();
  }, 60_000);

  it('responses nobody asked for (ACK, NAKs, READ response, ATOMIC ACK for PSNs never sent) are ignored: no answer, QP stays RTS', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    const qx = victimQp();
    const ignored0 = v.engine.stats.ignored;
    const forged: [number, number][] = [
      [Opcode.RC_ACKNOWLEDGE, Syndrome.ACK_UNLIMITED],
      [Opcode.RC_ACKNOWLEDGE, Syndrome.NAK_REMOTE_ACCESS_ERROR],
      [Opcode.RC_ACKNOWLEDGE, Syndrome.NAK_PSN_SEQ_ERROR],
      [Opcode.RC_ACKNOWLEDGE, Syndrome.RNR_NAK | 1],
      [Opcode.RC_RDMA_READ_RESPONSE_ONLY, Syndrome.ACK_UNLIMITED],
      [Opcode.RC_ATOMIC_ACKNOWLEDGE, Syndrome.ACK_UNLIMITED],
    ];
    for (const [opcode, syndrome] of forged) {
      const p = packet({ opcode, psn: 0x200, destQp: qx, ackReq: false, payload: opcode === Opcode.RC_RDMA_READ_RESPONSE_ONLY ? new Uint8Array(32) : undefined });
      p.aeth.syndrome = syndrome;
      await sendBytes(attacker.build(p, p.payloadLength > 0 ? new Uint8Array(32) : null, to));
    }
    expect(await replies()).toEqual([]);
    expect(v.engine.stats.ignored - ignored0).toBe(forged.length);
    expect(qpState(qx)).toBe(QpState.RTS);
    expect(v.host.failed).toEqual([]);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });

  it('wrong QPN (none, a UD or UC QP with an RC opcode, a QP in RESET or INIT): dropped silently, counted, no QP changes state', async () => {
    const healthy = healthyTraffic();
    const { mr, before } = target();
    const ud = v.engine.createQp({ type: QpType.UD, pdn: PD, maxSendWr: 4, maxRecvWr: 4 }, null, () => false)!;
    for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) v.engine.modifyQp(ud, rcAttrs({ state, qkey: 0x1111 }), 0);
    const uc = victimQp({}, QpState.RTS, QpType.UC);
    const reset = v.engine.createQp({ type: QpType.RC, pdn: PD, maxSendWr: 4, maxRecvWr: 4 }, null, () => false)!;
    const init = victimQp({}, QpState.INIT);
    const targets: [number, QpState | undefined][] = [
      [0x7abcde, undefined],
      [ud, QpState.RTS],
      [uc, QpState.RTS],
      [reset, QpState.RESET],
      [init, QpState.INIT],
    ];
    const noQp0 = v.engine.stats.noQp;
    for (const [qpn] of targets) {
      await send({ opcode: Opcode.RC_RDMA_WRITE_ONLY, destQp: qpn, va: mr.iova, rkey: mr.rkey, payload: new Uint8Array(16).fill(0x99) });
      await send({ opcode: Opcode.RC_SEND_ONLY, destQp: qpn, payload: new Uint8Array(16).fill(0x98) });
    }
    expect(await replies()).toEqual([]);
    expect(v.engine.stats.noQp - noQp0).toBe(2 * targets.length);
    for (const [qpn, state] of targets) expect(qpState(qpn), `qpn 0x${qpn.toString(16)}`).toBe(state);
    expect(changes(mr, before)).toEqual([]);
    await healthy();
  });
});
