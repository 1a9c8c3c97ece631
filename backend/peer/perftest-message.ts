/**
 * The out-of-band messages of perftest 4.5-0.17 (Debian 12; it reports
 * version "6.06") over its TCP "ethernet" exchange, as measured on the
 * stock binaries (strace of ib_{write,read,send}_bw against each other):
 *
 *   version   16 bytes, the version string NUL-padded ("6.06")
 *   sys data  two big-endian u32: cycle buffer (page size), cache line size
 *   mtu       2 bytes: the active MTU enum as one decimal digit + NUL
 *   keys      108 bytes "%04x:%04x:%06x:%06x:%08x:%016x:" (LID, out_reads,
 *             QPN, PSN, rkey, vaddr), the GID as 16 "%02x:" fields, then
 *             "%08x:" (SRQ number) and NUL
 *   report    five big-endian 8-byte fields: size, iterations (u64),
 *             peak BW, average BW, message rate (IEEE doubles)
 *   done      "done\0", written by both sides at the very end, read by neither
 *
 * Each exchange step is symmetric: the client writes then reads, the
 * server reads then writes, the same size both ways.
 */

export const PERFTEST_VERSION = '6.06';
export const PERFTEST_VERSION_SIZE = 16;
export const PERFTEST_KEYS_SIZE = 108;
export const PERFTEST_MTU_SIZE = 2;
export const PERFTEST_REPORT_FIELD_SIZE = 8;
export const PERFTEST_DONE = new Uint8Array([0x64, 0x6f, 0x6e, 0x65, 0]);
export const PERFTEST_DEFAULT_PORT = 18515;

export class PerftestMessageError extends Error {
  override readonly name = 'PerftestMessageError';
}

export interface PerftestKeys {
  lid: number;
  outReads: number;
  qpn: number;
  psn: number;
  rkey: number;
  vaddr: bigint;
  /** 16 bytes. */
  gid: Uint8Array;
  srqn: number;
}

export interface PerftestReport {
  size: bigint;
  iterations: bigint;
  bwPeak: number;
  bwAvg: number;
  msgRate: number;
}

function hex(v: number | bigint, digits: number): string {
  return v.toString(16).padStart(digits, '0');
}

function ascii(text: string, size: number): Uint8Array {
  if (text.length >= size) throw new RangeError(`'${text}' does not fit ${size} bytes with its NUL`);
  const out = new Uint8Array(size);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

/** The printable text before the first NUL; refuses other control bytes. */
function cString(bytes: Uint8Array, what: string): string {
  const nul = bytes.indexOf(0);
  if (nul < 0) throw new PerftestMessageError(`${what} is not NUL-terminated`);
  let s = '';
  for (let i = 0; i < nul; i++) {
    const c = bytes[i]!;
    if (c < 0x20 || c > 0x7e) throw new PerftestMessageError(`${what} has a non-printable byte 0x${hex(c, 2)} at ${i}`);
    s += String.fromCharCode(c);
  }
  return s;
}

export function encodeVersion(version = PERFTEST_VERSION): Uint8Array {
  return ascii(version, PERFTEST_VERSION_SIZE);
}

/** The peer's version as perftest reads it (atof); refuses what is not a number. */
export function decodeVersion(bytes: Uint8Array): { text: string; value: number } {
  if (bytes.length !== PERFTEST_VERSION_SIZE) throw new PerftestMessageError(`version has ${bytes.length} bytes, expected ${PERFTEST_VERSION_SIZE}`);
  const text = cString(bytes, 'version');
  if (!/^\d+(\.\d+)?$/.test(text)) throw new PerftestMessageError(`version '${text}' is not a number`);
  return { text, value: Number(text) };
}

export function encodeU32(v: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, v >>> 0, false);
  return out;
}

export function decodeU32(bytes: Uint8Array): number {
  if (bytes.length !== 4) throw new PerftestMessageError(`u32 field has ${bytes.length} bytes`);
  return new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, false);
}

/** MTU enum (1 = 256 ... 5 = 4096) as perftest sends it. */
export function encodeMtu(mtuEnum: number): Uint8Array {
  if (!Number.isInteger(mtuEnum) || mtuEnum < 1 || mtuEnum > 5) throw new RangeError(`MTU enum ${mtuEnum} not in 1..5`);
  return ascii(String(mtuEnum), PERFTEST_MTU_SIZE);
}

