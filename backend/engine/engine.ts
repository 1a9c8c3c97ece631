/**
 * The interface between the device model and an RDMA engine (loopback,
 * soft-RoCE, host verbs). The device model owns virtqueues, WQE parsing,
 * resource tables and CQE writing; an engine owns transport: moving data
 * between QPs (local or over a network) and deciding when a work request
 * is complete. Engines never see virtqueues, and reach guest memory only
 * through {@link MemoryAccess}, which enforces MR keys, bounds, PDs and
 * access rights and keeps the dirty log.
 */
import { QpState, type QpType, type SendOp, type WcOpcode, type WcStatus } from '../abi/constants.js';
import type { Logger } from '../../virtio/log.js';

export interface Sge {
  addr: bigint;
  length: number;
  lkey: number;
}

export interface AddressVector {
  dgid: Uint8Array;
  sgidIndex: number;
  hopLimit: number;
  trafficClass: number;
  flowLabel: number;
  sl: number;
}

export interface SendWr {
  wrId: bigint;
  opcode: SendOp;
  /** SendFlag bits. */
  flags: number;
  /** Local buffers, or empty when `inline` carries the data. */
  sges: Sge[];
  /** Inline payload copied from the WQE at post time. */
  inline: Uint8Array | null;
  /** Sum of SGE lengths (or inline length). */
  length: number;
  /** Immediate data (network byte order as a u32) or the rkey to invalidate. */
  imm: number;
  remoteAddr: bigint;
  rkey: number;
  compareAdd: bigint;
  swap: bigint;
  /** UD only. */
  ud: { av: AddressVector; remoteQpn: number; remoteQkey: number } | null;
}

export interface RecvWr {
  wrId: bigint;
  sges: Sge[];
  length: number;
}

/** What an engine reports for a finished work request. */
export interface Completion {
  status: WcStatus;
  opcode: WcOpcode;
  byteLen: number;
  /** WcFlag bits. */
  flags: number;
  imm: number;
  /** Receive completions: the sender. */
  srcQp: number;
  /** Receive completions: the message carried the solicited-event bit (for SOLICITED arming). */
  solicited?: boolean;
}

/** QP settings the device model has validated (MODIFY_QP attribute rules) and hands to the engine. */
export interface QpAttributes {
  state: QpState;
  pathMtu: number;
  timeout: number;
  retryCnt: number;
  rnrRetry: number;
  minRnrTimer: number;
  maxRdAtomic: number;
  maxDestRdAtomic: number;
  accessFlags: number;
  qkey: number;
  rqPsn: number;
  sqPsn: number;
  destQpn: number;
  pkeyIndex: number;
  av: AddressVector | null;
}

/** Attributes of a QP in RESET: what a new QP has and what RESET returns it to. */
export function resetQpAttributes(): QpAttributes {
  return {
    state: QpState.RESET,
    pathMtu: 0,
    timeout: 0,
    retryCnt: 0,
    rnrRetry: 0,
    minRnrTimer: 0,
    maxRdAtomic: 0,
    maxDestRdAtomic: 0,
    accessFlags: 0,
    qkey: 0,
    rqPsn: 0,
    sqPsn: 0,
    destQpn: 0,
    pkeyIndex: 0,
    av: null,
  };
}

export interface QpConfig {
  type: QpType;
  pdn: number;
  maxSendWr: number;
  maxRecvWr: number;
}

export type AtomicOp = 'cmp_swap' | 'fetch_add';

/**
 * Guest memory as RDMA sees it. Every method checks key, PD, bounds and
 * access before touching a byte, and returns a completion status:
 * SUCCESS, or the error the verbs spec assigns (LOC_PROT_ERR when a local
 * SGE does not name an MR valid for the operation: bad key, range, or no
 * LOCAL_WRITE where data lands; REM_ACCESS_ERR for any remote
 * key/range/right failure). LOC_ACCESS_ERR is not one of them: the verbs
 * keep it for an inbound RDMA WRITE with immediate.
 */
