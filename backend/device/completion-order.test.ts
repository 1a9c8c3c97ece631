/**
 * When a WR completes, the device gives its WQE chain back before it writes
 * the CQE (send and receive queues, docs/virtio-rdma.md §5, §6). A driver that frees a WQE buffer
 * when its chain comes back — virtio_rdma.ko does — must find the buffer
 * free as soon as the completion is visible; otherwise a consumer that
 * posts right after polling, with its queue full (perftest at its tx
 * depth), gets ENOMEM from post_send. Two guests running `ib_write_bw -b`
 * hit exactly that (test/vm/two-guests.test.ts).
 *
 * Both rings live in guest memory and each used index is published at
 * once, so the order of the device's pushUsed calls is the order a guest
 * vCPU can observe; the test records it.
 */
import { afterEach, beforeEach, expect, it, vi } from 'vitest';
import { QpState, SendFlag, SendOp, WcStatus, cqVq, rqVq, sqVq } from '../abi/constants.js';
import { SplitVirtqueue } from '../../virtio/queue/split-queue.js';
import { QpAttr, Rig, recvWqe, sendWqe, type Pair } from './hostile/rig.js';

let rig: Rig;
let p: Pair;
/** Names of the rings the device returned a buffer on, in order. */
let order: string[];

beforeEach(async () => {
  rig = await Rig.start();
  p = await rig.createPair();
  const n = rig.device.limits.numCqSlots;
  const names = new Map<number, string>([
    [sqVq(n, p.a.slot), 'A sq'],
    [rqVq(n, p.a.slot), 'A rq'],
    [sqVq(n, p.b.slot), 'B sq'],
    [rqVq(n, p.b.slot), 'B rq'],
  ]);
  // with the pair's CQs: a send CQ and a receive CQ per side (they may share a slot)
  for (const [side, qp] of [['A', p.a], ['B', p.b]] as const) {
    names.set(cqVq(qp.sendCq.slot), `${side} cq`);
    names.set(cqVq(qp.recvCq.slot), `${side} cq`);
  }
  order = [];
  const pushUsed = SplitVirtqueue.prototype.pushUsed;
  vi.spyOn(SplitVirtqueue.prototype, 'pushUsed').mockImplementation(function (this: SplitVirtqueue, head: number, len: number) {
    order.push(names.get(this.index) ?? `vq ${this.index}`);
    pushUsed.call(this, head, len);
  });
});

afterEach(async () => {
  vi.restoreAllMocks();
  expect(rig.log.errors).toEqual([]);
  await rig.stop();
});

/** `first` came back before `then` each time `then` did. */
function before(first: string, then: string): void {
  const seen: string[] = [];
  for (const name of order) {
    if (name === then) expect(seen, `${first} before ${then} in ${order.join(', ')}`).toContain(first);
    if (name === first || name === then) seen.push(name);
  }
  expect(order).toContain(then);
}

it('returns a completed SEND\'s chain before its send CQE, and the matched receive\'s chain before its receive CQE', async () => {
  rig.postRecv(p.b, recvWqe(0x71n, [{ addr: p.mrB.iova, length: 256, lkey: p.mrB.lkey }]));
  rig.postSend(p.a, sendWqe({ wr_id: 0x81n, opcode: SendOp.SEND, send_flags: SendFlag.SIGNALED }, [{ addr: p.mrA.iova, length: 256, lkey: p.mrA.lkey }]));
  const [sc] = await rig.waitCqes(p.a.sendCq, 1);
  const [rc] = await rig.waitCqes(p.b.recvCq, 1);
  expect([sc!.status, rc!.status]).toEqual([WcStatus.SUCCESS, WcStatus.SUCCESS]);
  before('A sq', 'A cq');
  before('B rq', 'B cq');
});

it('returns each flushed receive chain before its WR_FLUSH_ERR CQE when the QP goes to ERR', async () => {
  for (const id of [0x91n, 0x92n, 0x93n]) rig.postRecv(p.b, recvWqe(id, [{ addr: p.mrB.iova, length: 64, lkey: p.mrB.lkey }]));
  await rig.settle();
  order.length = 0;
  await rig.modifyOk(p.b.qpn, QpAttr.STATE, { qp_state: QpState.ERR });
  const cqes = await rig.waitCqes(p.b.recvCq, 3);
  expect(cqes.map((c) => c.status)).toEqual([WcStatus.WR_FLUSH_ERR, WcStatus.WR_FLUSH_ERR, WcStatus.WR_FLUSH_ERR]);
  const flush = order.filter((n) => n === 'B rq' || n === 'B cq');
  expect(flush).toEqual(['B rq', 'B cq', 'B rq', 'B cq', 'B rq', 'B cq']);
});

it('returns a malformed send WQE\'s chain before its error CQE', async () => {
  rig.postSend(p.a, sendWqe({ wr_id: 0xa1n, opcode: 0x7f, send_flags: SendFlag.SIGNALED }, []));
  const [c] = await rig.waitCqes(p.a.sendCq, 1);
  expect(c!.status).not.toBe(WcStatus.SUCCESS);
  before('A sq', 'A cq');
});
