/**
 * The soft-RoCE engine: RDMA over RoCEv2 (UDP), wire-compatible with Linux
 * rdma_rxe (reference §9). One UDP socket bound to the device's address;
 * the work is split like rxe:
 *
 *   requester.ts  segments WRs at the head of the SQ into packets (path
 *                 MTU), inside a window of outstanding PSNs;
 *   responder.ts  checks and executes incoming requests, answers with
 *                 ACK / NAK / RNR NAK / READ responses / ATOMIC ACKs;
 *   completer.ts  matches responses against outstanding WRs, retransmits on
 *                 timeout or PSN-sequence NAK, waits out RNR NAKs, and
 *                 reports completions in posting order.
 *
 * This file is the Engine the device model sees: QP control, posting,
 * receive dispatch (rxe_recv.c's checks: length, ICRC, QP, transport),
 * errors and flushing, and saveState/loadState as versioned plain data
 * (state.ts).
 *
 * Scope: RC SEND / SEND_WITH_IMM / RDMA WRITE (+IMM) / RDMA READ / atomics;
 * UC SEND / WRITE (+IMM); UD SEND (+IMM) with DETH and a GRH for the
 * receiver. Not (yet) here: SEND_WITH_INV, LOCAL_INV.
 */
import { allocateQpn } from '../../engine/qpn.js';
import { FIRST_QPN, QpState, QpType, SendOp, WcOpcode, WcStatus } from '../../abi/constants.js';
import { resetQpAttributes, type Engine, type EngineHost, type MemoryAccess, type QpAttributes, type QpConfig, type RecvWr, type SendWr } from '../../engine/engine.js';
import { sendCompletion } from '../loopback/completer.js';
import { copyAttrs } from '../loopback/qp.js';
import { gidToAddress, makePath } from './addressing.js';
import { type RoceCapture, captureNowMs } from './capture.js';
import { Completer } from './completer.js';
import { type RoceCore, type SoftRoceStats, newStats } from './core.js';
import { IcrcVerifier } from './icrc-verifier.js';
import { Opcode } from './opcodes.js';
import { PacketOut } from './packet-out.js';
import { RocePacket, decodePacket } from './packet.js';
import { Requester } from './requester.js';
import { Responder } from './responder.js';
import { PSN_MASK, RoceQp, type SendEntry, isAtomicOp, psnDiff, recvCompletion } from './roce-qp.js';
import { decodeState, encodeState, type SavedQp } from './state.js';
import { RoceAddress, type AddressHooks } from './roce-address.js';
import { Syndrome } from './headers.js';
import { ROCEV2_UDP_PORT, type UdpBatch, type UdpPeer, peerAddress, udpPeer } from './udp-transport.js';

export { gidToAddress, ipv4Gid } from './addressing.js';
export type { SoftRoceStats } from './core.js';
export { SEND_WINDOW } from './requester.js';
export { psnAdd, psnDiff, type AtomicReplay } from './roce-qp.js';

/** Transport bits of an opcode. */
const TRANSPORT_RC = 0x00;
const TRANSPORT_UC = 0x20;
const TRANSPORT_UD = 0x60;

export interface SoftRoceOptions {
  /** Address to bind (the device's GID as an IP address). */
  address: string;
  /** UDP port to bind; default 4791. */
  port?: number;
  /** UDP port of peers; default the bound port (rxe: 4791 everywhere). */
  remotePort?: number;
  /** Sees every datagram sent and received (see capture.ts); the engine does not close it. */
  capture?: RoceCapture | null;
  /**
   * An incoming migration's destination: the address is taken when the VM
   * first runs here (after the state is loaded), not at construction, since
   * the source still holds it.
   */
  incoming?: boolean;
  /** Commands run around taking and giving up the address. */
  hooks?: AddressHooks;
  /** Where the address reports what it survived (busy address, failed hooks). */
  warn?: (line: string) => void;
}

