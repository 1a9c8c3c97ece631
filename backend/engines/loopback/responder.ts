/**
 * The responder: what the receiving QP does with one incoming request
 * (IBTA ch. 9.7, rxe_resp.c). It checks the request against the QP (state,
 * transport, Q_Key, access flags, resources), consumes receive WQEs, moves
 * data through MemoryAccess, and says what the requester hears back. It
 * never calls the host: the engine applies the result (completions, QP
 * failures) afterwards, so a transport other than loopback can reuse it as
 * is.
 */
import { Access, QpType, WcFlag, WcOpcode, WcStatus } from '../../abi/constants.js';
import type { Completion, MemoryAccess, QpAttributes } from '../../engine/engine.js';
import { GRH_SIZE } from './grh.js';
import { CHUNK, type Message, sliceSges } from './message.js';
import { type RecvEntry, receiving } from './qp.js';
import type { Fifo } from './fifo.js';

/** The responder's view of its QP. */
export interface ResponderQp {
  readonly qpn: number;
  readonly type: QpType;
  readonly pdn: number;
  readonly attrs: QpAttributes;
  readonly rq: Fifo<RecvEntry>;
}

/** What goes back to the requester. */
export type Reply =
  /** Done (RC: ACK). */
  | { kind: 'ack' }
  /** RDMA READ accepted; the requester pulls the data with readResponse(). */
  | { kind: 'read' }
  | { kind: 'atomic'; original: bigint }
  /** RC: no receive WQE; try again after the responder's min_rnr_timer. */
  | { kind: 'rnr'; minRnrTimer: number }
  /** RC: the request failed at the responder (REM_ACCESS_ERR, REM_INV_REQ_ERR, REM_OP_ERR). */
  | { kind: 'nak'; status: WcStatus }
  /** Silently discarded: no reply at all (an RC requester times out; UC and UD never know). */
  | { kind: 'drop'; why: string }
  /** The requester's own payload could not be read part-way through: a local error at the requester. */
  | { kind: 'abort'; status: WcStatus };

export interface ResponderResult {
  reply: Reply;
  /** A receive WQE this request finished (already taken off the RQ) and its completion. */
  recv: { entry: RecvEntry; completion: Completion } | null;
  /** Why the responder QP must go to ERR, or null. */
  fail: string | null;
}

const drop = (why: string): ResponderResult => ({ reply: { kind: 'drop', why }, recv: null, fail: null });

function recvCompletion(status: WcStatus, opcode: WcOpcode, byteLen: number, flags: number, imm: number, srcQp: number, solicited: boolean): Completion {
  return { status, opcode, byteLen: status === WcStatus.SUCCESS ? byteLen : 0, flags: status === WcStatus.SUCCESS ? flags : 0, imm: status === WcStatus.SUCCESS ? imm : 0, srcQp, solicited };
}

/**
 * A request the responder refuses: RC answers with a NAK and the responder
 * QP goes to ERR (class B/C errors); UC and UD drop the message and carry on.
 */
function refuse(qp: ResponderQp, status: WcStatus, why: string): ResponderResult {
  if (qp.type === QpType.RC) return { reply: { kind: 'nak', status }, recv: null, fail: why };
  return drop(why);
}

/** Handles one request addressed to `qp`. */
export function respond(memory: MemoryAccess, qp: ResponderQp, msg: Message): ResponderResult {
  if (!receiving(qp.attrs.state)) return drop(`QP 0x${qp.qpn.toString(16)} is not ready to receive`);
  if (msg.transport !== qp.type) return drop(`QP 0x${qp.qpn.toString(16)} does not speak this transport`);
  if (qp.type === QpType.UD && msg.qkey !== qp.attrs.qkey) return drop('Q_Key mismatch');
  switch (msg.op) {
    case 'send':
      return respondSend(memory, qp, msg);
    case 'write':
      return respondWrite(memory, qp, msg);
    case 'read':
      if (qp.type !== QpType.RC) return drop('RDMA READ on a QP that is not RC');
      if (!(qp.attrs.accessFlags & Access.REMOTE_READ)) return refuse(qp, WcStatus.REM_ACCESS_ERR, 'RDMA READ without REMOTE_READ on the QP');
      if (qp.attrs.maxDestRdAtomic === 0) return refuse(qp, WcStatus.REM_INV_REQ_ERR, 'RDMA READ with max_dest_rd_atomic 0');
      return { reply: { kind: 'read' }, recv: null, fail: null };
    case 'cmp_swap':
    case 'fetch_add': {
      if (qp.type !== QpType.RC) return drop('atomic on a QP that is not RC');
      if (!(qp.attrs.accessFlags & Access.REMOTE_ATOMIC)) return refuse(qp, WcStatus.REM_ACCESS_ERR, 'atomic without REMOTE_ATOMIC on the QP');
      if (qp.attrs.maxDestRdAtomic === 0) return refuse(qp, WcStatus.REM_INV_REQ_ERR, 'atomic with max_dest_rd_atomic 0');
      const r = memory.remoteAtomic(qp.pdn, msg.rkey, msg.remoteAddr, msg.op, msg.compareAdd, msg.swap);
      if (r.status !== WcStatus.SUCCESS) return refuse(qp, r.status, `atomic at 0x${msg.remoteAddr.toString(16)} refused (rkey 0x${msg.rkey.toString(16)})`);
      return { reply: { kind: 'atomic', original: r.original }, recv: null, fail: null };
    }
  }
}

