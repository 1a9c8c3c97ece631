/**
 * The responder (rxe_resp.c): checks each incoming request against the
 * QP's expected PSN, message sequence, path MTU, receive queue and the MR
 * (key, bounds, rights — through MemoryAccess), executes it, and answers:
 * ACK, NAK (PSN sequence, invalid request, remote access), RNR NAK, READ
 * responses, ATOMIC ACKs (replayed, never re-executed, for duplicates).
 * UC and UD requests are handled here too, without answers.
 */
import { Access, WcFlag, WcOpcode, WcStatus } from '../../abi/constants.js';
import type { AddressVector, MemoryAccess } from '../../engine/engine.js';
import { GRH_SIZE, buildGrh } from '../loopback/grh.js';
import { sliceSges } from '../loopback/message.js';
import { receiving } from '../loopback/qp.js';
import { putPeerGid } from './addressing.js';
import type { RoceCore } from './core.js';
import { Syndrome } from './headers.js';
import { Opcode } from './opcodes.js';
import type { RocePacket } from './packet.js';
import { type InMessage, PSN_MASK, type RoceQp, psnAdd, psnDiff, recvCompletion } from './roce-qp.js';
import type { UdpPeer } from './udp-transport.js';

/** READ responses a QP sends per turn of the event loop. */
export const READ_BURST = 64;

function isSendFirstOrOnly(op: number): boolean {
  return op === Opcode.RC_SEND_FIRST || op === Opcode.RC_SEND_ONLY || op === Opcode.RC_SEND_ONLY_WITH_IMMEDIATE;
}

/** Opcode shape of an RC (or, masked to 5 bits, UC) SEND/WRITE packet. */
function isFirst(op: number): boolean {
  return op === Opcode.RC_SEND_FIRST || op === Opcode.RC_RDMA_WRITE_FIRST || isSendFirstOrOnly(op) || op === Opcode.RC_RDMA_WRITE_ONLY || op === Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
}

function isLast(op: number): boolean {
  return !(op === Opcode.RC_SEND_FIRST || op === Opcode.RC_SEND_MIDDLE || op === Opcode.RC_RDMA_WRITE_FIRST || op === Opcode.RC_RDMA_WRITE_MIDDLE);
}

function hasImmediate(op: number): boolean {
  return op === Opcode.RC_SEND_LAST_WITH_IMMEDIATE || op === Opcode.RC_SEND_ONLY_WITH_IMMEDIATE || op === Opcode.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE || op === Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE;
}

export class Responder {
  constructor(private readonly core: RoceCore) {}

  /** Scratch for a UD receive's GRH: the sender's GID, the address it came to, the header. */
  private readonly udSgid = new Uint8Array(16);
  private readonly udAv: AddressVector = { dgid: new Uint8Array(16), sgidIndex: 0, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 };
  private readonly udGrh = new Uint8Array(GRH_SIZE);