/**
 * The RNR NAK timer code (IBTA table 45) a suspended engine answers
 * requests with: 1.28 ms. Peers with rnr_retry 7 (ibv_rc_pingpong,
 * perftest) wait indefinitely without burning retry_cnt, and come back
 * soon after the VM runs again.
 */
export const BLACKOUT_RNR_TIMER = 14;

function sameAddress(a: UdpPeer, b: UdpPeer): boolean {
  return a.family === b.family && a.words[0] === b.words[0] && a.words[1] === b.words[1] && a.words[2] === b.words[2] && a.words[3] === b.words[3];
}

export class SoftRoceEngine implements Engine, RoceCore {
  readonly name = 'soft-roce';
  readonly stats: SoftRoceStats = newStats();
  /** The device's RoCE address (the VM's GID), held while the VM runs on this back-end. */
  readonly link: RoceAddress;
  readonly out: PacketOut;
  readonly remotePort: number;
  /** No guest memory is touched and nothing is sent: rings stopped, or the address is not held (yet). */
  suspended = false;
  /** resume() was asked for while the address was not held: it completes once the address is taken. */
  private resumeWanted = false;
  private attached: EngineHost | null = null;
  private readonly qps = new Map<number, RoceQp>();
  private nextQpn = FIRST_QPN;
  private readonly rx = new RocePacket();
  /** Source of the last datagram received, reused while the next ones come from the same address and port (no object per packet). */
  private rxSource: UdpPeer | null = null;
  /** Receive-side ICRC check (tolerates rxe's hashed IPv4 IDs, see icrc-verifier.ts). */
  readonly icrc: IcrcVerifier;
  private readonly requester: Requester;
  private readonly responder: Responder;
  private readonly completer: Completer;

  constructor(options: SoftRoceOptions) {
    const port = options.port ?? ROCEV2_UDP_PORT;
    this.remotePort = options.remotePort ?? port;
    this.link = new RoceAddress({ address: options.address, port, ...(options.hooks ? { hooks: options.hooks } : {}), ...(options.warn ? { warn: options.warn } : {}) });
    if (options.incoming === true) this.suspended = true;
    else this.link.bindNow();
    this.out = new PacketOut(this.link, this.stats);
    this.icrc = new IcrcVerifier(this.link.local);
    this.out.capture = options.capture ?? null;
    this.completer = new Completer(this);
    this.requester = new Requester(this, this.completer);
    this.responder = new Responder(this);
    this.link.onBatch((batch) => this.onBatch(batch));
    this.link.onError((err) => this.attached?.log.warn(`soft-roce: ${err.message}`));
  }

  /** Test hook: sees (and may alter) every outgoing datagram before it is queued; returning false drops it. */
  get outgoingHook(): ((bytes: Uint8Array) => boolean) | null {
    return this.out.hook;
  }

  set outgoingHook(hook: ((bytes: Uint8Array) => boolean) | null) {
    this.out.hook = hook;
  }

  /** Packet capture: every datagram sent and received, malformed ones included; null when off. */
  get capture(): RoceCapture | null {
    return this.out.capture;
  }

  set capture(capture: RoceCapture | null) {
    this.out.capture = capture;
  }

  get local(): UdpPeer {
    return this.link.local;
  }

  attach(host: EngineHost): void {
    this.attached = host;
  }

  // ---------------------------------------------------------------------------
  // RoceCore: what the requester, responder and completer call

  host(): EngineHost {
    if (this.attached === null) throw new Error('soft-roce engine used before attach()');
    return this.attached;
  }

  memory(): MemoryAccess | null {
    try {
      return this.attached?.memory ?? null;
    } catch {
      return null;
    }
  }

  isLive(qp: RoceQp): boolean {
    return this.qps.get(qp.qpn) === qp;
  }

  pump(qp: RoceQp): void {
    if (this.attached !== null) this.requester.pump(qp);
  }