/** RDMA READ response data: bytes [offset, offset+n) of the requested range into `dst` (REM_ACCESS_ERR when the rkey refuses). */
export function readResponse(memory: MemoryAccess, qp: ResponderQp, msg: Message, offset: number, dst: Uint8Array, n: number): WcStatus {
  return memory.remoteRead(qp.pdn, msg.rkey, msg.remoteAddr + BigInt(offset), dst, 0, n);
}

function respondSend(memory: MemoryAccess, qp: ResponderQp, msg: Message): ResponderResult {
  const entry = qp.rq.peek();
  if (entry === undefined) {
    if (qp.type === QpType.RC) return { reply: { kind: 'rnr', minRnrTimer: qp.attrs.minRnrTimer }, recv: null, fail: null };
    return drop('no receive WQE posted');
  }
  const flags = (msg.imm !== null ? WcFlag.WITH_IMM : 0) | (msg.grh !== null ? WcFlag.GRH : 0);
  const imm = msg.imm ?? 0;
  const header = msg.grh !== null ? GRH_SIZE : 0;
  const total = header + msg.length;
  /** The receive WQE completes with an error and the QP goes to ERR; an RC requester hears `nak`. */
  const failRecv = (status: WcStatus, nak: WcStatus, why: string): ResponderResult => {
    qp.rq.shift();
    return {
      reply: qp.type === QpType.RC ? { kind: 'nak', status: nak } : { kind: 'drop', why },
      recv: { entry, completion: recvCompletion(status, WcOpcode.RECV, 0, 0, 0, msg.srcQpn, msg.solicited) },
      fail: why,
    };
  };
  if (total > entry.wr.length) return failRecv(WcStatus.LOC_LEN_ERR, WcStatus.REM_INV_REQ_ERR, `a ${total}-byte message for a ${entry.wr.length}-byte receive buffer`);
  const sges = entry.wr.sges;
  if (msg.grh !== null) {
    const s = memory.scatter(qp.pdn, sges, msg.grh, 0, GRH_SIZE);
    if (s !== WcStatus.SUCCESS) return failRecv(s, WcStatus.REM_OP_ERR, `receive buffer refused the GRH (status ${s})`);
  }
  const payload = msg.payload;
  for (let off = 0; off < msg.length && payload !== null; off += CHUNK) {
    const n = Math.min(CHUNK, msg.length - off);
    const got = payload.load(off, n);
    // The sender failed mid-message: nothing completes here, the WQE stays for the next message.
    if (got !== WcStatus.SUCCESS) return { reply: { kind: 'abort', status: got }, recv: null, fail: null };
    const s = memory.scatter(qp.pdn, sliceSges(sges, header + off, n), payload.view, 0, n);
    if (s !== WcStatus.SUCCESS) return failRecv(s, WcStatus.REM_OP_ERR, `receive buffer refused the data (status ${s})`);
  }
  qp.rq.shift();
  return { reply: { kind: 'ack' }, recv: { entry, completion: recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV, total, flags, imm, msg.srcQpn, msg.solicited) }, fail: null };
}

function respondWrite(memory: MemoryAccess, qp: ResponderQp, msg: Message): ResponderResult {
  if (qp.type === QpType.UD) return drop('RDMA WRITE on a UD QP');
  if (!(qp.attrs.accessFlags & Access.REMOTE_WRITE)) return refuse(qp, WcStatus.REM_ACCESS_ERR, 'RDMA WRITE without REMOTE_WRITE on the QP');
  let entry: RecvEntry | undefined;
  if (msg.imm !== null) {
    entry = qp.rq.peek();
    if (entry === undefined) {
      if (qp.type === QpType.RC) return { reply: { kind: 'rnr', minRnrTimer: qp.attrs.minRnrTimer }, recv: null, fail: null };
      return drop('RDMA WRITE with immediate and no receive WQE posted');
    }
  }
  const payload = msg.payload;
  for (let off = 0; off < msg.length && payload !== null; off += CHUNK) {
    const n = Math.min(CHUNK, msg.length - off);
    const got = payload.load(off, n);
    if (got !== WcStatus.SUCCESS) return { reply: { kind: 'abort', status: got }, recv: null, fail: null };
    const s = memory.remoteWrite(qp.pdn, msg.rkey, msg.remoteAddr + BigInt(off), payload.view, 0, n);
    if (s !== WcStatus.SUCCESS) return refuse(qp, s, `RDMA WRITE of ${msg.length} bytes at 0x${msg.remoteAddr.toString(16)} refused (rkey 0x${msg.rkey.toString(16)})`);
  }
  if (entry === undefined) return { reply: { kind: 'ack' }, recv: null, fail: null };
  qp.rq.shift();
  return {
    reply: { kind: 'ack' },
    recv: { entry, completion: recvCompletion(WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, msg.length, WcFlag.WITH_IMM, msg.imm ?? 0, msg.srcQpn, msg.solicited) },
    fail: null,
  };
}
