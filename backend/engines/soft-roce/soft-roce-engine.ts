/**
 * The soft-RoCE engine: RC over RoCEv2 (UDP) between this device and a peer
 * (another instance of this engine, reference §9). One UDP socket bound to
 * the device's address; the work is split like Linux rxe:
 *
 *   requester  segments WRs at the head of the SQ into packets (path MTU),
 *              inside a window of outstanding PSNs;
 *   responder  checks and executes incoming requests, answers with
 *              ACK / NAK / RNR NAK / READ responses;
 *   completer  matches ACKs, NAKs and READ responses against outstanding
 *              WRs, retransmits on timeout or PSN-sequence NAK, waits out
 *              RNR NAKs, and reports completions in posting order.
 *
 * Scope: RC SEND / SEND_WITH_IMM / RDMA WRITE (+IMM) / RDMA READ / atomics
 * (CMP_AND_SWP, FETCH_AND_ADD, answered from a replay record when repeated);
 * UC SEND / WRITE (+IMM) without ACKs; UD SEND (+IMM) with DETH and a GRH
 * for the receiver; saveState/loadState as versioned plain data (state.ts).
 * Not (yet) here: SEND_WITH_INV, LOCAL_INV, fault injection.
 */
import { allocateQpn } from '../../engine/qpn.js';
import { Access, FIRST_QPN, QPN_MASK, QpState, QpType, SendFlag, SendOp, WcFlag, WcOpcode, WcStatus, mtuBytes } from '../../abi/constants.js';
import { resetQpAttributes, type AddressVector, type Completion, type Engine, type EngineHost, type MemoryAccess, type QpAttributes, type QpConfig, type RecvWr, type SendWr } from '../../engine/engine.js';
import { sendCompletion, RNR_RETRY_INFINITE } from '../loopback/completer.js';
import { GRH_SIZE, buildGrh } from '../loopback/grh.js';
import { sliceSges } from '../loopback/message.js';
import { copyAttrs, receiving } from '../loopback/qp.js';
import { MAX_TIMER_MS, rnrTimerMs, transportTimeoutMs } from '../loopback/timing.js';
import { type RoceCapture, captureNowMs } from './capture.js';
import { Syndrome, syndromeKind, syndromeValue } from './headers.js';
import { IPV4_DF, type IcrcPath, checkIcrc } from './icrc.js';
import { Opcode } from './opcodes.js';
import { MAX_MTU, RocePacket, decodePacket, encodePacket } from './packet.js';
import { decodeState, encodeState, type SavedQp } from './state.js';
import { ROCEV2_UDP_PORT, UdpTransport, type UdpBatch, type UdpPeer, peerAddress, udpPeer } from './udp-transport.js';

/** Outstanding PSNs a requester allows before it waits for ACKs. */
export const SEND_WINDOW = 32;
/** Ask for an ACK at least this often inside a long message. */
const ACK_REQ_EVERY = SEND_WINDOW / 2;
const PSN_MASK = 0xff_ffff;
/** Atomic replay records a responder keeps (rxe: max_dest_rd_atomic resources). */
const ATOMIC_REPLAY_MAX = 16;
/** Transport bits of an opcode. */
const TRANSPORT_RC = 0x00;
const TRANSPORT_UC = 0x20;
const TRANSPORT_UD = 0x60;
/** Room for the largest header set plus MTU payload, pad and ICRC. */
const STAGING = MAX_MTU + 128;

export function psnAdd(a: number, n: number): number {
  return (a + n) & PSN_MASK;
}

/** Signed 24-bit distance a - b. */
export function psnDiff(a: number, b: number): number {
  return (((a - b) & PSN_MASK) << 8) >> 8;
}

/** The IPv4 address of an IPv4-mapped GID (::ffff:a.b.c.d), or the IPv6 text of any other GID. */
export function gidToAddress(gid: Uint8Array): string {
  if (gid.length !== 16) throw new RangeError('a GID has 16 bytes');
  let mapped = gid[10] === 0xff && gid[11] === 0xff;
  for (let i = 0; i < 10 && mapped; i++) if (gid[i] !== 0) mapped = false;
  if (mapped) return `${gid[12]}.${gid[13]}.${gid[14]}.${gid[15]}`;
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((gid[i]! << 8) | gid[i + 1]!).toString(16));
  return groups.join(':');
}

/** The IPv4-mapped GID of an IPv4 address. */
export function ipv4Gid(address: string): Uint8Array {
  const peer = udpPeer(address, 0);
  if (peer.family !== 4) throw new TypeError(`not an IPv4 address: ${address}`);
  const a = peer.words[0];
  return new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a >>> 24, (a >>> 16) & 0xff, (a >>> 8) & 0xff, a & 0xff]);
}

function peerBytes(p: UdpPeer): Uint8Array {
  const n = p.family === 4 ? 1 : 4;
  const out = new Uint8Array(n * 4);
  for (let w = 0; w < n; w++) {
    const v = p.words[w]!;
    out[w * 4] = v >>> 24;
    out[w * 4 + 1] = (v >>> 16) & 0xff;
    out[w * 4 + 2] = (v >>> 8) & 0xff;
    out[w * 4 + 3] = v & 0xff;
  }
  return out;
}

function makePath(src: UdpPeer, dst: UdpPeer): IcrcPath {
  return { family: src.family, src: peerBytes(src), dst: peerBytes(dst), sport: src.port, dport: dst.port, ipId: 0, ipFlagsFragment: src.family === 4 ? IPV4_DF : 0 };
}

export interface SoftRoceOptions {
  /** Address to bind (the device's GID as an IP address). */
  address: string;
  /** UDP port to bind; default 4791. */
  port?: number;
  /** UDP port of peers; default the bound port (rxe: 4791 everywhere). */
  remotePort?: number;
  /** Sees every datagram sent and received (see capture.ts); the engine does not close it. */
  capture?: RoceCapture | null;
}

/** What the engine counts (tests, diagnostics). */
export interface SoftRoceStats {
  /** Datagrams dropped before reaching a QP: malformed, bad ICRC, unknown/wrong QP. */
  malformed: number;
  badIcrc: number;
  noQp: number;
  /** Requests and responses that were valid but not acted on (duplicates, unexpected responses). */
  ignored: number;
  retransmits: number;
  rnrNaks: number;
  naksSent: number;
  packetsSent: number;
}

