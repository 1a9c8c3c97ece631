/**
 * The virtio-rdma device model (docs/virtio-rdma.md) on the vhost-user
 * library: config space, the control queue, CQ rings (CQE writing, arming,
 * overflow), SQ/RQ rings (WQE parsing and validation) and the bridge to an
 * engine. Everything a guest wrote is checked here before an engine sees it.
 */
import type { DeviceContext, VirtioDevice } from '../../virtio/device.js';
import { DeviceError } from '../../virtio/device.js';
import type { Logger } from '../../virtio/log.js';
import { DescriptorChain } from '../../virtio/queue/descriptor-chain.js';
import { GuestMemory } from '../../virtio/memory/guest-memory.js';
import type { SplitVirtqueue } from '../../virtio/queue/split-queue.js';
import { VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit, hasBit } from '../../virtio/vhost-user/protocol.js';
import {
  CONTROL_VQ,
  Cmd,
  CqNotify,
  FIRST_QPN,
  QpState,
  QpType,
  SEND_FLAGS_ALL,
  SendFlag,
  SendOp,
  Status,
  VIRTIO_RDMA_ABI_VERSION,
  VIRTIO_RDMA_F_IB_GRH,
  WcOpcode,
  WcStatus,
  cqVq,
  numQueues,
  rqVq,
  sqVq,
  sendWcOpcode,
} from '../abi/constants.js';
import { Cqe, CtrlHeader, CtrlStatus, DeviceConfig, RecvWqe, SendWqe, Sge as SgeStruct } from '../abi/structs.js';
import type { Completion, Engine, EngineHost, GrhLayout, RecvWr, SendWr, Sge } from '../engine/engine.js';
import { ControlPlane } from './control.js';
import { ControlError } from './errors.js';
import { resolveLimits, type RdmaLimits } from './limits.js';
import { GuestMemoryAccess } from './memory-access.js';
import { MrTable } from './mr-table.js';
import { Resources, type CqRecord, type CqeValue, type QpRecord } from './resources.js';
import { loadDeviceState, saveDeviceState } from './state/index.js';

export interface RdmaDeviceOptions {
  limits?: Partial<RdmaLimits>;
  /** GID table (16 bytes each); index 0 first. */
  gids?: Uint8Array[];
  engine: Engine;
  log: Logger;
  nodeGuid?: bigint;
  /** Largest virtqueue the driver may set up. */
  maxQueueSize?: number;
}

const CQE_SIZE = Cqe.size;
const SEND_HDR = SendWqe.size;
const RECV_HDR = RecvWqe.size;
const SGE_SIZE = SgeStruct.size;
const MAX_MESSAGE = 0x8000_0000;
/** Longest stretch of control commands served before yielding to the event loop. */
const CONTROL_SLICE_MS = 5;

/** Opcodes each QP type may post. */
const ALLOWED_OPS: Record<QpType, ReadonlySet<number>> = {
  [QpType.RC]: new Set([SendOp.RDMA_WRITE, SendOp.RDMA_WRITE_WITH_IMM, SendOp.SEND, SendOp.SEND_WITH_IMM, SendOp.RDMA_READ, SendOp.ATOMIC_CMP_AND_SWP, SendOp.ATOMIC_FETCH_AND_ADD]),
  [QpType.UC]: new Set([SendOp.RDMA_WRITE, SendOp.RDMA_WRITE_WITH_IMM, SendOp.SEND, SendOp.SEND_WITH_IMM]),
  [QpType.UD]: new Set([SendOp.SEND, SendOp.SEND_WITH_IMM]),
};
const INLINE_OPS: ReadonlySet<number> = new Set([SendOp.RDMA_WRITE, SendOp.RDMA_WRITE_WITH_IMM, SendOp.SEND, SendOp.SEND_WITH_IMM]);

/** A WQE that breaks the ABI: error CQE, QP to ERR. */
class BadWqe extends Error {
  constructor(
    readonly status: WcStatus,
    message: string,
  ) {
    super(message);
  }
}

