/**
 * The completer: decides what a request step means for the WR at the head
 * of the SQ (rxe_comp.c): complete it, wait and retry (RNR NAK, no reply),
 * or fail the QP. It is the only place besides the flush that reports send
 * completions, so completions on one SQ leave in posting order.
 */
import { SendOp, WcFlag, WcOpcode, WcStatus, sendWcOpcode } from '../../abi/constants.js';
import type { Completion, EngineHost, SendWr } from '../../engine/engine.js';
import type { LoopbackQp, SendEntry, WaitKind } from './qp.js';
import type { RequestStep } from './requester.js';
import { rnrTimerMs, transportTimeoutMs } from './timing.js';

export interface CompleterContext {
  readonly host: EngineHost;
  qp(qpn: number): LoopbackQp | undefined;
  /** Parks the head WR of `qp`; null ms means forever. */
  startWait(qp: LoopbackQp, kind: WaitKind, ms: number | null): void;
  /** Moves `qp` to ERR on the engine's own account (reports it, flushes). */
  failQp(qp: LoopbackQp, reason: string): void;
}

/** The RNR retry count that means "retry forever". */
export const RNR_RETRY_INFINITE = 7;


export function sendCompletion(wr: SendWr, status: WcStatus, byteLen: number): Completion {
  const ok = status === WcStatus.SUCCESS;
  const withImm = wr.opcode === SendOp.SEND_WITH_IMM || wr.opcode === SendOp.RDMA_WRITE_WITH_IMM;
  return { status, opcode: sendWcOpcode(wr.opcode), byteLen: ok ? byteLen : 0, flags: ok && withImm ? WcFlag.WITH_IMM : 0, imm: 0, srcQp: 0 };
}

function failureReason(status: WcStatus): string {
  return `send WR failed with ${WcStatus[status] ?? status}`;
}

/** Applies the result of running the head WR `entry` of `qp`. */
export function complete(ctx: CompleterContext, qp: LoopbackQp, entry: SendEntry, step: RequestStep): void {
  const o = step.outcome;
  if (o.kind === 'rnr') {
    const limit = qp.attrs.rnrRetry;
    if (limit !== RNR_RETRY_INFINITE && qp.rnrRetries >= limit) {
      finish(ctx, qp, entry, step, WcStatus.RNR_RETRY_EXC_ERR, 0);
      return;
    }
    if (limit !== RNR_RETRY_INFINITE) qp.rnrRetries++;
    ctx.startWait(qp, 'rnr', rnrTimerMs(o.minRnrTimer));
    return;
  }
  if (o.kind === 'no_reply') {
    if (qp.retries >= qp.attrs.retryCnt) {
      ctx.host.log.debug(`qpn 0x${qp.qpn.toString(16)}: retries exhausted (${o.why})`);
      finish(ctx, qp, entry, step, WcStatus.RETRY_EXC_ERR, 0);
      return;
    }
    qp.retries++;
    ctx.startWait(qp, 'retry', transportTimeoutMs(qp.attrs.timeout));
    return;
  }
  finish(ctx, qp, entry, step, o.status, o.byteLen);
}

function finish(ctx: CompleterContext, qp: LoopbackQp, entry: SendEntry, step: RequestStep, status: WcStatus, byteLen: number): void {
  // Off the queue before any host call: a re-entrant flush must not see it again.
  if (qp.sq.peek() === entry) qp.sq.shift();
  qp.resetRetries();
  const host = ctx.host;
  if (step.recv !== null) host.recvDone(step.recv.qpn, step.recv.entry.token, step.recv.completion);
  host.sendDone(qp.qpn, entry.token, sendCompletion(entry.wr, status, byteLen));
  if (status !== WcStatus.SUCCESS) ctx.failQp(qp, failureReason(status));
  if (step.failPeer !== null) {
    const peer = ctx.qp(step.failPeer.qpn);
    if (peer !== undefined) ctx.failQp(peer, step.failPeer.reason);
  }
}

/**
 * Completes every outstanding WR of an ERR QP, in posting order, send queue
 * first: WR_FLUSH_ERR, or the error a WR was posted with.
 */
export function flush(host: EngineHost, qp: LoopbackQp): void {
  qp.flushPending = false;
  qp.badPost = false;
  for (let e = qp.sq.shift(); e !== undefined; e = qp.sq.shift()) {
    host.sendDone(qp.qpn, e.token, sendCompletion(e.wr, e.postError ?? WcStatus.WR_FLUSH_ERR, 0));
  }
  for (let e = qp.rq.shift(); e !== undefined; e = qp.rq.shift()) {
    host.recvDone(qp.qpn, e.token, { status: e.postError ?? WcStatus.WR_FLUSH_ERR, opcode: WcOpcode.RECV, byteLen: 0, flags: 0, imm: 0, srcQp: 0 });
  }
}
