/**
 * The requester: turns the send WR at the head of a QP's SQ into a request,
 * hands it to the transport, and works out what the WR's outcome is from the
 * reply (rxe_req.c + the data-moving half of rxe_comp.c). Like the
 * responder it never calls the host; the completer applies the step.
 */
import { QpType, SendFlag, SendOp, WcStatus } from '../../abi/constants.js';
import type { Completion, GrhLayout, MemoryAccess, SendWr } from '../../engine/engine.js';
import { GRH_SIZE, buildGrh } from './grh.js';
import { CHUNK, MAX_MESSAGE, type Message, type MessageOp, Payload, UD_MAX_PAYLOAD, sgeTotal, sliceSges } from './message.js';
import type { LoopbackQp, RecvEntry, SendEntry } from './qp.js';
import type { ResponderResult } from './responder.js';

/** A request that reached a responder. */
export interface Delivery {
  destQpn: number;
  result: ResponderResult;
  /** RDMA READ response data: bytes [offset, offset+n) of the requested range into dst. */
  read(offset: number, dst: Uint8Array, n: number): WcStatus;
}

export interface RequesterContext {
  readonly memory: MemoryAccess;
  /** Staging for request payloads (CHUNK bytes). */
  readonly payloadStaging: Uint8Array;
  /** Staging for READ responses (CHUNK bytes). */
  readonly replyStaging: Uint8Array;
  /** Local GID by index (the sender's source GID for UD). */
  gid(index: number): Uint8Array | null;
  /** The GRH layout a UD receive gets. */
  readonly grhLayout: GrhLayout;
  /** Sends the request; null when nobody answers (no such QP, not reachable). */
  deliver(src: LoopbackQp, wr: SendWr, msg: Message): Delivery | null;
}

/** What became of the head WR. */
export type Outcome =
  /** The WR is finished with this status (an error moves the QP to ERR). */
  | { kind: 'done'; status: WcStatus; byteLen: number }
  /** RC: the responder had no receive WQE; retry after delayCode (min_rnr_timer). */
  | { kind: 'rnr'; minRnrTimer: number }
  /** RC: nothing answered; retry after the local ACK timeout. */
  | { kind: 'no_reply'; why: string };

export interface RequestStep {
  outcome: Outcome;
  /** A receive WQE the responder finished. */
  recv: { qpn: number; entry: RecvEntry; completion: Completion } | null;
  /** A responder QP that must go to ERR. */
  failPeer: { qpn: number; reason: string } | null;
}

const OPS: Partial<Record<SendOp, MessageOp>> = {
  [SendOp.SEND]: 'send',
  [SendOp.SEND_WITH_IMM]: 'send',
  [SendOp.RDMA_WRITE]: 'write',
  [SendOp.RDMA_WRITE_WITH_IMM]: 'write',
  [SendOp.RDMA_READ]: 'read',
  [SendOp.ATOMIC_CMP_AND_SWP]: 'cmp_swap',
  [SendOp.ATOMIC_FETCH_AND_ADD]: 'fetch_add',
};

const ALLOWED: Record<QpType, ReadonlySet<MessageOp>> = {
  [QpType.RC]: new Set<MessageOp>(['send', 'write', 'read', 'cmp_swap', 'fetch_add']),
  [QpType.UC]: new Set<MessageOp>(['send', 'write']),
  [QpType.UD]: new Set<MessageOp>(['send']),
};

const done = (status: WcStatus, byteLen = 0): RequestStep => ({ outcome: { kind: 'done', status, byteLen }, recv: null, failPeer: null });

/** A Q_Key with the high bit set means "use the QP's own Q_Key" (IBTA 10.2.4). */
function effectiveQkey(qp: LoopbackQp, wrQkey: number): number {
  return wrQkey & 0x8000_0000 ? qp.attrs.qkey : wrQkey >>> 0;
}

