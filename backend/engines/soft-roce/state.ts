/**
 * The soft-RoCE engine's state as versioned plain data (JSON in UTF-8,
 * bigints as decimal strings, bytes as hex or base64): every QP with its
 * attributes, PSNs, queued and unacknowledged WRs with the device's tokens,
 * the responder's expected PSN and partial-message progress, atomic replay
 * records, retry counts and the time pending timers had left. Decoding checks
 * every field (plainReader), so garbage is refused with the path of the first
 * bad field before anything is replaced.
 */
import { DeviceError } from '../../../virtio/device.js';
import { FIRST_QPN, QPN_MASK, QpType, WcStatus } from '../../abi/constants.js';
import type { QpAttributes, RecvWr, SendWr } from '../../engine/engine.js';
import type { ReadJob } from './roce-qp.js';
import { plainReader, qpAttributesToJson, recvWrToJson, sendWrToJson, type Json } from '../../engine/plain-data.js';

const FORMAT = 'vrdma-soft-roce-engine';
/**
 * Version 2 adds the responder's READs still being answered (`readJobs`,
 * `droppedWhileReading`): a VM stopped while it sent a long READ response
 * goes on with it at the destination, where version 1 let the peer time out
 * and ask again. A version-1 state loads with no READs in progress.
 */
const VERSION = 2;
/** Versions decodeState() reads. */
const KNOWN_VERSIONS: readonly number[] = [1, 2];
const MAX_QUEUE = 32768;
const MAX_WAIT_MS = 1e10;
const U32 = 0xffff_ffff;
const PSN_MAX = 0xff_ffff;

export interface SavedSendEntry {
  token: number;
  wr: SendWr;
  postError: WcStatus | null;
  firstPsn: number;
  npkts: number;
  sent: number;
  readPkts: number;
}

export interface SavedInMessage {
  kind: 'send' | 'write';
  /** The message holds the head receive WQE (SEND). */
  hasEntry: boolean;
  offset: number;
  va: bigint;
  rkey: number;
  dmaLength: number;
}

export interface SavedQp {
  qpn: number;
  type: QpType;
  pdn: number;
  attrs: QpAttributes;
  sendIdx: number;
  sqPsn: number;
  unackedPsn: number;
  retries: number;
  rnrRetries: number;
  /** Time the RNR wait had left; null when not waiting. */
  rnrWaitMs: number | null;
  /** Time the retransmit timer had left; null when not armed. */
  retryMs: number | null;
  rqPsn: number;
  msn: number;
  nakSent: boolean;
  inMsg: SavedInMessage | null;
  atomicReplay: { psn: number; original: bigint }[];
  sq: SavedSendEntry[];
  rq: { token: number; wr: RecvWr }[];
  /** Version 2: READ responses still to send, oldest first. */
  readJobs: ReadJob[];
  droppedWhileReading: boolean;
}

export interface SoftRoceSnapshot {
  nextQpn: number;
  qps: SavedQp[];
}


export function encodeState(s: SoftRoceSnapshot): Uint8Array {
  const state: Json = {
    format: FORMAT,
    version: VERSION,
    nextQpn: s.nextQpn,
    qps: s.qps.map((q) => ({
      qpn: q.qpn,
      type: q.type,
      pdn: q.pdn,
      attrs: qpAttributesToJson(q.attrs),
      sendIdx: q.sendIdx,
      sqPsn: q.sqPsn,
      unackedPsn: q.unackedPsn,
      retries: q.retries,
      rnrRetries: q.rnrRetries,
      rnrWaitMs: q.rnrWaitMs,
      retryMs: q.retryMs,
      rqPsn: q.rqPsn,
      msn: q.msn,
      nakSent: q.nakSent,
      inMsg: q.inMsg === null ? null : { ...q.inMsg, va: q.inMsg.va.toString(), rkey: q.inMsg.rkey >>> 0 },
      atomicReplay: q.atomicReplay.map((r) => ({ psn: r.psn, original: r.original.toString() })),
      sq: q.sq.map((e) => ({ token: e.token, postError: e.postError, firstPsn: e.firstPsn, npkts: e.npkts, sent: e.sent, readPkts: e.readPkts, wr: sendWrToJson(e.wr) })),
      rq: q.rq.map((e) => ({ token: e.token, wr: recvWrToJson(e.wr) })),
      readJobs: q.readJobs.map((j) => ({ psn: j.psn, va: j.va.toString(), rkey: j.rkey >>> 0, total: j.total, npkts: j.npkts, next: j.next })),
      droppedWhileReading: q.droppedWhileReading,
    })),
  };
  return new TextEncoder().encode(JSON.stringify(state));
}

