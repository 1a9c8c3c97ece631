/**
 * Resource limits (docs/virtio-rdma.md §4 "Limits are hard"): every table
 * filled to its limit gets the documented status, a failed allocation leaves
 * nothing behind, and after freeing, exactly as many can be allocated again.
 * Also the argument checks of the creating commands.
 */
import { Access, QpType, SendFlag, Status, WcStatus, WrOpcode, statusName, type Cq, type Mr, type Pd, type Verbs } from '../verbs.js';
import {
  DEFAULT_CAP,
  ScenarioFailure,
  Teardown,
  allocateUntilFailure,
  avTo,
  connectedPair,
  expectBytes,
  expectEq,
  expectStatus,
  expectWc,
  localGid,
  mrBuf,
  pattern,
  pdOf,
  pollN,
  withTeardown,
  type ScenarioEnv,
} from './common.js';

/** Fills a table, frees it, fills it again: same count, same status, every time. */
async function fillTwice<T>(
  env: ScenarioEnv,
  what: string,
  expectedCount: number,
  expectedStatus: Status,
  make: (i: number) => Promise<T>,
  free: (x: T) => Promise<void>,
): Promise<void> {
  let first = -1;
  for (const round of [1, 2, 3]) {
    const { items, status } = await allocateUntilFailure(make, expectedCount + 64);
    try {
      if (status !== expectedStatus) throw new ScenarioFailure(`${what}: allocation ${items.length + 1} failed with ${statusName(status)}, expected ${statusName(expectedStatus)}`);
      if (env.fresh && items.length !== expectedCount) throw new ScenarioFailure(`${what}: ${items.length} allocated before the limit, expected ${expectedCount}`);
      if (!env.fresh && items.length > expectedCount) throw new ScenarioFailure(`${what}: ${items.length} allocated, over the limit ${expectedCount}`);
      if (first < 0) first = items.length;
      else if (items.length !== first) throw new ScenarioFailure(`${what}: round ${round} allocated ${items.length}, round 1 allocated ${first} (something leaked)`);
      // Still at the limit: a second attempt fails the same way.
      await expectStatus(make(-1), expectedStatus, `${what}: another allocation at the limit`);
    } finally {
      for (const x of items.reverse()) await free(x);
    }
  }
}

export async function limitPd(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  await fillTwice(env, 'PD', dev.maxPd, Status.ENOMEM, () => v.allocPd(), (pd) => v.deallocPd(pd));
}

/** MRs (REG_MR and GET_DMA_MR count alike); keys of re-registered MR numbers change. */
export async function limitMr(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  await withTeardown(async (t) => {
    const pd = await pdOf(t, v);
    const buf = await v.allocBuffer(8192);
    t.add('buffer', () => v.freeBuffer(buf));
    const seen = new Map<number, number>();
    const make = async (n: number): Promise<Mr> => {
      const i = Math.abs(n);
      const mr = i % 7 === 3 ? await v.getDmaMr(pd, Access.LOCAL_WRITE) : await v.regMr(pd, buf, Access.LOCAL_WRITE | Access.REMOTE_READ, { offset: i % 100, length: 100 + (i % 5000) });
      const old = seen.get(mr.handle);
      if (old !== undefined && old === mr.lkey) throw new ScenarioFailure(`MR number ${mr.handle} registered again with the same key 0x${mr.lkey.toString(16)} (§4: the key changes with each registration)`);
      seen.set(mr.handle, mr.lkey);
      return mr;
    };
    await fillTwice(env, 'MR', dev.maxMr, Status.ENOMEM, make, (mr) => v.deregMr(mr));
    // Argument checks (each must leave nothing allocated: the fill above ran after none of them).
    await expectStatus(v.regMr(pd, buf, Access.REMOTE_WRITE), Status.EINVAL, 'REG_MR REMOTE_WRITE without LOCAL_WRITE');
    await expectStatus(v.regMr(pd, buf, Access.REMOTE_ATOMIC | Access.REMOTE_READ), Status.EINVAL, 'REG_MR REMOTE_ATOMIC without LOCAL_WRITE');
    await expectStatus(v.regMr(pd, buf, 0x10 | Access.LOCAL_WRITE), Status.EINVAL, 'REG_MR unknown access bit 0x10');
    await expectStatus(v.regMr(pd, buf, Access.LOCAL_WRITE, { length: 0 }), Status.EINVAL, 'REG_MR length 0');
    await expectStatus(v.regMr({ handle: 0 } as Pd, buf, Access.LOCAL_WRITE), Status.ENOENT, 'REG_MR on PD handle 0');
    await expectStatus(v.getDmaMr({ handle: 0xfffff } as Pd, Access.LOCAL_WRITE), Status.ENOENT, 'GET_DMA_MR on an unknown PD');
    const { items } = await allocateUntilFailure(make, dev.maxMr + 64);
    try {
      if (env.fresh) expectEq(items.length, dev.maxMr, 'MRs after the refused registrations (nothing leaked)');
    } finally {
      for (const mr of items) await v.deregMr(mr);
    }
  });
}

