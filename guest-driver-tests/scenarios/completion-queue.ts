/**
 * CQ scenarios: overflow (docs/virtio-rdma.md §7: the CQ error event, QPs to
 * ERR) and arming (NEXT_COMPLETION / SOLICITED, interrupts only when armed).
 */
import { Access, QpState, QpType, SendFlag, WcOpcode, WcStatus, WrOpcode, type Verbs } from '../verbs.js';
import {
  DEFAULT_CAP,
  ScenarioFailure,
  bringUp,
  check,
  connectedPair,
  cqOf,
  drainCqEvents,
  expectBytes,
  expectEq,
  expectNoWc,
  expectQpState,
  expectWc,
  localGid,
  makeSide,
  mrBuf,
  pattern,
  pdOf,
  pollN,
  quietOf,
  timeoutOf,
  withTeardown,
  type ScenarioEnv,
  type Side,
} from './common.js';

/**
 * A CQ of 4 CQEs with 5 completions due and nothing polled: 4 CQEs, then the
 * CQ error event (opcode 255, GENERAL_ERR, qp_num of the QP) with an
 * interrupt although the CQ is not armed; the QP goes to ERR (its receives
 * flush into its other, healthy CQ) and later completions are dropped.
 */
export async function cqOverflow(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const CQE = 4;
    // Side A: a small send CQ, a normal receive CQ. Side B: normal CQs.
    const pdA = await pdOf(t, env.a);
    const small = await cqOf(t, env.a, CQE);
    expectEq(small.cqe, CQE, 'granted CQEs');
    const rcqA = await cqOf(t, env.a, 64);
    const qpA = await env.a.createQp(pdA, { qpType: QpType.RC, sendCq: small, recvCq: rcqA, cap: DEFAULT_CAP });
    t.add('qp A', () => env.a.destroyQp(qpA));
    const a: Side = { v: env.a, pd: pdA, scq: small, rcq: rcqA, qp: qpA, sqPsn: 0x10 };
    const b = await makeSide(t, env.b, {}, 0x20);
    await bringUp(a, b, await localGid(env.b));
    await bringUp(b, a, await localGid(env.a));

    const src = await mrBuf(t, env.a, a.pd, 64, Access.LOCAL_WRITE, pattern(64, 3));
    const dst = await mrBuf(t, env.b, b.pd, 64 * 8, Access.LOCAL_WRITE, 0);
    const ra = await mrBuf(t, env.a, a.pd, 64, Access.LOCAL_WRITE, 0);
    await env.b.postRecv(b.qp, Array.from({ length: CQE + 1 }, (_, i) => ({ wrId: BigInt(100 + i), sgList: [{ addr: dst.buf.addr + BigInt(64 * i), length: 64, lkey: dst.mr.lkey }] })));
    await env.a.postRecv(a.qp, [
      { wrId: 200n, sgList: [{ addr: ra.buf.addr, length: 32, lkey: ra.mr.lkey }] },
      { wrId: 201n, sgList: [{ addr: ra.buf.addr + 32n, length: 32, lkey: ra.mr.lkey }] },
    ]);
    await drainCqEvents(env.a, small);
    await env.a.postSend(
      a.qp,
      Array.from({ length: CQE + 1 }, (_, i) => ({ wrId: BigInt(i), opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 64, lkey: src.mr.lkey }] })),
    );

    // The responder got all five messages: only the fifth completion was lost, not the operation.
    const rw = await pollN(env, env.b, b.rcq, CQE + 1, 'responder receives');
    rw.forEach((w, i) => expectWc(w, { wrId: BigInt(100 + i), status: WcStatus.SUCCESS, byteLen: 64 }, `responder receive ${i}`));

    check(await env.a.waitCqEvent(small, timeoutOf(env)), 'no interrupt for the CQ error event on an unarmed CQ (§7: delivered whether or not the CQ is armed)');
    const ev = await env.a.getAsyncEvent(timeoutOf(env));
    if (ev === null) throw new ScenarioFailure('no CQ error event (CQE opcode 255) after the overflow');
    expectEq(ev.type, 'CQ_ERR', 'async event type');
    expectEq(ev.cq.handle, small.handle, 'CQ error event CQ');
    expectEq(ev.qpNum, a.qp.qpNum, 'CQ error event qp_num (the QP whose completion was lost)');
    expectEq(ev.status, WcStatus.GENERAL_ERR, 'CQ error event status');

    const sw = await env.a.pollCq(small, 16);
    expectEq(sw.length, CQE, 'completions before the CQ error event');
    sw.forEach((w, i) => expectWc(w, { wrId: BigInt(i), status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, qpNum: a.qp.qpNum }, `send completion ${i}`));

    await expectQpState(env.a, a.qp, QpState.ERR, 'QP using the overflowed CQ');
    const flushed = await pollN(env, env.a, a.rcq, 2, 'receives flushed when the QP went to ERR');
    flushed.forEach((w, i) => expectWc(w, { wrId: BigInt(200 + i), status: WcStatus.WR_FLUSH_ERR, qpNum: a.qp.qpNum }, `flushed receive ${i}`));

    // From now on the CQ drops completions: a send on the (ERR) QP is flushed into nothing.
    await env.a.postSend(a.qp, [{ wrId: 50n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [] }]);
    await expectNoWc(env, env.a, small, 'overflowed CQ after its error event');
    const again = await env.a.getAsyncEvent(0);
    check(again === null, `a second async event after the overflow: ${JSON.stringify(again?.type)}`);
    await expectQpState(env.b, b.qp, QpState.RTS, 'the peer QP (its CQs did not overflow)');
  });
}