interface SendEntry {
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

/** What a responder answered an atomic request with (for duplicates, §9). */
export interface AtomicReplay {
  psn: number;
  original: bigint;
}

function isAtomicOp(op: SendOp): boolean {
  return op === SendOp.ATOMIC_CMP_AND_SWP || op === SendOp.ATOMIC_FETCH_AND_ADD;
}

/** WRs answered by response packets (READ data, ATOMIC_ACK) rather than ACKs. */
function isReadLike(op: SendOp): boolean {
  return op === SendOp.RDMA_READ || isAtomicOp(op);
}

interface RecvEntry {
  token: number;
  wr: RecvWr;
}

interface InMessage {
  kind: 'send' | 'write';
  /** SEND: the receive WQE being filled; WRITE with immediate: taken at LAST. */
  entry: RecvEntry | null;
  offset: number;
  va: bigint;
  rkey: number;
  dmaLength: number;
}

class RoceQp {
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

  readonly rq: RecvEntry[] = [];
  /** Responder: expected PSN. */
  rqPsn = 0;
  msn = 0;
  /** A PSN-sequence NAK was sent for the current gap. */
  nakSent = false;
  inMsg: InMessage | null = null;
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
}

function isSendFirstOrOnly(op: number): boolean {
  return op === Opcode.RC_SEND_FIRST || op === Opcode.RC_SEND_ONLY || op === Opcode.RC_SEND_ONLY_WITH_IMMEDIATE;
}

export class SoftRoceEngine implements Engine {
  readonly name = 'soft-roce';
  readonly stats: SoftRoceStats = { malformed: 0, badIcrc: 0, noQp: 0, ignored: 0, retransmits: 0, rnrNaks: 0, naksSent: 0, packetsSent: 0 };
  readonly transport: UdpTransport;
  private host: EngineHost | null = null;
  private readonly qps = new Map<number, RoceQp>();
  private nextQpn = FIRST_QPN;
  private suspended = false;
  private readonly remotePort: number;
  private readonly rx = new RocePacket();
  private readonly tx = new RocePacket();
  private readonly staging = new Uint8Array(STAGING);
  /** Test hook: sees (and may alter) every outgoing datagram before it is queued; returning false drops it. */
  outgoingHook: ((bytes: Uint8Array) => boolean) | null = null;
  /** Packet capture: every datagram sent and received, malformed ones included; null when off. */
  capture: RoceCapture | null;

  constructor(options: SoftRoceOptions) {
    this.capture = options.capture ?? null;
    const port = options.port ?? ROCEV2_UDP_PORT;
    this.remotePort = options.remotePort ?? port;
    this.transport = new UdpTransport({ address: options.address, port });
    this.transport.onBatch((batch) => this.onBatch(batch));
    this.transport.onError((err) => this.host?.log.warn(`soft-roce: ${err.message}`));
  }

  attach(host: EngineHost): void {
    this.host = host;
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
      qp.path = qp.peer.family === this.transport.local.family ? makePath(this.transport.local, qp.peer) : null;
    }
    switch (attrs.state) {
      case QpState.RESET:
        this.clearTimers(qp);
        qp.sq.length = 0;
        qp.rq.length = 0;
        qp.sendIdx = 0;
        qp.inMsg = null;
        qp.atomicReplay.length = 0;
        break;
      case QpState.ERR:
        this.clearTimers(qp);
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
    this.clearTimers(qp);
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
  }

