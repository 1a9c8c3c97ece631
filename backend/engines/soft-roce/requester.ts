/**
 * The requester (rxe_req.c): turns WRs at the head of a QP's send queue
 * into packets — segmented by path MTU, inside a window of outstanding
 * PSNs, asking for an ACK at the end of each message and every
 * ACK_REQ_EVERY packets — and hands finished UC/UD WRs and local errors to
 * the completer.
 */
import { QPN_MASK, QpState, QpType, SendFlag, SendOp, WcStatus } from '../../abi/constants.js';
import type { MemoryAccess } from '../../engine/engine.js';
import { sendCompletion } from '../loopback/completer.js';
import { sliceSges } from '../loopback/message.js';
import { gidToAddress, makePath } from './addressing.js';
import type { Completer } from './completer.js';
import type { RoceCore } from './core.js';
import { Opcode } from './opcodes.js';
import { type RoceQp, type SendEntry, isAtomicOp, isReadLike, psnAdd, psnDiff } from './roce-qp.js';
import { udpPeer } from './udp-transport.js';

/** Outstanding PSNs a requester allows before it waits for ACKs. */
export const SEND_WINDOW = 32;
/** Ask for an ACK at least this often inside a long message. */
export const ACK_REQ_EVERY = SEND_WINDOW / 2;
/** Transport bits of UC opcodes (RC opcodes have 0). */
const TRANSPORT_UC = 0x20;

export class Requester {
  constructor(
    private readonly core: RoceCore,
    private readonly completer: Completer,
  ) {}