export class RdmaDevice implements VirtioDevice {
  readonly name = 'rdma';
  readonly deviceId = 42;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_RDMA_F_IB_GRH);
  /** What UD receives' GRHs look like: the driver's choice (VIRTIO_RDMA_F_IB_GRH), RoCEv2's until it acks. */
  private grhLayout: GrhLayout = 'rocev2';
  readonly configSize = DeviceConfig.size;

  readonly limits: RdmaLimits;
  readonly engine: Engine;
  readonly gids: Uint8Array[];
  readonly nodeGuid: bigint;
  private readonly log: Logger;
  private ctx: DeviceContext | null = null;
  private res: Resources | null = null;
  private control: ControlPlane | null = null;
  /**
   * The engine waits for resume() (the first ring run), which is when a
   * migration's destination takes the RoCE address over.
   */
  private suspended = true;
  private readonly chain = new DescriptorChain();
  private readonly cqChain = new DescriptorChain();
  private readonly scratch = new Uint8Array(4096 + SEND_HDR);
  private readonly scratchDv = new DataView(this.scratch.buffer);
  private readonly cqeBytes = new Uint8Array(CQE_SIZE);
  private readonly cqeDv = new DataView(this.cqeBytes.buffer);
  /** State loaded before the driver's memory was attached; applied on attach. */
  private pendingState: Uint8Array | null = null;

  constructor(opts: RdmaDeviceOptions) {
    this.limits = resolveLimits(opts.limits);
    this.engine = opts.engine;
    this.log = opts.log;
    this.numQueues = numQueues(this.limits.numCqSlots, this.limits.numQpSlots);
    this.maxQueueSize = opts.maxQueueSize ?? 1024;
    this.gids = (opts.gids ?? []).slice(0, this.limits.gidTblLen).map((g) => {
      if (g.byteLength !== 16) throw new RangeError('a GID is 16 bytes');
      return g.slice();
    });
    this.nodeGuid = opts.nodeGuid ?? 0x0200_00ff_fe00_0001n;
    this.engine.attach(this.engineHost());
  }

  // ---------------------------------------------------------------------------
  // VirtioDevice

  readConfig(offset: number, size: number): Uint8Array {
    const l = this.limits;
    const cfg = DeviceConfig.encodeBytes({
      ...DeviceConfig.zero(),
      abi_version: VIRTIO_RDMA_ABI_VERSION,
      num_cq_slots: l.numCqSlots,
      num_qp_slots: l.numQpSlots,
      max_pd: l.maxPd,
      max_mr: l.maxMr,
      max_cq: l.maxCq,
      max_qp: l.maxQp,
      max_ah: l.maxAh,
      max_cqe: l.maxCqe,
      max_qp_wr: l.maxQpWr,
      max_sge: l.maxSge,
      max_inline_data: l.maxInlineData,
      max_qp_rd_atom: l.maxQpRdAtom,
      max_mr_size: l.maxMrSize,
      gid_tbl_len: l.gidTblLen,
      phys_port_cnt: 1,
      node_guid: this.nodeGuid,
      sys_image_guid: this.nodeGuid,
    });
    return cfg.slice(offset, offset + size);
  }

  writeConfig(): void {
    throw new DeviceError('the virtio-rdma config space is read-only');
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
    const mrs = new MrTable(this.limits.maxMr, ctx.memory, this.limits.maxMrSize);
    this.res = new Resources(this.limits, mrs);
    this.control = new ControlPlane(this.res, this.engine, this.limits, this.gids, this.nodeGuid, this.log, {
      ringSize: (vq) => (this.ctx !== null && this.ctx.isRunning(vq) ? this.ctx.queue(vq).size : 0),
      returnChain: (vq, head, len) => this.returnChain(vq, head, len),
      returnAll: (qp) => this.returnOutstanding(qp),
      releaseCq: (cq) => this.releaseCqBuffers(cq),
    });
    this.memoryAccess = new GuestMemoryAccess(mrs, ctx.memory);
    if (this.pendingState !== null) {
      const state = this.pendingState;
      this.pendingState = null;
      this.restore(state);
    }
  }

  private memoryAccess: GuestMemoryAccess | null = null;

  setAckedFeatures(features: bigint): void {
    const layout: GrhLayout = hasBit(features, VIRTIO_RDMA_F_IB_GRH) ? 'ib' : 'rocev2';
    if (layout !== this.grhLayout) this.log.info(`UD receives get ${layout === 'ib' ? 'IB (RoCE v1)' : 'RoCEv2'} GRHs`);
    this.grhLayout = layout;
  }

  notifiesItself(index: number): boolean {
    return index >= 1 && index <= this.limits.numCqSlots;
  }

  handleQueue(index: number): void {
    if (this.ctx === null || this.res === null) return;
    if (this.suspended) {
      this.suspended = false;
      this.engine.resume();
      this.log.debug('engine resumed');
    }
    this.flushDeferred(index);
    if (index === CONTROL_VQ) this.serveControl();
    else if (index <= this.limits.numCqSlots) this.serveCqRing(index - 1);
    else {
      const rel = index - 1 - this.limits.numCqSlots;
      const slot = rel >> 1;
      this.serveWorkQueue(slot, rel % 2 === 0 ? 'send' : 'recv');
    }
  }

  queueStopped(): void {
    if (!this.suspended) {
      this.suspended = true;
      this.engine.suspend();
      this.log.debug('engine suspended (a ring stopped)');
    }
  }

  reset(): void {
    this.engine.reset();
    this.res?.clear();
    this.res = null;
    this.control = null;
    this.ctx = null;
    this.memoryAccess = null;
    this.suspended = true;
    this.grhLayout = 'rocev2'; // features are negotiated again
  }

  saveState(): Uint8Array {
    // Before a driver started there are no objects: an empty table set migrates an idle VM.
    const res = this.res ?? new Resources(this.limits, new MrTable(this.limits.maxMr, new GuestMemory(1), this.limits.maxMrSize));
    const state = saveDeviceState(res, this);
    // The destination takes the address over from here; a failed migration resumes this device (handleQueue).
    this.engine.handOver();
    return state;
  }

  loadState(state: Uint8Array): void {
    // QEMU loads state before the rings start, possibly before memory is
    // attached to the device; keep it until then.
    if (this.res === null) {
      loadDeviceState(state, null, this); // validate now, so CHECK_DEVICE_STATE reports garbage
      this.pendingState = state.slice();
      return;
    }
    this.restore(state);
  }

  private restore(state: Uint8Array): void {
    // Clears the tables and resets the engine itself, once the state has passed every check.
    loadDeviceState(state, this.res!, this);
    this.log.info(`device state restored: ${this.res!.qps.size} QPs, ${this.res!.cqs.size} CQs, ${this.res!.mrs.size} MRs`);
  }

  /** Counts for tests and logs. */
  get resources(): Resources | null {
    return this.res;
  }

  // ---------------------------------------------------------------------------
  // Control queue

  /**
   * Serves control commands for at most CONTROL_SLICE_MS, then yields to
   * the event loop and continues, so a ring full of expensive commands
   * (1 GiB page lists) cannot starve the data path or the socket.
   */
  private serveControl(): void {
    const q = this.ctx!.queue(CONTROL_VQ);
    const deadline = performance.now() + CONTROL_SLICE_MS;
    do {
      while (q.popInto(this.chain)) {
        this.serveCommand(q, this.chain);
        if (performance.now() > deadline) {
          this.scheduleControl();
          return;
        }
      }
    } while (q.enableNotification());
  }

  private controlScheduled = false;

  private scheduleControl(): void {
    if (this.controlScheduled) return;
    this.controlScheduled = true;
    setImmediate(() => {
      this.controlScheduled = false;
      if (this.ctx === null || !this.ctx.isRunning(CONTROL_VQ)) return;
      this.serveControl();
      this.ctx.notify(CONTROL_VQ);
    });
  }

  private serveCommand(q: SplitVirtqueue, c: DescriptorChain): void {
    if (c.writableBytes < CtrlStatus.size) {
      this.log.warn(`control: chain ${c.head} has ${c.writableBytes} writable bytes, no room for a status`);
      q.pushUsed(c.head, 0);
      return;
    }
    const n = Math.min(c.readableBytes, 1024);
    const req = this.scratch.subarray(0, n);
    c.read(req, 0, 0, n);
    let status = Status.OK;
    let resp: Uint8Array = new Uint8Array(0);
    let cmd = -1;
    try {
      if (n < CtrlHeader.size) throw new ControlError(Status.E2BIG, `request of ${n} bytes has no header`);
      cmd = CtrlHeader.decodeBytes(req).cmd;
      const respSize = this.control!.responseSize(cmd);
      if (respSize === null) throw new ControlError(Status.EOPNOTSUPP, `unknown command ${cmd}`);
      // Checked before running, so a command that cannot report its result has no effect.
      if (c.writableBytes < CtrlStatus.size + respSize) {
        throw new ControlError(Status.E2BIG, `response needs ${CtrlStatus.size + respSize} writable bytes, chain has ${c.writableBytes}`);
      }
      resp = this.control!.run(cmd, req.subarray(CtrlHeader.size));
    } catch (err) {
      if (!(err instanceof ControlError)) throw err;
      status = err.status;
      resp = new Uint8Array(0);
      this.log.info(`control ${Cmd[cmd] ?? cmd}: ${Status[status]}: ${err.message}`);
    }
    const out = new Uint8Array(CtrlStatus.size + resp.byteLength);
    new DataView(out.buffer).setUint32(0, status, true);
    out.set(resp, CtrlStatus.size);
    c.write(out, 0, 0, out.byteLength);
    q.pushUsed(c.head, out.byteLength);
  }

  // ---------------------------------------------------------------------------
  // Send and receive queues

  /** Hands every WQE on a QP slot's SQ or RQ to postSend / postRecv. */
  private serveWorkQueue(slot: number, which: 'send' | 'recv'): void {
    const n = this.limits.numCqSlots;
    const vq = which === 'send' ? sqVq(n, slot) : rqVq(n, slot);
    const q = this.ctx!.queue(vq);
    const qp = this.res!.qpBySlot(slot);
    q.drain(this.chain, (c) => {
      if (qp === undefined) {
        this.log.warn(`vq ${vq}: WQE on a QP slot with no QP; returned unused`);
        q.pushUsed(c.head, 0);
      } else if (which === 'send') this.postSend(qp, q, c);
      else this.postRecv(qp, q, c);
    });
  }

  private readSges(c: DescriptorChain, at: number, count: number): Sge[] {
    const sges: Sge[] = [];
    for (let i = 0; i < count; i++) {
      c.read(this.scratch, 0, at + i * SGE_SIZE, SGE_SIZE);
      const s = SgeStruct.decode(this.scratchDv, 0);
      sges.push({ addr: s.addr, length: s.length, lkey: s.lkey });
    }
    return sges;
  }

  private postSend(qp: QpRecord, q: SplitVirtqueue, c: DescriptorChain): void {
    const head = c.head;
    let wrId = 0n;
    try {
      if (qp.sendOut.has(head)) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `descriptor ${head} posted again while outstanding`);
      if (c.readableBytes < SEND_HDR) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `send WQE of ${c.readableBytes} bytes is shorter than its ${SEND_HDR}-byte header`);
      c.read(this.scratch, 0, 0, SEND_HDR);
      const w = SendWqe.decode(this.scratchDv, 0);
      wrId = w.wr_id;
      if (c.writableBytes !== 0) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, 'send WQE has device-writable buffers');
      if (!ALLOWED_OPS[qp.type].has(w.opcode)) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `opcode ${w.opcode} is not allowed on a ${QpType[qp.type]} QP`);
      if (w.send_flags & ~SEND_FLAGS_ALL) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `unknown send flags 0x${w.send_flags.toString(16)}`);
      const inline = (w.send_flags & SendFlag.INLINE) !== 0;
      let expected: number;
      if (inline) {
        if (!INLINE_OPS.has(w.opcode)) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `INLINE with opcode ${w.opcode}`);
        if (w.inline_len > qp.caps.maxInlineData) throw new BadWqe(WcStatus.LOC_LEN_ERR, `inline_len ${w.inline_len} exceeds ${qp.caps.maxInlineData}`);
        expected = SEND_HDR + w.inline_len;
      } else {
        if (w.num_sge > qp.caps.maxSendSge) throw new BadWqe(WcStatus.LOC_LEN_ERR, `num_sge ${w.num_sge} exceeds ${qp.caps.maxSendSge}`);
        expected = SEND_HDR + w.num_sge * SGE_SIZE;
      }
      if (c.readableBytes !== expected) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `send WQE is ${c.readableBytes} bytes, its header says ${expected}`);
      const sges = inline ? [] : this.readSges(c, SEND_HDR, w.num_sge);
      let data: Uint8Array | null = null;
      let length = 0;
      if (inline) {
        data = new Uint8Array(w.inline_len);
        c.read(data, 0, SEND_HDR, w.inline_len);
        length = w.inline_len;
      } else {
        for (const s of sges) length += s.length;
        if (length > MAX_MESSAGE) throw new BadWqe(WcStatus.LOC_LEN_ERR, `message of ${length} bytes exceeds 2^31`);
      }
      const atomic = w.opcode === SendOp.ATOMIC_CMP_AND_SWP || w.opcode === SendOp.ATOMIC_FETCH_AND_ADD;
      if (atomic) {
        if (sges.length !== 1 || sges[0]!.length !== 8) throw new BadWqe(WcStatus.LOC_LEN_ERR, 'an atomic needs exactly one 8-byte SGE');
        if (w.remote_addr % 8n !== 0n) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, 'atomic remote address is not 8-byte aligned');
      }
      let ud: SendWr['ud'] = null;
      if (qp.type === QpType.UD) {
        const ah = this.res!.ahs.get(w.ahn);
        if (ah === undefined || ah.pdn !== qp.pdn) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `AH ${w.ahn} does not exist in the QP's PD`);
        ud = { av: ah.av, remoteQpn: w.remote_qpn & 0xffffff, remoteQkey: w.remote_qkey };
      }
      const state = qp.attrs.state;
      if (state === QpState.ERR) {
        this.flushOne(qp, 'send', head, wrId, sendWcOpcode(w.opcode));
        return;
      }
      if (state !== QpState.RTS) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `send posted in state ${QpState[state]}`);
      const wr: SendWr = {
        wrId,
        opcode: w.opcode,
        flags: w.send_flags,
        sges,
        inline: data,
        length,
        imm: w.imm_data,
        remoteAddr: w.remote_addr,
        rkey: w.rkey,
        compareAdd: w.compare_add,
        swap: w.swap,
        ud,
      };
      qp.sendOut.set(head, { wrId, signaled: qp.sqSigAll || (w.send_flags & SendFlag.SIGNALED) !== 0 });
      this.engine.postSend(qp.qpn, wr, head);
    } catch (err) {
      if (!(err instanceof BadWqe)) throw err;
      this.badWqe(qp, q, 'send', head, wrId, err);
    }
  }

  private postRecv(qp: QpRecord, q: SplitVirtqueue, c: DescriptorChain): void {
    const head = c.head;
    let wrId = 0n;
    try {
      if (qp.recvOut.has(head)) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `descriptor ${head} posted again while outstanding`);
      if (c.readableBytes < RECV_HDR) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `receive WQE of ${c.readableBytes} bytes is shorter than its header`);
      c.read(this.scratch, 0, 0, RECV_HDR);
      const w = RecvWqe.decode(this.scratchDv, 0);
      wrId = w.wr_id;
      if (c.writableBytes !== 0) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, 'receive WQE has device-writable buffers');
      if (w.num_sge > qp.caps.maxRecvSge) throw new BadWqe(WcStatus.LOC_LEN_ERR, `num_sge ${w.num_sge} exceeds ${qp.caps.maxRecvSge}`);
      const expected = RECV_HDR + w.num_sge * SGE_SIZE;
      if (c.readableBytes !== expected) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, `receive WQE is ${c.readableBytes} bytes, its header says ${expected}`);
      const sges = this.readSges(c, RECV_HDR, w.num_sge);
      let length = 0;
      for (const s of sges) length += s.length;
      if (qp.attrs.state === QpState.ERR) {
        this.flushOne(qp, 'recv', head, wrId, WcOpcode.RECV);
        return;
      }
      if (qp.attrs.state === QpState.RESET) throw new BadWqe(WcStatus.LOC_QP_OP_ERR, 'receive posted in state RESET');
      const wr: RecvWr = { wrId, sges, length };
      qp.recvOut.set(head, wrId);
      this.engine.postRecv(qp.qpn, wr, head);
    } catch (err) {
      if (!(err instanceof BadWqe)) throw err;
      this.badWqe(qp, q, 'recv', head, wrId, err);
    }
  }

  /** A malformed WQE: the QP goes to ERR (flushing what it held), then this WQE completes with an error. */
  private badWqe(qp: QpRecord, q: SplitVirtqueue, which: 'send' | 'recv', head: number, wrId: bigint, err: BadWqe): void {
    this.log.warn(`qpn 0x${qp.qpn.toString(16)}: bad ${which} WQE (descriptor ${head}): ${err.message}`);
    this.moveToError(qp, `bad ${which} WQE`);
    const cqn = which === 'send' ? qp.sendCqn : qp.recvCqn;
    q.pushUsed(head, 0); // the chain before its CQE: see sendDone
    this.writeCqe(cqn, this.cqeValue(qp.qpn, wrId, { status: err.status, opcode: which === 'send' ? WcOpcode.SEND : WcOpcode.RECV, byteLen: 0, flags: 0, imm: 0, srcQp: 0 }), true);
  }

  private flushOne(qp: QpRecord, which: 'send' | 'recv', head: number, wrId: bigint, opcode: WcOpcode): void {
    const cqn = which === 'send' ? qp.sendCqn : qp.recvCqn;
    const vq = which === 'send' ? sqVq(this.limits.numCqSlots, qp.slot) : rqVq(this.limits.numCqSlots, qp.slot);
    this.returnChain(vq, head, 0); // the chain before its CQE: see sendDone
    this.writeCqe(cqn, this.cqeValue(qp.qpn, wrId, { status: WcStatus.WR_FLUSH_ERR, opcode, byteLen: 0, flags: 0, imm: 0, srcQp: 0 }), true);
  }

  /** Moves a QP to ERR through the engine, which flushes everything it holds. */
  private moveToError(qp: QpRecord, why: string): void {
    if (qp.attrs.state === QpState.ERR) return;
    this.log.info(`qpn 0x${qp.qpn.toString(16)}: -> ERR (${why})`);
    qp.attrs = { ...qp.attrs, state: QpState.ERR };
    this.engine.modifyQp(qp.qpn, qp.attrs, 1);
  }

  /** Returns every chain a QP holds with length 0 (RESET, destroy): no completions. */
  private returnOutstanding(qp: QpRecord): void {
    const n = this.limits.numCqSlots;
    for (const head of qp.sendOut.keys()) this.returnChain(sqVq(n, qp.slot), head, 0);
    for (const head of qp.recvOut.keys()) this.returnChain(rqVq(n, qp.slot), head, 0);
    qp.sendOut.clear();
    qp.recvOut.clear();
  }

  private returnChain(vq: number, head: number, len: number): void {
    if (this.ctx !== null && this.ctx.isRunning(vq)) {
      this.ctx.queue(vq).pushUsed(head, len);
    } else {
      this.res?.deferred.push({ vq, head, len });
    }
  }

  private flushDeferred(vq: number): void {
    const res = this.res!;
    if (res.deferred.length === 0 || !this.ctx!.isRunning(vq)) return;
    const q = this.ctx!.queue(vq);
    res.deferred = res.deferred.filter((d) => {
      if (d.vq !== vq) return true;
      q.pushUsed(d.head, d.len);
      return false;
    });
  }

  // ---------------------------------------------------------------------------
  // Completion queues

  private cqeValue(qpn: number, wrId: bigint, c: Completion): CqeValue {
    return {
      ...Cqe.zero(),
      wr_id: wrId,
      status: c.status,
      opcode: c.opcode,
      wc_flags: c.flags,
      byte_len: c.byteLen,
      imm_data: c.imm,
      qp_num: qpn,
      src_qp: c.srcQp,
      port_num: 1,
    };
  }

  /**
   * Writes a CQE, or keeps it while the CQ's ring is stopped (migration,
   * restart). `solicited` marks what wakes a SOLICITED arm. A completion
   * due with no room beyond the reserve buffer is an overflow (§7), and so
   * is a backlog longer than the CQ itself: the backlog is bounded by what
   * the guest asked for, never by what it does.
   */
  private writeCqe(cqn: number, cqe: CqeValue, solicited: boolean): void {
    const cq = this.res!.cqs.get(cqn);
    if (cq === undefined || cq.error) return;
    const wake = solicited || cqe.status !== WcStatus.SUCCESS;
    const running = this.ctx!.isRunning(cqVq(cq.slot));
    if (running && cq.backlog.length === 0) {
      // The common case: nothing waiting, write it now (putCqe applies the reserve rule).
      this.putCqe(cq, cqe, wake);
      return;
    }
    cq.backlog.push({ cqe, wake });
    if (!running) {
      if (cq.backlog.length > cq.cqe) this.overflow(cq, cqe.qp_num);
      return;
    }
    this.flushCqBuffers(cq);
  }

  /** Writes one CQE into the next posted buffer; handles overflow and arming. Returns false when it had to stop. */
  private putCqe(cq: CqRecord, cqe: CqeValue, wakesSolicited: boolean): boolean {
    const vq = cqVq(cq.slot);
    const q = this.ctx!.queue(vq);
    if (q.pending() <= 1) {
      this.overflow(cq, cqe.qp_num);
      return false;
    }
    if (!this.popCqBuffer(q)) {
      this.overflow(cq, cqe.qp_num);
      return false;
    }
    Cqe.encode(cqe, this.cqeDv, 0);
    this.cqChain.write(this.cqeBytes, 0, 0, CQE_SIZE);
    q.pushUsed(this.cqChain.head, CQE_SIZE);
    const armed = cq.armed;
    if (armed & CqNotify.NEXT_COMPLETION || (armed & CqNotify.SOLICITED && wakesSolicited)) {
      cq.armed = 0;
      this.ctx!.notify(vq);
    }
    return true;
  }

  /** Pops the next usable CQ buffer into cqChain, returning unusable ones with length 0. */
  private popCqBuffer(q: SplitVirtqueue): boolean {
    while (q.popInto(this.cqChain)) {
      const c = this.cqChain;
      if (c.readableCount === 0 && c.writableBytes >= CQE_SIZE) return true;
      this.log.warn(`vq ${q.index}: CQ buffer ${c.head} is unusable (${c.readableBytes} readable, ${c.writableBytes} writable bytes); returned`);
      q.pushUsed(c.head, 0);
    }
    return false;
  }

  /** The CQ overflowed: it enters the error state, its QPs go to ERR, and the error event is written if a buffer is left. */
  private overflow(cq: CqRecord, qpn: number): void {
    this.log.warn(`cqn ${cq.cqn}: overflow (completion for qpn 0x${qpn.toString(16)} lost); CQ in error`);
    cq.error = true;
    cq.backlog = [];
    cq.errorEventPending = { qpn };
    this.writeErrorEvent(cq);
    for (const qp of this.res!.qpsUsingCq(cq.cqn)) this.moveToError(qp, `CQ ${cq.cqn} overflowed`);
  }

  private writeErrorEvent(cq: CqRecord): void {
    const pending = cq.errorEventPending;
    const vq = cqVq(cq.slot);
    if (pending === null || !this.ctx!.isRunning(vq)) return;
    const q = this.ctx!.queue(vq);
    if (!this.popCqBuffer(q)) return;
    const ev = { ...Cqe.zero(), status: WcStatus.GENERAL_ERR, opcode: WcOpcode.CQ_ERROR, qp_num: pending.qpn, port_num: 1 };
    Cqe.encode(ev, this.cqeDv, 0);
    this.cqChain.write(this.cqeBytes, 0, 0, CQE_SIZE);
    q.pushUsed(this.cqChain.head, CQE_SIZE);
    cq.errorEventPending = null;
    cq.armed = 0;
    this.ctx!.notify(vq);
  }

  /** Buffers arrived on a CQ ring, or the ring runs again: write what waited. */
  private flushCqBuffers(cq: CqRecord): void {
    if (!this.ctx!.isRunning(cqVq(cq.slot))) return;
    if (cq.error) {
      this.writeErrorEvent(cq);
      return;
    }
    while (cq.backlog.length > 0) {
      const next = cq.backlog.shift()!;
      if (!this.putCqe(cq, next.cqe, next.wake)) return;
    }
  }

  /** DESTROY_CQ: posted buffers go back unused. */
  private releaseCqBuffers(cq: CqRecord): void {
    const vq = cqVq(cq.slot);
    if (!this.ctx!.isRunning(vq)) return;
    const q = this.ctx!.queue(vq);
    while (q.popInto(this.cqChain)) q.pushUsed(this.cqChain.head, 0);
  }

  private serveCqRing(slot: number): void {
    const cq = this.res!.cqBySlot(slot);
    if (cq === undefined) return;
    this.flushCqBuffers(cq);
  }

  // ---------------------------------------------------------------------------
  // Engine host

  private engineHost(): EngineHost {
    const device = this;
    return {
      get memory() {
        if (device.memoryAccess === null) throw new DeviceError('engine touched memory before the driver started');
        return device.memoryAccess;
      },
      log: this.log.child('engine'),
      get grhLayout() {
        return device.grhLayout;
      },
      sendDone: (qpn, token, completion) => this.sendDone(qpn, token, completion),
      recvDone: (qpn, token, completion) => this.recvDone(qpn, token, completion),
      qpFailed: (qpn, reason) => {
        const qp = this.res?.qps.get(qpn);
        if (qp === undefined || qp.attrs.state === QpState.ERR) return;
        this.log.info(`qpn 0x${qpn.toString(16)}: -> ERR (${reason})`);
        qp.attrs = { ...qp.attrs, state: QpState.ERR };
      },
      gid: (index) => this.gids[index] ?? null,
    };
  }

  private sendDone(qpn: number, token: number, c: Completion): void {
    const qp = this.res?.qps.get(qpn);
    const out = qp?.sendOut.get(token);
    if (qp === undefined || out === undefined) {
      this.log.error(`engine completed send token ${token} on qpn 0x${qpn.toString(16)}, which is not outstanding`);
      return;
    }
    qp.sendOut.delete(token);
    // The chain goes back before the CQE is written: a driver that sees the
    // completion must also see the WQE's buffer free, or a consumer that
    // posts again right after polling (ib_write_bw at its tx depth) finds
    // the send queue full. pushUsed publishes each used index at once.
    this.returnChain(sqVq(this.limits.numCqSlots, qp.slot), token, 0);
    if (out.signaled || c.status !== WcStatus.SUCCESS) this.writeCqe(qp.sendCqn, this.cqeValue(qpn, out.wrId, c), false);
  }

  private recvDone(qpn: number, token: number, c: Completion): void {
    const qp = this.res?.qps.get(qpn);
    const wrId = qp?.recvOut.get(token);
    if (qp === undefined || wrId === undefined) {
      this.log.error(`engine completed receive token ${token} on qpn 0x${qpn.toString(16)}, which is not outstanding`);
      return;
    }
    qp.recvOut.delete(token);
    this.returnChain(rqVq(this.limits.numCqSlots, qp.slot), token, 0); // the chain before its CQE: see sendDone
    this.writeCqe(qp.recvCqn, this.cqeValue(qpn, wrId, c), c.solicited === true);
  }
}

export { FIRST_QPN };
