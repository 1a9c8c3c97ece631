import { describe, expect, it } from 'vitest';
import {
  PERFTEST_KEYS_SIZE,
  PerftestMessageError,
  decodeKeys,
  decodeMtu,
  decodeReport,
  decodeU32,
  decodeVersion,
  encodeKeys,
  encodeMtu,
  encodeReport,
  encodeU32,
  encodeVersion,
} from './perftest-message.js';

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

function ascii(text: string, size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

// As ib_write_bw 4.5-0.17 (version 6.06) wrote it on the socket (strace, rxe in a guest).
const STOCK_KEYS = '0000:0001:000012:66c2a8:000003f9:000055fe9a022000:00:00:00:00:00:00:00:00:00:00:ff:ff:0a:f0:3c:02:00000000:';

describe('the perftest 4.5-0.17 ethernet exchange', () => {
  it('version is "6.06" NUL-padded to 16 bytes', () => {
    expect(hex(encodeVersion())).toBe('362e3036000000000000000000000000');
    expect(decodeVersion(encodeVersion())).toEqual({ text: '6.06', value: 6.06 });
  });

  it('cycle buffer and cache line sizes are big-endian u32', () => {
    expect(hex(encodeU32(4096))).toBe('00001000');
    expect(decodeU32(new Uint8Array([0, 0, 0, 0x40]))).toBe(64);
  });

  it('MTU is the enum as one digit and a NUL', () => {
    expect(hex(encodeMtu(3))).toBe('3300');
    expect(decodeMtu(new Uint8Array([0x35, 0]))).toBe(5);
    expect(() => decodeMtu(new Uint8Array([0x39, 0]))).toThrow(PerftestMessageError);
  });

  it('keys message decodes what the stock tool sent and encodes byte for byte the same', () => {
    const bytes = ascii(STOCK_KEYS, PERFTEST_KEYS_SIZE);
    const k = decodeKeys(bytes);
    expect(k).toMatchObject({ lid: 0, outReads: 1, qpn: 0x12, psn: 0x66c2a8, rkey: 0x3f9, vaddr: 0x55fe9a022000n, srqn: 0 });
    expect(Array.from(k.gid)).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0xf0, 0x3c, 2]);
    expect(encodeKeys(k)).toEqual(bytes);
  });

  it.each([
    ['a short message', new Uint8Array(107)],
    ['garbage', new Uint8Array(108).fill(0x41)],
    ['fifteen GID bytes', ascii(STOCK_KEYS.replace('00:00:00:00:00:00:00:00:00:00:ff:ff', '00:00:00:00:00:00:00:00:00:ff:ff'), 108)],
    ['QPN 0', ascii(STOCK_KEYS.replace(':000012:', ':000000:'), 108)],
  ])('keys message refuses %s', (_what, bytes) => {
    expect(() => decodeKeys(bytes)).toThrow(PerftestMessageError);
  });

  it('report is five big-endian 8-byte fields: size, iterations, then IEEE doubles', () => {
    // The stock client's report of a 4096-byte, 200-iteration run (its peak BW field as sent).
    const peak = Buffer.from('401584cc1483f1ad', 'hex').readDoubleBE(0);
    const r = { size: 4096n, iterations: 200n, bwPeak: peak, bwAvg: 4.91, msgRate: 0.001257 };
    const fields = encodeReport(r);
    expect(fields.map(hex).slice(0, 3)).toEqual(['0000000000001000', '00000000000000c8', '401584cc1483f1ad']);
    expect(decodeReport(fields)).toEqual(r);
    expect(() => decodeReport(fields.slice(0, 4))).toThrow(PerftestMessageError);
  });
});
