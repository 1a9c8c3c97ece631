/**
 * Signalling (docs/virtio-rdma.md §5) and the work-request errors of §9 that
 * a correct driver can provoke: WQEs posted in the wrong QP state, RNR
 * retries exhausted, a receive buffer too small.
 */
import { Access, QpAttrMask as M, QpState, QpType, SendFlag, WcOpcode, WcStatus, WrOpcode } from '../verbs.js';
import {
  avTo,
  connectedPair,
  expectEq,
  expectNoWc,
  expectQpState,
  expectWc,
  localGid,
  makeSide,
  mrBuf,
  pattern,
  pollN,
  withTeardown,
  type ScenarioEnv,
} from './common.js';

/**
 * Unsignalled successes produce no CQE, signalled ones do, in posting order;
 * a QP created with sq_sig_all signals everything (and QUERY_QP says so).
 */
export async function signalingRules(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const src = await mrBuf(t, env.a, a.pd, 64, Access.LOCAL_WRITE, pattern(64, 1));
    const dst = await mrBuf(t, env.b, b.pd, 64 * 8, Access.LOCAL_WRITE | Access.REMOTE_WRITE, 0);
    const sge = { addr: src.buf.addr, length: 64, lkey: src.mr.lkey };
    const write = (i: number): { remoteAddr: bigint; rkey: number } => ({ remoteAddr: dst.mr.addr + BigInt(64 * i), rkey: dst.mr.rkey });
    await env.a.postSend(a.qp, [
      { wrId: 1n, opcode: WrOpcode.RDMA_WRITE, sendFlags: 0, sgList: [sge], rdma: write(0) },
      { wrId: 2n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [sge], rdma: write(1) },
      { wrId: 3n, opcode: WrOpcode.RDMA_WRITE, sendFlags: 0, sgList: [sge], rdma: write(2) },
      { wrId: 4n, opcode: WrOpcode.RDMA_WRITE, sendFlags: 0, sgList: [sge], rdma: write(3) },
      { wrId: 5n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [sge], rdma: write(4) },
    ]);
    const w = await pollN(env, env.a, a.scq, 2, 'signalled writes');
    expectWc(w[0], { wrId: 2n, status: WcStatus.SUCCESS }, 'first signalled write');
    expectWc(w[1], { wrId: 5n, status: WcStatus.SUCCESS }, 'second signalled write');
    await expectNoWc(env, env.a, a.scq, 'unsignalled writes');
    expectEq((await env.a.queryQp(a.qp)).sqSigAll, false, 'QUERY_QP sq_sig_all of a QP created without it');

    const all = await connectedPair(t, env, { sqSigAll: true });
    expectEq((await env.a.queryQp(all.a.qp)).sqSigAll, true, 'QUERY_QP sq_sig_all');
    const src2 = await mrBuf(t, env.a, all.a.pd, 64, Access.LOCAL_WRITE, pattern(64, 2));
    const dst2 = await mrBuf(t, env.b, all.b.pd, 64 * 4, Access.LOCAL_WRITE | Access.REMOTE_WRITE, 0);
    await env.a.postSend(
      all.a.qp,
      [0, 1, 2].map((i) => ({ wrId: BigInt(10 + i), opcode: WrOpcode.RDMA_WRITE, sendFlags: 0, sgList: [{ addr: src2.buf.addr, length: 64, lkey: src2.mr.lkey }], rdma: { remoteAddr: dst2.mr.addr + BigInt(64 * i), rkey: dst2.mr.rkey } })),
    );
    const ws = await pollN(env, env.a, all.a.scq, 3, 'sq_sig_all writes');
    ws.forEach((x, i) => expectWc(x, { wrId: BigInt(10 + i), status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }, `sq_sig_all write ${i}`));
  });
}

/**
 * §9: a send posted to a QP in RESET, INIT or RTR, or a receive posted in
 * RESET, completes with LOC_QP_OP_ERR (a CQE although unsignalled) and moves
 * the QP to ERR. A receive posted in INIT is fine.
 */
