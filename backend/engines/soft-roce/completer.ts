/**
 * The completer (rxe_comp.c): matches ACKs, NAKs, READ responses and
 * ATOMIC ACKs against the WRs the requester sent, completes WRs in posting
 * order, retransmits from the first unacknowledged PSN on a PSN-sequence
 * NAK or when the transport timer expires (bounded by retry_cnt), and waits
 * out RNR NAKs (bounded by rnr_retry).
 */
import { QpState, SendOp, WcStatus } from '../../abi/constants.js';
import { RNR_RETRY_INFINITE, sendCompletion } from '../loopback/completer.js';
import { sliceSges } from '../loopback/message.js';
import { MAX_TIMER_MS, rnrTimerMs, transportTimeoutMs } from '../loopback/timing.js';
import type { RoceCore } from './core.js';
import { Syndrome, syndromeKind, syndromeValue } from './headers.js';
import { Opcode } from './opcodes.js';
import type { RocePacket } from './packet.js';
import { type RoceQp, isAtomicOp, isReadLike, psnAdd, psnDiff } from './roce-qp.js';

export class Completer {
  /** An ATOMIC ACK's original value, little-endian as guest memory holds it. */
  private readonly atomicBytes = new Uint8Array(8);
  private readonly atomicView = new DataView(this.atomicBytes.buffer);

  constructor(private readonly core: RoceCore) {}

  /** An ACK/NAK, READ response or ATOMIC ACK for `qp`. */
  onResponse(qp: RoceQp, pkt: RocePacket): void {
    const core = this.core;
    if (qp.attrs.state !== QpState.RTS && qp.attrs.state !== QpState.SQD) {
      core.stats.ignored++;
      return;
    }
    const psn = pkt.bth.psn;
    const op = pkt.opcode;
    const idx = this.sentIndexOf(qp, psn);
    if (op === Opcode.RC_ACKNOWLEDGE) return this.onAck(qp, pkt, idx);
    if (idx < 0) {
      core.stats.ignored++;
      return;
    }
    if (op === Opcode.RC_ATOMIC_ACKNOWLEDGE) return this.onAtomicAck(qp, pkt, idx);
    // READ response: it acknowledges every WR before its READ, and must be the next one that READ expects.
    const e = qp.sq[idx]!;
    if (e.wr.opcode !== SendOp.RDMA_READ) {
      core.stats.ignored++;
      return;
    }
    if (this.ackBefore(qp, idx)) {
      // An earlier READ or atomic still lacks responses that should have come first.
      core.stats.ignored++;
      this.responsesLost(qp, op);
      return;
    }
    const gap = psnDiff(psn, this.headResumePsn(qp));
    if (gap !== 0) {
      core.stats.ignored++;
      if (gap > 0) this.responsesLost(qp, op);
      return;
    }
    const lastOp = op === Opcode.RC_RDMA_READ_RESPONSE_LAST || op === Opcode.RC_RDMA_READ_RESPONSE_ONLY;
    const mtu = qp.mtu;
    const off = e.readPkts * mtu;
    const n = pkt.payloadLength;
    const expectLen = Math.min(mtu, e.wr.length - off);
    const expectLast = e.readPkts === e.npkts - 1;
    if (lastOp !== expectLast || n !== expectLen) {
      core.stats.ignored++;
      return;
    }
    const memory = core.memory();
    if (memory === null) return;
    if (n > 0) {
      const s = memory.scatter(qp.pdn, sliceSges(e.wr.sges, off, n), pkt.buffer, pkt.payloadOffset, n);
      if (s !== WcStatus.SUCCESS) {
        this.finishHead(qp, s);
        return;
      }
    }
    e.readPkts++;
    qp.unackedPsn = psnAdd(psn, 1);
    qp.retries = 0;
    qp.rnrRetries = 0;
    if (lastOp) this.completeThrough(qp, 0);
    this.restartRetry(qp);
    core.pump(qp);
  }

  /** Completes sq[0..last] successfully (they were acknowledged). */
  completeThrough(qp: RoceQp, last: number): void {
    const host = this.core.host();
    for (let i = 0; i <= last; i++) {
      const e = qp.sq.shift()!;
      if (qp.sendIdx > 0) qp.sendIdx--;
      qp.retries = 0;
      qp.rnrRetries = 0;
      host.sendDone(qp.qpn, e.token, sendCompletion(e.wr, WcStatus.SUCCESS, e.wr.length));
    }
    if (last >= 0) {
      const head = qp.sq[0];
      if (head !== undefined && head.firstPsn >= 0 && psnDiff(head.firstPsn, qp.unackedPsn) > 0) qp.unackedPsn = head.firstPsn;
    }
  }

  /** The head WR ends with `status`; the QP goes to ERR. */
  finishHead(qp: RoceQp, status: WcStatus): void {
    const e = qp.sq.shift();
    if (qp.sendIdx > 0) qp.sendIdx--;
    if (e !== undefined) this.core.host().sendDone(qp.qpn, e.token, sendCompletion(e.wr, status, 0));
    this.core.failQp(qp, `send WR failed with ${WcStatus[status] ?? status}`);
  }