export async function limitCq(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  const slots = dev.virtio?.numCqSlots ?? dev.maxCq;
  const count = Math.min(dev.maxCq, slots);
  await fillTwice(env, 'CQ', count, count >= dev.maxCq ? Status.ENOMEM : Status.ENOSPC, (i) => v.createCq(1 + (Math.abs(i) % 8)), (cq) => v.destroyCq(cq));
  await expectStatus(v.createCq(0), Status.EINVAL, 'CREATE_CQ cqe 0');
  await expectStatus(v.createCq(dev.maxCqe + 1), Status.EINVAL, `CREATE_CQ cqe ${dev.maxCqe + 1} > max_cqe`);
  if (dev.virtio) {
    const ring = dev.virtio.cqQueueSize;
    if (ring <= dev.maxCqe) await expectStatus(v.createCq(ring), Status.EINVAL, `CREATE_CQ cqe ${ring} = size of the CQ virtqueue`);
    const cq = await v.createCq(Math.min(ring - 1, dev.maxCqe));
    expectEq(cq.cqe, Math.min(ring - 1, dev.maxCqe), 'granted CQEs for cqe = ring size - 1');
    await v.destroyCq(cq);
  }
  await expectStatus(v.destroyCq({ handle: 0, cqe: 1 }), Status.ENOENT, 'DESTROY_CQ handle 0');
}

async function qpFixture(t: Teardown, v: Verbs): Promise<{ pd: Pd; cq: Cq }> {
  const pd = await pdOf(t, v);
  const cq = await v.createCq(8);
  t.add('cq', () => v.destroyCq(cq));
  return { pd, cq };
}

