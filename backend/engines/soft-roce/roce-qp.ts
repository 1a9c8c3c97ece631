/**
 * A soft-RoCE QP's transport state, shared by the requester, responder and
 * completer: the send queue with each WR's PSN range and progress, the
 * receive queue, the responder's expected PSN and partial message, and the
 * retry bookkeeping. Plus the 24-bit PSN arithmetic everything uses.
 */
import { QpType, SendOp, WcStatus, mtuBytes, type WcOpcode } from '../../abi/constants.js';
import type { Completion, QpAttributes, RecvWr, SendWr } from '../../engine/engine.js';
import type { IcrcPath } from './icrc.js';
import { MAX_MTU } from './packet.js';
import type { UdpPeer } from './udp-transport.js';

export const PSN_MASK = 0xff_ffff;

export function psnAdd(a: number, n: number): number {
  return (a + n) & PSN_MASK;
}

/** Signed 24-bit distance a - b. */
export function psnDiff(a: number, b: number): number {
  return (((a - b) & PSN_MASK) << 8) >> 8;
}

export interface SendEntry {
  token: number;
  wr: SendWr;
  postError: WcStatus | null;
  /** First PSN, assigned when the WR first goes out; -1 before. */
  firstPsn: number;
  npkts: number;
  /** Packets of this WR sent since its (re)start. */
  sent: number;
  /** READ: response packets received. */
  readPkts: number;
}

export interface RecvEntry {
  token: number;
  wr: RecvWr;
}

/** What a responder answered an atomic request with (for duplicates, §9). */
export interface AtomicReplay {
  psn: number;
  original: bigint;
}

/** An RDMA READ the responder answers a burst at a time (responses [next, npkts) still to send). */
export interface ReadJob {
  psn: number;
  va: bigint;
  rkey: number;
  total: number;
  npkts: number;
  next: number;
}

/** The responder's message in progress (multi-packet SEND or RDMA WRITE). */
export interface InMessage {
  kind: 'send' | 'write';
  /** SEND: the receive WQE being filled; WRITE with immediate: taken at LAST. */
  entry: RecvEntry | null;
  offset: number;
  va: bigint;
  rkey: number;
  dmaLength: number;
}

export function isAtomicOp(op: SendOp): boolean {
  return op === SendOp.ATOMIC_CMP_AND_SWP || op === SendOp.ATOMIC_FETCH_AND_ADD;
}

/** WRs answered by response packets (READ data, ATOMIC_ACK) rather than ACKs. */
export function isReadLike(op: SendOp): boolean {
  return op === SendOp.RDMA_READ || isAtomicOp(op);
}

export class RoceQp {
  attrs: QpAttributes;
  readonly sq: SendEntry[] = [];
  /** Index in `sq` of the first WR with packets still to send. */
  sendIdx = 0;
  /** Next PSN to assign to a new WR. */
  sqPsn = 0;
  /** Oldest PSN not yet acknowledged. */
  unackedPsn = 0;
  retries = 0;
  rnrRetries = 0;
  retryTimer: NodeJS.Timeout | null = null;
  rnrTimer: NodeJS.Timeout | null = null;
  rnrWaiting = false;
  /** Date.now() at which the armed timers fire (for saveState). */
  retryDeadline = 0;
  rnrDeadline = 0;
  /** Completer: the PSN last gone back to on a NAK or a gap in responses (-1: none); repeats of the same news are ignored until the timer fires. */
  wentBackTo = -1;

  readonly rq: RecvEntry[] = [];
  /** Responder: expected PSN. */
  rqPsn = 0;
  msn = 0;
  /** A PSN-sequence NAK was sent for the current gap. */
  nakSent = false;
  inMsg: InMessage | null = null;
  /** Responder: READs whose responses are still to go, oldest first; other requests wait while there are any. */
  readonly readJobs: ReadJob[] = [];
  /** Responder: a request was dropped while READ responses were going out (NAK its PSN once they are done). */
  droppedWhileReading = false;
  /** Responder: answers to the latest atomics, oldest first. */
  readonly atomicReplay: AtomicReplay[] = [];
  peer: UdpPeer | null = null;
  path: IcrcPath | null = null;

  constructor(
    readonly qpn: number,
    readonly type: QpType,
    readonly pdn: number,
    attrs: QpAttributes,
  ) {
    this.attrs = attrs;
  }

  get mtu(): number {
    if (this.type === QpType.UD && !this.attrs.pathMtu) return MAX_MTU;
    return mtuBytes(Math.min(5, Math.max(1, this.attrs.pathMtu || 1)));
  }

  /** Log prefix naming this QP. */
  get name(): string {
    return `soft-roce qpn 0x${this.qpn.toString(16)}`;
  }
}

export function recvCompletion(status: WcStatus, opcode: WcOpcode, byteLen: number, flags: number, imm: number, srcQp: number): Completion {
  const ok = status === WcStatus.SUCCESS;
  return { status, opcode, byteLen: ok ? byteLen : 0, flags: ok ? flags : 0, imm: ok ? imm : 0, srcQp };
}
