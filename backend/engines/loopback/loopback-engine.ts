/**
 * The loopback engine: RC, UC and UD between QPs of one device
 * (docs/virtio-rdma.md §5–§9). It reaches guest memory only through the
 * host's MemoryAccess and reports through EngineHost, so it makes no
 * assumption about the device model. The work is split like Linux rxe:
 *
 *   requester.ts  runs the WR at the head of an SQ and builds the request;
 *   responder.ts  what the destination QP does with a request;
 *   completer.ts  what completes when (retries, RNR waits, errors, flush);
 *   this file     QP table, routing between local QPs, scheduling, timers,
 *                 suspend/resume and state.
 *
 * Scheduling: posting only queues work; it runs in a step on the event loop
 * (setImmediate), and the host hears about completions from there. The one
 * exception is flushing: a QP entering ERR (modifyQp, or a post to an ERR
 * QP) flushes at once, so flush completions come before anything the
 * device completes itself afterwards. While suspended nothing runs and no
 * timer fires; the state then holds the time each wait has left.
 */
import { allocateQpn } from '../../engine/qpn.js';
import { performance } from 'node:perf_hooks';
import { FIRST_QPN, QpState, QpType, WcStatus } from '../../abi/constants.js';
import type { Engine, EngineHost, MemoryAccess, QpAttributes, QpConfig, RecvWr, SendWr } from '../../engine/engine.js';
import { type CompleterContext, complete, flush } from './completer.js';
import { CHUNK, type Message } from './message.js';
import { LoopbackQp, type Wait, type WaitKind, copyAttrs } from './qp.js';
import { type Delivery, type RequesterContext, request } from './requester.js';
import { readResponse, respond } from './responder.js';
import { decodeState, encodeState, remainingMs } from './state.js';
import { MAX_TIMER_MS } from './timing.js';

/**
 * Work one step does before it yields to the event loop, in units: a WR
 * costs one unit plus one per MiB it moves, so a step ends after 256 WRs
 * or about 256 MiB, whichever comes first. A WR that has started runs to
 * its end (up to 2 GiB; the requester is not resumable mid-message).
 */
const STEP_BUDGET = 256;
const BYTES_PER_UNIT = 1 << 20;
/** Entries of the GID table the engine looks at. */
const GID_TABLE_MAX = 256;

function sameGid(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== 16 || b.length !== 16) return false;
  for (let i = 0; i < 16; i++) if (a[i] !== b[i]) return false;
  return true;
}

function isZero(g: Uint8Array): boolean {
  for (const b of g) if (b !== 0) return false;
  return true;
}

export class LoopbackEngine implements Engine {
  readonly name = 'loopback';
  private host: EngineHost | null = null;
  private readonly qps = new Map<number, LoopbackQp>();
  /** QPs that may have work for the next step. */
  private readonly ready = new Set<LoopbackQp>();
  private nextQpn = FIRST_QPN;
  private suspended = false;
  private immediate: NodeJS.Immediate | null = null;
  private running = false;
  private readonly payloadStaging = new Uint8Array(CHUNK);
  private readonly replyStaging = new Uint8Array(CHUNK);
  private readonly completer: CompleterContext;

  constructor() {
    const engine = this;
    this.completer = {
      get host(): EngineHost {
        return engine.host!;
      },
      qp: (qpn) => this.qps.get(qpn),
      startWait: (qp, kind, ms) => this.startWait(qp, kind, ms),
      failQp: (qp, reason) => this.failQp(qp, reason),
    };
  }

  attach(host: EngineHost): void {
    this.host = host;
    this.scheduleIfWork();
  }

  // ---------------------------------------------------------------------------
  // Control path

  createQp(config: QpConfig, wanted: number | null, inUse: (qpn: number) => boolean): number | null {
    if (config.type !== QpType.RC && config.type !== QpType.UC && config.type !== QpType.UD) return null;
    const got = allocateQpn(wanted, this.nextQpn, (n) => this.qps.has(n) || inUse(n));
    if (got === null) return null;
    this.nextQpn = got.cursor;
    const qpn = got.qpn;
    this.qps.set(qpn, new LoopbackQp(qpn, config.type, config.pdn, config.maxSendWr, config.maxRecvWr));
    return qpn;
  }

