/**
 * RC recovery from single, targeted faults (the cases the fault-injection
 * run found): each test loses, duplicates or delays specific datagrams with
 * the engine's outgoing hook and checks that retransmission alone repairs
 * it — data byte-exact, every WR completes once and successfully.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SendOp, WcStatus } from '../../abi/constants.js';
import { type Side, closeSide, connectRc, fillPattern, makeSide, postRecv, postSend, randomPort, region, until } from './engine-pair.js';
import { Opcode } from './opcodes.js';
import { RocePacket, decodePacket } from './packet.js';

const PORT = randomPort();
let a: Side;
let b: Side;

beforeEach(() => {
  a = makeSide('127.0.0.2', PORT, 8 << 20);
  b = makeSide('127.0.0.3', PORT, 8 << 20);
});

afterEach(() => {
  for (const s of [a, b]) {
    expect(s.host.violations).toEqual([]);
    closeSide(s);
  }
});

function allSucceeded(s: Side): void {
  expect(s.host.failed).toEqual([]);
  expect(s.host.sends.map((c) => WcStatus[c.status])).toEqual(s.host.sends.map(() => 'SUCCESS'));
  expect(s.host.outstandingSends.size + s.host.outstandingRecvs.size).toBe(0);
}

interface Seen {
  psn: number;
  va: bigint;
  length: number;
}

/** Records `s`'s outgoing packets of `opcode` (PSN, RETH VA and length) without changing them. */
function watch(s: Side, opcode: number): Seen[] {
  const seen: Seen[] = [];
  const pkt = new RocePacket();
  s.engine.outgoingHook = (x) => {
    if (x[0] === opcode && decodePacket(x, pkt) === 'ok') seen.push({ psn: pkt.bth.psn, va: pkt.reth.va, length: pkt.reth.dmaLength });
    return true;
  };
  return seen;
}

describe('RC retransmission', () => {
  it('a READ whose responses stop part-way is asked again once, for the remainder, at the PSN where they stopped', async () => {
    const [qa] = connectRc(a, b, { timeout: 14, retryCnt: 3 }); // ≈ 67 ms: recovery must come from the gap, not the timer
    const len = 10 * 1024 + 77;
    const dst = region(a, len);
    const src = region(b, len);
    fillPattern(src.bytes, 3);
    const requests = watch(a, Opcode.RC_RDMA_READ_REQUEST);
    let responses = 0;
    // Lose the 5th READ response once: 0-3 arrive, 5-10 arrive after a gap.
    b.engine.outgoingHook = (x) => !(x[0]! >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && x[0]! <= Opcode.RC_RDMA_READ_RESPONSE_ONLY && responses++ === 4);
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [dst.sge(0, len)], remoteAddr: src.iova, rkey: src.rkey });
    await until(() => a.host.sends.length === 1);
    allSucceeded(a);
    expect(Buffer.compare(dst.bytes, src.bytes)).toBe(0);
    expect(requests.map((p) => [p.psn, Number(p.va - src.iova), p.length])).toEqual([
      [0xfffff0, 0, len],
      [0xfffff4, 4 * 1024, len - 4 * 1024],
    ]);
  });
  it('a gap in the responses of a later READ while an earlier READ lacks its own goes back to the earlier READ', async () => {
    const [qa] = connectRc(a, b, { timeout: 10, retryCnt: 3, maxRdAtomic: 4, maxDestRdAtomic: 4 });
    const dst = region(a, 4096);
    const src = region(b, 4096);
    fillPattern(src.bytes, 5);
    let responses = 0;
    // Lose READ 1's only response and READ 2's first: READ 2's second response then shows a gap.
    b.engine.outgoingHook = (x) => !(x[0]! >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && x[0]! <= Opcode.RC_RDMA_READ_RESPONSE_ONLY && responses++ < 2);
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [dst.sge(0, 100)], remoteAddr: src.iova, rkey: src.rkey });
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [dst.sge(100, 3000)], remoteAddr: src.iova + 100n, rkey: src.rkey });
    await until(() => a.host.sends.length === 2);
    allSucceeded(a);
    expect(Buffer.compare(dst.bytes.subarray(0, 3100), src.bytes.subarray(0, 3100))).toBe(0);
  });

  it('a PSN-sequence NAK for a WRITE behind a READ whose response was lost re-reads instead of completing the READ without data', async () => {
    const [qa] = connectRc(a, b, { timeout: 14, retryCnt: 3 });
    const mine = region(a, 8192);
    const theirs = region(b, 8192);
    fillPattern(mine.bytes, 6);
    fillPattern(theirs.bytes, 7);
    const expectRead = theirs.bytes.slice(0, 500);
    let readResponses = 0;
    let writes = 0;
    b.engine.outgoingHook = (x) => !(x[0] === Opcode.RC_RDMA_READ_RESPONSE_ONLY && readResponses++ === 0);
    // Lose the WRITE's first packet once: its second draws the NAK.
    a.engine.outgoingHook = (x) => !(x[0] === Opcode.RC_RDMA_WRITE_FIRST && writes++ === 0);
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [mine.sge(0, 500)], remoteAddr: theirs.iova, rkey: theirs.rkey });
    postSend(a, qa, { opcode: SendOp.RDMA_WRITE, sges: [mine.sge(4096, 2000)], remoteAddr: theirs.iova + 4096n, rkey: theirs.rkey });
    await until(() => a.host.sends.length === 2);
    allSucceeded(a);
    expect(b.engine.stats.naksSent).toBe(1);
    expect(Buffer.compare(mine.bytes.subarray(0, 500), expectRead)).toBe(0);
    expect(Buffer.compare(theirs.bytes.subarray(4096, 6096), mine.bytes.subarray(4096, 6096))).toBe(0);
  });

  it('a duplicated PSN-sequence NAK and a stale one (for PSNs already acknowledged) cause one retransmission, not one each', async () => {
    const [qa, qb] = connectRc(a, b, { timeout: 14, retryCnt: 3 });
    const src = region(a, 8 * 1024);
    const dst = region(b, 8 * 1024);
    fillPattern(src.bytes, 8);
    let dropped = 0;
    const naks: Uint8Array[] = [];
    // Lose the 3rd packet of the first SEND once; duplicate every NAK; replay the first NAK after the SEND completed.
    a.engine.outgoingHook = (x) => !(x[0] === Opcode.RC_SEND_MIDDLE && dropped++ === 1);
    b.engine.outgoingHook = (x) => {
      if (x[0] === Opcode.RC_ACKNOWLEDGE && (x[12]! & 0x60) === 0x60) {
        naks.push(x.slice());
        b.engine.link.queue(a.engine.local, x.slice());
      }
      return true;
    };
    postRecv(b, qb, [dst.sge(0, 4096)]);
    postRecv(b, qb, [dst.sge(4096, 4096)]);
    postSend(a, qa, { opcode: SendOp.SEND, sges: [src.sge(0, 4096)] });
    await until(() => a.host.sends.length === 1);
    expect(naks.length).toBe(1);
    expect(a.engine.stats.retransmits).toBe(1);
    b.engine.link.queue(a.engine.local, naks[0]!); // stale now: every PSN it names is acknowledged
    postSend(a, qa, { opcode: SendOp.SEND, sges: [src.sge(4096, 4096)] });
    await until(() => a.host.sends.length === 2 && b.host.recvs.length === 2);
    allSucceeded(a);
    expect(a.engine.stats.retransmits).toBe(1);
    expect(Buffer.compare(dst.bytes, src.bytes)).toBe(0);
  });
});