export class SoftRoceStateError extends DeviceError {
  constructor(where: string, what: string) {
    super(`soft-roce engine state: ${where}: ${what}`);
    this.name = 'SoftRoceStateError';
  }
}

const { obj, arr, int, bool, u64, qpAttributes, sendWr, recvWr } = plainReader((where, what) => new SoftRoceStateError(where, what));

function status(x: unknown, where: string): WcStatus | null {
  if (x === null) return null;
  const v = int(x, where, 0, 255);
  if (WcStatus[v] === undefined) throw new SoftRoceStateError(where, `${v} is not a completion status`);
  return v as WcStatus;
}

function waitMs(x: unknown, where: string): number | null {
  if (x === null) return null;
  if (typeof x !== 'number' || !Number.isFinite(x) || x < 0 || x > MAX_WAIT_MS) throw new SoftRoceStateError(where, `${String(x)} is not a time in 0..${MAX_WAIT_MS} ms`);
  return x;
}


function tokenOf(o: Record<string, unknown>, where: string, seen: Set<number>): number {
  const token = int(o.token, `${where}.token`, 0, U32);
  if (seen.has(token)) throw new SoftRoceStateError(where, `token ${token} twice`);
  seen.add(token);
  return token;
}

export function decodeState(bytes: Uint8Array): SoftRoceSnapshot {
  let root: unknown;
  try {
    root = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw new SoftRoceStateError('blob', `not UTF-8 JSON (${(err as Error).message})`);
  }
  const r = obj(root, 'root');
  if (r.format !== FORMAT) throw new SoftRoceStateError('format', `is not ${FORMAT}`);
  if (typeof r.version !== 'number' || !KNOWN_VERSIONS.includes(r.version)) {
    throw new SoftRoceStateError('version', `${String(r.version)} is not one this back-end reads (${KNOWN_VERSIONS.join(', ')}; it writes ${VERSION})`);
  }
  const version = r.version;
  const nextQpn = int(r.nextQpn, 'nextQpn', FIRST_QPN, QPN_MASK);
  const seen = new Set<number>();
  const qps = arr(r.qps, 'qps', 1 << 20).map((x, i): SavedQp => {
    const w = `qps[${i}]`;
    const o = obj(x, w);
    const qpn = int(o.qpn, `${w}.qpn`, FIRST_QPN, QPN_MASK);
    if (seen.has(qpn)) throw new SoftRoceStateError(`${w}.qpn`, `QPN 0x${qpn.toString(16)} twice`);
    seen.add(qpn);
    const type = int(o.type, `${w}.type`, QpType.RC, QpType.UD) as QpType;
    const psn = (k: string): number => int(o[k], `${w}.${k}`, 0, PSN_MAX);
    const sendTokens = new Set<number>();
    const sq = arr(o.sq, `${w}.sq`, MAX_QUEUE).map((e, j): SavedSendEntry => {
      const we = `${w}.sq[${j}]`;
      const eo = obj(e, we);
      return {
        token: tokenOf(eo, we, sendTokens),
        postError: status(eo.postError, `${we}.postError`),
        firstPsn: int(eo.firstPsn, `${we}.firstPsn`, -1, PSN_MAX),
        npkts: int(eo.npkts, `${we}.npkts`, 0, PSN_MAX),
        sent: int(eo.sent, `${we}.sent`, 0, PSN_MAX),
        readPkts: int(eo.readPkts, `${we}.readPkts`, 0, PSN_MAX),
        wr: sendWr(eo.wr, `${we}.wr`),
      };
    });
    const recvTokens = new Set<number>();
    const rq = arr(o.rq, `${w}.rq`, MAX_QUEUE).map((e, j) => {
      const we = `${w}.rq[${j}]`;
      const eo = obj(e, we);
      return { token: tokenOf(eo, we, recvTokens), wr: recvWr(eo.wr, `${we}.wr`) };
    });
    let inMsg: SavedInMessage | null = null;
    if (o.inMsg !== null) {
      const m = obj(o.inMsg, `${w}.inMsg`);
      if (m.kind !== 'send' && m.kind !== 'write') throw new SoftRoceStateError(`${w}.inMsg.kind`, `${String(m.kind)} is not send or write`);
      const hasEntry = bool(m.hasEntry, `${w}.inMsg.hasEntry`);
      if (hasEntry !== (m.kind === 'send')) throw new SoftRoceStateError(`${w}.inMsg.hasEntry`, 'only a SEND holds a receive WQE');
      if (hasEntry && rq.length === 0) throw new SoftRoceStateError(`${w}.inMsg`, 'a SEND in progress with no receive WQE');
      inMsg = { kind: m.kind, hasEntry, offset: int(m.offset, `${w}.inMsg.offset`, 0, 0x8000_0000), va: u64(m.va, `${w}.inMsg.va`), rkey: int(m.rkey, `${w}.inMsg.rkey`, 0, U32), dmaLength: int(m.dmaLength, `${w}.inMsg.dmaLength`, 0, 0x8000_0000) };
    }
    const atomicReplay = arr(o.atomicReplay, `${w}.atomicReplay`, 64).map((e, j) => {
      const eo = obj(e, `${w}.atomicReplay[${j}]`);
      return { psn: int(eo.psn, `${w}.atomicReplay[${j}].psn`, 0, PSN_MAX), original: u64(eo.original, `${w}.atomicReplay[${j}].original`) };
    });
    const sendIdx = int(o.sendIdx, `${w}.sendIdx`, 0, sq.length);
    const readJobs = version >= 2 ? decodeReadJobs(o.readJobs, `${w}.readJobs`) : [];
    const droppedWhileReading = version >= 2 ? bool(o.droppedWhileReading, `${w}.droppedWhileReading`) : false;
    return {
      qpn,
      type,
      pdn: int(o.pdn, `${w}.pdn`, 0, U32),
      attrs: qpAttributes(o.attrs, `${w}.attrs`, { maxRdAtomic: 255, maxPkeyIndex: 0xffff }),
      sendIdx,
      sqPsn: psn('sqPsn'),
      unackedPsn: psn('unackedPsn'),
      retries: int(o.retries, `${w}.retries`, 0, 7),
      rnrRetries: int(o.rnrRetries, `${w}.rnrRetries`, 0, 7),
      rnrWaitMs: waitMs(o.rnrWaitMs, `${w}.rnrWaitMs`),
      retryMs: waitMs(o.retryMs, `${w}.retryMs`),
      rqPsn: psn('rqPsn'),
      msn: psn('msn'),
      nakSent: bool(o.nakSent, `${w}.nakSent`),
      inMsg,
      atomicReplay,
      sq,
      rq,
      readJobs,
      droppedWhileReading,
    };
  });
  return { nextQpn, qps };
}

/** Version 2's READs in progress: each inside its own PSN range, at most one per responder resource. */
function decodeReadJobs(x: unknown, where: string): ReadJob[] {
  return arr(x, where, 256).map((e, j) => {
    const w = `${where}[${j}]`;
    const o = obj(e, w);
    const npkts = int(o.npkts, `${w}.npkts`, 1, PSN_MAX);
    const total = int(o.total, `${w}.total`, 0, 0x8000_0000);
    return { psn: int(o.psn, `${w}.psn`, 0, PSN_MAX), va: u64(o.va, `${w}.va`), rkey: int(o.rkey, `${w}.rkey`, 0, U32), total, npkts, next: int(o.next, `${w}.next`, 0, npkts - 1) };
  });
}
