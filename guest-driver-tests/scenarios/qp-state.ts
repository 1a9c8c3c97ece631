/**
 * QP state scenarios: entering ERR flushes (docs/virtio-rdma.md §8), and the
 * MODIFY_QP attribute rules (required / optional / refused attributes, bad
 * transitions, value checks), each refusal leaving the QP exactly as it was.
 */
import { Access, QpAttrMask as M, QpState, QpType, SendFlag, Status, WcStatus, WrOpcode, type Qp, type QpAttr, type Verbs } from '../verbs.js';
import {
  ScenarioFailure,
  avTo,
  connectedPair,
  expectEq,
  expectNoWc,
  expectQpState,
  expectStatus,
  expectWc,
  localGid,
  makeSide,
  mrBuf,
  pattern,
  pollN,
  withTeardown,
  RC_INIT_MASK,
  RC_RTR_MASK,
  RC_RTS_MASK,
  UD_INIT_MASK,
  DEFAULT_QKEY,
  type ScenarioEnv,
} from './common.js';

/**
 * Receives that will never be matched and sends stuck behind an RNR (the
 * peer has no receive, rnr_retry 7 = forever): moving the QP to ERR flushes
 * every one of them with WR_FLUSH_ERR, in posting order, unsignalled sends
 * included; WQEs posted in ERR are flushed the same way.
 */
export async function qpErrorFlush(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { rnrRetry: 7, minRnrTimer: 1 });
    const src = await mrBuf(t, env.a, a.pd, 256, Access.LOCAL_WRITE, pattern(256, 1));
    const rbuf = await mrBuf(t, env.a, a.pd, 256, Access.LOCAL_WRITE, 0);
    await env.a.postRecv(a.qp, Array.from({ length: 4 }, (_, i) => ({ wrId: BigInt(100 + i), sgList: [{ addr: rbuf.buf.addr + BigInt(64 * i), length: 64, lkey: rbuf.mr.lkey }] })));
    const sends = [SendFlag.SIGNALED, 0, SendFlag.SIGNALED];
    await env.a.postSend(
      a.qp,
      sends.map((f, i) => ({ wrId: BigInt(i), opcode: WrOpcode.SEND, sendFlags: f, sgList: [{ addr: src.buf.addr, length: 64, lkey: src.mr.lkey }] })),
    );
    await expectNoWc(env, env.a, a.scq, 'sends waiting for a receive (RNR, retried forever)');
    await expectQpState(env.a, a.qp, QpState.RTS, 'requester while RNR-retrying');

    await env.a.modifyQp(a.qp, { qpState: QpState.ERR }, M.STATE);
    await expectQpState(env.a, a.qp, QpState.ERR, 'after MODIFY_QP to ERR');
    const sw = await pollN(env, env.a, a.scq, sends.length, 'flushed sends');
    sw.forEach((w, i) => expectWc(w, { wrId: BigInt(i), status: WcStatus.WR_FLUSH_ERR, qpNum: a.qp.qpNum }, `flushed send ${i}${sends[i] === 0 ? ' (unsignalled)' : ''}`));
    const rw = await pollN(env, env.a, a.rcq, 4, 'flushed receives');
    rw.forEach((w, i) => expectWc(w, { wrId: BigInt(100 + i), status: WcStatus.WR_FLUSH_ERR, qpNum: a.qp.qpNum }, `flushed receive ${i}`));

    // Posted in ERR: flushed as well, in order.
    await env.a.postSend(a.qp, [
      { wrId: 10n, opcode: WrOpcode.SEND, sendFlags: 0, sgList: [{ addr: src.buf.addr, length: 8, lkey: src.mr.lkey }] },
      { wrId: 11n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [], rdma: { remoteAddr: 0n, rkey: 0 } },
    ]);
    await env.a.postRecv(a.qp, [{ wrId: 110n, sgList: [{ addr: rbuf.buf.addr, length: 64, lkey: rbuf.mr.lkey }] }]);
    const late = await pollN(env, env.a, a.scq, 2, 'sends posted in ERR');
    late.forEach((w, i) => expectWc(w, { wrId: BigInt(10 + i), status: WcStatus.WR_FLUSH_ERR }, `send ${i} posted in ERR`));
    expectWc((await pollN(env, env.a, a.rcq, 1, 'receive posted in ERR'))[0], { wrId: 110n, status: WcStatus.WR_FLUSH_ERR }, 'receive posted in ERR');
    await expectNoWc(env, env.a, a.scq, 'send CQ after the flushes');
    await expectNoWc(env, env.a, a.rcq, 'receive CQ after the flushes');
    // Nothing reached the peer.
    await expectNoWc(env, env.b, b.rcq, 'peer receive CQ');

    // ERR -> RESET -> INIT: the QP is usable again, and RESET produced no completions.
    await env.a.modifyQp(a.qp, { qpState: QpState.RESET }, M.STATE);
    await expectQpState(env.a, a.qp, QpState.RESET, 'after ERR -> RESET');
    await env.a.modifyQp(a.qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: Access.REMOTE_WRITE }, RC_INIT_MASK);
    await expectQpState(env.a, a.qp, QpState.INIT, 'after RESET -> INIT');
    await expectNoWc(env, env.a, a.scq, 'send CQ after RESET');
  });
}

