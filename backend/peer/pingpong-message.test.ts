import { describe, expect, it } from 'vitest';
import { PINGPONG_MESSAGE_SIZE, PingpongMessageError, decodePingpongDest, encodePingpongDest } from './pingpong-message.js';

const GID = new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 214, 3, 2]);

function ascii(text: string, size = PINGPONG_MESSAGE_SIZE): Uint8Array {
  const out = new Uint8Array(size);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

describe('the ibv_*_pingpong address message', () => {
  it('is the 52-byte "%04x:%06x:%06x:<32 hex GID>" string the tools write, NUL-padded', () => {
    const bytes = encodePingpongDest({ lid: 0, qpn: 0x12, psn: 0x148c84, gid: GID });
    expect(bytes.length).toBe(52);
    expect(bytes).toEqual(ascii('0000:000012:148c84:00000000000000000000ffff0ad60302'));
  });

  it('decodes what a stock tool sent, GID bytes in wire order', () => {
    const d = decodePingpongDest(ascii('0000:000011:8cbe30:00000000000000000000ffff0ad60302'));
    expect(d).toEqual({ lid: 0, qpn: 0x11, psn: 0x8cbe30, gid: GID });
  });

  it('round-trips the largest values', () => {
    const d = { lid: 0xffff, qpn: 0xffffff, psn: 0xffffff, gid: new Uint8Array(16).fill(0xab) };
    expect(decodePingpongDest(encodePingpongDest(d))).toEqual(d);
  });

  it.each([
    ['a short read', new Uint8Array(51)],
    ['no NUL', new Uint8Array(52).fill(0x30)],
    ['a missing field', ascii('0000:000011:00000000000000000000ffff0ad60302')],
    ['a short GID', ascii('0000:000011:8cbe30:00000000000000000000ffff0ad603')],
    ['QPN 0', ascii('0000:000000:8cbe30:00000000000000000000ffff0ad60302')],
    ['a PSN over 24 bits', ascii('0000:000011:1000000:00000000000000000000ffff0ad60302')],
    ['a control byte', ascii('0000:000011:8cbe30:0000000000000000\x01000ffff0ad60302')],
  ])('refuses %s with a reason', (_what, bytes) => {
    expect(() => decodePingpongDest(bytes)).toThrow(PingpongMessageError);
  });

  it('refuses to encode a QPN wider than 24 bits', () => {
    expect(() => encodePingpongDest({ lid: 0, qpn: 0x1000000, psn: 0, gid: GID })).toThrow(RangeError);
  });
});