/** B's receive CQ (and A's send CQ) under every arming mode, with interrupts counted. */
export async function cqArmingAndInterrupts(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { cap: { maxRecvWr: 16 } });
    const src = await mrBuf(t, env.a, a.pd, 64, Access.LOCAL_WRITE, pattern(64, 5));
    const dst = await mrBuf(t, env.b, b.pd, 64 * 16, Access.LOCAL_WRITE | Access.REMOTE_WRITE, 0);
    const RECVS = 12;
    await env.b.postRecv(b.qp, Array.from({ length: RECVS }, (_, i) => ({ wrId: BigInt(i), sgList: [{ addr: dst.buf.addr + BigInt(64 * i), length: 64, lkey: dst.mr.lkey }] })));
    let received = 0;
    let sent = 0;

    const send = async (flags: number, op: WrOpcode = WrOpcode.SEND): Promise<void> => {
      const wrId = BigInt(1000 + sent++);
      await env.a.postSend(a.qp, [
        {
          wrId,
          opcode: op,
          sendFlags: SendFlag.SIGNALED | flags,
          sgList: [{ addr: src.buf.addr, length: 64, lkey: src.mr.lkey }],
          ...(op === WrOpcode.RDMA_WRITE_WITH_IMM ? { immData: 0x5, rdma: { remoteAddr: dst.mr.addr + 64n * 15n, rkey: dst.mr.rkey } } : {}),
        },
      ]);
      expectWc((await pollN(env, env.a, a.scq, 1, 'send completion'))[0], { wrId, status: WcStatus.SUCCESS }, 'send completion');
    };
    const takeReceive = async (what: string): Promise<void> => {
      const [w] = await pollN(env, env.b, b.rcq, 1, what);
      expectWc(w, { wrId: BigInt(received++), status: WcStatus.SUCCESS }, what);
    };
    /** The receive CQE must come without an interrupt. */
    const quiet = async (cq: typeof b.rcq, v: Verbs, what: string): Promise<void> => {
      if (await v.waitCqEvent(cq, quietOf(env))) throw new ScenarioFailure(`${what}: interrupt, expected none`);
    };
    const interrupt = async (what: string): Promise<void> => {
      if (!(await env.b.waitCqEvent(b.rcq, timeoutOf(env)))) throw new ScenarioFailure(`${what}: no interrupt within ${timeoutOf(env)} ms`);
    };
    /** Arms, then polls once more as §7 says (the CQ is drained here, so nothing may be there). */
    const arm = async (solicited: boolean): Promise<void> => {
      await env.b.reqNotifyCq(b.rcq, solicited);
      const late = await env.b.pollCq(b.rcq, 4);
      expectEq(late.length, 0, 'completions found after arming an empty CQ');
    };

    await drainCqEvents(env.b, b.rcq);
    await drainCqEvents(env.a, a.scq);

    // 1. Not armed: a CQE, no interrupt.
    await send(0);
    await quiet(b.rcq, env.b, 'unarmed CQ');
    await takeReceive('receive on an unarmed CQ');
    await quiet(b.rcq, env.b, 'unarmed CQ after polling');

    // 2. NEXT_COMPLETION: one interrupt for any CQE, then disarmed.
    await arm(false);
    await send(0);
    await interrupt('NEXT_COMPLETION armed CQ');
    await takeReceive('receive after NEXT_COMPLETION');
    await send(0);
    await quiet(b.rcq, env.b, 'CQ after its interrupt (disarmed)');
    await takeReceive('receive on the disarmed CQ');

    // 3. SOLICITED: an unsolicited receive does not interrupt, a solicited one does; then disarmed.
    await arm(true);
    await send(0);
    await quiet(b.rcq, env.b, 'SOLICITED armed CQ, unsolicited message');
    await takeReceive('unsolicited receive');
    await send(SendFlag.SOLICITED);
    await interrupt('SOLICITED armed CQ, solicited message');
    await takeReceive('solicited receive');
    await send(SendFlag.SOLICITED);
    await quiet(b.rcq, env.b, 'CQ after its solicited interrupt (disarmed)');
    await takeReceive('solicited receive on the disarmed CQ');

    // 4. Arming again keeps the wider condition, in either order.
    await arm(true);
    await arm(false);
    await send(0);
    await interrupt('SOLICITED then NEXT_COMPLETION, unsolicited message');
    await takeReceive('receive after SOLICITED+NEXT');
    await arm(false);
    await arm(true);
    await send(0);
    await interrupt('NEXT_COMPLETION then SOLICITED, unsolicited message');
    await takeReceive('receive after NEXT+SOLICITED');

    // 5. A send completion is not a solicited receive, even for a SOLICITED send.
    await env.a.reqNotifyCq(a.scq, true);
    await send(SendFlag.SOLICITED);
    await quiet(a.scq, env.a, 'SOLICITED armed send CQ, send completion');
    await quiet(b.rcq, env.b, 'unarmed receive CQ');
    await takeReceive('receive 9');

    // 6. RDMA WRITE_WITH_IMM with SOLICITED consumes a receive and is solicited.
    await arm(true);
    await send(SendFlag.SOLICITED, WrOpcode.RDMA_WRITE_WITH_IMM);
    await interrupt('SOLICITED armed CQ, solicited WRITE_WITH_IMM');
    const [wi] = await pollN(env, env.b, b.rcq, 1, 'write-with-imm receive');
    expectWc(wi, { wrId: BigInt(received++), status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM }, 'write-with-imm receive');
    expectBytes(await env.b.readBuffer(dst.buf, 64 * 15, 64), pattern(64, 5), 'write-with-imm data');

    // 7. SOLICITED also fires for a completion with an error status: flush the remaining receives.
    await arm(true);
    await env.b.modifyQp(b.qp, { qpState: QpState.ERR }, 1);
    await interrupt('SOLICITED armed CQ, flush (error) completion');
    const rest = await pollN(env, env.b, b.rcq, RECVS - received, 'flushed receives');
    rest.forEach((w, i) => expectWc(w, { wrId: BigInt(received + i), status: WcStatus.WR_FLUSH_ERR }, `flushed receive ${received + i}`));
    await expectNoWc(env, env.b, b.rcq, 'receive CQ after the flush');
  });
}