  // ---------------------------------------------------------------------------
  // Timers

  startRnrWait(qp: RoceQp, ms: number): void {
    qp.rnrWaiting = true;
    const wait = Math.min(ms, MAX_TIMER_MS);
    qp.rnrDeadline = Date.now() + wait;
    qp.rnrTimer = setTimeout(() => {
      qp.rnrTimer = null;
      qp.rnrWaiting = false;
      if (this.core.isLive(qp)) this.core.pump(qp);
    }, wait);
  }

  /** Arms the transport timer unless it runs; `remaining` resumes a saved one. */
  armRetry(qp: RoceQp, remaining?: number): void {
    if (qp.retryTimer !== null) return;
    const ms = remaining ?? transportTimeoutMs(qp.attrs.timeout);
    if (ms === null) return;
    const wait = Math.min(Math.max(ms, 1), MAX_TIMER_MS);
    qp.retryDeadline = Date.now() + wait;
    qp.retryTimer = setTimeout(() => this.retryExpired(qp), wait);
  }

  clearTimers(qp: RoceQp): void {
    if (qp.retryTimer !== null) clearTimeout(qp.retryTimer);
    if (qp.rnrTimer !== null) clearTimeout(qp.rnrTimer);
    qp.retryTimer = null;
    qp.rnrTimer = null;
    qp.rnrWaiting = false;
  }

  // ---------------------------------------------------------------------------

  /** Index in the SQ of the sent WR whose PSN range holds `psn`, or -1. */
  private sentIndexOf(qp: RoceQp, psn: number): number {
    for (let i = 0; i < qp.sq.length; i++) {
      const e = qp.sq[i]!;
      if (e.firstPsn < 0) break;
      const d = psnDiff(psn, e.firstPsn);
      if (d >= 0 && d < e.npkts) return i;
    }
    return -1;
  }

  /** A READ or atomic before sq[idx] still waits for its responses. */
  private readLikeBefore(qp: RoceQp, idx: number): boolean {
    for (let i = 0; i < idx; i++) if (isReadLike(qp.sq[i]!.wr.opcode)) return true;
    return false;
  }

  private onAck(qp: RoceQp, pkt: RocePacket, idx: number): void {
    const core = this.core;
    const psn = pkt.bth.psn;
    const syn = pkt.aeth.syndrome;
    const kind = syndromeKind(syn);
    if (kind === 'ack') {
      if (idx < 0 || psnDiff(psn, qp.unackedPsn) < 0) {
        core.stats.ignored++;
        return;
      }
      const e = qp.sq[idx]!;
      const done = psnDiff(psn, e.firstPsn) === e.npkts - 1 ? idx : idx - 1;
      // An ACK past an unfinished READ or atomic means its responses were lost.
      if (this.ackBefore(qp, done + 1)) {
        this.goBack(qp, this.headResumePsn(qp));
        return;
      }
      qp.unackedPsn = psnAdd(psn, 1);
      qp.retries = 0;
      qp.rnrRetries = 0;
      this.restartRetry(qp);
      core.pump(qp);
      return;
    }
    // A NAK for a PSN already acknowledged is stale (a duplicate, or overtaken by a retransmission).
    if (idx < 0 || psnDiff(psn, qp.unackedPsn) < 0) {
      core.stats.ignored++;
      return;
    }
    // Responses of an earlier READ or atomic are missing: recover them first (rxe_comp.c does the same).
    if (this.ackBefore(qp, idx)) {
      this.goBack(qp, this.headResumePsn(qp));
      return;
    }
    if (kind === 'rnr_nak') {
      const limit = qp.attrs.rnrRetry;
      if (limit !== RNR_RETRY_INFINITE && qp.rnrRetries >= limit) {
        this.finishHead(qp, WcStatus.RNR_RETRY_EXC_ERR);
        return;
      }
      if (limit !== RNR_RETRY_INFINITE) qp.rnrRetries++;
      this.clearTimers(qp);
      qp.rnrWaiting = true;
      this.rewind(qp, psn);
      this.startRnrWait(qp, rnrTimerMs(syndromeValue(syn)));
      return;
    }
    switch (syn) {
      case Syndrome.NAK_PSN_SEQ_ERROR:
        this.goBack(qp, psn);
        return;
      case Syndrome.NAK_REMOTE_ACCESS_ERROR:
        this.finishHead(qp, WcStatus.REM_ACCESS_ERR);
        return;
      case Syndrome.NAK_REMOTE_OPERATIONAL_ERROR:
        this.finishHead(qp, WcStatus.REM_OP_ERR);
        return;
      default:
        this.finishHead(qp, WcStatus.REM_INV_REQ_ERR);
        return;
    }
  }