  resume(): void {
    if (!this.suspended) return;
    this.suspended = false;
    for (const qp of this.qps.values()) this.pump(qp);
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
    }));
    return encodeState({ nextQpn: this.nextQpn, qps });
  }

  /** Replaces all QPs with the saved ones (refusing garbage before anything changes); timers resume with the time they had left. */
  loadState(state: Uint8Array): void {
    const snap = decodeState(state);
    for (const qp of this.qps.values()) this.clearTimers(qp);
    this.qps.clear();
    this.nextQpn = snap.nextQpn;
    const loaded: RoceQp[] = [];
    for (const q of snap.qps) {
      const qp = new RoceQp(q.qpn, q.type, q.pdn, q.attrs);
      if (q.attrs.av !== null && q.type !== QpType.UD) {
        qp.peer = udpPeer(gidToAddress(q.attrs.av.dgid), this.remotePort);
        qp.path = qp.peer.family === this.transport.local.family ? makePath(this.transport.local, qp.peer) : null;
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
      if (q.inMsg !== null) qp.inMsg = { kind: q.inMsg.kind, entry: q.inMsg.hasEntry ? qp.rq[0]! : null, offset: q.inMsg.offset, va: q.inMsg.va, rkey: q.inMsg.rkey, dmaLength: q.inMsg.dmaLength };
      this.qps.set(qp.qpn, qp);
      if (q.rnrWaitMs !== null) this.startRnrWait(qp, q.rnrWaitMs);
      if (q.retryMs !== null) this.armRetry(qp, q.retryMs);
      loaded.push(qp);
    }
    if (!this.suspended) for (const qp of loaded) this.pump(qp);
  }

  reset(): void {
    for (const qp of this.qps.values()) this.clearTimers(qp);
    this.qps.clear();
    this.nextQpn = FIRST_QPN;
    this.suspended = false;
  }

  close(): void {
    this.reset();
    this.transport.close();
  }

  // ---------------------------------------------------------------------------
  // Requester

  private memory(): MemoryAccess | null {
    try {
      return this.host?.memory ?? null;
    } catch {
      return null;
    }
  }

  /** Sends what the window allows of `qp`'s SQ. */
  private pump(qp: RoceQp): void {
    const host = this.host;
    if (host === null || this.suspended || qp.attrs.state !== QpState.RTS || qp.rnrWaiting) return;
    if (qp.type === QpType.UD) return this.pumpUd(qp);
    if (qp.peer === null || qp.path === null) return;
    const memory = this.memory();
    if (memory === null) return;
    const mtu = qp.mtu;
    const uc = qp.type === QpType.UC;
    while (qp.sendIdx < qp.sq.length) {
      const e = qp.sq[qp.sendIdx]!;
      if (e.postError !== null) return;
      if (e.firstPsn < 0) {
        e.firstPsn = qp.sqPsn;
        e.npkts = isAtomicOp(e.wr.opcode) ? 1 : Math.max(1, Math.ceil(e.wr.length / mtu));
        e.sent = 0;
        qp.sqPsn = psnAdd(qp.sqPsn, e.npkts);
      }
      const op = e.wr.opcode;
      const readLike = isReadLike(op);
      const psn = psnAdd(e.firstPsn, e.sent);
      if (!uc) {
        const outstanding = psnDiff(psn, qp.unackedPsn);
        if (outstanding > 0 && outstanding + (readLike ? 1 : 0) > SEND_WINDOW) return;
      }
      const status = op === SendOp.RDMA_READ ? this.sendReadRequest(qp, e, psn, mtu) : readLike ? this.sendAtomicRequest(qp, e, psn, memory) : this.sendDataPacket(qp, memory, e, psn, mtu);
      if (status !== WcStatus.SUCCESS) {
        this.completeThrough(qp, qp.sq.indexOf(e) - 1);
        this.finishHead(qp, status);
        return;
      }
      if (readLike) e.sent = e.npkts;
      else e.sent++;
      if (e.sent >= e.npkts) qp.sendIdx++;
      if (uc) {
        // No ACKs on UC: a WR is complete once its last packet is out.
        if (e.sent >= e.npkts) {
          qp.unackedPsn = qp.sqPsn;
          this.completeThrough(qp, qp.sq.indexOf(e));
        }
      } else this.armRetry(qp);
    }
  }

  /** UD: one packet per WR to the WR's address; complete once sent. */
  private pumpUd(qp: RoceQp): void {
    const memory = this.memory();
    if (memory === null) return;
    while (qp.sq.length > 0) {
      const e = qp.sq[0]!;
      if (e.postError !== null) {
        if (e.postError !== WcStatus.LOC_LEN_ERR) return;
        qp.sq.shift();
        qp.sendIdx = 0;
        this.host!.sendDone(qp.qpn, e.token, sendCompletion(e.wr, e.postError, 0));
        continue;
      }
      const wr = e.wr;
      const ud = wr.ud!;
      const withImm = wr.opcode === SendOp.SEND_WITH_IMM;
      const peer = udpPeer(gidToAddress(ud.av.dgid), this.remotePort);
      const local = this.transport.local;
      if (peer.family === local.family) {
        const pkt = this.tx.setOpcode(withImm ? Opcode.UD_SEND_ONLY_WITH_IMMEDIATE : Opcode.UD_SEND_ONLY);
        this.fillBth(qp, qp.sqPsn, false);
        pkt.bth.destQp = ud.remoteQpn & QPN_MASK;
        pkt.bth.se = (wr.flags & SendFlag.SOLICITED) !== 0;
        // IB: a Q_Key with the high bit set means the QP's own Q_Key.
        pkt.deth.qkey = (ud.remoteQkey & 0x8000_0000 ? qp.attrs.qkey : ud.remoteQkey) >>> 0;
        pkt.deth.srcQp = qp.qpn;
        if (withImm) pkt.immDt.imm = wr.imm >>> 0;
        pkt.payloadLength = wr.length;
        const hl = pkt.info!.headerLength;
        if (wr.length > 0) {
          if (wr.inline !== null) this.staging.set(wr.inline.subarray(0, wr.length), hl);
          else {
            const s = memory.gather(qp.pdn, wr.sges, this.staging, hl);
            if (s !== WcStatus.SUCCESS) {
              this.finishHead(qp, s);
              return;
            }
          }
        }
        const len = encodePacket(this.staging, 0, pkt, null, makePath(local, peer));
        this.emit(peer, this.staging.subarray(0, len));
      }
      qp.sqPsn = psnAdd(qp.sqPsn, 1);
      qp.sq.shift();
      qp.sendIdx = 0;
      this.host!.sendDone(qp.qpn, e.token, sendCompletion(wr, WcStatus.SUCCESS, wr.length));
    }
  }

  private sendAtomicRequest(qp: RoceQp, e: SendEntry, psn: number, memory: MemoryAccess): WcStatus {
    void memory;
    const wr = e.wr;
    const cas = wr.opcode === SendOp.ATOMIC_CMP_AND_SWP;
    const pkt = this.tx.setOpcode(cas ? Opcode.RC_COMPARE_SWAP : Opcode.RC_FETCH_ADD);
    this.fillBth(qp, psn, true);
    pkt.atomicEth.va = wr.remoteAddr;
    pkt.atomicEth.rkey = wr.rkey >>> 0;
    pkt.atomicEth.swapAdd = cas ? wr.swap : wr.compareAdd;
    pkt.atomicEth.compare = cas ? wr.compareAdd : 0n;
    pkt.payloadLength = 0;
    const len = encodePacket(this.staging, 0, pkt, null, qp.path);
    this.emit(qp.peer!, this.staging.subarray(0, len));
    return WcStatus.SUCCESS;
  }

  private sendDataPacket(qp: RoceQp, memory: MemoryAccess, e: SendEntry, psn: number, mtu: number): WcStatus {
    const wr = e.wr;
    const isSend = wr.opcode === SendOp.SEND || wr.opcode === SendOp.SEND_WITH_IMM;
    const withImm = wr.opcode === SendOp.SEND_WITH_IMM || wr.opcode === SendOp.RDMA_WRITE_WITH_IMM;
    const i = e.sent;
    const first = i === 0;
    const last = i === e.npkts - 1;
    let op: number;
    if (isSend) op = first && last ? (withImm ? Opcode.RC_SEND_ONLY_WITH_IMMEDIATE : Opcode.RC_SEND_ONLY) : first ? Opcode.RC_SEND_FIRST : last ? (withImm ? Opcode.RC_SEND_LAST_WITH_IMMEDIATE : Opcode.RC_SEND_LAST) : Opcode.RC_SEND_MIDDLE;
    else op = first && last ? (withImm ? Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE : Opcode.RC_RDMA_WRITE_ONLY) : first ? Opcode.RC_RDMA_WRITE_FIRST : last ? (withImm ? Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE : Opcode.RC_RDMA_WRITE_LAST) : Opcode.RC_RDMA_WRITE_MIDDLE;
    const uc = qp.type === QpType.UC;
    if (uc) op |= TRANSPORT_UC; // same shapes, UC transport bits
    const pkt = this.tx.setOpcode(op);
    this.fillBth(qp, psn, !uc && (last || (i + 1) % ACK_REQ_EVERY === 0));
    // SE rides on the last packet of anything that consumes a receive: SEND, and RDMA WRITE with immediate.
    pkt.bth.se = last && (isSend || withImm) && (wr.flags & SendFlag.SOLICITED) !== 0;
    if (first && !isSend) {
      pkt.reth.va = wr.remoteAddr;
      pkt.reth.rkey = wr.rkey >>> 0;
      pkt.reth.dmaLength = wr.length;
    }
    if (last && withImm) pkt.immDt.imm = wr.imm >>> 0;
    const off = i * mtu;
    const n = Math.min(mtu, wr.length - off);
    pkt.payloadLength = n;
    const hl = pkt.info!.headerLength;
    if (n > 0) {
      if (wr.inline !== null) this.staging.set(wr.inline.subarray(off, off + n), hl);
      else {
        const s = memory.gather(qp.pdn, sliceSges(wr.sges, off, n), this.staging, hl);
        if (s !== WcStatus.SUCCESS) return s;
      }
    }
    const len = encodePacket(this.staging, 0, pkt, null, qp.path);
    this.emit(qp.peer!, this.staging.subarray(0, len));
    return WcStatus.SUCCESS;
  }

  private sendReadRequest(qp: RoceQp, e: SendEntry, psn: number, mtu: number): WcStatus {
    // A restarted READ asks only for what has not arrived.
    const off = e.readPkts * mtu;
    const pkt = this.tx.setOpcode(Opcode.RC_RDMA_READ_REQUEST);
    this.fillBth(qp, psn, true);
    pkt.reth.va = e.wr.remoteAddr + BigInt(off);
    pkt.reth.rkey = e.wr.rkey >>> 0;
    pkt.reth.dmaLength = e.wr.length - off;
    pkt.payloadLength = 0;
    const len = encodePacket(this.staging, 0, pkt, null, qp.path);
    this.emit(qp.peer!, this.staging.subarray(0, len));
    return WcStatus.SUCCESS;
  }

  private fillBth(qp: RoceQp, psn: number, ackReq: boolean): void {
    const b = this.tx.bth;
    b.se = false;
    b.migReq = false;
    b.pkey = 0xffff;
    b.fecn = false;
    b.becn = false;
    b.destQp = qp.attrs.destQpn & QPN_MASK;
    b.ackReq = ackReq;
    b.psn = psn;
  }

  private emit(peer: UdpPeer, bytes: Uint8Array): void {
    if (this.outgoingHook !== null && !this.outgoingHook(bytes)) return;
    this.stats.packetsSent++;
    if (this.capture !== null) this.capture.write('tx', this.transport.local, peer, bytes, captureNowMs());
    this.transport.queue(peer, bytes);
  }

  // ---------------------------------------------------------------------------
  // Receive

  private onBatch(batch: UdpBatch): void {
    if (this.capture !== null) this.captureBatch(this.capture, batch);
    if (this.host === null || this.suspended) return;
    const local = this.transport.local;
    for (let i = 0; i < batch.count; i++) {
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
      const src = batch.source(i);
      if (src.family !== local.family || !checkIcrc(makePath(src, local), batch.buf, off, len)) {
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
      const op = pkt.opcode;
      if (transport === TRANSPORT_UD) this.onUdRequest(qp, pkt, src);
      else if (transport === TRANSPORT_UC) this.onUcRequest(qp, pkt);
      else if (op >= Opcode.RC_RDMA_READ_RESPONSE_FIRST && op <= Opcode.RC_ATOMIC_ACKNOWLEDGE) this.onResponse(qp, pkt);
      else this.onRequest(qp, pkt);
    }
  }

  /** Records every datagram of a batch as received, before any check drops it. */
  private captureBatch(capture: RoceCapture, batch: UdpBatch): void {
    const local = this.transport.local;
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
  // Responder

  private onRequest(qp: RoceQp, pkt: RocePacket): void {
    if (!receiving(qp.attrs.state) || qp.peer === null || qp.path === null) {
      this.stats.noQp++;
      return;
    }
    const memory = this.memory();
    if (memory === null) return;
    const op = pkt.opcode;
    const psn = pkt.bth.psn;
    const d = psnDiff(psn, qp.rqPsn);
    if (d > 0) {
      // A gap: ask once for the missing packets.
      this.stats.ignored++;
      if (!qp.nakSent) {
        qp.nakSent = true;
        this.sendAck(qp, qp.rqPsn, Syndrome.NAK_PSN_SEQ_ERROR);
      }
      return;
    }
    if (d < 0) {
      this.stats.ignored++;
      if (op === Opcode.RC_RDMA_READ_REQUEST) this.readRespond(qp, memory, pkt, false);
      else if (op === Opcode.RC_COMPARE_SWAP || op === Opcode.RC_FETCH_ADD) {
        // Never executed twice: answer from the replay record, if still held.
        const r = qp.atomicReplay.find((x) => x.psn === psn);
        if (r !== undefined) this.sendAtomicAck(qp, psn, r.original);
      } else if (pkt.bth.ackReq) this.sendAck(qp, psnAdd(qp.rqPsn, -1), Syndrome.ACK_UNLIMITED);
      return;
    }
    qp.nakSent = false;
    const mtu = qp.mtu;
    const n = pkt.payloadLength;
    const cur = qp.inMsg;
    const isSend = op <= Opcode.RC_SEND_ONLY_WITH_IMMEDIATE;
    const isWrite = op >= Opcode.RC_RDMA_WRITE_FIRST && op <= Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
    if (op === Opcode.RC_RDMA_READ_REQUEST) {
      if (cur !== null) return this.invalid(qp, 'READ request inside a message');
      this.readRespond(qp, memory, pkt, true);
      return;
    }
    if (op === Opcode.RC_COMPARE_SWAP || op === Opcode.RC_FETCH_ADD) {
      if (cur !== null) return this.invalid(qp, 'atomic request inside a message');
      this.atomicRespond(qp, memory, pkt);
      return;
    }
    if (!isSend && !isWrite) return this.invalid(qp, `opcode 0x${op.toString(16)} not supported`);
    const first = op === Opcode.RC_SEND_FIRST || op === Opcode.RC_RDMA_WRITE_FIRST || isSendFirstOrOnly(op) || op === Opcode.RC_RDMA_WRITE_ONLY || op === Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
    const last = !(op === Opcode.RC_SEND_FIRST || op === Opcode.RC_SEND_MIDDLE || op === Opcode.RC_RDMA_WRITE_FIRST || op === Opcode.RC_RDMA_WRITE_MIDDLE);
    if (first !== (cur === null) || (cur !== null && cur.kind !== (isSend ? 'send' : 'write'))) return this.invalid(qp, 'opcode out of sequence');
    if ((!last && n !== mtu) || n > mtu) return this.invalid(qp, `payload of ${n} bytes for path MTU ${mtu}`);
    const withImm = op === Opcode.RC_SEND_LAST_WITH_IMMEDIATE || op === Opcode.RC_SEND_ONLY_WITH_IMMEDIATE || op === Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE || op === Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
    let msg: InMessage;
    if (cur === null) {
      if (isSend) {
        const entry = qp.rq[0];
        if (entry === undefined) {
          this.stats.rnrNaks++;
          this.sendAck(qp, psn, Syndrome.RNR_NAK | (qp.attrs.minRnrTimer & 0x1f));
          return;
        }
        msg = { kind: 'send', entry, offset: 0, va: 0n, rkey: 0, dmaLength: 0 };
      } else {
        if (!(qp.attrs.accessFlags & Access.REMOTE_WRITE)) return this.nakAccess(qp, 'RDMA WRITE without REMOTE_WRITE on the QP');
        if (withImm && qp.rq[0] === undefined) {
          this.stats.rnrNaks++;
          this.sendAck(qp, psn, Syndrome.RNR_NAK | (qp.attrs.minRnrTimer & 0x1f));
          return;
        }
        msg = { kind: 'write', entry: null, offset: 0, va: pkt.reth.va, rkey: pkt.reth.rkey, dmaLength: pkt.reth.dmaLength };
      }
    } else msg = cur;
    if (!isSend && msg.offset + n > msg.dmaLength) return this.invalid(qp, 'RDMA WRITE longer than its DMA length');
    if (isSend) {
      if (n > 0) {
        const s = this.scatterAt(memory, qp, msg, pkt);
        if (s !== WcStatus.SUCCESS) {
          qp.rq.shift();
          qp.inMsg = null;
          this.host!.recvDone(qp.qpn, msg.entry!.token, recvCompletion(s, WcOpcode.RECV, 0, 0, 0, qp.attrs.destQpn));
          return this.invalid(qp, `SEND does not fit the receive WQE (${WcStatus[s]})`);
        }
      }
    } else if (n > 0) {
      const s = memory.remoteWrite(qp.pdn, msg.rkey, msg.va + BigInt(msg.offset), pkt.buffer, pkt.payloadOffset, n);
      if (s !== WcStatus.SUCCESS) return this.nakAccess(qp, `RDMA WRITE at 0x${(msg.va + BigInt(msg.offset)).toString(16)} refused (rkey 0x${msg.rkey.toString(16)})`);
    }
    msg.offset += n;
    qp.rqPsn = psnAdd(psn, 1);
    if (!last) {
      qp.inMsg = msg;
      if (pkt.bth.ackReq) this.sendAck(qp, psn, Syndrome.ACK_UNLIMITED);
      return;
    }
    qp.inMsg = null;
    qp.msn = (qp.msn + 1) & PSN_MASK;
    if (!isSend && msg.offset !== msg.dmaLength) return this.invalid(qp, 'RDMA WRITE shorter than its DMA length');
    this.sendAck(qp, psn, Syndrome.ACK_UNLIMITED);
    const imm = withImm ? pkt.immDt.imm : 0;
    const flags = withImm ? WcFlag.WITH_IMM : 0;
    if (isSend) {
      qp.rq.shift();
      const c = recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV, msg.offset, flags, imm, qp.attrs.destQpn);
      c.solicited = pkt.bth.se;
      this.host!.recvDone(qp.qpn, msg.entry!.token, c);
    } else if (withImm) {
      const entry = qp.rq.shift()!;
      const c = recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, msg.offset, flags, imm, qp.attrs.destQpn);
      c.solicited = pkt.bth.se;
      this.host!.recvDone(qp.qpn, entry.token, c);
    }
  }

  private scatterAt(memory: MemoryAccess, qp: RoceQp, msg: InMessage, pkt: RocePacket): WcStatus {
    const n = pkt.payloadLength;
    const entry = msg.entry!;
    if (msg.offset + n > entry.wr.length) return WcStatus.LOC_LEN_ERR;
    return memory.scatter(qp.pdn, sliceSges(entry.wr.sges, msg.offset, n), pkt.buffer, pkt.payloadOffset, n);
  }

  private readRespond(qp: RoceQp, memory: MemoryAccess, pkt: RocePacket, fresh: boolean): void {
    const psn = pkt.bth.psn;
    if (!(qp.attrs.accessFlags & Access.REMOTE_READ)) return this.nakAccess(qp, 'RDMA READ without REMOTE_READ on the QP', psn);
    const mtu = qp.mtu;
    const total = pkt.reth.dmaLength;
    const va = pkt.reth.va;
    const rkey = pkt.reth.rkey;
    const npkts = Math.max(1, Math.ceil(total / mtu));
    // Check the whole range before the first response goes out.
    const probe = memory.remoteRead(qp.pdn, rkey, va, this.staging, 0, 0);
    const probeEnd = total > 0 ? memory.remoteRead(qp.pdn, rkey, va + BigInt(total - 1), this.staging, 0, 1) : probe;
    if (probe !== WcStatus.SUCCESS || probeEnd !== WcStatus.SUCCESS) return this.nakAccess(qp, `RDMA READ at 0x${va.toString(16)} refused (rkey 0x${rkey.toString(16)})`, psn);
    if (fresh) {
      qp.rqPsn = psnAdd(psn, npkts);
      qp.msn = (qp.msn + 1) & PSN_MASK;
    }
    for (let i = 0; i < npkts; i++) {
      const first = i === 0;
      const last = i === npkts - 1;
      const op = first && last ? Opcode.RC_RDMA_READ_RESPONSE_ONLY : first ? Opcode.RC_RDMA_READ_RESPONSE_FIRST : last ? Opcode.RC_RDMA_READ_RESPONSE_LAST : Opcode.RC_RDMA_READ_RESPONSE_MIDDLE;
      const out = this.tx.setOpcode(op);
      this.fillBth(qp, psnAdd(psn, i), false);
      out.aeth.syndrome = Syndrome.ACK_UNLIMITED;
      out.aeth.msn = qp.msn;
      const n = Math.min(mtu, total - i * mtu);
      out.payloadLength = n;
      const hl = out.info!.headerLength;
      if (n > 0) {
        const s = memory.remoteRead(qp.pdn, rkey, va + BigInt(i * mtu), this.staging, hl, n);
        if (s !== WcStatus.SUCCESS) return this.nakAccess(qp, 'RDMA READ refused mid-way', psnAdd(psn, i));
      }
      const len = encodePacket(this.staging, 0, out, null, qp.path);
      this.emit(qp.peer!, this.staging.subarray(0, len));
    }
  }

  private atomicRespond(qp: RoceQp, memory: MemoryAccess, pkt: RocePacket): void {
    const psn = pkt.bth.psn;
    const { va, rkey, swapAdd, compare } = pkt.atomicEth;
    if (!(qp.attrs.accessFlags & Access.REMOTE_ATOMIC)) return this.nakAccess(qp, 'atomic without REMOTE_ATOMIC on the QP', psn);
    if ((va & 7n) !== 0n) return this.invalid(qp, `atomic at misaligned 0x${va.toString(16)}`);
    const cas = pkt.opcode === Opcode.RC_COMPARE_SWAP;
    const r = memory.remoteAtomic(qp.pdn, rkey, va, cas ? 'cmp_swap' : 'fetch_add', cas ? compare : swapAdd, cas ? swapAdd : 0n);
    if (r.status !== WcStatus.SUCCESS) return this.nakAccess(qp, `atomic at 0x${va.toString(16)} refused (rkey 0x${rkey.toString(16)})`, psn);
    qp.rqPsn = psnAdd(psn, 1);
    qp.msn = (qp.msn + 1) & PSN_MASK;
    qp.atomicReplay.push({ psn, original: r.original });
    if (qp.atomicReplay.length > ATOMIC_REPLAY_MAX) qp.atomicReplay.shift();
    this.sendAtomicAck(qp, psn, r.original);
  }

  private sendAtomicAck(qp: RoceQp, psn: number, original: bigint): void {
    const pkt = this.tx.setOpcode(Opcode.RC_ATOMIC_ACKNOWLEDGE);
    this.fillBth(qp, psn, false);
    pkt.aeth.syndrome = Syndrome.ACK_UNLIMITED;
    pkt.aeth.msn = qp.msn;
    pkt.atomicAckEth.origRemoteData = original;
    pkt.payloadLength = 0;
    const len = encodePacket(this.staging, 0, pkt, null, qp.path);
    this.emit(qp.peer!, this.staging.subarray(0, len));
  }

  /** UC: like RC without ACKs; errors drop the message, a PSN gap discards the partial one. */
  private onUcRequest(qp: RoceQp, pkt: RocePacket): void {
    if (!receiving(qp.attrs.state) || qp.peer === null || qp.path === null) {
      this.stats.noQp++;
      return;
    }
    const memory = this.memory();
    if (memory === null) return;
    const op = pkt.opcode & 0x1f; // the RC opcode of the same shape
    const psn = pkt.bth.psn;
    const drop = (why: string): void => {
      qp.inMsg = null;
      this.stats.ignored++;
      this.host!.log.debug(`soft-roce qpn 0x${qp.qpn.toString(16)}: UC drop (${why})`);
    };
    if (psn !== qp.rqPsn && qp.inMsg !== null) drop(`PSN 0x${psn.toString(16)}, expected 0x${qp.rqPsn.toString(16)}`);
    qp.rqPsn = psnAdd(psn, 1);
    const isSend = op <= Opcode.RC_SEND_ONLY_WITH_IMMEDIATE;
    const first = op === Opcode.RC_SEND_FIRST || op === Opcode.RC_RDMA_WRITE_FIRST || isSendFirstOrOnly(op) || op === Opcode.RC_RDMA_WRITE_ONLY || op === Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
    const last = !(op === Opcode.RC_SEND_FIRST || op === Opcode.RC_SEND_MIDDLE || op === Opcode.RC_RDMA_WRITE_FIRST || op === Opcode.RC_RDMA_WRITE_MIDDLE);
    const withImm = op === Opcode.RC_SEND_LAST_WITH_IMMEDIATE || op === Opcode.RC_SEND_ONLY_WITH_IMMEDIATE || op === Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE || op === Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
    const n = pkt.payloadLength;
    const mtu = qp.mtu;
    let msg = qp.inMsg;
    if (first) {
      if (msg !== null) drop('new message before the last one ended');
      if (isSend) {
        const entry = qp.rq[0];
        if (entry === undefined) return drop('no receive WQE');
        msg = { kind: 'send', entry, offset: 0, va: 0n, rkey: 0, dmaLength: 0 };
      } else {
        if (!(qp.attrs.accessFlags & Access.REMOTE_WRITE)) return drop('RDMA WRITE without REMOTE_WRITE on the QP');
        msg = { kind: 'write', entry: null, offset: 0, va: pkt.reth.va, rkey: pkt.reth.rkey, dmaLength: pkt.reth.dmaLength };
      }
    } else if (msg === null || msg.kind !== (isSend ? 'send' : 'write')) {
      return drop('middle or last packet without a first');
    }
    if ((!last && n !== mtu) || n > mtu) return drop(`payload of ${n} bytes for path MTU ${mtu}`);
    if (isSend) {
      if (n > 0 && this.scatterAt(memory, qp, msg, pkt) !== WcStatus.SUCCESS) return drop('SEND does not fit the receive WQE');
    } else {
      if (msg.offset + n > msg.dmaLength) return drop('RDMA WRITE longer than its DMA length');
      if (n > 0 && memory.remoteWrite(qp.pdn, msg.rkey, msg.va + BigInt(msg.offset), pkt.buffer, pkt.payloadOffset, n) !== WcStatus.SUCCESS) return drop('RDMA WRITE refused');
    }
    msg.offset += n;
    if (!last) {
      qp.inMsg = msg;
      return;
    }
    qp.inMsg = null;
    if (!isSend && msg.offset !== msg.dmaLength) return drop('RDMA WRITE shorter than its DMA length');
    const imm = withImm ? pkt.immDt.imm : 0;
    const flags = withImm ? WcFlag.WITH_IMM : 0;
    if (isSend) {
      qp.rq.shift();
      const c = recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV, msg.offset, flags, imm, qp.attrs.destQpn);
      c.solicited = pkt.bth.se;
      this.host!.recvDone(qp.qpn, msg.entry!.token, c);
    } else if (withImm) {
      const entry = qp.rq.shift();
      if (entry === undefined) return drop('no receive WQE for the immediate');
      const c = recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, msg.offset, flags, imm, qp.attrs.destQpn);
      c.solicited = pkt.bth.se;
      this.host!.recvDone(qp.qpn, entry.token, c);
    }
  }

  /** UD: one-packet SENDs; Q_Key checked; the receive buffer gets the GRH first. */
  private onUdRequest(qp: RoceQp, pkt: RocePacket, src: UdpPeer): void {
    if (!receiving(qp.attrs.state)) {
      this.stats.noQp++;
      return;
    }
    const memory = this.memory();
    if (memory === null) return;
    if (pkt.deth.qkey >>> 0 !== qp.attrs.qkey >>> 0) {
      this.stats.ignored++;
      return;
    }
    const entry = qp.rq[0];
    if (entry === undefined) {
      this.stats.ignored++;
      return;
    }
    const withImm = pkt.opcode === Opcode.UD_SEND_ONLY_WITH_IMMEDIATE;
    const n = pkt.payloadLength;
    const local = this.transport.local;
    const toGid = (p: UdpPeer): Uint8Array => (p.family === 4 ? ipv4Gid(peerAddress(p)) : peerBytes(p));
    const av: AddressVector = { dgid: toGid(local), sgidIndex: 0, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 };
    const grh = buildGrh(toGid(src), av, n, withImm);
    qp.rq.shift();
    let s = GRH_SIZE + n > entry.wr.length ? WcStatus.LOC_LEN_ERR : memory.scatter(qp.pdn, sliceSges(entry.wr.sges, 0, GRH_SIZE), grh, 0, GRH_SIZE);
    if (s === WcStatus.SUCCESS && n > 0) s = memory.scatter(qp.pdn, sliceSges(entry.wr.sges, GRH_SIZE, n), pkt.buffer, pkt.payloadOffset, n);
    const srcQp = pkt.deth.srcQp;
    if (s !== WcStatus.SUCCESS) {
      this.host!.recvDone(qp.qpn, entry.token, recvCompletion(s, WcOpcode.RECV, 0, 0, 0, srcQp));
      this.failQp(qp, `UD receive failed with ${WcStatus[s] ?? s}`);
      return;
    }
    const c = recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV, GRH_SIZE + n, WcFlag.GRH | (withImm ? WcFlag.WITH_IMM : 0), withImm ? pkt.immDt.imm : 0, srcQp);
    c.solicited = pkt.bth.se;
    this.host!.recvDone(qp.qpn, entry.token, c);
  }

  private sendAck(qp: RoceQp, psn: number, syndrome: number): void {
    if (syndromeKind(syndrome) === 'nak') this.stats.naksSent++;
    const pkt = this.tx.setOpcode(Opcode.RC_ACKNOWLEDGE);
    this.fillBth(qp, psn, false);
    pkt.aeth.syndrome = syndrome;
    pkt.aeth.msn = qp.msn;
    pkt.payloadLength = 0;
    const len = encodePacket(this.staging, 0, pkt, null, qp.path);
    this.emit(qp.peer!, this.staging.subarray(0, len));
  }

  private invalid(qp: RoceQp, why: string): void {
    this.sendAck(qp, qp.rqPsn, Syndrome.NAK_INVALID_REQUEST);
    this.failQp(qp, `responder: ${why}`);
  }

  private nakAccess(qp: RoceQp, why: string, psn = qp.rqPsn): void {
    this.sendAck(qp, psn, Syndrome.NAK_REMOTE_ACCESS_ERROR);
    this.failQp(qp, `responder: ${why}`);
  }

  // ---------------------------------------------------------------------------
  // Completer

  private onResponse(qp: RoceQp, pkt: RocePacket): void {
    if (qp.attrs.state !== QpState.RTS && qp.attrs.state !== QpState.SQD) {
      this.stats.ignored++;
      return;
    }
    const psn = pkt.bth.psn;
    const op = pkt.opcode;
    // Which WR does this PSN belong to (among those sent)?
    let idx = -1;
    for (let i = 0; i < qp.sq.length; i++) {
      const e = qp.sq[i]!;
      if (e.firstPsn < 0) break;
      const d = psnDiff(psn, e.firstPsn);
      if (d >= 0 && d < e.npkts) {
        idx = i;
        break;
      }
    }
    if (op === Opcode.RC_ACKNOWLEDGE) {
      const syn = pkt.aeth.syndrome;
      const kind = syndromeKind(syn);
      if (kind === 'ack') {
        if (idx < 0 || psnDiff(psn, qp.unackedPsn) < 0) {
          this.stats.ignored++;
          return;
        }
        const e = qp.sq[idx]!;
        const done = psnDiff(psn, e.firstPsn) === e.npkts - 1 ? idx : idx - 1;
        // An ACK past an unfinished READ or atomic means its responses were lost.
        for (let i = 0; i <= done; i++) {
          if (isReadLike(qp.sq[i]!.wr.opcode)) {
            this.completeThrough(qp, i - 1);
            this.retransmit(qp, psnAdd(qp.sq[0]!.firstPsn, qp.sq[0]!.readPkts));
            return;
          }
        }
        this.completeThrough(qp, done);
        qp.unackedPsn = psnAdd(psn, 1);
        qp.retries = 0;
        qp.rnrRetries = 0;
        this.restartRetry(qp);
        this.pump(qp);
        return;
      }
      if (idx < 0) {
        this.stats.ignored++;
        return;
      }
      this.completeThrough(qp, idx - 1);
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
          this.retransmit(qp, psn);
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
    if (idx < 0) {
      this.stats.ignored++;
      return;
    }
    if (op === Opcode.RC_ATOMIC_ACKNOWLEDGE) return this.onAtomicAck(qp, pkt, idx);
    // READ response: must be the next one expected for this READ, and earlier WRs are implicitly ACKed.
    const e = qp.sq[idx]!;
    if (e.wr.opcode !== SendOp.RDMA_READ || psnDiff(psn, psnAdd(e.firstPsn, e.readPkts)) !== 0) {
      this.stats.ignored++;
      if (e.wr.opcode === SendOp.RDMA_READ && psnDiff(psn, psnAdd(e.firstPsn, e.readPkts)) > 0) this.retransmit(qp, psnAdd(e.firstPsn, e.readPkts));
      return;
    }
    for (let i = 0; i < idx; i++) {
      if (isReadLike(qp.sq[i]!.wr.opcode)) {
        this.stats.ignored++;
        return;
      }
    }
    const lastOp = op === Opcode.RC_RDMA_READ_RESPONSE_LAST || op === Opcode.RC_RDMA_READ_RESPONSE_ONLY;
    const mtu = qp.mtu;
    const off = e.readPkts * mtu;
    const n = pkt.payloadLength;
    const expectLen = Math.min(mtu, e.wr.length - off);
    const expectLast = e.readPkts === e.npkts - 1;
    if (lastOp !== expectLast || n !== expectLen) {
      this.stats.ignored++;
      return;
    }
    this.completeThrough(qp, idx - 1);
    const memory = this.memory();
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
    this.pump(qp);
  }

  private onAtomicAck(qp: RoceQp, pkt: RocePacket, idx: number): void {
    const e = qp.sq[idx]!;
    if (!isAtomicOp(e.wr.opcode) || pkt.bth.psn !== e.firstPsn || e.readPkts > 0) {
      this.stats.ignored++;
      return;
    }
    for (let i = 0; i < idx; i++) {
      if (isReadLike(qp.sq[i]!.wr.opcode)) {
        this.stats.ignored++;
        return;
      }
    }
    this.completeThrough(qp, idx - 1);
    const memory = this.memory();
    if (memory === null) return;
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, pkt.atomicAckEth.origRemoteData, true);
    const s = memory.scatter(qp.pdn, sliceSges(e.wr.sges, 0, Math.min(8, e.wr.length)), bytes, 0, Math.min(8, e.wr.length));
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
    this.pump(qp);
  }

  /** Completes sq[0..last] successfully (they were acknowledged). */
  private completeThrough(qp: RoceQp, last: number): void {
    for (let i = 0; i <= last; i++) {
      const e = qp.sq.shift()!;
      if (qp.sendIdx > 0) qp.sendIdx--;
      qp.retries = 0;
      qp.rnrRetries = 0;
      this.host!.sendDone(qp.qpn, e.token, sendCompletion(e.wr, WcStatus.SUCCESS, e.wr.length));
    }
    if (last >= 0) {
      const head = qp.sq[0];
      if (head !== undefined && head.firstPsn >= 0 && psnDiff(head.firstPsn, qp.unackedPsn) > 0) qp.unackedPsn = head.firstPsn;
    }
  }

  /** The head WR ends with `status`; the QP goes to ERR. */
  private finishHead(qp: RoceQp, status: WcStatus): void {
    const e = qp.sq.shift();
    if (qp.sendIdx > 0) qp.sendIdx--;
    if (e !== undefined) this.host!.sendDone(qp.qpn, e.token, sendCompletion(e.wr, status, 0));
    this.failQp(qp, `send WR failed with ${WcStatus[status] ?? status}`);
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

  private retransmit(qp: RoceQp, psn: number): void {
    this.stats.retransmits++;
    this.rewind(qp, psn);
    if (qp.retryTimer !== null) {
      clearTimeout(qp.retryTimer);
      qp.retryTimer = null;
    }
    this.pump(qp);
  }

  // ---------------------------------------------------------------------------
  // Timers

  private startRnrWait(qp: RoceQp, ms: number): void {
    qp.rnrWaiting = true;
    const wait = Math.min(ms, MAX_TIMER_MS);
    qp.rnrDeadline = Date.now() + wait;
    qp.rnrTimer = setTimeout(() => {
      qp.rnrTimer = null;
      qp.rnrWaiting = false;
      if (this.qps.get(qp.qpn) === qp) this.pump(qp);
    }, wait);
  }

  private armRetry(qp: RoceQp, remaining?: number): void {
    if (qp.retryTimer !== null) return;
    const ms = remaining ?? transportTimeoutMs(qp.attrs.timeout);
    if (ms === null) return;
    const wait = Math.min(Math.max(ms, 1), MAX_TIMER_MS);
    qp.retryDeadline = Date.now() + wait;
    qp.retryTimer = setTimeout(() => this.retryExpired(qp), wait);
  }

  private restartRetry(qp: RoceQp): void {
    if (qp.retryTimer !== null) clearTimeout(qp.retryTimer);
    qp.retryTimer = null;
    if (qp.sq.length > 0 && qp.sq[0]!.firstPsn >= 0) this.armRetry(qp);
  }

  private retryExpired(qp: RoceQp): void {
    qp.retryTimer = null;
    if (this.qps.get(qp.qpn) !== qp || qp.attrs.state !== QpState.RTS || qp.rnrWaiting) return;
    if (this.suspended) {
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
    this.retransmit(qp, qp.unackedPsn);
  }

  private clearTimers(qp: RoceQp): void {
    if (qp.retryTimer !== null) clearTimeout(qp.retryTimer);
    if (qp.rnrTimer !== null) clearTimeout(qp.rnrTimer);
    qp.retryTimer = null;
    qp.rnrTimer = null;
    qp.rnrWaiting = false;
  }

  // ---------------------------------------------------------------------------
  // Errors

  private failQp(qp: RoceQp, reason: string): void {
    const host = this.host!;
    this.clearTimers(qp);
    if (qp.attrs.state !== QpState.ERR) {
      qp.attrs = { ...qp.attrs, state: QpState.ERR };
      host.log.info(`soft-roce qpn 0x${qp.qpn.toString(16)}: -> ERR (${reason})`);
      host.qpFailed(qp.qpn, reason);
    }
    this.flush(qp);
  }

  /** Completes everything outstanding of an ERR QP: WR_FLUSH_ERR, or the error a WR was posted with. */
  private flush(qp: RoceQp): void {
    const host = this.host;
    if (host === null) return;
    qp.inMsg = null;
    qp.sendIdx = 0;
    for (let e = qp.sq.shift(); e !== undefined; e = qp.sq.shift()) host.sendDone(qp.qpn, e.token, sendCompletion(e.wr, e.postError ?? WcStatus.WR_FLUSH_ERR, 0));
    for (let e = qp.rq.shift(); e !== undefined; e = qp.rq.shift()) host.recvDone(qp.qpn, e.token, recvCompletion(WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, 0, 0, 0, 0));
  }

  /** Diagnostics/tests: the local UDP endpoint. */
  get localAddress(): string {
    return `${peerAddress(this.transport.local)}:${this.transport.local.port}`;
  }
}

function recvCompletion(status: WcStatus, opcode: WcOpcode, byteLen: number, flags: number, imm: number, srcQp: number): Completion {
  const ok = status === WcStatus.SUCCESS;
  return { status, opcode, byteLen: ok ? byteLen : 0, flags: ok ? flags : 0, imm: ok ? imm : 0, srcQp };
}