export function decodeMtu(bytes: Uint8Array): number {
  if (bytes.length !== PERFTEST_MTU_SIZE) throw new PerftestMessageError(`mtu has ${bytes.length} bytes`);
  // perftest sends sizeof(char[2]) of a "%d": a one-digit enum and its NUL.
  const c = bytes[0]!;
  if (c < 0x31 || c > 0x35) throw new PerftestMessageError(`mtu byte 0x${hex(c, 2)} is not an MTU enum 1..5`);
  return c - 0x30;
}

export function encodeKeys(k: PerftestKeys): Uint8Array {
  const fits = (v: number, bits: number, what: string): void => {
    if (!Number.isInteger(v) || v < 0 || v >= 2 ** bits) throw new RangeError(`${what} ${v} does not fit ${bits} bits`);
  };
  fits(k.lid, 16, 'LID');
  fits(k.outReads, 16, 'out_reads');
  fits(k.qpn, 24, 'QPN');
  fits(k.psn, 24, 'PSN');
  fits(k.rkey, 32, 'rkey');
  fits(k.srqn, 32, 'SRQN');
  if (k.vaddr < 0n || k.vaddr >= 1n << 64n) throw new RangeError(`vaddr ${k.vaddr} is not a 64-bit address`);
  if (k.gid.length !== 16) throw new RangeError(`a GID has 16 bytes, got ${k.gid.length}`);
  let text = `${hex(k.lid, 4)}:${hex(k.outReads, 4)}:${hex(k.qpn, 6)}:${hex(k.psn, 6)}:${hex(k.rkey, 8)}:${hex(k.vaddr, 16)}:`;
  for (const b of k.gid) text += `${hex(b, 2)}:`;
  text += `${hex(k.srqn, 8)}:`;
  return ascii(text, PERFTEST_KEYS_SIZE);
}

const KEYS_RE = /^([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,6}):([0-9a-fA-F]{1,6}):([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,16}):((?:[0-9a-fA-F]{1,2}:){16})([0-9a-fA-F]{1,8}):$/;

export function decodeKeys(bytes: Uint8Array): PerftestKeys {
  if (bytes.length !== PERFTEST_KEYS_SIZE) throw new PerftestMessageError(`keys message has ${bytes.length} bytes, expected ${PERFTEST_KEYS_SIZE}`);
  const text = cString(bytes, 'keys message');
  const m = KEYS_RE.exec(text);
  if (m === null) throw new PerftestMessageError(`keys message '${text}' is not LID:OUT_READS:QPN:PSN:RKEY:VADDR:GID:SRQN`);
  const qpn = parseInt(m[3]!, 16);
  if (qpn === 0) throw new PerftestMessageError('keys message names QPN 0');
  const gid = new Uint8Array(m[7]!.slice(0, -1).split(':').map((h) => parseInt(h, 16)));
  return {
    lid: parseInt(m[1]!, 16),
    outReads: parseInt(m[2]!, 16),
    qpn,
    psn: parseInt(m[4]!, 16),
    rkey: parseInt(m[5]!, 16) >>> 0,
    vaddr: BigInt(`0x${m[6]!}`),
    gid,
    srqn: parseInt(m[8]!, 16) >>> 0,
  };
}

/** The five report fields, each its own 8-byte exchange step. */
export function encodeReport(r: PerftestReport): Uint8Array[] {
  const field = (set: (dv: DataView) => void): Uint8Array => {
    const out = new Uint8Array(PERFTEST_REPORT_FIELD_SIZE);
    set(new DataView(out.buffer));
    return out;
  };
  return [
    field((dv) => dv.setBigUint64(0, r.size, false)),
    field((dv) => dv.setBigUint64(0, r.iterations, false)),
    field((dv) => dv.setFloat64(0, r.bwPeak, false)),
    field((dv) => dv.setFloat64(0, r.bwAvg, false)),
    field((dv) => dv.setFloat64(0, r.msgRate, false)),
  ];
}

export function decodeReport(fields: readonly Uint8Array[]): PerftestReport {
  if (fields.length !== 5 || fields.some((f) => f.length !== PERFTEST_REPORT_FIELD_SIZE)) throw new PerftestMessageError('a report is five 8-byte fields');
  const dv = fields.map((f) => new DataView(f.buffer, f.byteOffset, 8));
  return {
    size: dv[0]!.getBigUint64(0, false),
    iterations: dv[1]!.getBigUint64(0, false),
    bwPeak: dv[2]!.getFloat64(0, false),
    bwAvg: dv[3]!.getFloat64(0, false),
    msgRate: dv[4]!.getFloat64(0, false),
  };
}