/** Runs the WR at the head of `qp`'s SQ once. */
export function request(ctx: RequesterContext, qp: LoopbackQp, entry: SendEntry): RequestStep {
  if (entry.postError !== null) return done(entry.postError);
  const wr = entry.wr;
  const op = OPS[wr.opcode];
  if (op === undefined || !ALLOWED[qp.type].has(op)) return done(WcStatus.LOC_QP_OP_ERR);
  const isAtomic = op === 'cmp_swap' || op === 'fetch_add';
  if (wr.inline !== null && (op !== 'send' && op !== 'write')) return done(WcStatus.LOC_QP_OP_ERR);
  // The engine does not trust the device's sum: it is recomputed from what it moves.
  const length = wr.inline !== null ? wr.inline.length : sgeTotal(wr.sges);
  if (length > MAX_MESSAGE) return done(WcStatus.LOC_LEN_ERR);
  if (isAtomic && (wr.sges.length !== 1 || length !== 8)) return done(WcStatus.LOC_LEN_ERR);
  if (isAtomic && wr.remoteAddr % 8n !== 0n) return done(WcStatus.LOC_QP_OP_ERR);
  let grh: Uint8Array | null = null;
  let qkey = 0;
  if (qp.type === QpType.UD) {
    if (wr.ud === null) return done(WcStatus.LOC_QP_OP_ERR);
    if (length > UD_MAX_PAYLOAD) return done(WcStatus.LOC_LEN_ERR);
    const sgid = ctx.gid(wr.ud.av.sgidIndex) ?? new Uint8Array(16);
    grh = new Uint8Array(GRH_SIZE); // travels with the message (one per UD message, like its payload)
    buildGrh(grh, ctx.grhLayout, sgid, wr.ud.av, length, wr.opcode === SendOp.SEND_WITH_IMM);
    qkey = effectiveQkey(qp, wr.ud.remoteQkey);
  }
  let payload: Payload | null = null;
  if (op === 'send' || op === 'write') {
    payload = new Payload(ctx.memory, qp.pdn, wr.sges, wr.inline, length, ctx.payloadStaging);
    // Read the first chunk before anything goes out: a bad local key fails here, with no effect on the peer.
    const first = payload.load(0, Math.min(length, CHUNK));
    if (first !== WcStatus.SUCCESS) return done(first);
  }
  const withImm = wr.opcode === SendOp.SEND_WITH_IMM || wr.opcode === SendOp.RDMA_WRITE_WITH_IMM;
  const msg: Message = {
    op,
    transport: qp.type,
    srcQpn: qp.qpn,
    length,
    imm: withImm ? wr.imm >>> 0 : null,
    solicited: (wr.flags & SendFlag.SOLICITED) !== 0,
    remoteAddr: wr.remoteAddr,
    rkey: wr.rkey >>> 0,
    compareAdd: wr.compareAdd,
    swap: wr.swap,
    qkey,
    grh,
    payload,
  };
  const delivery = ctx.deliver(qp, wr, msg);
  if (delivery === null) return lost(qp, 'no QP answered', length);
  const result = delivery.result;
  const recv = result.recv === null ? null : { qpn: delivery.destQpn, ...result.recv };
  const failPeer = result.fail === null ? null : { qpn: delivery.destQpn, reason: result.fail };
  const step = (outcome: Outcome, peer = failPeer): RequestStep => ({ outcome, recv, failPeer: peer });
  const reply = result.reply;
  switch (reply.kind) {
    case 'ack':
      return step({ kind: 'done', status: WcStatus.SUCCESS, byteLen: length });
    case 'drop':
      return qp.type === QpType.RC ? step({ kind: 'no_reply', why: reply.why }) : step({ kind: 'done', status: WcStatus.SUCCESS, byteLen: length });
    case 'rnr':
      return step({ kind: 'rnr', minRnrTimer: reply.minRnrTimer });
    case 'nak':
      return step({ kind: 'done', status: reply.status, byteLen: 0 });
    case 'abort':
      return step({ kind: 'done', status: reply.status, byteLen: 0 });
    case 'read': {
      const buf = ctx.replyStaging;
      for (let off = 0; off < length; off += CHUNK) {
        const n = Math.min(CHUNK, length - off);
        const got = delivery.read(off, buf, n);
        if (got !== WcStatus.SUCCESS) {
          return step({ kind: 'done', status: got, byteLen: 0 }, { qpn: delivery.destQpn, reason: `RDMA READ at 0x${wr.remoteAddr.toString(16)} refused (rkey 0x${msg.rkey.toString(16)})` });
        }
        const put = ctx.memory.scatter(qp.pdn, sliceSges(wr.sges, off, n), buf, 0, n);
        if (put !== WcStatus.SUCCESS) return step({ kind: 'done', status: put, byteLen: 0 });
      }
      return step({ kind: 'done', status: WcStatus.SUCCESS, byteLen: length });
    }
    case 'atomic': {
      const bytes = new Uint8Array(8);
      new DataView(bytes.buffer).setBigUint64(0, reply.original, true);
      const put = ctx.memory.scatter(qp.pdn, wr.sges, bytes, 0, 8);
      return step({ kind: 'done', status: put, byteLen: put === WcStatus.SUCCESS ? 8 : 0 });
    }
  }
}

/** Nobody answered: RC waits for its ACK timeout; UC and UD never learn and complete. */
function lost(qp: LoopbackQp, why: string, length: number): RequestStep {
  if (qp.type === QpType.RC) return { outcome: { kind: 'no_reply', why }, recv: null, failPeer: null };
  return done(WcStatus.SUCCESS, length);
}