  failQp(qp: RoceQp, reason: string): void {
    const host = this.host();
    this.completer.clearTimers(qp);
    if (qp.attrs.state !== QpState.ERR) {
      qp.attrs = { ...qp.attrs, state: QpState.ERR };
      host.log.info(`${qp.name}: -> ERR (${reason})`);
      host.qpFailed(qp.qpn, reason);
    }
    this.flush(qp);
  }

  // ---------------------------------------------------------------------------
  // Control path
  createQp(config: QpConfig, wanted: number | null, inUse: (qpn: number) => boolean): number | null {
    if (config.type !== QpType.RC && config.type !== QpType.UC && config.type !== QpType.UD) return null;
    const got = allocateQpn(wanted, this.nextQpn, (n) => this.qps.has(n) || inUse(n));
    if (got === null) return null;
    this.nextQpn = got.cursor;
    const qpn = got.qpn;
    this.qps.set(qpn, new RoceQp(qpn, config.type, config.pdn, resetQpAttributes()));
    return qpn;
  }

  modifyQp(qpn: number, attrs: QpAttributes, _mask: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) return;
    const prev = qp.attrs.state;
    qp.attrs = copyAttrs(attrs);
    if (attrs.av !== null) {
      qp.peer = udpPeer(gidToAddress(attrs.av.dgid), this.remotePort);
      qp.path = qp.peer.family === this.link.local.family ? makePath(this.link.local, qp.peer) : null;
    }
    switch (attrs.state) {
      case QpState.RESET:
        this.completer.clearTimers(qp);
        qp.sq.length = 0;
        qp.rq.length = 0;
        qp.sendIdx = 0;
        qp.inMsg = null;
        qp.atomicReplay.length = 0;
        qp.readJobs.length = 0;
        qp.droppedWhileReading = false;
        qp.wentBackTo = -1;
        break;
      case QpState.ERR:
        this.completer.clearTimers(qp);
        this.flush(qp);
        break;
      case QpState.RTR:
        if (prev !== QpState.RTR) {
          qp.rqPsn = attrs.rqPsn & PSN_MASK;
          qp.msn = 0;
          qp.nakSent = false;
        }
        break;
      case QpState.RTS:
        if (prev !== QpState.RTS) {
          qp.sqPsn = attrs.sqPsn & PSN_MASK;
          qp.unackedPsn = qp.sqPsn;
        }
        this.pump(qp);
        break;
      default:
    }
  }

  destroyQp(qpn: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) return;
    this.completer.clearTimers(qp);
    this.qps.delete(qpn);
  }

  // ---------------------------------------------------------------------------
  // Data path

  postSend(qpn: number, wr: SendWr, token: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) return;
    const entry: SendEntry = { token, wr, postError: null, firstPsn: -1, npkts: 0, sent: 0, readPkts: 0 };
    qp.sq.push(entry);
    if (qp.attrs.state === QpState.ERR) {
      this.flush(qp);
      return;
    }
    const op = wr.opcode;
    const sendOrWrite = op === SendOp.SEND || op === SendOp.SEND_WITH_IMM || op === SendOp.RDMA_WRITE || op === SendOp.RDMA_WRITE_WITH_IMM;
    const supported =
      qp.type === QpType.RC
        ? sendOrWrite || op === SendOp.RDMA_READ || isAtomicOp(op)
        : qp.type === QpType.UC
          ? sendOrWrite
          : (op === SendOp.SEND || op === SendOp.SEND_WITH_IMM) && wr.ud !== null;
    if (supported && qp.attrs.state === QpState.RTS && qp.type === QpType.UD && wr.length > qp.mtu) {
      // One packet per UD message: refused at post, in posting order.
      entry.postError = WcStatus.LOC_LEN_ERR;
      this.pump(qp);
      return;
    }
    if (qp.attrs.state !== QpState.RTS || !supported) {
      entry.postError = WcStatus.LOC_QP_OP_ERR;
      setImmediate(() => {
        if (this.qps.get(qpn) === qp) this.failQp(qp, supported ? 'send posted to a QP not in RTS' : `send opcode ${op} not supported by soft-roce`);
      });
      return;
    }
    this.pump(qp);
  }

  postRecv(qpn: number, wr: RecvWr, token: number): void {
    const qp = this.qps.get(qpn);
    if (qp === undefined) return;
    qp.rq.push({ token, wr });
    if (qp.attrs.state === QpState.ERR) this.flush(qp);
  }

  suspend(): void {
    this.suspended = true;
    this.resumeWanted = false;
  }

  resume(): void {
    if (!this.suspended) return;
    if (this.link.held) {
      this.runAgain();
      return;
    }
    if (this.resumeWanted) return;
    this.resumeWanted = true;
    this.attached?.log.info(`soft-roce: taking the RoCE address ${this.link.describe()}`);
    this.link.acquire().then(
      () => {
        if (!this.resumeWanted || !this.link.held) return;
        this.attached?.log.info(`soft-roce: RoCE address ${this.link.describe()} held; running`);
        this.runAgain();
      },
      (err: unknown) => this.attached?.log.error(`soft-roce: cannot take the RoCE address ${this.link.describe()}: ${(err as Error).message}`),
    );
  }

  /**
   * Leaves the blackout: what was sent and not acknowledged goes out again
   * at once (responses that came while suspended were dropped, and a
   * destination's peers have been waiting), then the send queues go on.
   */
  private runAgain(): void {
    this.suspended = false;
    this.resumeWanted = false;
    for (const qp of this.qps.values()) {
      if (qp.type === QpType.RC) this.completer.resendUnacked(qp);
      this.pump(qp);
    }
    this.responder.resumeReads();
    this.out.flush();
  }

  handOver(): void {
    this.suspended = true;
    this.resumeWanted = false;
    if (!this.link.held) return;
    this.link.release();
    this.attached?.log.info(`soft-roce: state handed over; RoCE address ${this.link.describe()} released`);
  }

  saveState(): Uint8Array {
    const now = Date.now();
    const qps: SavedQp[] = [...this.qps.values()].map((qp) => ({
      qpn: qp.qpn,
      type: qp.type,
      pdn: qp.pdn,
      attrs: qp.attrs,
      sendIdx: qp.sendIdx,
      sqPsn: qp.sqPsn,
      unackedPsn: qp.unackedPsn,
      retries: qp.retries,
      rnrRetries: qp.rnrRetries,
      rnrWaitMs: qp.rnrWaiting ? Math.max(0, qp.rnrDeadline - now) : null,
      retryMs: qp.retryTimer !== null ? Math.max(0, qp.retryDeadline - now) : null,
      rqPsn: qp.rqPsn,
      msn: qp.msn,
      nakSent: qp.nakSent,
      inMsg: qp.inMsg === null ? null : { kind: qp.inMsg.kind, hasEntry: qp.inMsg.kind === 'send', offset: qp.inMsg.offset, va: qp.inMsg.va, rkey: qp.inMsg.rkey, dmaLength: qp.inMsg.dmaLength },
      atomicReplay: qp.atomicReplay.map((r) => ({ ...r })),
      sq: qp.sq.map((e) => ({ ...e })),
      rq: qp.rq.map((e) => ({ ...e })),
      readJobs: qp.readJobs.map((j) => ({ ...j })),
      droppedWhileReading: qp.droppedWhileReading,
    }));
    return encodeState({ nextQpn: this.nextQpn, qps });
  }

  /** Replaces all QPs with the saved ones (refusing garbage before anything changes); timers resume with the time they had left. */
  loadState(state: Uint8Array): void {
    const snap = decodeState(state);
    for (const qp of this.qps.values()) this.completer.clearTimers(qp);
    this.qps.clear();
    this.nextQpn = snap.nextQpn;
    const loaded: RoceQp[] = [];
    for (const q of snap.qps) {
      const qp = new RoceQp(q.qpn, q.type, q.pdn, q.attrs);
      if (q.attrs.av !== null && q.type !== QpType.UD) {
        qp.peer = udpPeer(gidToAddress(q.attrs.av.dgid), this.remotePort);
        qp.path = qp.peer.family === this.link.local.family ? makePath(this.link.local, qp.peer) : null;
      }
      qp.sq.push(...q.sq.map((e) => ({ ...e })));
      qp.rq.push(...q.rq.map((e) => ({ ...e })));
      qp.sendIdx = q.sendIdx;
      qp.sqPsn = q.sqPsn;
      qp.unackedPsn = q.unackedPsn;
      qp.retries = q.retries;
      qp.rnrRetries = q.rnrRetries;
      qp.rqPsn = q.rqPsn;
      qp.msn = q.msn;
      qp.nakSent = q.nakSent;
      qp.atomicReplay.push(...q.atomicReplay);
      qp.readJobs.push(...q.readJobs);
      qp.droppedWhileReading = q.droppedWhileReading;
      if (qp.readJobs.length > 0) this.responder.continueReads(qp);
      if (q.inMsg !== null) qp.inMsg = { kind: q.inMsg.kind, entry: q.inMsg.hasEntry ? qp.rq[0]! : null, offset: q.inMsg.offset, va: q.inMsg.va, rkey: q.inMsg.rkey, dmaLength: q.inMsg.dmaLength };
      this.qps.set(qp.qpn, qp);
      if (q.rnrWaitMs !== null) this.completer.startRnrWait(qp, q.rnrWaitMs);
      if (q.retryMs !== null) this.completer.armRetry(qp, q.retryMs);
      loaded.push(qp);
    }
    if (!this.suspended) {
      for (const qp of loaded) this.pump(qp);
      this.responder.resumeReads();
    }
  }

  reset(): void {
    for (const qp of this.qps.values()) this.completer.clearTimers(qp);
    this.qps.clear();
    this.nextQpn = FIRST_QPN;
    // Without the address (handed over, or not yet taken) the engine stays quiet until resume() takes it.
    this.suspended = !this.link.held;
    this.resumeWanted = false;
  }

  close(): void {
    this.reset();
    this.link.close();
  }

  // ---------------------------------------------------------------------------
  // Receive

  private onBatch(batch: UdpBatch): void {
    const capture = this.out.capture;
    if (capture !== null) this.captureBatch(capture, batch);
    if (this.attached === null) return;
    for (let i = 0; i < batch.count; i++) {
      this.out.moreInBatch = i + 1 < batch.count;
      if (batch.truncated(i)) {
        this.stats.malformed++;
        continue;
      }
      const off = batch.offset(i);
      const len = batch.length(i);
      const pkt = this.rx;
      if (decodePacket(batch.buf, pkt, off, len) !== 'ok') {
        this.stats.malformed++;
        continue;
      }
      let src = this.rxSource;
      if (src === null || !batch.isFrom(i, src)) this.rxSource = src = batch.source(i);
      if (!this.icrc.verify(src, batch.buf, off, len)) {
        this.stats.badIcrc++;
        continue;
      }
      const qp = this.qps.get(pkt.bth.destQp);
      const transport = pkt.opcode & 0xe0;
      const wanted = qp === undefined ? -1 : qp.type === QpType.RC ? TRANSPORT_RC : qp.type === QpType.UC ? TRANSPORT_UC : TRANSPORT_UD;
      if (qp === undefined || transport !== wanted) {
        this.stats.noQp++;
        continue;
      }
      // RC/UC take packets only from the connected peer's address (rxe_recv.c check_addr; the port may differ).
      if (transport !== TRANSPORT_UD && (qp.peer === null || !sameAddress(src, qp.peer))) {
        this.stats.noQp++;
        continue;
      }
      const op = pkt.opcode;
      if (this.suspended) {
        this.answerSuspended(qp, pkt);
        continue;
      }
      try {
        if (transport === TRANSPORT_UD) this.responder.onUdRequest(qp, pkt, src);
        else if (transport === TRANSPORT_UC) this.responder.onUcRequest(qp, pkt);
        else if (op >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && op <= Opcode.RC_ATOMIC_ACKNOWLEDGE) this.completer.onResponse(qp, pkt);
        else this.responder.onRequest(qp, pkt);
      } catch (err) {
        // Datagrams come from the network: a bug their handling hits must cost this QP, never the
        // back-end and every other QP with it.
        this.stats.internalErrors++;
        this.attached?.log.error(`${qp.name}: handling opcode 0x${op.toString(16)} PSN 0x${pkt.bth.psn.toString(16)} failed: ${oneLine(err)}; QP to ERR`);
        this.failQp(qp, 'internal error in the receive path');
      }
    }
  }

  /**
   * While suspended (the VM is stopped for a migration, or its state has not
   * been loaded yet) no guest memory may change: an RC request at the
   * expected PSN gets an RNR NAK, the wire's "try again later", and
   * everything else is dropped for the peer's and our own retransmission.
   * Nothing here changes QP state, so the state saved meanwhile is exact.
   * (A READ still answering holds its later requests back: an RNR NAK past
   * it would acknowledge the READ before its data went out.)
   */
  private answerSuspended(qp: RoceQp, pkt: RocePacket): void {
    const op = pkt.opcode;
    const isRequest = (op & 0xe0) === TRANSPORT_RC && !(op >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && op <= Opcode.RC_ATOMIC_ACKNOWLEDGE);
    if (isRequest && (qp.attrs.state === QpState.RTR || qp.attrs.state === QpState.RTS) && qp.readJobs.length === 0 && psnDiff(pkt.bth.psn, qp.rqPsn) === 0) {
      this.stats.blackoutRnrNaks++;
      this.out.ack(qp, qp.rqPsn, Syndrome.RNR_NAK | BLACKOUT_RNR_TIMER);
      return;
    }
    this.stats.blackoutDropped++;
  }

  /** Records every datagram of a batch as received, before any check drops it. */
  private captureBatch(capture: RoceCapture, batch: UdpBatch): void {
    const local = this.link.local;
    const now = captureNowMs();
    for (let i = 0; i < batch.count; i++) {
      const off = batch.offset(i);
      const len = batch.length(i);
      const cut = batch.truncated(i);
      const have = cut ? Math.min(len, batch.slotSize) : len;
      capture.write('rx', batch.source(i), local, batch.buf.subarray(off, off + have), now, cut ? len : undefined);
    }
  }

  // ---------------------------------------------------------------------------
  // Errors

  /** Completes everything outstanding of an ERR QP: WR_FLUSH_ERR, or the error a WR was posted with. */
  private flush(qp: RoceQp): void {
    const host = this.attached;
    if (host === null) return;
    qp.inMsg = null;
    qp.sendIdx = 0;
    qp.readJobs.length = 0;
    for (let e = qp.sq.shift(); e !== undefined; e = qp.sq.shift()) host.sendDone(qp.qpn, e.token, sendCompletion(e.wr, e.postError ?? WcStatus.WR_FLUSH_ERR, 0));
    for (let e = qp.rq.shift(); e !== undefined; e = qp.rq.shift()) host.recvDone(qp.qpn, e.token, recvCompletion(WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, 0, 0, 0, 0));
  }

  /** Diagnostics/tests: the local UDP endpoint. */
  get localAddress(): string {
    return `${peerAddress(this.link.local)}:${this.link.local.port}`;
  }
}

/** An error and where it was thrown, on one log line. */
function oneLine(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const at = (err.stack ?? '').split('\n').find((l) => l.trim().startsWith('at '));
  return at === undefined ? err.message : `${err.message} (${at.trim()})`;
}
