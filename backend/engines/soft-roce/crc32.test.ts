import { crc32 as zlibCrc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { pattern } from './test-support.js';
import { native } from '../../../virtio/sys/native.js';
import { NATIVE_MIN, ZLIB_MIN, crc32, crc32Update, crc32UpdateBytewise, crc32UpdateTables, crc32UpdateZlib } from './crc32.js';


const STARTS = [0, 0xffffffff, 0xdebb20e3, 0x80000001];

describe('crc32: the native, zlib and table paths agree with the byte-at-a-time definition', () => {
  it('the addon built from this tree has the carry-less-multiply binding', () => {
    expect(typeof native.crc32Update).toBe('function');
  });

  it('native crc32Update matches byte-at-a-time for every length 0..600 at odd offsets, from any start register', () => {
    const d = pattern(700, 3);
    for (let len = 0; len <= 600; len++) {
      for (const off of [0, 1, 7, 13]) {
        for (const start of STARTS) expect(native.crc32Update!(start, d, off, len), `len ${len} off ${off}`).toBe(crc32UpdateBytewise(start, d, off, len));
      }
    }
  });

  it('native crc32Update matches on packet and message sizes, and on SharedArrayBuffer views (guest memory)', () => {
    const d = pattern(70_000, 5);
    const shared = new Uint8Array(new SharedArrayBuffer(70_000));
    shared.set(d);
    for (const len of [1040, 4096, 4099, 4112, 65_536, 69_990]) {
      for (const off of [0, 5]) {
        expect(native.crc32Update!(0xdebb20e3, d, off, len)).toBe(crc32UpdateBytewise(0xdebb20e3, d, off, len));
        expect(native.crc32Update!(0x12345678, shared, off, len)).toBe(crc32UpdateBytewise(0x12345678, d, off, len));
      }
    }
  });

  it('native crc32Update refuses a range outside the buffer instead of reading past it', () => {
    const d = pattern(100, 1);
    expect(() => native.crc32Update!(0, d, 90, 11)).toThrow(RangeError);
    expect(() => native.crc32Update!(0, d.subarray(50), 0, 51)).toThrow(RangeError);
    expect(() => native.crc32Update!(-1, d, 0, 1)).toThrow(RangeError);
  });

  it('the table code and the zlib path match zlib past the lengths where crc32Update hands over', () => {
    const backing = pattern(70_000, 5);
    for (const [start, len] of [
      [0, NATIVE_MIN],
      [0, ZLIB_MIN],
      [1, 4096 + 12],
      [3, 4099],
      [6, 65_536],
    ] as const) {
      const view = backing.subarray(start, start + len);
      expect(crc32UpdateTables(0xffffffff, view, 0, len) ^ 0xffffffff).toBe(zlibCrc32(view) | 0);
      expect(crc32UpdateTables(0x12345678, backing, start, len)).toBe(crc32UpdateBytewise(0x12345678, backing, start, len));
      expect(crc32UpdateZlib(0x12345678, backing, start, len)).toBe(crc32UpdateBytewise(0x12345678, backing, start, len));
    }
  });

  it('crc32Update gives the same register on both sides of each hand-over length', () => {
    const d = pattern(3 * ZLIB_MIN, 9);
    for (const len of [NATIVE_MIN - 1, NATIVE_MIN, ZLIB_MIN - 1, ZLIB_MIN, 2 * ZLIB_MIN + 7]) {
      for (const start of STARTS) expect(crc32Update(start, d, 5, len)).toBe(crc32UpdateBytewise(start, d, 5, len));
    }
  });

  it('composes across the hand-over: a short piece then a long one equals one update', () => {
    const d = pattern(4112, 13);
    const whole = crc32Update(0xdebb20e3, d, 0, d.length);
    const pieces = crc32Update(crc32Update(0xdebb20e3, d, 0, 48), d, 48, d.length - 48);
    expect(pieces).toBe(whole);
    expect(crc32(d)).toBe(zlibCrc32(d));
  });
});