function snapshot(q: Awaited<ReturnType<Verbs['queryQp']>>): string {
  return JSON.stringify(q, (_k, x: unknown) => (x instanceof Uint8Array ? Array.from(x) : typeof x === 'bigint' ? String(x) : x));
}

/** Expects EINVAL and an unchanged QUERY_QP answer. */
async function refused(v: Verbs, qp: Qp, attr: Partial<QpAttr>, mask: number, what: string, status = Status.EINVAL): Promise<void> {
  const before = snapshot(await v.queryQp(qp));
  await expectStatus(v.modifyQp(qp, attr, mask), status, what);
  const after = snapshot(await v.queryQp(qp));
  if (after !== before) throw new ScenarioFailure(`${what}: refused, but QUERY_QP changed:\n  before ${before}\n  after  ${after}`);
}

export async function modifyQpRules(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  const port = await v.queryPort(1);
  const gid = await localGid(v);
  await withTeardown(async (t) => {
    // ---------------------------------------------------------------- RC
    const rc = await makeSide(t, v, {}, 0x42);
    const qp = rc.qp;
    await expectQpState(v, qp, QpState.RESET, 'new QP');
    const init = { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: Access.REMOTE_WRITE | Access.REMOTE_READ };
    await refused(v, qp, init, M.STATE | M.PKEY_INDEX | M.PORT, 'RC RESET->INIT without ACCESS_FLAGS');
    await refused(v, qp, init, M.STATE | M.PKEY_INDEX | M.ACCESS_FLAGS, 'RC RESET->INIT without PORT');
    await refused(v, qp, init, M.STATE | M.PORT | M.ACCESS_FLAGS, 'RC RESET->INIT without PKEY_INDEX');
    await refused(v, qp, { ...init, qkey: 7 }, RC_INIT_MASK | M.QKEY, 'RC RESET->INIT with QKEY (not allowed for RC)');
    await refused(v, qp, { ...init, ahAttr: avTo(gid) }, RC_INIT_MASK | M.AV, 'RC RESET->INIT with AV (extra)');
    await refused(v, qp, { ...init, curQpState: QpState.RESET }, RC_INIT_MASK | M.CUR_STATE, 'RC RESET->INIT with CUR_STATE (not optional there)');
    await refused(v, qp, init, RC_INIT_MASK | M.ALT_PATH, 'RC RESET->INIT with ALT_PATH (unsupported)');
    await refused(v, qp, init, RC_INIT_MASK | M.CAP, 'RC RESET->INIT with CAP (unsupported)');
    await refused(v, qp, { ...init, portNum: 2 }, RC_INIT_MASK, 'RC RESET->INIT port 2');
    await refused(v, qp, { ...init, pkeyIndex: 1 }, RC_INIT_MASK, 'RC RESET->INIT pkey_index 1');
    await refused(v, qp, { ...init, qpAccessFlags: 0x10 }, RC_INIT_MASK, 'RC RESET->INIT unknown access flag 0x10');
    await refused(v, qp, { qpState: QpState.RTR }, M.STATE, 'RESET->RTR');
    await refused(v, qp, { qpState: QpState.RTS }, M.STATE, 'RESET->RTS');
    await refused(v, qp, { qpState: QpState.SQD }, M.STATE, 'RESET->SQD');
    await refused(v, qp, { qpState: QpState.SQE }, M.STATE, 'RESET->SQE');
    await refused(v, qp, { qpState: 7 as QpState }, M.STATE, 'RESET->state 7');

    await v.modifyQp(qp, init, RC_INIT_MASK);
    let q = await v.queryQp(qp);
    expectEq(q.attr.qpState, QpState.INIT, 'state after RESET->INIT');
    expectEq(q.attr.portNum, 1, 'port_num after RESET->INIT');
    expectEq(q.attr.pkeyIndex, 0, 'pkey_index after RESET->INIT');
    expectEq(q.attr.qpAccessFlags & ~Access.LOCAL_WRITE, Access.REMOTE_WRITE | Access.REMOTE_READ, 'qp_access_flags after RESET->INIT');

    // INIT->INIT: ACCESS_FLAGS is optional.
    await v.modifyQp(qp, { qpState: QpState.INIT, qpAccessFlags: Access.REMOTE_READ }, M.STATE | M.ACCESS_FLAGS);
    expectEq((await v.queryQp(qp)).attr.qpAccessFlags & ~Access.LOCAL_WRITE, Access.REMOTE_READ, 'qp_access_flags after INIT->INIT');
    await refused(v, qp, { qpState: QpState.INIT, qkey: 1 }, M.STATE | M.QKEY, 'RC INIT->INIT with QKEY');
    await refused(v, qp, { qpState: QpState.RTS }, M.STATE, 'INIT->RTS');
    await refused(v, qp, { qpState: QpState.RESET, curQpState: QpState.RTS }, M.STATE | M.CUR_STATE, 'INIT->RESET with a CUR_STATE that is not current');

    const rtr: Partial<QpAttr> = { qpState: QpState.RTR, ahAttr: avTo(gid), pathMtu: Math.min(port.activeMtu || 3, 3), destQpNum: 0x123, rqPsn: 0xabcdef, maxDestRdAtomic: 1, minRnrTimer: 12 };
    await refused(v, qp, rtr, RC_RTR_MASK & ~M.MIN_RNR_TIMER, 'RC INIT->RTR without MIN_RNR_TIMER');
    await refused(v, qp, rtr, RC_RTR_MASK & ~M.AV, 'RC INIT->RTR without AV');
    await refused(v, qp, rtr, RC_RTR_MASK & ~M.DEST_QPN, 'RC INIT->RTR without DEST_QPN');
    await refused(v, qp, rtr, RC_RTR_MASK & ~M.MAX_DEST_RD_ATOMIC, 'RC INIT->RTR without MAX_DEST_RD_ATOMIC');
    await refused(v, qp, { ...rtr, sqPsn: 5 }, RC_RTR_MASK | M.SQ_PSN, 'RC INIT->RTR with SQ_PSN (extra)');
    await refused(v, qp, { ...rtr, timeout: 5 }, RC_RTR_MASK | M.TIMEOUT, 'RC INIT->RTR with TIMEOUT (extra)');
    await refused(v, qp, { ...rtr, pathMtu: 6 }, RC_RTR_MASK, 'path_mtu 6');
    await refused(v, qp, { ...rtr, pathMtu: 0 }, RC_RTR_MASK, 'path_mtu 0');
    await refused(v, qp, { ...rtr, destQpNum: 0x1000000 }, RC_RTR_MASK, 'dest_qp_num over 24 bits');
    await refused(v, qp, { ...rtr, rqPsn: 0x1000000 }, RC_RTR_MASK, 'rq_psn over 24 bits');
    await refused(v, qp, { ...rtr, minRnrTimer: 32 }, RC_RTR_MASK, 'min_rnr_timer 32');
    await refused(v, qp, { ...rtr, maxDestRdAtomic: dev.maxQpRdAtom + 1 }, RC_RTR_MASK, `max_dest_rd_atomic ${dev.maxQpRdAtom + 1} > max_qp_rd_atom`);
    await refused(v, qp, { ...rtr, ahAttr: { ...avTo(gid), portNum: 2 } }, RC_RTR_MASK, 'AV port 2');
    await refused(v, qp, { ...rtr, ahAttr: { ...avTo(gid), grh: { ...avTo(gid).grh, sgidIndex: port.gidTblLen } } }, RC_RTR_MASK, 'AV sgid_index = gid_tbl_len');

    await v.modifyQp(qp, rtr, RC_RTR_MASK);
    q = await v.queryQp(qp);
    expectEq(q.attr.qpState, QpState.RTR, 'state after INIT->RTR');
    expectEq(q.attr.pathMtu, rtr.pathMtu, 'path_mtu after INIT->RTR');
    expectEq(q.attr.destQpNum, 0x123, 'dest_qp_num after INIT->RTR');
    expectEq(q.attr.rqPsn, 0xabcdef, 'rq_psn after INIT->RTR');
    expectEq(q.attr.minRnrTimer, 12, 'min_rnr_timer after INIT->RTR');
    expectEq(q.attr.maxDestRdAtomic, 1, 'max_dest_rd_atomic after INIT->RTR');
    expectEq(Array.from(q.attr.ahAttr.grh.dgid).join(','), Array.from(gid).join(','), 'AV dgid after INIT->RTR');

    const rts: Partial<QpAttr> = { qpState: QpState.RTS, sqPsn: 0x654321, timeout: 14, retryCnt: 6, rnrRetry: 5, maxRdAtomic: 1 };
    await refused(v, qp, rts, RC_RTS_MASK & ~M.RETRY_CNT, 'RC RTR->RTS without RETRY_CNT');
    await refused(v, qp, rts, RC_RTS_MASK & ~M.SQ_PSN, 'RC RTR->RTS without SQ_PSN');
    await refused(v, qp, { ...rts, retryCnt: 8 }, RC_RTS_MASK, 'retry_cnt 8');
    await refused(v, qp, { ...rts, rnrRetry: 8 }, RC_RTS_MASK, 'rnr_retry 8');
    await refused(v, qp, { ...rts, timeout: 32 }, RC_RTS_MASK, 'timeout 32');
    await refused(v, qp, { ...rts, sqPsn: 0x1000000 }, RC_RTS_MASK, 'sq_psn over 24 bits');
    await refused(v, qp, { ...rts, maxRdAtomic: dev.maxQpRdAtom + 1 }, RC_RTS_MASK, `max_rd_atomic ${dev.maxQpRdAtom + 1} > max_qp_rd_atom`);
    await refused(v, qp, { ...rts, curQpState: QpState.INIT }, RC_RTS_MASK | M.CUR_STATE, 'RTR->RTS with CUR_STATE INIT (not current)');
    await refused(v, qp, { ...rts, pathMtu: 1 }, RC_RTS_MASK | M.PATH_MTU, 'RC RTR->RTS with PATH_MTU (extra)');
    await refused(v, qp, { qpState: QpState.INIT }, M.STATE, 'RTR->INIT');

    await v.modifyQp(qp, { ...rts, curQpState: QpState.RTR }, RC_RTS_MASK | M.CUR_STATE);
    q = await v.queryQp(qp);
    expectEq(q.attr.qpState, QpState.RTS, 'state after RTR->RTS');
    expectEq(q.attr.sqPsn, 0x654321, 'sq_psn after RTR->RTS');
    expectEq(q.attr.timeout, 14, 'timeout after RTR->RTS');
    expectEq(q.attr.retryCnt, 6, 'retry_cnt after RTR->RTS');
    expectEq(q.attr.rnrRetry, 5, 'rnr_retry after RTR->RTS');
    expectEq(q.attr.maxRdAtomic, 1, 'max_rd_atomic after RTR->RTS');

    await v.modifyQp(qp, { qpState: QpState.RTS, minRnrTimer: 3 }, M.STATE | M.MIN_RNR_TIMER);
    expectEq((await v.queryQp(qp)).attr.minRnrTimer, 3, 'min_rnr_timer after RTS->RTS');
    await refused(v, qp, { qpState: QpState.RTS, sqPsn: 1 }, M.STATE | M.SQ_PSN, 'RTS->RTS with SQ_PSN');
    await refused(v, qp, { qpState: QpState.RTS }, M.STATE | M.EN_SQD_ASYNC_NOTIFY, 'RTS->RTS with EN_SQD_ASYNC_NOTIFY');
    await refused(v, qp, { qpState: QpState.RTS }, M.STATE | M.PATH_MIG_STATE, 'RTS->RTS with PATH_MIG_STATE');
    await refused(v, qp, { qpState: QpState.SQD }, M.STATE, 'RTS->SQD (not reachable in version 1)');
    await refused(v, qp, { qpState: QpState.RTR }, M.STATE, 'RTS->RTR');
    await refused(v, qp, { qpState: QpState.INIT }, M.STATE, 'RTS->INIT');
    await refused(v, qp, { qpState: QpState.SQE }, M.STATE, 'RTS->SQE');

    await v.modifyQp(qp, { qpState: QpState.ERR }, M.STATE);
    await expectQpState(v, qp, QpState.ERR, 'RTS->ERR');
    await refused(v, qp, { qpState: QpState.RTS }, M.STATE, 'ERR->RTS');
    await refused(v, qp, init, RC_INIT_MASK, 'ERR->INIT');
    await v.modifyQp(qp, { qpState: QpState.ERR }, M.STATE);
    await expectQpState(v, qp, QpState.ERR, 'ERR->ERR');
    await v.modifyQp(qp, { qpState: QpState.RESET }, M.STATE);
    await expectQpState(v, qp, QpState.RESET, 'ERR->RESET');
    await v.modifyQp(qp, { qpState: QpState.ERR }, M.STATE);
    await expectQpState(v, qp, QpState.ERR, 'RESET->ERR');
    await v.modifyQp(qp, { qpState: QpState.RESET }, M.STATE);
    await v.modifyQp(qp, init, RC_INIT_MASK);
    await expectQpState(v, qp, QpState.INIT, 'RESET->INIT again');

    // ---------------------------------------------------------------- UD
    const ud = await makeSide(t, v, { type: QpType.UD }, 0x77);
    const uinit = { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qkey: DEFAULT_QKEY };
    await refused(v, ud.qp, uinit, UD_INIT_MASK & ~M.QKEY, 'UD RESET->INIT without QKEY');
    await refused(v, ud.qp, { ...uinit, qpAccessFlags: Access.REMOTE_WRITE }, UD_INIT_MASK | M.ACCESS_FLAGS, 'UD RESET->INIT with ACCESS_FLAGS');
    await v.modifyQp(ud.qp, uinit, UD_INIT_MASK);
    await refused(v, ud.qp, { qpState: QpState.RTR, ahAttr: avTo(gid) }, M.STATE | M.AV, 'UD INIT->RTR with AV');
    await refused(v, ud.qp, { qpState: QpState.RTR, destQpNum: 5 }, M.STATE | M.DEST_QPN, 'UD INIT->RTR with DEST_QPN');
    await v.modifyQp(ud.qp, { qpState: QpState.RTR, qkey: 0x2222 }, M.STATE | M.QKEY);
    expectEq((await v.queryQp(ud.qp)).attr.qkey, 0x2222, 'qkey after UD INIT->RTR with QKEY');
    await refused(v, ud.qp, { qpState: QpState.RTS }, M.STATE, 'UD RTR->RTS without SQ_PSN');
    await refused(v, ud.qp, { qpState: QpState.RTS, sqPsn: 1, timeout: 3 }, M.STATE | M.SQ_PSN | M.TIMEOUT, 'UD RTR->RTS with TIMEOUT');
    await v.modifyQp(ud.qp, { qpState: QpState.RTS, sqPsn: 1 }, M.STATE | M.SQ_PSN);
    await v.modifyQp(ud.qp, { qpState: QpState.RTS, qkey: 0x3333 }, M.STATE | M.QKEY);
    expectEq((await v.queryQp(ud.qp)).attr.qkey, 0x3333, 'qkey after UD RTS->RTS');
    await refused(v, ud.qp, { qpState: QpState.RTS, minRnrTimer: 1 }, M.STATE | M.MIN_RNR_TIMER, 'UD RTS->RTS with MIN_RNR_TIMER');

    // ---------------------------------------------------------------- UC
    const uc = await makeSide(t, v, { type: QpType.UC }, 0x99);
    await v.modifyQp(uc.qp, { ...init, qpAccessFlags: Access.REMOTE_WRITE }, RC_INIT_MASK);
    const ucRtr = { qpState: QpState.RTR, ahAttr: avTo(gid), pathMtu: 3, destQpNum: 0x55, rqPsn: 7 };
    const ucRtrMask = M.STATE | M.AV | M.PATH_MTU | M.DEST_QPN | M.RQ_PSN;
    await refused(v, uc.qp, { ...ucRtr, maxDestRdAtomic: 1 }, ucRtrMask | M.MAX_DEST_RD_ATOMIC, 'UC INIT->RTR with MAX_DEST_RD_ATOMIC');
    await refused(v, uc.qp, { ...ucRtr, minRnrTimer: 1 }, ucRtrMask | M.MIN_RNR_TIMER, 'UC INIT->RTR with MIN_RNR_TIMER');
    await v.modifyQp(uc.qp, ucRtr, ucRtrMask);
    await refused(v, uc.qp, { qpState: QpState.RTS, sqPsn: 1, retryCnt: 1 }, M.STATE | M.SQ_PSN | M.RETRY_CNT, 'UC RTR->RTS with RETRY_CNT');
    await v.modifyQp(uc.qp, { qpState: QpState.RTS, sqPsn: 1 }, M.STATE | M.SQ_PSN);
    await expectQpState(v, uc.qp, QpState.RTS, 'UC after RTR->RTS');

    // A QP that is not there.
    await expectStatus(v.modifyQp({ ...qp, qpNum: 0xfffffe } as Qp, { qpState: QpState.ERR }, M.STATE), Status.ENOENT, 'MODIFY_QP of an unknown QPN');
  });
}

