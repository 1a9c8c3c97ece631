/**
 * Destroying objects that are still in use (docs/virtio-rdma.md §4): a PD
 * with an MR, QP or AH and a CQ with a QP are EBUSY and stay usable;
 * DESTROY_QP with outstanding WQEs is allowed and produces no completions;
 * dead handles are ENOENT.
 */
import { Access, QpState, QpType, SendFlag, Status, WcStatus, WrOpcode } from '../verbs.js';
import {
  DEFAULT_CAP,
  avTo,
  connectedPair,
  expectBytes,
  expectNoWc,
  expectQpState,
  expectStatus,
  expectWc,
  localGid,
  mrBuf,
  pattern,
  pollN,
  withTeardown,
  type ScenarioEnv,
} from './common.js';

export async function destroyPdInUse(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const gid = await localGid(v);
  // PD with an MR.
  let pd = await v.allocPd();
  const buf = await v.allocBuffer(4096);
  const mr = await v.regMr(pd, buf, Access.LOCAL_WRITE);
  await expectStatus(v.deallocPd(pd), Status.EBUSY, 'DESTROY_PD with an MR');
  const mr2 = await v.regMr(pd, buf, Access.LOCAL_WRITE); // the PD is still there and usable
  await v.deregMr(mr);
  await expectStatus(v.deallocPd(pd), Status.EBUSY, 'DESTROY_PD with one MR left');
  await v.deregMr(mr2);
  await v.deallocPd(pd);
  await expectStatus(v.deallocPd(pd), Status.ENOENT, 'DESTROY_PD twice');
  await expectStatus(v.deregMr(mr), Status.ENOENT, 'DEREG_MR twice');
  await expectStatus(v.regMr(pd, buf, Access.LOCAL_WRITE), Status.ENOENT, 'REG_MR on a destroyed PD');

  // PD with a QP.
  pd = await v.allocPd();
  const cq = await v.createCq(4);
  const qp = await v.createQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, cap: DEFAULT_CAP });
  await expectStatus(v.deallocPd(pd), Status.EBUSY, 'DESTROY_PD with a QP');
  await expectQpState(v, qp, QpState.RESET, 'QP of the PD that could not be destroyed');
  await v.destroyQp(qp);
  await v.deallocPd(pd);

  // PD with an AH; DESTROY_AH is always allowed.
  pd = await v.allocPd();
  const ah = await v.createAh(pd, avTo(gid));
  await expectStatus(v.deallocPd(pd), Status.EBUSY, 'DESTROY_PD with an AH');
  await v.destroyAh(ah);
  await expectStatus(v.destroyAh(ah), Status.ENOENT, 'DESTROY_AH twice');
  await v.deallocPd(pd);
  await v.destroyCq(cq);
  await v.freeBuffer(buf);
}

export async function destroyCqInUse(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const pd = await v.allocPd();
  const scq = await v.createCq(16);
  const rcq = await v.createCq(16);
  const qp = await v.createQp(pd, { qpType: QpType.UD, sendCq: scq, recvCq: rcq, cap: DEFAULT_CAP });
  await expectStatus(v.destroyCq(scq), Status.EBUSY, 'DESTROY_CQ of a send CQ in use');
  await expectStatus(v.destroyCq(rcq), Status.EBUSY, 'DESTROY_CQ of a receive CQ in use');
  // Both CQs still work: flushes land in them.
  const buf = await v.allocBuffer(256);
  const mr = await v.regMr(pd, buf, Access.LOCAL_WRITE);
  await v.modifyQp(qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qkey: 1 }, 1 | (1 << 4) | (1 << 5) | (1 << 6));
  await v.postRecv(qp, [{ wrId: 7n, sgList: [{ addr: buf.addr, length: 256, lkey: mr.lkey }] }]);
  await v.modifyQp(qp, { qpState: QpState.ERR }, 1);
  expectWc((await pollN(env, v, rcq, 1, 'flush into a CQ that refused DESTROY_CQ'))[0], { wrId: 7n, status: WcStatus.WR_FLUSH_ERR }, 'flush into a CQ that refused DESTROY_CQ');
  await v.destroyQp(qp);
  await v.destroyCq(scq);
  await v.destroyCq(rcq);
  await expectStatus(v.destroyCq(rcq), Status.ENOENT, 'DESTROY_CQ twice');
  await expectStatus(v.reqNotifyCq(rcq, false), Status.ENOENT, 'REQ_NOTIFY_CQ of a destroyed CQ');
  await v.deregMr(mr);
  await v.deallocPd(pd);
  await v.freeBuffer(buf);
}

/**
 * DESTROY_QP of a QP with outstanding receives and sends stuck in RNR
 * retry: allowed, no completion ever appears for them, the peer is not
 * affected, and the QPN is gone (ENOENT).
 */
export async function destroyQpWithOutstandingWqes(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { rnrRetry: 7, minRnrTimer: 1 });
    const src = await mrBuf(t, env.a, a.pd, 256, Access.LOCAL_WRITE, pattern(256, 4));
    const ra = await mrBuf(t, env.a, a.pd, 256, Access.LOCAL_WRITE, 0);
    await env.a.postRecv(a.qp, Array.from({ length: 3 }, (_, i) => ({ wrId: BigInt(i), sgList: [{ addr: ra.buf.addr + BigInt(64 * i), length: 64, lkey: ra.mr.lkey }] })));
    await env.a.postSend(
      a.qp,
      Array.from({ length: 3 }, (_, i) => ({ wrId: BigInt(10 + i), opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 64, lkey: src.mr.lkey }] })),
    );
    await expectNoWc(env, env.a, a.scq, 'sends in RNR retry');
    await env.a.destroyQp(a.qp);
    await expectNoWc(env, env.a, a.scq, 'send CQ after DESTROY_QP');
    await expectNoWc(env, env.a, a.rcq, 'receive CQ after DESTROY_QP');
    await expectStatus(env.a.queryQp(a.qp), Status.ENOENT, 'QUERY_QP of a destroyed QP');
    await expectStatus(env.a.destroyQp(a.qp), Status.ENOENT, 'DESTROY_QP twice');

    // The peer is untouched: a receive posted now sees nothing arrive (the RNR-retried sends died with their QP).
    await expectQpState(env.b, b.qp, QpState.RTS, 'peer QP');
    const rb = await mrBuf(t, env.b, b.pd, 64, Access.LOCAL_WRITE, 0x5a);
    await env.b.postRecv(b.qp, [{ wrId: 99n, sgList: [{ addr: rb.buf.addr, length: 64, lkey: rb.mr.lkey }] }]);
    await expectNoWc(env, env.b, b.rcq, 'peer receive CQ after the requester was destroyed');
    expectBytes(await env.b.readBuffer(rb.buf, 0, 64), new Uint8Array(64).fill(0x5a), 'peer receive buffer');
    // And DESTROY_QP of the peer with that receive outstanding: no completion either.
    await env.b.destroyQp(b.qp);
    await expectNoWc(env, env.b, b.rcq, 'peer receive CQ after its DESTROY_QP');
    // The CQs are free now.
    await env.a.destroyCq(a.scq);
    await env.a.destroyCq(a.rcq);
    await env.b.destroyCq(b.scq);
    await env.b.destroyCq(b.rcq);
    // Already gone: the teardown's destroys would be ENOENT.
    t.forgetPrefix('qp#');
    t.forgetPrefix('cq#');
  });
}