export async function postInWrongState(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    for (const state of [QpState.RESET, QpState.INIT, QpState.RTR]) {
      const s = await makeSide(t, env.a, {}, 1);
      const peer = await makeSide(t, env.b, {}, 2);
      if (state !== QpState.RESET) {
        await env.a.modifyQp(s.qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: 0 }, M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS);
      }
      if (state === QpState.RTR) {
        await env.a.modifyQp(
          s.qp,
          { qpState: QpState.RTR, ahAttr: avTo(await localGid(env.b)), pathMtu: 3, destQpNum: peer.qp.qpNum, rqPsn: 0, maxDestRdAtomic: 1, minRnrTimer: 1 },
          M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN | M.MAX_DEST_RD_ATOMIC | M.MIN_RNR_TIMER,
        );
      }
      await expectQpState(env.a, s.qp, state, 'before the post');
      await env.a.postSend(s.qp, [{ wrId: 1n, opcode: WrOpcode.SEND, sendFlags: 0, sgList: [] }]);
      expectWc((await pollN(env, env.a, s.scq, 1, `send posted in ${QpState[state]}`))[0], { wrId: 1n, status: WcStatus.LOC_QP_OP_ERR, qpNum: s.qp.qpNum }, `send posted in ${QpState[state]}`);
      await expectQpState(env.a, s.qp, QpState.ERR, `QP after a send posted in ${QpState[state]}`);
    }
    const r = await makeSide(t, env.a, {}, 3);
    const buf = await mrBuf(t, env.a, r.pd, 64, Access.LOCAL_WRITE, 0);
    await env.a.postRecv(r.qp, [{ wrId: 2n, sgList: [{ addr: buf.buf.addr, length: 64, lkey: buf.mr.lkey }] }]);
    expectWc((await pollN(env, env.a, r.rcq, 1, 'receive posted in RESET'))[0], { wrId: 2n, status: WcStatus.LOC_QP_OP_ERR }, 'receive posted in RESET');
    await expectQpState(env.a, r.qp, QpState.ERR, 'QP after a receive posted in RESET');
    const i = await makeSide(t, env.a, {}, 4);
    await env.a.modifyQp(i.qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: 0 }, M.STATE | M.PKEY_INDEX | M.PORT | M.ACCESS_FLAGS);
    const ibuf = await mrBuf(t, env.a, i.pd, 64, Access.LOCAL_WRITE, 0);
    await env.a.postRecv(i.qp, [{ wrId: 3n, sgList: [{ addr: ibuf.buf.addr, length: 64, lkey: ibuf.mr.lkey }] }]);
    await expectNoWc(env, env.a, i.rcq, 'receive posted in INIT');
    await expectQpState(env.a, i.qp, QpState.INIT, 'QP after a receive posted in INIT');
    // RESET drops it without a completion (§8).
    await env.a.modifyQp(i.qp, { qpState: QpState.RESET }, M.STATE);
    await expectNoWc(env, env.a, i.rcq, 'receive dropped by RESET');
  });
}

/** §9: a SEND with no receive posted and rnr_retry 0 fails with RNR_RETRY_EXC_ERR; the QP goes to ERR. */
export async function rnrRetryExceeded(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { rnrRetry: 0, minRnrTimer: 1 });
    const src = await mrBuf(t, env.a, a.pd, 64, Access.LOCAL_WRITE, 0);
    await env.a.postSend(a.qp, [
      { wrId: 1n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 64, lkey: src.mr.lkey }] },
      { wrId: 2n, opcode: WrOpcode.SEND, sendFlags: 0, sgList: [{ addr: src.buf.addr, length: 64, lkey: src.mr.lkey }] },
    ]);
    const w = await pollN(env, env.a, a.scq, 2, 'RNR-failed send and the flushed one behind it');
    expectWc(w[0], { wrId: 1n, status: WcStatus.RNR_RETRY_EXC_ERR, qpNum: a.qp.qpNum }, 'send without a receive, rnr_retry 0');
    expectWc(w[1], { wrId: 2n, status: WcStatus.WR_FLUSH_ERR }, 'send behind it');
    await expectQpState(env.a, a.qp, QpState.ERR, 'requester after RNR_RETRY_EXC_ERR');
    await expectNoWc(env, env.b, b.rcq, 'responder without receives');
  });
}

/** §9: a receive buffer too small for a SEND: LOC_LEN_ERR at the receiver, REM_INV_REQ_ERR at the sender. */
export async function receiveTooSmall(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { type: QpType.RC });
    const src = await mrBuf(t, env.a, a.pd, 200, Access.LOCAL_WRITE, pattern(200, 3));
    const dst = await mrBuf(t, env.b, b.pd, 100, Access.LOCAL_WRITE, 0);
    await env.b.postRecv(b.qp, [{ wrId: 1n, sgList: [{ addr: dst.buf.addr, length: 100, lkey: dst.mr.lkey }] }]);
    await env.a.postSend(a.qp, [{ wrId: 2n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 200, lkey: src.mr.lkey }] }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'sender'))[0], { wrId: 2n, status: WcStatus.REM_INV_REQ_ERR }, 'sender of a too-long SEND');
    expectWc((await pollN(env, env.b, b.rcq, 1, 'receiver'))[0], { wrId: 1n, status: WcStatus.LOC_LEN_ERR }, 'receiver of a too-long SEND');
    await expectQpState(env.a, a.qp, QpState.ERR, 'sender after REM_INV_REQ_ERR');
    await expectQpState(env.b, b.qp, QpState.ERR, 'receiver after LOC_LEN_ERR');
  });
}