  /** Sends what the window allows of `qp`'s SQ. */
  pump(qp: RoceQp): void {
    const core = this.core;
    if (core.suspended || qp.attrs.state !== QpState.RTS || qp.rnrWaiting) return;
    if (qp.type === QpType.UD) return this.pumpUd(qp);
    if (qp.peer === null || qp.path === null) return;
    const memory = core.memory();
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
      // A restarted READ asks for the remainder, numbered from where its responses stopped (rxe_req.c).
      const psn = psnAdd(e.firstPsn, op === SendOp.RDMA_READ ? e.readPkts : e.sent);
      if (!uc) {
        const outstanding = psnDiff(psn, qp.unackedPsn);
        if (outstanding > 0 && outstanding + (readLike ? 1 : 0) > SEND_WINDOW) return;
        if (readLike && e.sent === 0 && this.readsInFlight(qp) >= Math.max(1, qp.attrs.maxRdAtomic)) return;
      }
      const status = op === SendOp.RDMA_READ ? this.sendReadRequest(qp, e, psn, mtu) : readLike ? this.sendAtomicRequest(qp, e, psn) : this.sendDataPacket(qp, memory, e, psn, mtu);
      if (status !== WcStatus.SUCCESS) {
        this.completer.completeThrough(qp, qp.sq.indexOf(e) - 1);
        this.completer.finishHead(qp, status);
        return;
      }
      if (readLike) e.sent = e.npkts;
      else e.sent++;
      if (e.sent >= e.npkts) qp.sendIdx++;
      if (uc) {
        // No ACKs on UC: a WR is complete once its last packet is out.
        if (e.sent >= e.npkts) {
          qp.unackedPsn = qp.sqPsn;
          this.completer.completeThrough(qp, qp.sq.indexOf(e));
        }
      } else this.completer.armRetry(qp);
    }
  }

  /**
   * READs and atomics sent and not yet answered: max_rd_atomic bounds them,
   * because the responder keeps that many replay resources (rxe waits the
   * same way; 0 is treated as 1 rather than stalling the QP forever).
   */
  private readsInFlight(qp: RoceQp): number {
    let n = 0;
    for (let i = 0; i < qp.sendIdx; i++) if (isReadLike(qp.sq[i]!.wr.opcode)) n++;
    return n;
  }

  /** UD: one packet per WR to the WR's address; complete once sent. */
  private pumpUd(qp: RoceQp): void {
    const core = this.core;
    const memory = core.memory();
    if (memory === null) return;
    const out = core.out;
    const host = core.host();
    while (qp.sq.length > 0) {
      const e = qp.sq[0]!;
      if (e.postError !== null) {
        if (e.postError !== WcStatus.LOC_LEN_ERR) return;
        qp.sq.shift();
        qp.sendIdx = 0;
        host.sendDone(qp.qpn, e.token, sendCompletion(e.wr, e.postError, 0));
        continue;
      }
      const wr = e.wr;
      const ud = wr.ud!;
      const withImm = wr.opcode === SendOp.SEND_WITH_IMM;
      const peer = udpPeer(gidToAddress(ud.av.dgid), core.remotePort);
      if (peer.family === core.local.family) {
        const pkt = out.start(qp, withImm ? Opcode.UD_SEND_ONLY_WITH_IMMEDIATE : Opcode.UD_SEND_ONLY, qp.sqPsn, false);
        pkt.bth.destQp = ud.remoteQpn & QPN_MASK;
        pkt.bth.se = (wr.flags & SendFlag.SOLICITED) !== 0;
        // IB: a Q_Key with the high bit set means the QP's own Q_Key.
        pkt.deth.qkey = (ud.remoteQkey & 0x8000_0000 ? qp.attrs.qkey : ud.remoteQkey) >>> 0;
        pkt.deth.srcQp = qp.qpn;
        if (withImm) pkt.immDt.imm = wr.imm >>> 0;
        pkt.payloadLength = wr.length;
        if (wr.length > 0) {
          if (wr.inline !== null) out.staging.set(wr.inline.subarray(0, wr.length), out.payloadOffset);
          else {
            const s = memory.gather(qp.pdn, wr.sges, out.staging, out.payloadOffset);
            if (s !== WcStatus.SUCCESS) {
              this.completer.finishHead(qp, s);
              return;
            }
          }
        }
        out.send(peer, makePath(core.local, peer));
      }
      qp.sqPsn = psnAdd(qp.sqPsn, 1);
      qp.sq.shift();
      qp.sendIdx = 0;
      host.sendDone(qp.qpn, e.token, sendCompletion(wr, WcStatus.SUCCESS, wr.length));
    }
  }

  private sendAtomicRequest(qp: RoceQp, e: SendEntry, psn: number): WcStatus {
    const wr = e.wr;
    const cas = wr.opcode === SendOp.ATOMIC_CMP_AND_SWP;
    const pkt = this.core.out.start(qp, cas ? Opcode.RC_COMPARE_SWAP : Opcode.RC_FETCH_ADD, psn, true);
    pkt.atomicEth.va = wr.remoteAddr;
    pkt.atomicEth.rkey = wr.rkey >>> 0;
    pkt.atomicEth.swapAdd = cas ? wr.swap : wr.compareAdd;
    pkt.atomicEth.compare = cas ? wr.compareAdd : 0n;
    pkt.payloadLength = 0;
    this.core.out.sendTo(qp);
    return WcStatus.SUCCESS;
  }

  private sendDataPacket(qp: RoceQp, memory: MemoryAccess, e: SendEntry, psn: number, mtu: number): WcStatus {
    const out = this.core.out;
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
    const pkt = out.start(qp, op, psn, !uc && (last || (i + 1) % ACK_REQ_EVERY === 0));
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
    if (n > 0) {
      const at = out.payloadOffset;
      if (wr.inline !== null) out.staging.set(wr.inline.subarray(off, off + n), at);
      else {
        const s = memory.gather(qp.pdn, sliceSges(wr.sges, off, n), out.staging, at);
        if (s !== WcStatus.SUCCESS) return s;
      }
    }
    out.sendTo(qp);
    return WcStatus.SUCCESS;
  }

  private sendReadRequest(qp: RoceQp, e: SendEntry, psn: number, mtu: number): WcStatus {
    // A restarted READ asks only for what has not arrived.
    const off = e.readPkts * mtu;
    const pkt = this.core.out.start(qp, Opcode.RC_RDMA_READ_REQUEST, psn, true);
    pkt.reth.va = e.wr.remoteAddr + BigInt(off);
    pkt.reth.rkey = e.wr.rkey >>> 0;
    pkt.reth.dmaLength = e.wr.length - off;
    pkt.payloadLength = 0;
    this.core.out.sendTo(qp);
    return WcStatus.SUCCESS;
  }
}