  /** An RC request (SEND, WRITE, READ, atomic). */
  onRequest(qp: RoceQp, pkt: RocePacket): void {
    const memory = this.connected(qp);
    if (memory === null) return;
    const core = this.core;
    const op = pkt.opcode;
    const psn = pkt.bth.psn;
    const d = psnDiff(psn, qp.rqPsn);
    // While READ responses go out, answering anything else could ACK past the READ before its data
    // arrives (an implied NAK): only READs are taken (queued, or restarted); the rest is asked for again later.
    if (qp.readJobs.length > 0 && op !== Opcode.RC_RDMA_READ_REQUEST) {
      core.stats.ignored++;
      qp.droppedWhileReading = true;
      return;
    }
    if (d > 0) {
      // A gap: ask once for the missing packets.
      core.stats.ignored++;
      if (!qp.nakSent) {
        qp.nakSent = true;
        core.out.ack(qp, qp.rqPsn, Syndrome.NAK_PSN_SEQ_ERROR);
      }
      return;
    }
    if (d < 0) {
      core.stats.ignored++;
      if (op === Opcode.RC_RDMA_READ_REQUEST) this.readRespond(qp, memory, pkt, false);
      else if (op === Opcode.RC_COMPARE_SWAP || op === Opcode.RC_FETCH_ADD) {
        // Never executed twice: answer from the replay record, if still held.
        const r = qp.atomicReplay.find((x) => x.psn === psn);
        if (r !== undefined) this.sendAtomicAck(qp, psn, r.original);
      } else if (pkt.bth.ackReq) core.out.ack(qp, psnAdd(qp.rqPsn, -1), Syndrome.ACK_UNLIMITED);
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
    const first = isFirst(op);
    const last = isLast(op);
    if (first !== (cur === null) || (cur !== null && cur.kind !== (isSend ? 'send' : 'write'))) return this.invalid(qp, 'opcode out of sequence');
    if ((!last && n !== mtu) || n > mtu) return this.invalid(qp, `payload of ${n} bytes for path MTU ${mtu}`);
    const withImm = hasImmediate(op);
    let msg: InMessage;
    if (cur === null) {
      if (isSend) {
        const entry = qp.rq[0];
        if (entry === undefined) return this.rnrNak(qp, psn);
        msg = { kind: 'send', entry, offset: 0, va: 0n, rkey: 0, dmaLength: 0 };
      } else {
        if (!(qp.attrs.accessFlags & Access.REMOTE_WRITE)) return this.nakAccess(qp, 'RDMA WRITE without REMOTE_WRITE on the QP');
        if (withImm && qp.rq[0] === undefined) return this.rnrNak(qp, psn);
        // The whole RETH range, before the first byte lands (as rxe does): a refused WRITE changes nothing.
        const { va, rkey, dmaLength } = pkt.reth;
        if (dmaLength > 0 && memory.remoteCheck(qp.pdn, rkey, va, dmaLength, 'write') !== WcStatus.SUCCESS) return this.nakAccess(qp, `RDMA WRITE of ${dmaLength} bytes at 0x${va.toString(16)} refused (rkey 0x${rkey.toString(16)})`);
        msg = { kind: 'write', entry: null, offset: 0, va, rkey, dmaLength };
      }
    } else {
      msg = cur;
      // The last packet of a multi-packet WRITE with immediate takes a receive WQE: without one,
      // RNR NAK that packet before its bytes land (the message stays open; the requester resends it).
      if (!isSend && withImm && qp.rq[0] === undefined) return this.rnrNak(qp, psn);
    }
    if (!isSend && msg.offset + n > msg.dmaLength) return this.invalid(qp, 'RDMA WRITE longer than its DMA length');
    if (isSend) {
      if (n > 0) {
        const s = this.scatterAt(memory, qp, msg, pkt);
        if (s !== WcStatus.SUCCESS) {
          qp.rq.shift();
          qp.inMsg = null;
          core.host().recvDone(qp.qpn, msg.entry!.token, recvCompletion(s, WcOpcode.RECV, 0, 0, 0, qp.attrs.destQpn));
          // Too long for the buffer is the request's fault (invalid request); a buffer the
          // receiver cannot write is its own (remote operational error), as the verbs say.
          if (s === WcStatus.LOC_LEN_ERR) return this.invalid(qp, 'SEND longer than the receive WQE');
          return this.nakOperational(qp, `the receive WQE refused the SEND (${WcStatus[s]})`);
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
      if (pkt.bth.ackReq) core.out.ack(qp, psn, Syndrome.ACK_UNLIMITED);
      return;
    }
    qp.inMsg = null;
    qp.msn = (qp.msn + 1) & PSN_MASK;
    if (!isSend && msg.offset !== msg.dmaLength) return this.invalid(qp, 'RDMA WRITE shorter than its DMA length');
    core.out.ack(qp, psn, Syndrome.ACK_UNLIMITED);
    this.deliver(qp, pkt, msg, isSend, withImm);
  }

  /** A UC request: like RC without ACKs; errors drop the message, a PSN gap discards the partial one. */
  onUcRequest(qp: RoceQp, pkt: RocePacket): void {
    const memory = this.connected(qp);
    if (memory === null) return;
    const op = pkt.opcode & 0x1f; // the RC opcode of the same shape
    const psn = pkt.bth.psn;
    if (psn !== qp.rqPsn && qp.inMsg !== null) this.ucDrop(qp, `PSN 0x${psn.toString(16)}, expected 0x${qp.rqPsn.toString(16)}`);
    qp.rqPsn = psnAdd(psn, 1);
    const isSend = op <= Opcode.RC_SEND_ONLY_WITH_IMMEDIATE;
    const first = isFirst(op);
    const last = isLast(op);
    const withImm = hasImmediate(op);
    const n = pkt.payloadLength;
    const mtu = qp.mtu;
    let msg = qp.inMsg;
    if (first) {
      if (msg !== null) this.ucDrop(qp, 'new message before the last one ended');
      if (isSend) {
        const entry = qp.rq[0];
        if (entry === undefined) return this.ucDrop(qp, 'no receive WQE');
        msg = { kind: 'send', entry, offset: 0, va: 0n, rkey: 0, dmaLength: 0 };
      } else {
        if (!(qp.attrs.accessFlags & Access.REMOTE_WRITE)) return this.ucDrop(qp, 'RDMA WRITE without REMOTE_WRITE on the QP');
        const { va, rkey, dmaLength } = pkt.reth;
        if (dmaLength > 0 && memory.remoteCheck(qp.pdn, rkey, va, dmaLength, 'write') !== WcStatus.SUCCESS) return this.ucDrop(qp, 'RDMA WRITE refused');
        msg = { kind: 'write', entry: null, offset: 0, va, rkey, dmaLength };
      }
    } else if (msg === null || msg.kind !== (isSend ? 'send' : 'write')) {
      return this.ucDrop(qp, 'middle or last packet without a first');
    }
    if ((!last && n !== mtu) || n > mtu) return this.ucDrop(qp, `payload of ${n} bytes for path MTU ${mtu}`);
    if (isSend) {
      if (n > 0 && this.scatterAt(memory, qp, msg, pkt) !== WcStatus.SUCCESS) return this.ucDrop(qp, 'SEND does not fit the receive WQE');
    } else {
      if (msg.offset + n > msg.dmaLength) return this.ucDrop(qp, 'RDMA WRITE longer than its DMA length');
      if (n > 0 && memory.remoteWrite(qp.pdn, msg.rkey, msg.va + BigInt(msg.offset), pkt.buffer, pkt.payloadOffset, n) !== WcStatus.SUCCESS) return this.ucDrop(qp, 'RDMA WRITE refused');
    }
    msg.offset += n;
    if (!last) {
      qp.inMsg = msg;
      return;
    }
    qp.inMsg = null;
    if (!isSend && msg.offset !== msg.dmaLength) return this.ucDrop(qp, 'RDMA WRITE shorter than its DMA length');
    if (!isSend && withImm && qp.rq[0] === undefined) return this.ucDrop(qp, 'no receive WQE for the immediate');
    this.deliver(qp, pkt, msg, isSend, withImm);
  }

  /** A UD SEND: one packet; Q_Key checked; the receive buffer gets the GRH first. */
  onUdRequest(qp: RoceQp, pkt: RocePacket, src: UdpPeer): void {
    const core = this.core;
    if (!receiving(qp.attrs.state)) {
      core.stats.noQp++;
      return;
    }
    const memory = core.memory();
    if (memory === null) return;
    if (pkt.deth.qkey >>> 0 !== qp.attrs.qkey >>> 0) {
      core.stats.ignored++;
      return;
    }
    const entry = qp.rq[0];
    if (entry === undefined) {
      core.stats.ignored++;
      return;
    }
    const withImm = pkt.opcode === Opcode.UD_SEND_ONLY_WITH_IMMEDIATE;
    const n = pkt.payloadLength;
    const grh = this.udGrh;
    putPeerGid(this.udSgid, src);
    putPeerGid(this.udAv.dgid, core.local);
    buildGrh(grh, core.host().grhLayout, this.udSgid, this.udAv, n, withImm);
    qp.rq.shift();
    let s = GRH_SIZE + n > entry.wr.length ? WcStatus.LOC_LEN_ERR : memory.scatter(qp.pdn, sliceSges(entry.wr.sges, 0, GRH_SIZE), grh, 0, GRH_SIZE);
    if (s === WcStatus.SUCCESS && n > 0) s = memory.scatter(qp.pdn, sliceSges(entry.wr.sges, GRH_SIZE, n), pkt.buffer, pkt.payloadOffset, n);
    const srcQp = pkt.deth.srcQp;
    const host = core.host();
    if (s !== WcStatus.SUCCESS) {
      host.recvDone(qp.qpn, entry.token, recvCompletion(s, WcOpcode.RECV, 0, 0, 0, srcQp));
      core.failQp(qp, `UD receive failed with ${WcStatus[s] ?? s}`);
      return;
    }
    const c = recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV, GRH_SIZE + n, WcFlag.GRH | (withImm ? WcFlag.WITH_IMM : 0), withImm ? pkt.immDt.imm : 0, srcQp);
    c.solicited = pkt.bth.se;
    host.recvDone(qp.qpn, entry.token, c);
  }

  /** Guest memory for a request to a connected QP that receives; null drops the request (counted when the QP does not receive). */
  private connected(qp: RoceQp): MemoryAccess | null {
    if (!receiving(qp.attrs.state) || qp.peer === null || qp.path === null) {
      this.core.stats.noQp++;
      return null;
    }
    return this.core.memory();
  }

  /** A finished SEND, or WRITE with immediate, completes the head receive WQE. */
  private deliver(qp: RoceQp, pkt: RocePacket, msg: InMessage, isSend: boolean, withImm: boolean): void {
    if (!isSend && !withImm) return;
    // A SEND took its WQE at the first packet, a WRITE with immediate was RNR-NAKed without one.
    const entry = isSend ? msg.entry! : qp.rq[0]!;
    qp.rq.shift();
    const c = recvCompletion(WcStatus.SUCCESS, isSend ? WcOpcode.RECV : WcOpcode.RECV_RDMA_WITH_IMM, msg.offset, withImm ? WcFlag.WITH_IMM : 0, withImm ? pkt.immDt.imm : 0, qp.attrs.destQpn);
    c.solicited = pkt.bth.se;
    this.core.host().recvDone(qp.qpn, entry.token, c);
  }

  private scatterAt(memory: MemoryAccess, qp: RoceQp, msg: InMessage, pkt: RocePacket): WcStatus {
    const n = pkt.payloadLength;
    const entry = msg.entry!;
    if (msg.offset + n > entry.wr.length) return WcStatus.LOC_LEN_ERR;
    return memory.scatter(qp.pdn, sliceSges(entry.wr.sges, msg.offset, n), pkt.buffer, pkt.payloadOffset, n);
  }

  private readRespond(qp: RoceQp, memory: MemoryAccess, pkt: RocePacket, fresh: boolean): void {
    const psn = pkt.bth.psn;
    if (!(qp.attrs.accessFlags & Access.REMOTE_READ)) return this.refuseRead(qp, fresh, psn, 'RDMA READ without REMOTE_READ on the QP');
    const total = pkt.reth.dmaLength;
    const va = pkt.reth.va;
    const rkey = pkt.reth.rkey;
    const npkts = Math.max(1, Math.ceil(total / qp.mtu));
    // Check the whole range (a zero-length READ checks nothing, like rxe) before the first response goes out.
    if (total > 0 && memory.remoteCheck(qp.pdn, rkey, va, total, 'read') !== WcStatus.SUCCESS) return this.refuseRead(qp, fresh, psn, `RDMA READ at 0x${va.toString(16)} refused (rkey 0x${rkey.toString(16)})`);
    const jobs = qp.readJobs;
    // More READs in progress than the QP's max_dest_rd_atomic: the requester broke the limit it
    // agreed to, and a queue without a bound would let a remote grow it without end.
    if (fresh && jobs.length >= Math.max(1, qp.attrs.maxDestRdAtomic)) return this.invalid(qp, `more than max_dest_rd_atomic ${qp.attrs.maxDestRdAtomic} READs outstanding`);
    if (fresh) {
      qp.rqPsn = psnAdd(psn, npkts);
      qp.msn = (qp.msn + 1) & PSN_MASK;
    } else {
      // A repeated READ (its responses were lost): it and everything after it start over, from here.
      for (let i = jobs.length - 1; i >= 0; i--) if (psnDiff(psnAdd(jobs[i]!.psn, jobs[i]!.npkts - 1), psn) >= 0) jobs.splice(i, 1);
    }
    jobs.push({ psn, va, rkey, total, npkts, next: 0 });
    if (jobs.length === 1) this.sendReadResponses(qp, memory);
  }

  /**
   * Sends up to READ_BURST responses of the QP's oldest READs, then gives
   * the event loop back: a READ of any size neither blocks the back-end nor
   * outruns the socket. The rest goes from the next turn.
   */
  private sendReadResponses(qp: RoceQp, memory: MemoryAccess): void {
    const out = this.core.out;
    const mtu = qp.mtu;
    let budget = READ_BURST;
    while (budget > 0 && qp.readJobs.length > 0) {
      const job = qp.readJobs[0]!;
      for (; job.next < job.npkts && budget > 0; job.next++, budget--) {
        const i = job.next;
        const first = i === 0;
        const last = i === job.npkts - 1;
        const op = first && last ? Opcode.RC_RDMA_READ_RESPONSE_ONLY : first ? Opcode.RC_RDMA_READ_RESPONSE_FIRST : last ? Opcode.RC_RDMA_READ_RESPONSE_LAST : Opcode.RC_RDMA_READ_RESPONSE_MIDDLE;
        const res = out.start(qp, op, psnAdd(job.psn, i), false);
        res.aeth.syndrome = Syndrome.ACK_UNLIMITED;
        res.aeth.msn = qp.msn;
        const n = Math.min(mtu, job.total - i * mtu);
        res.payloadLength = n;
        if (n > 0) {
          // The MR may have gone since the request was checked.
          const s = memory.remoteRead(qp.pdn, job.rkey, job.va + BigInt(i * mtu), out.staging, out.payloadOffset, n);
          if (s !== WcStatus.SUCCESS) {
            qp.readJobs.length = 0;
            return this.nakAccess(qp, 'RDMA READ refused mid-way', psnAdd(job.psn, i));
          }
        }
        out.sendTo(qp);
      }
      if (job.next === job.npkts) qp.readJobs.shift();
    }
    if (qp.readJobs.length > 0) {
      this.reading.add(qp);
      if (!this.readTurnScheduled) {
        this.readTurnScheduled = true;
        setImmediate(this.readTurn);
      }
    } else if (qp.droppedWhileReading) {
      // Requests that came meanwhile were dropped: ask for them again now that the READs are answered.
      qp.droppedWhileReading = false;
      qp.nakSent = true;
      out.ack(qp, qp.rqPsn, Syndrome.NAK_PSN_SEQ_ERROR);
    }
  }

  /** QPs with READ responses left for the next turn. */
  private readonly reading = new Set<RoceQp>();
  private readTurnScheduled = false;
  private readonly readTurn = (): void => {
    this.readTurnScheduled = false;
    const memory = this.core.memory();
    const qps = [...this.reading];
    this.reading.clear();
    for (const qp of qps) {
      if (!this.core.isLive(qp) || !receiving(qp.attrs.state) || qp.peer === null || memory === null) {
        qp.readJobs.length = 0;
        continue;
      }
      // A suspended engine keeps its jobs; resumeReads() goes on with them.
      if (this.core.suspended) this.reading.add(qp);
      else this.sendReadResponses(qp, memory);
    }
    this.core.out.flush();
  };

  /** A loaded QP has READ responses left: they go on once the engine runs (resumeReads). */
  continueReads(qp: RoceQp): void {
    this.reading.add(qp);
  }

  /** After the engine resumes: READ responses left when it was suspended go on. */
  resumeReads(): void {
    if (this.reading.size > 0 && !this.readTurnScheduled) {
      this.readTurnScheduled = true;
      setImmediate(this.readTurn);
    }
  }

  private refuseRead(qp: RoceQp, fresh: boolean, psn: number, why: string): void {
    if (fresh) return this.nakAccess(qp, why, psn);
    this.core.host().log.debug(`${qp.name}: duplicate READ dropped (${why})`);
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
    // One record per responder resource (rxe: max_dest_rd_atomic): a requester never has more
    // atomics unacknowledged, so the duplicate of any of them finds its original result.
    qp.atomicReplay.push({ psn, original: r.original });
    if (qp.atomicReplay.length > Math.max(1, qp.attrs.maxDestRdAtomic)) qp.atomicReplay.shift();
    this.sendAtomicAck(qp, psn, r.original);
  }

  private sendAtomicAck(qp: RoceQp, psn: number, original: bigint): void {
    const pkt = this.core.out.start(qp, Opcode.RC_ATOMIC_ACKNOWLEDGE, psn, false);
    pkt.aeth.syndrome = Syndrome.ACK_UNLIMITED;
    pkt.aeth.msn = qp.msn;
    pkt.atomicAckEth.origRemoteData = original;
    pkt.payloadLength = 0;
    this.core.out.sendTo(qp);
  }

  private rnrNak(qp: RoceQp, psn: number): void {
    this.core.stats.rnrNaks++;
    this.core.out.ack(qp, psn, Syndrome.RNR_NAK | (qp.attrs.minRnrTimer & 0x1f));
  }

  private invalid(qp: RoceQp, why: string): void {
    this.core.out.ack(qp, qp.rqPsn, Syndrome.NAK_INVALID_REQUEST);
    this.core.failQp(qp, `responder: ${why}`);
  }

  private nakOperational(qp: RoceQp, why: string): void {
    this.core.out.ack(qp, qp.rqPsn, Syndrome.NAK_REMOTE_OPERATIONAL_ERROR);
    this.core.failQp(qp, `responder: ${why}`);
  }

  private nakAccess(qp: RoceQp, why: string, psn = qp.rqPsn): void {
    this.core.out.ack(qp, psn, Syndrome.NAK_REMOTE_ACCESS_ERROR);
    this.core.failQp(qp, `responder: ${why}`);
  }

  private ucDrop(qp: RoceQp, why: string): void {
    qp.inMsg = null;
    this.core.stats.ignored++;
    this.core.host().log.debug(`${qp.name}: UC drop (${why})`);
  }
}