  private onAtomicAck(qp: RoceQp, pkt: RocePacket, idx: number): void {
    const core = this.core;
    const e = qp.sq[idx]!;
    if (!isAtomicOp(e.wr.opcode) || pkt.bth.psn !== e.firstPsn || e.readPkts > 0 || this.readLikeBefore(qp, idx)) {
      core.stats.ignored++;
      return;
    }
    this.completeThrough(qp, idx - 1);
    const memory = core.memory();
    if (memory === null) return;
    this.atomicView.setBigUint64(0, pkt.atomicAckEth.origRemoteData, true);
    const n = Math.min(8, e.wr.length);
    const s = memory.scatter(qp.pdn, sliceSges(e.wr.sges, 0, n), this.atomicBytes, 0, n);
    if (s !== WcStatus.SUCCESS) {
      this.finishHead(qp, s);
      return;
    }
    e.readPkts = 1;
    qp.unackedPsn = psnAdd(pkt.bth.psn, 1);
    qp.retries = 0;
    qp.rnrRetries = 0;
    this.completeThrough(qp, 0);
    this.restartRetry(qp);
    core.pump(qp);
  }

  /**
   * A response for sq[idx] means the responder executed every request
   * before it: completes those WRs, stopping at the first READ or atomic,
   * which needs its own responses. True when it stopped at one (now sq[0]).
   */
  private ackBefore(qp: RoceQp, idx: number): boolean {
    for (let i = 0; i < idx; i++) {
      if (isReadLike(qp.sq[i]!.wr.opcode)) {
        this.completeThrough(qp, i - 1);
        return true;
      }
    }
    this.completeThrough(qp, idx - 1);
    return false;
  }

  /**
   * Responses of the head READ/atomic are missing before this one. The rest
   * of the burst that overtook the loss is already on its way: asking again
   * before its last packet has passed would make bursts of the same data
   * overlap, and a 1 MiB READ would flood the receiver with copies. So ask
   * at the burst's end; the timer covers a lost last packet.
   */
  private responsesLost(qp: RoceQp, op: number): void {
    if (op === Opcode.RC_RDMA_READ_RESPONSE_LAST || op === Opcode.RC_RDMA_READ_RESPONSE_ONLY) this.goBack(qp, this.headResumePsn(qp));
  }

  /** Where the head WR resumes: its first response not yet received (READ, atomic). */
  private headResumePsn(qp: RoceQp): number {
    const head = qp.sq[0]!;
    return psnAdd(head.firstPsn, head.readPkts);
  }

  /**
   * Retransmits from `psn` on news of a loss (a PSN-sequence NAK, a gap in
   * responses), once: the rest of a burst that overtook the lost packet,
   * or a duplicated NAK, tells nothing new until the timer fires.
   */
  private goBack(qp: RoceQp, psn: number): void {
    if (qp.wentBackTo === psn) return;
    qp.wentBackTo = psn;
    this.retransmit(qp, psn);
  }

  /** Moves the send point back to `psn` without sending. */
  private rewind(qp: RoceQp, psn: number): void {
    qp.unackedPsn = psn;
    for (let i = 0; i < qp.sq.length; i++) {
      const e = qp.sq[i]!;
      if (e.firstPsn < 0) break;
      const d = psnDiff(psn, e.firstPsn);
      if (d >= 0 && d < e.npkts) {
        qp.sendIdx = i;
        e.sent = isReadLike(e.wr.opcode) ? 0 : d;
        for (let j = i + 1; j < qp.sq.length; j++) qp.sq[j]!.sent = 0;
        return;
      }
    }
  }

  /**
   * Sends everything unacknowledged again now, without counting a retry:
   * the engine runs again after a blackout (a migration's destination right
   * after the load, or a source whose migration failed), and what its peer
   * answered meanwhile was dropped.
   */
  resendUnacked(qp: RoceQp): void {
    if (qp.attrs.state !== QpState.RTS || qp.rnrWaiting) return;
    const head = qp.sq[0];
    if (head === undefined || head.firstPsn < 0) return;
    qp.wentBackTo = -1;
    this.retransmit(qp, qp.unackedPsn);
  }

  private retransmit(qp: RoceQp, psn: number): void {
    this.core.stats.retransmits++;
    this.rewind(qp, psn);
    if (qp.retryTimer !== null) {
      clearTimeout(qp.retryTimer);
      qp.retryTimer = null;
    }
    this.core.pump(qp);
  }

  private restartRetry(qp: RoceQp): void {
    if (qp.retryTimer !== null) clearTimeout(qp.retryTimer);
    qp.retryTimer = null;
    if (qp.sq.length > 0 && qp.sq[0]!.firstPsn >= 0) this.armRetry(qp);
  }

  private retryExpired(qp: RoceQp): void {
    qp.retryTimer = null;
    const core = this.core;
    if (!core.isLive(qp) || qp.attrs.state !== QpState.RTS || qp.rnrWaiting) return;
    if (core.suspended) {
      this.armRetry(qp);
      return;
    }
    const head = qp.sq[0];
    if (head === undefined || head.firstPsn < 0) return;
    if (qp.retries >= qp.attrs.retryCnt) {
      this.finishHead(qp, WcStatus.RETRY_EXC_ERR);
      return;
    }
    qp.retries++;
    qp.wentBackTo = -1;
    this.retransmit(qp, qp.unackedPsn);
  }
}
