/**
 * Reading and writing the plain JSON data that device and engine state are
 * saved as. Loading treats the data as untrusted: every reader checks type
 * and range and fails with the path of the field ("qps[2].attrs.sqPsn").
 */
import { QpState, QPN_MASK, SendOp } from '../abi/constants.js';
import type { AddressVector, QpAttributes, RecvWr, SendWr, Sge } from './engine.js';

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

export function hexOf(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}

export function avToJson(av: AddressVector | null): Json {
  return av === null ? null : { dgid: hexOf(av.dgid), sgidIndex: av.sgidIndex, hopLimit: av.hopLimit, trafficClass: av.trafficClass, flowLabel: av.flowLabel, sl: av.sl };
}

export function qpAttributesToJson(a: QpAttributes): Json {
  return { ...a, qkey: a.qkey >>> 0, av: avToJson(a.av) };
}

export function sgesToJson(sges: readonly Sge[]): Json {
  return sges.map((g) => [g.addr.toString(), g.length, g.lkey]);
}

export function sendWrToJson(wr: SendWr): Json {
  return {
    wrId: wr.wrId.toString(),
    opcode: wr.opcode,
    flags: wr.flags,
    sges: sgesToJson(wr.sges),
    inline: wr.inline === null ? null : Buffer.from(wr.inline.buffer, wr.inline.byteOffset, wr.inline.byteLength).toString('base64'),
    length: wr.length,
    imm: wr.imm >>> 0,
    remoteAddr: wr.remoteAddr.toString(),
    rkey: wr.rkey >>> 0,
    compareAdd: wr.compareAdd.toString(),
    swap: wr.swap.toString(),
    ud: wr.ud === null ? null : { av: avToJson(wr.ud.av), remoteQpn: wr.ud.remoteQpn, remoteQkey: wr.ud.remoteQkey >>> 0 },
  };
}

export function recvWrToJson(wr: RecvWr): Json {
  return { wrId: wr.wrId.toString(), sges: sgesToJson(wr.sges), length: wr.length };
}

/** Bounds on saved work requests: what any device could have accepted. */
const MAX_SGES = 256;
const MAX_INLINE = 65536;
const U32 = 0xffff_ffff;
const SEND_OPS = new Set<number>(Object.values(SendOp).filter((v): v is number => typeof v === 'number'));

export interface PlainReader {
  obj(x: unknown, where: string): Record<string, unknown>;
  arr(x: unknown, where: string, max?: number): unknown[];
  int(x: unknown, where: string, min: number, max: number): number;
  bool(x: unknown, where: string): boolean;
  /** A u64 written as a decimal string. */
  u64(x: unknown, where: string): bigint;
  /** Exactly `len` bytes written as hex. */
  bytes(x: unknown, where: string, len: number): Uint8Array;
  av(x: unknown, where: string): AddressVector | null;
  qpAttributes(x: unknown, where: string, bounds: { maxRdAtomic: number; maxPkeyIndex: number }): QpAttributes;
  sges(x: unknown, where: string): { sges: Sge[]; total: number };
  sendWr(x: unknown, where: string): SendWr;
  recvWr(x: unknown, where: string): RecvWr;
}