  modifyQp(qpn: number, attrs: QpAttributes, _mask: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) {
      this.host?.log.warn(`loopback: modify of unknown qpn 0x${qpn.toString(16)}`);
      return;
    }
    qp.attrs = copyAttrs(attrs);
    switch (attrs.state) {
      case QpState.RESET:
        // Outstanding WRs are dropped without completions: the device returns their buffers.
        this.cancelWait(qp);
        qp.sq.clear();
        qp.rq.clear();
        qp.resetRetries();
        qp.flushPending = false;
        qp.badPost = false;
        this.ready.delete(qp);
        break;
      case QpState.ERR:
        this.cancelWait(qp);
        qp.resetRetries();
        this.flushNowOrLater(qp);
        break;
      default:
        if (qp.sq.length > 0 || qp.badPost) this.kick(qp);
    }
  }

  destroyQp(qpn: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) return;
    this.cancelWait(qp);
    this.ready.delete(qp);
    this.qps.delete(qpn);
  }

  // ---------------------------------------------------------------------------
  // Data path

  postSend(qpn: number, wr: SendWr, token: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) {
      this.host?.log.error(`loopback: send posted to unknown qpn 0x${qpn.toString(16)} (token ${token})`);
      return;
    }
    const state = qp.attrs.state;
    const entry = { token, wr, postError: null as WcStatus | null };
    if (state === QpState.ERR) {
      qp.sq.push(entry);
      this.flushNowOrLater(qp);
      return;
    }
    if (state !== QpState.RTS) {
      entry.postError = WcStatus.LOC_QP_OP_ERR;
      qp.badPost = true;
    }
    qp.sq.push(entry);
    this.kick(qp);
  }

  postRecv(qpn: number, wr: RecvWr, token: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) {
      this.host?.log.error(`loopback: receive posted to unknown qpn 0x${qpn.toString(16)} (token ${token})`);
      return;
    }
    const state = qp.attrs.state;
    const entry = { token, wr, postError: null as WcStatus | null };
    if (state === QpState.ERR) {
      qp.rq.push(entry);
      this.flushNowOrLater(qp);
      return;
    }
    qp.rq.push(entry);
    if (state === QpState.RESET) {
      entry.postError = WcStatus.LOC_QP_OP_ERR;
      qp.badPost = true;
      this.kick(qp);
    }
    // A new receive WQE does not cut an RNR wait short: the sender retries when its timer expires.
  }

  suspend(): void {
    if (this.suspended) return;
    this.suspended = true;
    if (this.immediate !== null) {
      clearImmediate(this.immediate);
      this.immediate = null;
    }
    const now = performance.now();
    for (const qp of this.qps.values()) {
      const w = qp.wait;
      if (w === null || w.deadline === null) continue;
      if (w.timer !== null) clearTimeout(w.timer);
      w.timer = null;
      w.remainingMs = Math.max(0, w.deadline - now);
      w.deadline = null;
    }
  }

  resume(): void {
    if (!this.suspended) return;
    this.suspended = false;
    if (this.host !== null) {
      for (const qp of this.qps.values()) {
        if (qp.flushPending && qp.attrs.state === QpState.ERR) flush(this.host, qp);
        qp.flushPending = false;
      }
    }
    for (const qp of this.qps.values()) this.armWait(qp);
    this.scheduleIfWork();
  }

  /** Nothing to give up: loopback traffic never leaves the device. */
  handOver(): void {}

  // ---------------------------------------------------------------------------
  // State

  saveState(): Uint8Array {
    return encodeState({ nextQpn: this.nextQpn, qps: [...this.qps.values()] }, performance.now());
  }

  /**
   * Replaces everything with saved state (validated first: garbage throws and
   * changes nothing). The engine stays suspended if it was; otherwise waits
   * resume counting and queued work runs in the next step. No host call is
   * made from here.
   */
  loadState(state: Uint8Array): void {
    const snap = decodeState(state);
    this.dropAll();
    this.nextQpn = snap.nextQpn;
    for (const qp of snap.qps) this.qps.set(qp.qpn, qp);
    if (!this.suspended) {
      for (const qp of this.qps.values()) this.armWait(qp);
      this.scheduleIfWork();
    }
  }

  reset(): void {
    this.dropAll();
    this.nextQpn = FIRST_QPN;
    this.suspended = false;
  }

  close(): void {
    this.reset();
  }

  /** True when no step is scheduled (tests, diagnostics); WRs parked in a wait do not count. */
  get idle(): boolean {
    return this.immediate === null;
  }

  /** Send WRs parked in an RNR or retry wait (tests, diagnostics). */
  get waiting(): number {
    let n = 0;
    for (const qp of this.qps.values()) if (qp.wait !== null) n++;
    return n;
  }

  // ---------------------------------------------------------------------------
  // Stepping

  private dropAll(): void {
    if (this.immediate !== null) {
      clearImmediate(this.immediate);
      this.immediate = null;
    }
    for (const qp of this.qps.values()) this.cancelWait(qp);
    this.qps.clear();
    this.ready.clear();
  }

  private kick(qp: LoopbackQp): void {
    this.ready.add(qp);
    this.schedule();
  }

  private schedule(): void {
    if (this.immediate !== null || this.suspended || this.host === null) return;
    this.immediate = setImmediate(() => {
      this.immediate = null;
      this.run();
    });
  }

  private scheduleIfWork(): void {
    for (const qp of this.qps.values()) {
      if (qp.flushPending || qp.badPost || (qp.sq.length > 0 && qp.wait === null)) this.ready.add(qp);
    }
    if (this.ready.size > 0) this.schedule();
  }

  private flushNowOrLater(qp: LoopbackQp): void {
    if (this.suspended || this.host === null) {
      qp.flushPending = true;
      return;
    }
    flush(this.host, qp);
  }

  /** One step: runs queued WRs of ready QPs, up to the budget. */
  private run(): void {
    const host = this.host;
    if (this.suspended || host === null || this.running) return;
    this.running = true;
    let stalled = false;
    try {
      let budget = STEP_BUDGET;
      for (const qp of this.ready) {
        if (budget <= 0) break;
        this.ready.delete(qp);
        if (this.qps.get(qp.qpn) !== qp) continue;
        const left = this.drive(host, qp, budget);
        if (left === null) {
          stalled = true;
          break;
        }
        budget = left;
      }
    } finally {
      this.running = false;
    }
    // Without guest memory nothing can run; the next post, modify or resume tries again.
    if (!stalled && this.ready.size > 0) this.schedule();
  }

  /** Runs `qp`'s SQ until it is empty, blocked or out of budget. Returns the budget left, or null when guest memory is not available. */
  private drive(host: EngineHost, qp: LoopbackQp, budget: number): number | null {
    let ctx: RequesterContext | null = null;
    for (;;) {
      if (this.qps.get(qp.qpn) !== qp) return budget;
      if (qp.attrs.state === QpState.ERR) {
        if (qp.sq.length > 0 || qp.rq.length > 0) flush(host, qp);
        return budget;
      }
      if (qp.badPost) {
        this.failQp(qp, 'work request posted in a state that does not allow it');
        return budget;
      }
      const entry = qp.sq.peek();
      if (entry === undefined || qp.wait !== null || qp.attrs.state !== QpState.RTS) return budget;
      if (budget <= 0) {
        this.ready.add(qp);
        return 0;
      }
      if (ctx === null) {
        const memory = this.memory(host);
        if (memory === null) {
          this.ready.add(qp);
          return null;
        }
        ctx = this.requesterContext(host, memory);
      }
      budget -= 1 + Math.floor(entry.wr.length / BYTES_PER_UNIT);
      const step = request(ctx, qp, entry);
      complete(this.completer, qp, entry, step);
    }
  }

  private memory(host: EngineHost): MemoryAccess | null {
    try {
      return host.memory;
    } catch (err) {
      host.log.warn(`loopback: guest memory is not available (${(err as Error).message}); work waits`);
      return null;
    }
  }

  private requesterContext(host: EngineHost, memory: MemoryAccess): RequesterContext {
    return {
      memory,
      payloadStaging: this.payloadStaging,
      replyStaging: this.replyStaging,
      gid: (i) => host.gid(i),
      grhLayout: host.grhLayout,
      deliver: (src, wr, msg) => this.deliver(host, memory, src, wr, msg),
    };
  }

  /**
   * Routing: the destination is a local QP only when the address names one
   * of this device's GIDs. RC also needs the destination to be connected
   * back to the sender (its ACKs go to its own destination QPN).
   */
  private deliver(host: EngineHost, memory: MemoryAccess, src: LoopbackQp, wr: SendWr, msg: Message): Delivery | null {
    let dest: LoopbackQp | undefined;
    if (src.type === QpType.UD) {
      if (wr.ud === null || !this.isLocalGid(host, wr.ud.av.dgid)) return null;
      dest = this.qps.get(wr.ud.remoteQpn);
    } else {
      if (src.attrs.av === null || !this.isLocalGid(host, src.attrs.av.dgid)) return null;
      dest = this.qps.get(src.attrs.destQpn);
      if (dest !== undefined && src.type === QpType.RC && dest.attrs.destQpn !== src.qpn) return null;
    }
    if (dest === undefined) return null;
    const target = dest;
    const result = respond(memory, target, msg);
    return { destQpn: target.qpn, result, read: (offset, dst, n) => readResponse(memory, target, msg, offset, dst, n) };
  }

  /** True when `gid` is one of this device's GIDs (host.gid() answers null past the end of the table). */
  private isLocalGid(host: EngineHost, gid: Uint8Array): boolean {
    if (isZero(gid)) return false;
    for (let i = 0; i < GID_TABLE_MAX; i++) {
      const g = host.gid(i);
      if (g === null) return false;
      if (sameGid(g, gid)) return true;
    }
    return false;
  }

  private failQp(qp: LoopbackQp, reason: string): void {
    const host = this.host!;
    this.cancelWait(qp);
    qp.resetRetries();
    if (qp.attrs.state !== QpState.ERR) {
      qp.attrs = { ...qp.attrs, state: QpState.ERR };
      host.log.info(`qpn 0x${qp.qpn.toString(16)}: -> ERR (${reason})`);
      host.qpFailed(qp.qpn, reason);
    }
    flush(host, qp);
  }

  // ---------------------------------------------------------------------------
  // Waits (RNR NAK timer, local ACK timeout)

  private startWait(qp: LoopbackQp, kind: WaitKind, ms: number | null): void {
    this.cancelWait(qp);
    qp.wait = { kind, deadline: null, remainingMs: ms, timer: null };
    if (!this.suspended) this.armWait(qp);
  }

  /** Starts the timer of a paused wait. A wait without end stays as it is. */
  private armWait(qp: LoopbackQp): void {
    const w = qp.wait;
    if (w === null || w.timer !== null || w.deadline !== null || w.remainingMs === null) return;
    w.deadline = performance.now() + w.remainingMs;
    w.remainingMs = null;
    this.setTimer(qp, w);
  }

  private setTimer(qp: LoopbackQp, w: Wait): void {
    const delay = Math.max(0, (w.deadline ?? 0) - performance.now());
    w.timer = setTimeout(() => this.waitExpired(qp, w), Math.min(delay, MAX_TIMER_MS));
  }

  private waitExpired(qp: LoopbackQp, w: Wait): void {
    if (qp.wait !== w) return;
    w.timer = null;
    if (this.suspended) {
      w.remainingMs = remainingMs(w, performance.now());
      w.deadline = null;
      return;
    }
    const left = remainingMs(w, performance.now()) ?? 0;
    if (left > 1) {
      // Timers longer than setTimeout's range fire in several hops.
      this.setTimer(qp, w);
      return;
    }
    qp.wait = null;
    this.kick(qp);
  }

  private cancelWait(qp: LoopbackQp): void {
    const w = qp.wait;
    if (w === null) return;
    if (w.timer !== null) clearTimeout(w.timer);
    qp.wait = null;
  }
}
