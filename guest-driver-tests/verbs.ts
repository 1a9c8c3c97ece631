/**
 * A verbs-like interface (libibverbs naming, camelCased) that the
 * conformance scenarios are written against. The TypeScript reference
 * driver (./driver) implements it over a vhost-user front-end; a later
 * implementation can drive the guest kernel driver inside a VM, and the same
 * scenarios run unchanged.
 *
 * Everything is asynchronous so that an implementation may forward each call
 * to another process (a guest agent). Numbers follow Linux verbs (and so the
 * virtio-rdma ABI, which uses the same numbering): opcodes, statuses, access
 * flags, QP states and attribute-mask bits are passed through unchanged.
 */
import {
  Access,
  CqNotify,
  QpAttr as QpAttrMask,
  QpState,
  QpType,
  SendFlag,
  SendOp,
  Status,
  WcFlag,
  WcOpcode,
  WcStatus,
} from '../backend/abi/constants.js';

export { Access, CqNotify, QpAttrMask, QpState, QpType, SendFlag, WcFlag, WcOpcode, WcStatus, Status };
/** ibv_wr_opcode. */
export { SendOp as WrOpcode };

/** A control operation failed; `status` is the device's (Linux errno) status. */
export class VerbsError extends Error {
  constructor(
    readonly op: string,
    readonly status: Status,
    detail = '',
  ) {
    super(`${op} failed: ${Status[status] ?? 'status'} (${status})${detail ? `: ${detail}` : ''}`);
    this.name = 'VerbsError';
  }
}

/** ibv_post_send / ibv_post_recv failed at work request `badWrIndex` (the ones before it were posted). */
export class PostError extends Error {
  constructor(
    readonly op: 'postSend' | 'postRecv',
    readonly status: Status,
    readonly badWrIndex: number,
    detail = '',
  ) {
    super(`${op} failed at wr ${badWrIndex}: ${Status[status] ?? 'status'} (${status})${detail ? `: ${detail}` : ''}`);
    this.name = 'PostError';
  }
}

// ---------------------------------------------------------------------------
// Attributes

export interface DeviceAttr {
  fwVer: bigint;
  nodeGuid: bigint;
  sysImageGuid: bigint;
  maxMrSize: bigint;
  pageSizeCap: bigint;
  deviceCapFlags: bigint;
  vendorId: number;
  vendorPartId: number;
  hwVer: number;
  maxQp: number;
  maxQpWr: number;
  maxSendSge: number;
  maxRecvSge: number;
  maxSgeRd: number;
  maxCq: number;
  maxCqe: number;
  maxMr: number;
  maxPd: number;
  maxQpRdAtom: number;
  maxQpInitRdAtom: number;
  maxAh: number;
  maxInlineData: number;
  maxPkeys: number;
  atomicCap: number;
  localCaAckDelay: number;
  /**
   * virtio-rdma specifics, when the implementation can see them (the
   * reference driver reads them from the config space): the CQ and QP slot
   * pools and the queue sizes the driver gave them.
   */
  virtio?: {
    numCqSlots: number;
    numQpSlots: number;
    cqQueueSize: number;
    sqQueueSize: number;
    rqQueueSize: number;
  };
}

export interface PortAttr {
  state: number;
  maxMtu: number;
  activeMtu: number;
  physState: number;
  gidTblLen: number;
  portCapFlags: number;
  maxMsgSz: number;
  pkeyTblLen: number;
  activeSpeed: number;
  activeWidth: number;
  linkLayer: number;
}

export interface Gid {
  raw: Uint8Array;
  type: number;
}

/** ibv_global_route + the rest of ibv_ah_attr that RoCE uses. */
export interface AhAttr {
  grh: {
    dgid: Uint8Array;
    flowLabel: number;
    sgidIndex: number;
    hopLimit: number;
    trafficClass: number;
  };
  sl: number;
  staticRate: number;
  portNum: number;
}

export interface QpCap {
  maxSendWr: number;
  maxRecvWr: number;
  maxSendSge: number;
  maxRecvSge: number;
  maxInlineData: number;
}

/** ibv_qp_attr (the fields virtio-rdma carries). */
export interface QpAttr {
  qpState: QpState;
  curQpState: QpState;
  pathMtu: number;
  timeout: number;
  retryCnt: number;
  rnrRetry: number;
  minRnrTimer: number;
  maxRdAtomic: number;
  maxDestRdAtomic: number;
  sqDraining: number;
  pkeyIndex: number;
  qpAccessFlags: number;
  qkey: number;
  rqPsn: number;
  sqPsn: number;
  destQpNum: number;
  portNum: number;
  ahAttr: AhAttr;
}

export interface QpInitAttr {
  qpType: QpType;
  sendCq: Cq;
  recvCq: Cq;
  cap: QpCap;
  sqSigAll?: boolean;
}

export interface QueryQpResult {
  attr: QpAttr;
  qpType: QpType;
  sqSigAll: boolean;
  cap: QpCap;
}

// ---------------------------------------------------------------------------
// Objects. Implementations may attach more; scenarios use only these fields.

export interface Pd {
  readonly handle: number;
}

export interface Mr {
  readonly handle: number;
  readonly pd: Pd;
  readonly lkey: number;
  readonly rkey: number;
  /** The address the MR is known by (iova) and its length. */
  readonly addr: bigint;
  readonly length: number;
  readonly access: number;
}

export interface Cq {
  readonly handle: number;
  /** Granted number of CQEs. */
  readonly cqe: number;
}

export interface Qp {
  readonly qpNum: number;
  readonly qpType: QpType;
  readonly pd: Pd;
  readonly sendCq: Cq;
  readonly recvCq: Cq;
  /** Granted capabilities. */
  readonly cap: QpCap;
}

