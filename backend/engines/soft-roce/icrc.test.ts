import { crc32 as zlibCrc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { crc32, crc32Update, crc32UpdateBytewise } from './crc32.js';
import { ETH_HEADER, type RoceFlow, headersLength, writeFrame } from './frame.js';
import { ICRC_SEED, checkIcrc, icrc, icrcOfDatagram, readIcrc, sealIcrc, writeIcrc } from './icrc.js';
import { Opcode, SUPPORTED_OPCODES } from './opcodes.js';
import { RocePacket, encodePacket } from './packet.js';
import { ETH, FLOW_V4, FLOW_V6, pattern, samplePacket } from './test-support.js';

const hex = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
const toHex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

/**
 * The masked ICRC input of a frame, built here byte by byte from the rule
 * in the reference (§5) — independently of icrc.ts — for zlib to hash.
 */
function maskedInput(frame: Uint8Array): Uint8Array {
  const ip = frame.slice(ETH_HEADER, frame.length - 4);
  const v4 = ip[0]! >>> 4 === 4;
  const ipLen = v4 ? 20 : 40;
  if (v4) {
    ip[1] = 0xff; // TOS
    ip[8] = 0xff; // TTL
    ip[10] = 0xff; // checksum
    ip[11] = 0xff;
  } else {
    ip[0] = 0x6f;
    ip[1] = 0xff;
    ip[2] = 0xff;
    ip[3] = 0xff;
    ip[7] = 0xff; // hop limit
  }
  ip[ipLen + 6] = 0xff; // UDP checksum
  ip[ipLen + 7] = 0xff;
  ip[ipLen + 8 + 4] = 0xff; // BTH byte 4
  const out = new Uint8Array(8 + ip.length);
  out.fill(0xff, 0, 8);
  out.set(ip, 8);
  return out;
}

function frameOf(pkt: RocePacket, payload: Uint8Array | null, flow = FLOW_V4, opts = {}): { frame: Uint8Array; roce: Uint8Array } {
  const roce = new Uint8Array(8192);
  const n = encodePacket(roce, 0, pkt, payload, flow);
  const frame = new Uint8Array(headersLength(flow.family) + n);
  writeFrame(frame, 0, ETH, flow, roce, 0, n, opts);
  return { frame, roce: roce.slice(0, n) };
}

describe('crc32', () => {
  it('matches zlib for every length 0..300 at every start alignment 0..7', () => {
    const data = pattern(320, 7);
    for (let off = 0; off < 8; off++) {
      for (let len = 0; len + off <= 300; len++) {
        expect(crc32(data, off, len)).toBe(zlibCrc32(data.subarray(off, off + len)));
      }
    }
  });

  it('matches zlib on large buffers and on views with odd byteOffsets (the word path)', () => {
    const backing = pattern(70_000, 3);
    for (const [start, len] of [
      [0, 65_536],
      [1, 4096],
      [3, 4099],
      [5, 9000],
      [6, 64],
      [7, 65],
    ] as const) {
      const view = backing.subarray(start, start + len);
      expect(crc32(view)).toBe(zlibCrc32(view));
      expect(crc32Update(0x12345678, view, 0, len)).toBe(crc32UpdateBytewise(0x12345678, view, 0, len));
    }
  });

  it('composes: updating in pieces equals updating at once', () => {
    const d = pattern(5000, 11);
    const whole = crc32Update(0xffffffff, d, 0, d.length);
    let c = 0xffffffff;
    for (let o = 0; o < d.length; o += 333) c = crc32Update(c, d, o, Math.min(333, d.length - o));
    expect(c).toBe(whole);
  });

  it('starts from 0xDEBB20E3 after eight 0xFF bytes, the seed rxe uses for the masked LRH', () => {
    expect(crc32Update(0xffffffff, new Uint8Array(8).fill(0xff), 0, 8)).toBe(ICRC_SEED);
  });
});

describe('ICRC: the reference worked example (§5)', () => {
  const REF_INPUT = 'ffffffffffffffff 45ff0034 00004000 ff11ffff c0a80101 c0a80102 c00012b7 0020ffff 0430ffff ff000011 80000000 68656c6c6f000000';
  const REF_UDP_PAYLOAD = '0430ffff 00000011 80000000 68656c6c 6f000000 a3b8e0d6';

  function example(): RocePacket {
    const p = new RocePacket().setOpcode(Opcode.RC_SEND_ONLY);
    p.bth.destQp = 0x11;
    p.bth.ackReq = true;
    p.bth.psn = 0;
    p.bth.pkey = 0xffff;
    p.payloadLength = 5;
    return p;
  }

  it('its CRC input string hashes to 0xD6E0B8A3 under zlib', () => {
    expect(zlibCrc32(hex(REF_INPUT))).toBe(0xd6e0b8a3);
  });

  it('the masking rule applied to our encoded frame gives exactly its CRC input string', () => {
    const { frame } = frameOf(example(), Buffer.from('hello'));
    expect(toHex(maskedInput(frame))).toBe(REF_INPUT.replace(/\s+/g, ''));
  });

  it('our encoder produces its UDP payload byte for byte, ICRC 0xD6E0B8A3 sent as a3 b8 e0 d6', () => {
    const { frame, roce } = frameOf(example(), Buffer.from('hello'));
    expect(toHex(roce)).toBe(REF_UDP_PAYLOAD.replace(/\s+/g, ''));
    expect(readIcrc(roce, roce.length - 4)).toBe(0xd6e0b8a3);
    expect(icrc(FLOW_V4, roce, 0, roce.length - 4)).toBe(0xd6e0b8a3);
    expect(icrcOfDatagram(frame, ETH_HEADER, roce.length - 4)).toBe(0xd6e0b8a3);
    // IP total length 52, UDP length 32, as the example states.
    expect(frame[ETH_HEADER + 2]! * 256 + frame[ETH_HEADER + 3]!).toBe(52);
    expect(frame[ETH_HEADER + 24]! * 256 + frame[ETH_HEADER + 25]!).toBe(32);
  });
});

describe('ICRC', () => {
  it('equals zlib over the independently masked frame, for every opcode, IPv4 and IPv6', () => {
    for (const flow of [FLOW_V4, FLOW_V6]) {
      for (const op of SUPPORTED_OPCODES) {
        for (const len of [0, 1, 3, 4, 5, 300]) {
          const p = samplePacket(op, len, op + len);
          const { frame, roce } = frameOf(p, pattern(p.payloadLength, len), flow);
          const want = zlibCrc32(maskedInput(frame));
          expect(readIcrc(roce, roce.length - 4)).toBe(want);
          expect(icrcOfDatagram(frame, ETH_HEADER, roce.length - 4)).toBe(want);
        }
      }
    }
  });

  it('ignores the masked IPv4 fields: TOS, TTL, header checksum, UDP checksum, FECN/BECN and BTH reserved bits', () => {
    const { frame, roce } = frameOf(samplePacket(Opcode.RC_RDMA_WRITE_ONLY, 37, 2), pattern(37));
    const len = roce.length - 4;
    const base = icrcOfDatagram(frame, ETH_HEADER, len);
    const ip = ETH_HEADER;
    for (const at of [ip + 1, ip + 8, ip + 10, ip + 11, ip + 26, ip + 27, ip + 28 + 4]) {
      for (const v of [0x00, 0x5a, 0xff]) {
        const f = frame.slice();
        f[at] = v;
        expect(icrcOfDatagram(f, ETH_HEADER, len), `byte ${at - ip} of the IP datagram = ${v}`).toBe(base);
      }
    }
  });

  it('covers every other IPv4, UDP and transport byte (ID and flags included)', () => {
    const { frame, roce } = frameOf(samplePacket(Opcode.RC_SEND_ONLY_WITH_IMMEDIATE, 6, 3), pattern(6));
    const len = roce.length - 4;
    const base = icrcOfDatagram(frame, ETH_HEADER, len);
    const masked = new Set([1, 8, 10, 11, 26, 27, 32]);
    for (let i = 0; i < 20 + 8 + len; i++) {
      if (masked.has(i)) continue;
      const f = frame.slice();
      f[ETH_HEADER + i] = f[ETH_HEADER + i]! ^ 0x01;
      expect(icrcOfDatagram(f, ETH_HEADER, len), `IP datagram byte ${i}`).not.toBe(base);
    }
  });

  it('ignores the masked IPv6 fields: traffic class, flow label, hop limit', () => {
    const { frame, roce } = frameOf(samplePacket(Opcode.UD_SEND_ONLY, 9, 4), pattern(9), FLOW_V6);
    const len = roce.length - 4;
    const base = icrcOfDatagram(frame, ETH_HEADER, len);
    for (const at of [0, 1, 2, 3, 7]) {
      const f = frame.slice();
      // Byte 0: keep the version nibble, change the traffic class's high nibble.
      f[ETH_HEADER + at] = at === 0 ? (f[ETH_HEADER]! & 0xf0) | ((f[ETH_HEADER]! & 0x0f) ^ 0x0f) : f[ETH_HEADER + at]! ^ 0xff;
      expect(icrcOfDatagram(f, ETH_HEADER, len), `IPv6 byte ${at}`).toBe(base);
    }
    const f = frame.slice();
    f[ETH_HEADER + 4] = f[ETH_HEADER + 4]! ^ 0x01; // payload length is covered
    expect(icrcOfDatagram(f, ETH_HEADER, len)).not.toBe(base);
  });

  it('computed from the path equals computed from the datagram, and differs between paths', () => {
    for (const flow of [FLOW_V4, FLOW_V6]) {
      const { frame, roce } = frameOf(samplePacket(Opcode.RC_COMPARE_SWAP, 0, 5), null, flow);
      expect(icrc(flow, roce, 0, roce.length - 4)).toBe(icrcOfDatagram(frame, ETH_HEADER, roce.length - 4));
    }
    const roce = frameOf(samplePacket(Opcode.RC_ACKNOWLEDGE, 0, 1), null).roce;
    expect(icrc({ ...FLOW_V4, ipId: 1 }, roce, 0, roce.length - 4)).not.toBe(icrc(FLOW_V4, roce, 0, roce.length - 4));
    expect(icrc({ ...FLOW_V4, ipFlagsFragment: 0 }, roce, 0, roce.length - 4)).not.toBe(icrc(FLOW_V4, roce, 0, roce.length - 4));
    expect(icrc({ ...FLOW_V4, sport: 0xc001 }, roce, 0, roce.length - 4)).not.toBe(icrc(FLOW_V4, roce, 0, roce.length - 4));
    const otherClassAndTtl: RoceFlow = { ...FLOW_V4, trafficClass: 0xb8, hopLimit: 1 };
    expect(icrc(otherClassAndTtl, roce, 0, roce.length - 4)).toBe(icrc(FLOW_V4, roce, 0, roce.length - 4));
  });

  it('is stored little-endian and checkIcrc catches every single-bit error in the packet', () => {
    const b = new Uint8Array(4);
    writeIcrc(b, 0, 0xd6e0b8a3);
    expect([...b]).toEqual([0xa3, 0xb8, 0xe0, 0xd6]);
    const { roce } = frameOf(samplePacket(Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE, 7, 9), pattern(7));
    expect(checkIcrc(FLOW_V4, roce, 0, roce.length)).toBe(true);
    for (let bit = 0; bit < roce.length * 8; bit++) {
      const f = roce.slice();
      f[bit >>> 3] = f[bit >>> 3]! ^ (1 << (bit & 7));
      const bth4 = (bit >>> 3) === 4; // FECN, BECN and reserved are masked: flipping them must not matter
      expect(checkIcrc(FLOW_V4, f, 0, f.length), `bit ${bit}`).toBe(bth4);
    }
  });

  it('works in place at an offset inside a larger buffer', () => {
    const p = samplePacket(Opcode.UC_SEND_ONLY, 33, 1);
    const big = new Uint8Array(1000).fill(0xee);
    const n = encodePacket(big, 101, p, pattern(33), null);
    sealIcrc(FLOW_V6, big, 101, n);
    const alone = new Uint8Array(n);
    encodePacket(alone, 0, p, pattern(33), FLOW_V6);
    expect(toHex(big.subarray(101, 101 + n))).toBe(toHex(alone));
    expect(big[100]).toBe(0xee);
    expect(big[101 + n]).toBe(0xee);
  });

  it('refuses impossible ranges and address sizes instead of reading out of bounds', () => {
    const b = new Uint8Array(20);
    expect(() => icrc(FLOW_V4, b, 0, 11)).toThrow(RangeError);
    expect(() => icrc(FLOW_V4, b, 10, 12)).toThrow(RangeError);
    expect(() => icrc({ ...FLOW_V4, src: new Uint8Array(16) }, b, 0, 12)).toThrow(RangeError);
    expect(() => icrcOfDatagram(b, 0, 12)).toThrow(RangeError);
    expect(checkIcrc(FLOW_V4, b, 0, 15)).toBe(false);
    expect(checkIcrc(FLOW_V4, b, 8, 16)).toBe(false);
  });
});