export async function limitQp(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  await withTeardown(async (t) => {
    const { pd, cq } = await qpFixture(t, v);
    const slots = dev.virtio?.numQpSlots ?? dev.maxQp;
    const count = Math.min(dev.maxQp, slots);
    const types = [QpType.RC, QpType.UD, QpType.UC];
    await fillTwice(
      env,
      'QP',
      count,
      count >= dev.maxQp ? Status.ENOMEM : Status.ENOSPC,
      (i) => v.createQp(pd, { qpType: types[Math.abs(i) % 3]!, sendCq: cq, recvCq: cq, cap: { ...DEFAULT_CAP, maxSendWr: 1 + (Math.abs(i) % 4) } }),
      (qp) => v.destroyQp(qp),
    );
    const ok = { qpType: QpType.RC, sendCq: cq, recvCq: cq, cap: DEFAULT_CAP };
    const sq = dev.virtio?.sqQueueSize ?? dev.maxQpWr;
    const rq = dev.virtio?.rqQueueSize ?? dev.maxQpWr;
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxSendWr: 0 } }), Status.EINVAL, 'CREATE_QP max_send_wr 0');
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxRecvWr: 0 } }), Status.EINVAL, 'CREATE_QP max_recv_wr 0');
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxSendWr: Math.min(dev.maxQpWr, sq) + 1 } }), Status.EINVAL, 'CREATE_QP max_send_wr over min(max_qp_wr, SQ size)');
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxRecvWr: Math.min(dev.maxQpWr, rq) + 1 } }), Status.EINVAL, 'CREATE_QP max_recv_wr over min(max_qp_wr, RQ size)');
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxSendSge: dev.maxSendSge + 1 } }), Status.EINVAL, 'CREATE_QP max_send_sge over max_sge');
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxRecvSge: dev.maxRecvSge + 1 } }), Status.EINVAL, 'CREATE_QP max_recv_sge over max_sge');
    await expectStatus(v.createQp(pd, { ...ok, cap: { ...DEFAULT_CAP, maxInlineData: dev.maxInlineData + 1 } }), Status.EINVAL, 'CREATE_QP max_inline_data over the device');
    await expectStatus(v.createQp(pd, { ...ok, qpType: 1 as QpType }), Status.EOPNOTSUPP, 'CREATE_QP of type GSI');
    await expectStatus(v.createQp(pd, { ...ok, qpType: 9 as QpType }), Status.EOPNOTSUPP, 'CREATE_QP of type 9');
    await expectStatus(v.createQp(pd, { ...ok, sendCq: { handle: 0xffff, cqe: 1 } }), Status.ENOENT, 'CREATE_QP with an unknown send CQ');
    await expectStatus(v.createQp({ handle: 0xffff } as Pd, ok), Status.ENOENT, 'CREATE_QP on an unknown PD');
    // Exactly the maximum is fine.
    const max = await v.createQp(pd, { ...ok, cap: { maxSendWr: Math.min(dev.maxQpWr, sq), maxRecvWr: Math.min(dev.maxQpWr, rq), maxSendSge: dev.maxSendSge, maxRecvSge: dev.maxRecvSge, maxInlineData: dev.maxInlineData } });
    await v.destroyQp(max);
    // And nothing of the refused ones is left over.
    const { items } = await allocateUntilFailure(() => v.createQp(pd, ok), count + 8);
    try {
      if (env.fresh) expectEq(items.length, count, 'QPs after the refused creations (nothing leaked)');
    } finally {
      for (const qp of items) await v.destroyQp(qp);
    }
  });
}

export async function limitAh(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  const port = await v.queryPort(1);
  const gid = await localGid(v);
  await withTeardown(async (t) => {
    const pd = await pdOf(t, v);
    await fillTwice(env, 'AH', dev.maxAh, Status.ENOMEM, (i) => v.createAh(pd, { ...avTo(gid), sl: Math.abs(i) % 8 }), (ah) => v.destroyAh(ah));
    await expectStatus(v.createAh(pd, { ...avTo(gid), portNum: 2 }), Status.EINVAL, 'CREATE_AH port 2');
    await expectStatus(v.createAh(pd, { ...avTo(gid), grh: { ...avTo(gid).grh, sgidIndex: port.gidTblLen } }), Status.EINVAL, 'CREATE_AH sgid_index = gid_tbl_len');
    for (let i = 1; i < port.gidTblLen; i++) {
      const g = await v.queryGid(1, i);
      if (g.raw.every((b) => b === 0)) {
        await expectStatus(v.createAh(pd, { ...avTo(gid), grh: { ...avTo(gid).grh, sgidIndex: i } }), Status.EINVAL, `CREATE_AH sgid_index ${i} (an unused GID entry)`);
        break;
      }
    }
    await expectStatus(v.createAh({ handle: 0xfffff } as Pd, avTo(gid)), Status.ENOENT, 'CREATE_AH on an unknown PD');
  });
}