export interface MemoryAccess {
  /** Copies `len` bytes gathered from local SGEs into `dst` (local read). */
  gather(pdn: number, sges: readonly Sge[], dst: Uint8Array, dstOffset: number): WcStatus;
  /** Scatters `len` bytes of `src` into local SGEs (needs LOCAL_WRITE); LOC_LEN_ERR if they hold less. */
  scatter(pdn: number, sges: readonly Sge[], src: Uint8Array, srcOffset: number, len: number): WcStatus;
  /** Remote RDMA WRITE into [addr, addr+len) of the MR named by `rkey` (needs REMOTE_WRITE). */
  remoteWrite(pdn: number, rkey: number, addr: bigint, src: Uint8Array, srcOffset: number, len: number): WcStatus;
  /**
   * Whether a remote access of [addr, addr+len) with `rkey` would be allowed
   * (REMOTE_WRITE or REMOTE_READ right), touching nothing: a responder checks
   * a whole RDMA WRITE or READ before its first byte moves.
   */
  remoteCheck(pdn: number, rkey: number, addr: bigint, len: number, right: 'write' | 'read'): WcStatus;
  /** Remote RDMA READ of [addr, addr+len) (needs REMOTE_READ). */
  remoteRead(pdn: number, rkey: number, addr: bigint, dst: Uint8Array, dstOffset: number, len: number): WcStatus;
  /** 8-byte aligned atomic at addr (needs REMOTE_ATOMIC); returns the original value. */
  remoteAtomic(pdn: number, rkey: number, addr: bigint, op: AtomicOp, compareAdd: bigint, swap: bigint): { status: WcStatus; original: bigint };
  /** Invalidates a remote key (SEND_WITH_INV / LOCAL_INV); false when the key is unknown or not invalidatable. */
  invalidate(pdn: number, rkey: number): boolean;
}

/** What the device model gives an engine. */
/**
 * How a UD receive presents its 40-byte GRH (docs/virtio-rdma.md §6):
 * 'rocev2' as Linux does for RoCEv2 (an IPv4 header after 20 zero bytes
 * for IPv4-mapped GIDs), 'ib' as for IB and RoCE v1 (an IPv6-format GRH
 * with next header 0x1B for every GID). The driver chooses with
 * VIRTIO_RDMA_F_IB_GRH, to match the GID types it shows its consumers.
 */
export type GrhLayout = 'rocev2' | 'ib';

export interface EngineHost {
  readonly memory: MemoryAccess;
  readonly log: Logger;
  /** The GRH layout the driver negotiated; read when a GRH is built. */
  readonly grhLayout: GrhLayout;
  /**
   * A send WR is finished. The device returns its SQ buffer and writes a
   * CQE when the WR was signalled or failed. Exactly once per token.
   */
  sendDone(qpn: number, token: number, completion: Completion): void;
  /** A receive WR is finished (data arrived, or flushed). Exactly once per token. */
  recvDone(qpn: number, token: number, completion: Completion): void;
  /** The engine moved a QP to ERR on its own (retry exhausted, remote error). */
  qpFailed(qpn: number, reason: string): void;
  /** The local GID table, index -> 16-byte GID. */
  gid(index: number): Uint8Array | null;
}

export interface Engine {
  readonly name: string;
  attach(host: EngineHost): void;
  /**
   * A QP is created. Returns its QPN: engines that own a QPN space pick one
   * (avoiding `inUse`); a host-verbs engine returns the host's. `wanted`
   * asks for a specific QPN (restore after migration); the engine refuses
   * (returns null) when it cannot give it.
   */
  createQp(config: QpConfig, wanted: number | null, inUse: (qpn: number) => boolean): number | null;
  /** The QP's attributes changed (already validated). Entering ERR flushes outstanding WRs through the host. */
  modifyQp(qpn: number, attrs: QpAttributes, mask: number): void;
  /** The QP is gone; outstanding WRs are dropped without completions (the device returns their buffers). */
  destroyQp(qpn: number): void;
  postSend(qpn: number, wr: SendWr, token: number): void;
  postRecv(qpn: number, wr: RecvWr, token: number): void;
  /** Rings stopped (migration, disconnect): no more guest-memory writes until resume. */
  suspend(): void;
  /**
   * Runs again after suspend() or handOver(): takes the network address back
   * if it was given up, and sends what is unacknowledged at once (a
   * destination right after a load, a source whose migration failed).
   */
  resume(): void;
  /**
   * The state just saved now belongs to another back-end (migration): stop
   * answering the network and give up the device's address until resume().
   */
  handOver(): void;
  /** Transport state (PSNs, queued WRs and their tokens, timers as deadlines) as plain versioned bytes. */
  saveState(): Uint8Array;
  loadState(state: Uint8Array): void;
  /** Drops everything (device reset). */
  reset(): void;
  close(): void;
}
