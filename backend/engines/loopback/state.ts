/**
 * The loopback engine's state as versioned plain data (JSON in UTF-8,
 * bigints as decimal strings, bytes as hex or base64): every QP with its
 * attributes, its outstanding WRs in order with the device's tokens, its
 * retry counts, and a pending wait as the time it had left. Decoding checks
 * every field, so garbage is refused before anything is replaced.
 */
import { plainReader, qpAttributesToJson, recvWrToJson, sendWrToJson, type Json } from '../../engine/plain-data.js';
import { DeviceError } from '../../../virtio/device.js';
import { FIRST_QPN, QPN_MASK, QpType, WcStatus } from '../../abi/constants.js';
import type { QpAttributes } from '../../engine/engine.js';
import { LoopbackQp, type RecvEntry, type SendEntry, type Wait } from './qp.js';

const FORMAT = 'vrdma-loopback-engine';
const VERSION = 1;
/** Bounds for what a saved queue may hold (virtqueues have at most 32768 entries). */
const MAX_QUEUE = 32768;
/** A saved wait longer than this is garbage (the longest IB timeout is about 2.5 hours). */
const MAX_WAIT_MS = 1e10;

export interface EngineSnapshot {
  nextQpn: number;
  qps: LoopbackQp[];
}



/** Time a wait has left at `now`; null for a wait without end. */
export function remainingMs(w: Wait, now: number): number | null {
  if (w.deadline !== null) return Math.max(0, w.deadline - now);
  return w.remainingMs;
}

export function encodeState(s: EngineSnapshot, now: number): Uint8Array {
  const state: Json = {
    format: FORMAT,
    version: VERSION,
    nextQpn: s.nextQpn,
    qps: s.qps.map((qp) => ({
      qpn: qp.qpn,
      type: qp.type,
      pdn: qp.pdn,
      maxSendWr: qp.maxSendWr,
      maxRecvWr: qp.maxRecvWr,
      attrs: qpAttributesToJson(qp.attrs),
      rnrRetries: qp.rnrRetries,
      retries: qp.retries,
      flushPending: qp.flushPending,
      badPost: qp.badPost,
      wait: qp.wait === null ? null : { kind: qp.wait.kind, remainingMs: remainingMs(qp.wait, now) },
      sq: qp.sq.toArray().map((e) => ({ token: e.token, postError: e.postError, wr: sendWrToJson(e.wr) })),
      rq: qp.rq.toArray().map((e) => ({ token: e.token, postError: e.postError, wr: recvWrToJson(e.wr) })),
    })),
  };
  return new TextEncoder().encode(JSON.stringify(state));
}

// ---------------------------------------------------------------------------
// Decoding

export class EngineStateError extends DeviceError {
  constructor(where: string, what: string) {
    super(`loopback engine state: ${where}: ${what}`);
    this.name = 'EngineStateError';
  }
}

const { obj, arr, int, bool, qpAttributes, sendWr, recvWr } = plainReader((where, what) => new EngineStateError(where, what));

function attrs(x: unknown, where: string): QpAttributes {
  return qpAttributes(x, where, { maxRdAtomic: 255, maxPkeyIndex: 0xffff });
}

const U32 = 0xffff_ffff;

function status(x: unknown, where: string): WcStatus | null {
  if (x === null) return null;
  const v = int(x, where, 0, 255);
  if (WcStatus[v] === undefined) throw new EngineStateError(where, `${v} is not a completion status`);
  return v as WcStatus;
}


function queue<W>(x: unknown, where: string, parseWr: (x: unknown, where: string) => W): { token: number; wr: W; postError: WcStatus | null }[] {
  const tokens = new Set<number>();
  return arr(x, where, MAX_QUEUE).map((e, i) => {
    const w = `${where}[${i}]`;
    const o = obj(e, w);
    const token = int(o.token, `${w}.token`, 0, U32);
    if (tokens.has(token)) throw new EngineStateError(w, `token ${token} twice`);
    tokens.add(token);
    return { token, postError: status(o.postError, `${w}.postError`), wr: parseWr(o.wr, `${w}.wr`) };
  });
}

export function decodeState(bytes: Uint8Array): EngineSnapshot {
  let root: unknown;
  try {
    root = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw new EngineStateError('blob', `not UTF-8 JSON (${(err as Error).message})`);
  }
  const r = obj(root, 'root');
  if (r.format !== FORMAT) throw new EngineStateError('format', `is not ${FORMAT}`);
  if (r.version !== VERSION) throw new EngineStateError('version', `${String(r.version)} is not ${VERSION}`);
  const nextQpn = int(r.nextQpn, 'nextQpn', FIRST_QPN, QPN_MASK);
  const seen = new Set<number>();
  const qps = arr(r.qps, 'qps', 1 << 20).map((x, i) => {
    const w = `qps[${i}]`;
    const o = obj(x, w);
    const qpn = int(o.qpn, `${w}.qpn`, FIRST_QPN, QPN_MASK);
    if (seen.has(qpn)) throw new EngineStateError(w, `QPN 0x${qpn.toString(16)} twice`);
    seen.add(qpn);
    const type = int(o.type, `${w}.type`, QpType.RC, QpType.UD) as QpType;
    const qp = new LoopbackQp(
      qpn,
      type,
      int(o.pdn, `${w}.pdn`, 1, U32),
      int(o.maxSendWr, `${w}.maxSendWr`, 1, MAX_QUEUE),
      int(o.maxRecvWr, `${w}.maxRecvWr`, 1, MAX_QUEUE),
      attrs(o.attrs, `${w}.attrs`),
    );
    qp.rnrRetries = int(o.rnrRetries, `${w}.rnrRetries`, 0, 7);
    qp.retries = int(o.retries, `${w}.retries`, 0, 7);
    qp.flushPending = bool(o.flushPending, `${w}.flushPending`);
    qp.badPost = bool(o.badPost, `${w}.badPost`);
    for (const e of queue(o.sq, `${w}.sq`, sendWr)) qp.sq.push(e as SendEntry);
    for (const e of queue(o.rq, `${w}.rq`, recvWr)) qp.rq.push(e as RecvEntry);
    if (o.wait !== null) {
      const wt = obj(o.wait, `${w}.wait`);
      if (wt.kind !== 'rnr' && wt.kind !== 'retry') throw new EngineStateError(`${w}.wait.kind`, `${String(wt.kind)} is not rnr or retry`);
      let remaining: number | null = null;
      if (wt.remainingMs !== null) {
        if (typeof wt.remainingMs !== 'number' || !Number.isFinite(wt.remainingMs) || wt.remainingMs < 0 || wt.remainingMs > MAX_WAIT_MS) {
          throw new EngineStateError(`${w}.wait.remainingMs`, `${String(wt.remainingMs)} is not a time in 0..${MAX_WAIT_MS} ms`);
        }
        remaining = wt.remainingMs;
      }
      if (qp.sq.length === 0) throw new EngineStateError(`${w}.wait`, 'a wait with no send WR');
      qp.wait = { kind: wt.kind, deadline: null, remainingMs: remaining, timer: null };
    }
    return qp;
  });
  return { nextQpn, qps };
}