/** Readers that throw `fail(where, what)` on the first field that is not what it must be. */
export function plainReader(fail: (where: string, what: string) => Error): PlainReader {
  const obj = (x: unknown, where: string): Record<string, unknown> => {
    if (typeof x !== 'object' || x === null || Array.isArray(x)) throw fail(where, 'not an object');
    return x as Record<string, unknown>;
  };
  const arr = (x: unknown, where: string, max = Number.POSITIVE_INFINITY): unknown[] => {
    if (!Array.isArray(x)) throw fail(where, 'not an array');
    if (x.length > max) throw fail(where, `${x.length} entries, at most ${max}`);
    return x;
  };
  const int = (x: unknown, where: string, min: number, max: number): number => {
    if (typeof x !== 'number' || !Number.isInteger(x) || x < min || x > max) throw fail(where, `${String(x)} is not an integer in ${min}..${max}`);
    return x;
  };
  const bool = (x: unknown, where: string): boolean => {
    if (typeof x !== 'boolean') throw fail(where, 'not a boolean');
    return x;
  };
  const u64 = (x: unknown, where: string): bigint => {
    if (typeof x !== 'string' || !/^\d{1,20}$/.test(x)) throw fail(where, 'not a u64 decimal string');
    const v = BigInt(x);
    if (v >= 1n << 64n) throw fail(where, 'exceeds 64 bits');
    return v;
  };
  const bytes = (x: unknown, where: string, len: number): Uint8Array => {
    if (typeof x !== 'string' || x.length !== len * 2 || !/^[0-9a-fA-F]*$/.test(x)) throw fail(where, `not ${len} bytes of hex`);
    return new Uint8Array(Buffer.from(x, 'hex'));
  };
  const av = (x: unknown, where: string): AddressVector | null => {
    if (x === null) return null;
    const o = obj(x, where);
    return {
      dgid: bytes(o.dgid, `${where}.dgid`, 16),
      sgidIndex: int(o.sgidIndex, `${where}.sgidIndex`, 0, 255),
      hopLimit: int(o.hopLimit, `${where}.hopLimit`, 0, 255),
      trafficClass: int(o.trafficClass, `${where}.trafficClass`, 0, 255),
      flowLabel: int(o.flowLabel, `${where}.flowLabel`, 0, 0xfffff),
      sl: int(o.sl, `${where}.sl`, 0, 15),
    };
  };
  const qpAttributes = (x: unknown, where: string, bounds: { maxRdAtomic: number; maxPkeyIndex: number }): QpAttributes => {
    const o = obj(x, where);
    const f = (k: string, max: number): number => int(o[k], `${where}.${k}`, 0, max);
    return {
      state: f('state', QpState.ERR) as QpState,
      pathMtu: f('pathMtu', 5),
      timeout: f('timeout', 31),
      retryCnt: f('retryCnt', 7),
      rnrRetry: f('rnrRetry', 7),
      minRnrTimer: f('minRnrTimer', 31),
      maxRdAtomic: f('maxRdAtomic', bounds.maxRdAtomic),
      maxDestRdAtomic: f('maxDestRdAtomic', bounds.maxRdAtomic),
      accessFlags: f('accessFlags', 0xf),
      qkey: f('qkey', 0xffff_ffff),
      rqPsn: f('rqPsn', QPN_MASK),
      sqPsn: f('sqPsn', QPN_MASK),
      destQpn: f('destQpn', QPN_MASK),
      pkeyIndex: f('pkeyIndex', bounds.maxPkeyIndex),
      av: av(o.av, `${where}.av`),
    };
  };
  const sges = (x: unknown, where: string): { sges: Sge[]; total: number } => {
    let total = 0;
    const list = arr(x, where, MAX_SGES).map((e, i) => {
      const t = arr(e, `${where}[${i}]`);
      if (t.length !== 3) throw fail(`${where}[${i}]`, 'not [addr, length, lkey]');
      const length = int(t[1], `${where}[${i}].length`, 0, U32);
      total += length;
      return { addr: u64(t[0], `${where}[${i}].addr`), length, lkey: int(t[2], `${where}[${i}].lkey`, 0, U32) };
    });
    return { sges: list, total };
  };
  const sendWr = (x: unknown, where: string): SendWr => {
    const o = obj(x, where);
    const opcode = int(o.opcode, `${where}.opcode`, 0, 255);
    if (!SEND_OPS.has(opcode)) throw fail(`${where}.opcode`, `${opcode} is not a send opcode`);
    const { sges: list, total } = sges(o.sges, `${where}.sges`);
    let inline: Uint8Array | null = null;
    if (o.inline !== null) {
      if (typeof o.inline !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(o.inline)) throw fail(`${where}.inline`, 'not base64');
      inline = new Uint8Array(Buffer.from(o.inline, 'base64'));
      if (inline.length > MAX_INLINE) throw fail(`${where}.inline`, `${inline.length} bytes`);
      if (list.length !== 0) throw fail(where, 'both inline data and SGEs');
    }
    const length = int(o.length, `${where}.length`, 0, Number.MAX_SAFE_INTEGER);
    if (length !== (inline !== null ? inline.length : total)) throw fail(`${where}.length`, `${length} does not match the data it names`);
    let ud: SendWr['ud'] = null;
    if (o.ud !== null) {
      const u = obj(o.ud, `${where}.ud`);
      const a = av(u.av, `${where}.ud.av`);
      if (a === null) throw fail(`${where}.ud.av`, 'missing');
      ud = { av: a, remoteQpn: int(u.remoteQpn, `${where}.ud.remoteQpn`, 0, QPN_MASK), remoteQkey: int(u.remoteQkey, `${where}.ud.remoteQkey`, 0, U32) };
    }
    return {
      wrId: u64(o.wrId, `${where}.wrId`),
      opcode: opcode as SendOp,
      flags: int(o.flags, `${where}.flags`, 0, 0xff),
      sges: list,
      inline,
      length,
      imm: int(o.imm, `${where}.imm`, 0, U32),
      remoteAddr: u64(o.remoteAddr, `${where}.remoteAddr`),
      rkey: int(o.rkey, `${where}.rkey`, 0, U32),
      compareAdd: u64(o.compareAdd, `${where}.compareAdd`),
      swap: u64(o.swap, `${where}.swap`),
      ud,
    };
  };
  const recvWr = (x: unknown, where: string): RecvWr => {
    const o = obj(x, where);
    const { sges: list, total } = sges(o.sges, `${where}.sges`);
    const length = int(o.length, `${where}.length`, 0, Number.MAX_SAFE_INTEGER);
    if (length !== total) throw fail(`${where}.length`, `${length} is not the sum of its SGEs (${total})`);
    return { wrId: u64(o.wrId, `${where}.wrId`), sges: list, length };
  };
  return { obj, arr, int, bool, u64, bytes, av, qpAttributes, sges, sendWr, recvWr };
}
