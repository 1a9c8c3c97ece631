/**
 * CRC-32 (IEEE 802.3 / zlib: reflected, polynomial 0xEDB88320). The ICRC
 * runs it over every byte of every packet sent and received, so the path
 * depends on the length:
 *
 * - from {@link NATIVE_MIN} bytes: the native addon's crc32Update
 *   (carry-less multiply folding, about 11 GB/s on a 4 KiB payload here,
 *   against 1.6 GB/s for the table code below and 3-4 GB/s for Node's
 *   zlib.crc32, which does not use the instruction);
 * - without that binding (an addon built before it): zlib.crc32 from
 *   {@link ZLIB_MIN} bytes;
 * - shorter ranges, where a call costs more than it saves: JavaScript,
 *   table driven, slicing-by-16 over 32-bit little-endian words where the
 *   host is little-endian and the data is 4-byte aligned, slicing-by-8 over
 *   single byte loads otherwise, byte at a time for the tail.
 *
 * `crc32Update` works on the raw register: no inversion on entry or exit,
 * like the kernel's crc32_le(). zlib's crc32(data) equals
 * `~crc32Update(0xFFFFFFFF, data)`.
 */
import * as zlib from 'node:zlib';
import { native } from '../../../virtio/sys/native.js';

const POLY = 0xedb88320;
const SLICES = 16;

/** T[k * 256 + n]: the register after byte n followed by k zero bytes. */
const T = new Int32Array(SLICES * 256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? POLY ^ (c >>> 1) : c >>> 1;
  T[n] = c;
}
for (let n = 0; n < 256; n++) {
  let c = T[n]!;
  for (let k = 1; k < SLICES; k++) {
    c = T[c & 0xff]! ^ (c >>> 8);
    T[k * 256 + n] = c;
  }
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
/** Below this many bytes a typed-array view costs more than it saves. */
const WORD_PATH_MIN = 64;

/** From this many bytes on, the native binding beats the table code (its call costs about 120 ns; at 80 bytes they tie). */
export const NATIVE_MIN = 256;
/** From this many bytes on, zlib.crc32 beats the table code (measured crossover). */
export const ZLIB_MIN = 512;
const nativeCrc32 = typeof native.crc32Update === 'function' ? native.crc32Update.bind(native) : null;
/** zlib.crc32 exists from Node 20.15; older runtimes keep the table code for every length. */
const zlibCrc32: ((data: Uint8Array, value: number) => number) | null = typeof zlib.crc32 === 'function' ? zlib.crc32 : null;

/** Advances the CRC register `crc` over `len` bytes of `buf` from `off`. Callers pass a valid range (the native path would throw a RangeError). */
export function crc32Update(crc: number, buf: Uint8Array, off: number, len: number): number {
  if (len >= NATIVE_MIN && nativeCrc32 !== null) return nativeCrc32(crc >>> 0, buf, off, len);
  if (len >= ZLIB_MIN && zlibCrc32 !== null) return crc32UpdateZlib(crc, buf, off, len);
  return crc32UpdateTables(crc, buf, off, len);
}

/** {@link crc32Update} through zlib.crc32 (the fallback when the addon lacks its binding). */
export function crc32UpdateZlib(crc: number, buf: Uint8Array, off: number, len: number): number {
  if (zlibCrc32 === null) return crc32UpdateTables(crc, buf, off, len);
  // zlib takes and returns the inverted register (its running crc32 value).
  return ~zlibCrc32(buf.subarray(off, off + len), ~crc >>> 0) >>> 0;
}

/** {@link crc32Update} in JavaScript alone: the table code, for any length (tests compare the paths). */
export function crc32UpdateTables(crc: number, buf: Uint8Array, off: number, len: number): number {
  let c = crc | 0;
  let i = off;
  const end = off + len;
  if (LITTLE_ENDIAN_HOST && len >= WORD_PATH_MIN) {
    while (((buf.byteOffset + i) & 3) !== 0) c = T[(c ^ buf[i++]!) & 0xff]! ^ (c >>> 8);
    const blocks = (end - i) >>> 4;
    if (blocks > 0) {
      const w = new Int32Array(buf.buffer, buf.byteOffset + i, blocks * 4);
      for (let k = 0; k < w.length; k += 4) {
        c ^= w[k]!;
        const d = w[k + 1]!;
        const e = w[k + 2]!;
        const f = w[k + 3]!;
        c =
          T[3840 + (c & 0xff)]! ^
          T[3584 + ((c >>> 8) & 0xff)]! ^
          T[3328 + ((c >>> 16) & 0xff)]! ^
          T[3072 + (c >>> 24)]! ^
          T[2816 + (d & 0xff)]! ^
          T[2560 + ((d >>> 8) & 0xff)]! ^
          T[2304 + ((d >>> 16) & 0xff)]! ^
          T[2048 + (d >>> 24)]! ^
          T[1792 + (e & 0xff)]! ^
          T[1536 + ((e >>> 8) & 0xff)]! ^
          T[1280 + ((e >>> 16) & 0xff)]! ^
          T[1024 + (e >>> 24)]! ^
          T[768 + (f & 0xff)]! ^
          T[512 + ((f >>> 8) & 0xff)]! ^
          T[256 + ((f >>> 16) & 0xff)]! ^
          T[f >>> 24]!;
      }
      i += blocks * 16;
    }
  } else {
    const end8 = off + (len & ~7);
    while (i < end8) {
      c ^= buf[i]! | (buf[i + 1]! << 8) | (buf[i + 2]! << 16) | (buf[i + 3]! << 24);
      c =
        T[1792 + (c & 0xff)]! ^
        T[1536 + ((c >>> 8) & 0xff)]! ^
        T[1280 + ((c >>> 16) & 0xff)]! ^
        T[1024 + (c >>> 24)]! ^
        T[768 + buf[i + 4]!]! ^
        T[512 + buf[i + 5]!]! ^
        T[256 + buf[i + 6]!]! ^
        T[buf[i + 7]!]!;
      i += 8;
    }
  }
  while (i < end) c = T[(c ^ buf[i++]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** The byte-at-a-time form of {@link crc32Update} (the reference the sliced paths are tested against). */
export function crc32UpdateBytewise(crc: number, buf: Uint8Array, off: number, len: number): number {
  let c = crc | 0;
  for (let i = off, end = off + len; i < end; i++) c = T[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** zlib-compatible CRC-32 of `buf[off, off+len)`. */
export function crc32(buf: Uint8Array, off = 0, len = buf.length - off): number {
  return ~crc32Update(0xffffffff, buf, off, len) >>> 0;
}