async function slotChurn(
  what: string,
  limitCount: number,
  make: () => Promise<unknown>,
  free: (x: never) => Promise<void>,
): Promise<void> {
  // Many more create/destroy cycles than there are slots: a slot that is not given back runs the pool dry.
  for (let i = 0; i < 3 * limitCount + 2; i++) await free((await make()) as never);
  // Then hold all of them at once, twice.
  for (let round = 0; round < 2; round++) {
    const held: unknown[] = [];
    try {
      for (let i = 0; i < limitCount; i++) held.push(await make());
    } catch (err) {
      throw new ScenarioFailure(`${what}: only ${held.length} of ${limitCount} after churning slots: ${(err as Error).message}`);
    } finally {
      for (const x of held.reverse()) await free(x as never);
    }
  }
}

/**
 * The CQ slot pool: slots come back when CQs are destroyed (many times more
 * cycles than slots), all of them can be held at once, and the status at
 * the end of the pool is ENOSPC when the pool runs out before max_cq (which
 * §2's max_cq ≤ C makes impossible: then it is ENOMEM).
 */
export async function limitCqSlots(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  const slots = dev.virtio?.numCqSlots ?? dev.maxCq;
  const n = Math.min(slots, dev.maxCq);
  await slotChurn('CQ slots', n, () => v.createCq(4), (cq: Cq) => v.destroyCq(cq));
  const held: Cq[] = [];
  try {
    for (let i = 0; i < n; i++) held.push(await v.createCq(2));
    await expectStatus(v.createCq(2), n < dev.maxCq ? Status.ENOSPC : Status.ENOMEM, `CREATE_CQ with ${n} CQs (${slots} slots, max_cq ${dev.maxCq})`);
  } finally {
    for (const cq of held) await v.destroyCq(cq);
  }
}

/** The QP slot pool: as for CQs, then a QP on a much-reused slot still moves data. */
export async function limitQpSlots(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  const slots = dev.virtio?.numQpSlots ?? dev.maxQp;
  const n = Math.min(slots, dev.maxQp);
  await withTeardown(async (t) => {
    const { pd, cq } = await qpFixture(t, v);
    const mk = (): Promise<unknown> => v.createQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, cap: DEFAULT_CAP });
    await slotChurn('QP slots', n, mk, (qp: never) => v.destroyQp(qp));
    const held: Awaited<ReturnType<Verbs['createQp']>>[] = [];
    try {
      for (let i = 0; i < n; i++) held.push(await v.createQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, cap: DEFAULT_CAP }));
      await expectStatus(
        v.createQp(pd, { qpType: QpType.RC, sendCq: cq, recvCq: cq, cap: DEFAULT_CAP }),
        n < dev.maxQp ? Status.ENOSPC : Status.ENOMEM,
        `CREATE_QP with ${n} QPs (${slots} slots, max_qp ${dev.maxQp})`,
      );
    } finally {
      for (const qp of held) await v.destroyQp(qp);
    }
  });
  // Reused slots carry traffic (their rings were handed back clean).
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { sharedCq: true });
    const src = await mrBuf(t, env.a, a.pd, 1000, Access.LOCAL_WRITE, pattern(1000, 8));
    const dst = await mrBuf(t, env.b, b.pd, 1000, Access.LOCAL_WRITE, 0);
    await env.b.postRecv(b.qp, [{ wrId: 1n, sgList: [{ addr: dst.buf.addr, length: 1000, lkey: dst.mr.lkey }] }]);
    await env.a.postSend(a.qp, [{ wrId: 2n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 1000, lkey: src.mr.lkey }] }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'send on a reused slot'))[0], { wrId: 2n, status: WcStatus.SUCCESS }, 'send on a reused slot');
    expectWc((await pollN(env, env.b, b.rcq, 1, 'receive on a reused slot'))[0], { wrId: 1n, status: WcStatus.SUCCESS, byteLen: 1000 }, 'receive on a reused slot');
    expectBytes(await env.b.readBuffer(dst.buf, 0, 1000), pattern(1000, 8), 'data through reused slots');
  });
}

