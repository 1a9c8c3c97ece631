/**
 * Reading and writing the plain JSON data that device and engine state are
 * saved as. Loading treats the data as untrusted: every reader checks type
 * and range and fails with the path of the field ("qps[2].attrs.sqPsn").
 */
import { QpState, QPN_MASK } from '../abi/constants.js';
import type { AddressVector, QpAttributes } from './engine.js';

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
  return { obj, arr, int, bool, u64, bytes, av, qpAttributes };
}
