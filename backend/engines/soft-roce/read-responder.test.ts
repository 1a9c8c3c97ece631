/**
 * The responder answers an RDMA READ a burst at a time (READ_BURST
 * responses per turn of the event loop), so a READ of any size neither
 * blocks the back-end nor outruns its socket. (Requests that arrive
 * meanwhile: remote-attack.test.ts, from a raw sender — this engine's own
 * requester never sends past a READ's responses inside its window.)
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SendOp, WcStatus } from '../../abi/constants.js';
import { closeSide, connectRc, fillPattern, makeSide, postSend, randomPort, region, until, type Side } from './engine-pair.js';
import { Opcode } from './opcodes.js';
import { READ_BURST } from './responder.js';

const MIB = 1 << 20;
let a: Side;
let b: Side;

beforeEach(() => {
  const port = randomPort();
  a = makeSide('127.0.0.2', port, 24 * MIB);
  b = makeSide('127.0.0.3', port, 24 * MIB);
});

afterEach(() => {
  closeSide(a);
  closeSide(b);
});

describe('soft-RoCE READ responder', () => {
  it(`sends a 4 MiB READ at MTU 1024 (4096 responses) at most ${READ_BURST} responses per turn of the event loop`, async () => {
    const [qa] = connectRc(a, b, { pathMtu: 3 });
    const src = region(b, 4 * MIB);
    const dst = region(a, 4 * MIB);
    fillPattern(src.bytes, 7);
    let turn = 0;
    let inTurn = 0;
    let most = 0;
    let responses = 0;
    let ticking = true;
    const tick = (): void => {
      turn++;
      if (ticking) setImmediate(tick);
    };
    setImmediate(tick);
    let seenTurn = -1;
    b.engine.outgoingHook = (x) => {
      if (x[0]! >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && x[0]! <= Opcode.RC_RDMA_READ_RESPONSE_ONLY) {
        responses++;
        if (turn !== seenTurn) {
          seenTurn = turn;
          inTurn = 0;
        }
        most = Math.max(most, ++inTurn);
      }
      return true;
    };
    postSend(a, qa, { opcode: SendOp.RDMA_READ, sges: [dst.sge(0, 4 * MIB)], remoteAddr: src.iova, rkey: src.rkey });
    await until(() => a.host.sends.length === 1, 20_000);
    ticking = false;
    expect(a.host.sends[0]!.status).toBe(WcStatus.SUCCESS);
    expect(Buffer.compare(dst.bytes, src.bytes)).toBe(0);
    expect(responses).toBeGreaterThanOrEqual(4096);
    expect(most).toBeLessThanOrEqual(READ_BURST);
  });
});
