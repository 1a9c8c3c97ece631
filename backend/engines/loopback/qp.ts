/**
 * A QP as the loopback engine keeps it: type, PD, the attributes the device
 * validated, the outstanding send and receive WRs in posting order (with
 * the device's tokens), and the retry state of the send WR at the head.
 */
import { QpState, type QpType, type WcStatus } from '../../abi/constants.js';
import { resetQpAttributes, type QpAttributes, type RecvWr, type SendWr } from '../../engine/engine.js';
import { Fifo } from './fifo.js';

export interface SendEntry {
  token: number;
  wr: SendWr;
  /** Set when the WR was posted in a state that does not allow it: it completes with this status. */
  postError: WcStatus | null;
}

export interface RecvEntry {
  token: number;
  wr: RecvWr;
  postError: WcStatus | null;
}

export type WaitKind = 'rnr' | 'retry';

/** The head send WR waits before it is tried again. */
export interface Wait {
  kind: WaitKind;
  /** Absolute time (performance.now()) of the retry while the timer runs; null while paused or forever. */
  deadline: number | null;
  /** Time left while paused (suspend, saved state); null = no retry ever (timeout 0 means infinite). */
  remainingMs: number | null;
  timer: NodeJS.Timeout | null;
}

export const initialAttrs = resetQpAttributes;

export function copyAttrs(a: QpAttributes): QpAttributes {
  return { ...a, av: a.av === null ? null : { ...a.av, dgid: a.av.dgid.slice() } };
}

/** States in which a QP accepts incoming messages. */
export function receiving(state: QpState): boolean {
  return state === QpState.RTR || state === QpState.RTS;
}

export class LoopbackQp {
  readonly sq = new Fifo<SendEntry>();
  readonly rq = new Fifo<RecvEntry>();
  /** RNR NAKs the head send WR has met. */
  rnrRetries = 0;
  /** Times the head send WR went unanswered. */
  retries = 0;
  wait: Wait | null = null;
  /** Entered ERR while the engine was suspended: flush when it resumes. */
  flushPending = false;
  /** A WR was posted in a state that does not allow it: fail the QP at the next step. */
  badPost = false;

  constructor(
    readonly qpn: number,
    readonly type: QpType,
    readonly pdn: number,
    readonly maxSendWr: number,
    readonly maxRecvWr: number,
    public attrs: QpAttributes = initialAttrs(),
  ) {}

  /** The head WR is finished (or gone): the next one starts with fresh retry counts. */
  resetRetries(): void {
    this.rnrRetries = 0;
    this.retries = 0;
  }
}