export interface Ah {
  readonly handle: number;
  readonly pd: Pd;
}

/**
 * Memory a scenario can register and point SGEs at. `addr` is what SGEs and
 * MRs use (a user virtual address in a VM; in the reference driver a
 * driver-chosen address that its page lists map to guest pages).
 */
export interface Buffer {
  readonly addr: bigint;
  readonly length: number;
  /** Set when the buffer is physically contiguous and its guest-physical address is known (DMA MR use). */
  readonly dmaAddr?: bigint;
}

export interface BufferOptions {
  /** Byte alignment of `addr` (default 64). */
  align?: number;
  /** Ask for a physically contiguous buffer with a known `dmaAddr` (for DMA MRs). */
  contiguous?: boolean;
}

export interface Sge {
  addr: bigint;
  length: number;
  lkey: number;
}

export interface SendWr {
  wrId: bigint;
  sgList: Sge[];
  opcode: SendOp;
  /** SendFlag bits. */
  sendFlags?: number;
  /** Network byte order, as in verbs (passed through). */
  immData?: number;
  rdma?: { remoteAddr: bigint; rkey: number };
  atomic?: { remoteAddr: bigint; compareAdd: bigint; swap: bigint; rkey: number };
  ud?: { ah: Ah; remoteQpn: number; remoteQkey: number };
}

export interface RecvWr {
  wrId: bigint;
  sgList: Sge[];
}

/** ibv_wc. */
export interface Wc {
  wrId: bigint;
  status: WcStatus;
  opcode: WcOpcode;
  vendorErr: number;
  byteLen: number;
  immData: number;
  qpNum: number;
  srcQp: number;
  wcFlags: number;
  pkeyIndex: number;
  sl: number;
  portNum: number;
}

/** ibv_async_event, for what this device reports. */
export interface AsyncEvent {
  /** CQ_ERR: the CQ overflowed (virtio-rdma CQ error event, CQE opcode 255). */
  type: 'CQ_ERR';
  cq: Cq;
  /** The QP whose completion was lost. */
  qpNum: number;
  /** The CQE status the device reported (GENERAL_ERR). */
  status: WcStatus;
}

export interface RegMrOptions {
  /** Register [buffer.addr + offset, + length) instead of the whole buffer. */
  offset?: number;
  length?: number;
  /** Address the MR is known by; default the buffer address (+ offset). Must keep the page offset. */
  iova?: bigint;
}

/** One opened device (ibv_context) with its async-event queue. */
export interface Verbs {
  /** A short label for logs ("ref-driver", "vm"). */
  readonly name: string;
  close(): Promise<void>;

  queryDevice(): Promise<DeviceAttr>;
  queryPort(portNum: number): Promise<PortAttr>;
  queryGid(portNum: number, index: number): Promise<Gid>;
  queryPkey(portNum: number, index: number): Promise<number>;

  allocPd(): Promise<Pd>;
  deallocPd(pd: Pd): Promise<void>;

  regMr(pd: Pd, buf: Buffer, access: number, opts?: RegMrOptions): Promise<Mr>;
  getDmaMr(pd: Pd, access: number): Promise<Mr>;
  deregMr(mr: Mr): Promise<void>;

  createCq(cqe: number): Promise<Cq>;
  destroyCq(cq: Cq): Promise<void>;
  /** ibv_req_notify_cq. */
  reqNotifyCq(cq: Cq, solicitedOnly: boolean): Promise<void>;
  /** Waits for a completion event (an interrupt) of `cq`, consuming it; false on timeout. timeoutMs 0 only checks. */
  waitCqEvent(cq: Cq, timeoutMs: number): Promise<boolean>;
  /** Up to `max` work completions; CQ error events go to the async-event queue instead. */
  pollCq(cq: Cq, max: number): Promise<Wc[]>;

  createQp(pd: Pd, init: QpInitAttr): Promise<Qp>;
  modifyQp(qp: Qp, attr: Partial<QpAttr>, attrMask: number): Promise<void>;
  queryQp(qp: Qp): Promise<QueryQpResult>;
  destroyQp(qp: Qp): Promise<void>;

  createAh(pd: Pd, attr: AhAttr): Promise<Ah>;
  destroyAh(ah: Ah): Promise<void>;

  postSend(qp: Qp, wrs: SendWr[]): Promise<void>;
  postRecv(qp: Qp, wrs: RecvWr[]): Promise<void>;

  /** Next async event, waiting up to timeoutMs (0: only check); null when none. */
  getAsyncEvent(timeoutMs: number): Promise<AsyncEvent | null>;

  allocBuffer(length: number, opts?: BufferOptions): Promise<Buffer>;
  freeBuffer(buf: Buffer): Promise<void>;
  writeBuffer(buf: Buffer, offset: number, data: Uint8Array): Promise<void>;
  readBuffer(buf: Buffer, offset: number, length: number): Promise<Uint8Array>;
}

/** A zeroed address vector, for MODIFY_QP masks that do not carry AV. */
export function zeroAhAttr(): AhAttr {
  return { grh: { dgid: new Uint8Array(16), flowLabel: 0, sgidIndex: 0, hopLimit: 0, trafficClass: 0 }, sl: 0, staticRate: 0, portNum: 0 };
}

/** Names of status codes for messages. */
export function statusName(s: number): string {
  return Status[s] ?? String(s);
}
export function wcStatusName(s: number): string {
  return WcStatus[s] ?? String(s);
}
export function wcOpcodeName(s: number): string {
  return WcOpcode[s] ?? String(s);
}
export function qpStateName(s: number): string {
  return QpState[s] ?? String(s);
}
