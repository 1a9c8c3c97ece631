import { describe, expect, it } from 'vitest';
import {
  AethCodec,
  AtomicAckEthCodec,
  AtomicEthCodec,
  BthCodec,
  DethCodec,
  FethCodec,
  IethCodec,
  ImmDtCodec,
  RethCodec,
  Syndrome,
  newAeth,
  newAtomicAckEth,
  newAtomicEth,
  newBth,
  newDeth,
  newFeth,
  newIeth,
  newImmDt,
  newReth,
  syndromeKind,
  syndromeValue,
} from './headers.js';
import { headersLength } from './frame.js';
import { checkIcrc } from './icrc.js';
import { Hdr, OPCODES, Opcode, PayloadRule, SUPPORTED_OPCODES, Transport, opcodeName } from './opcodes.js';
import { type DecodeStatus, MAX_MTU, RocePacket, decodePacket, encodePacket, packetLength, padFor } from './packet.js';
import { FLOW_V4, allowedPayload, pattern, samplePacket } from './test-support.js';

const toHex = (b: Uint8Array): string => Buffer.from(b).toString('hex');
const hex = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));

function encode(p: RocePacket, payload: Uint8Array | null = pattern(p.payloadLength, p.bth.psn)): Uint8Array {
  const b = new Uint8Array(packetLength(p.bth.opcode, p.payloadLength));
  expect(encodePacket(b, 0, p, payload, FLOW_V4)).toBe(b.length);
  return b;
}

function decode(b: Uint8Array, mtu = MAX_MTU): { st: DecodeStatus; p: RocePacket } {
  const p = new RocePacket();
  return { st: decodePacket(b, p, 0, b.length, mtu), p };
}

/** Everything a decoder fills, as plain data (for equality checks). */
function snapshot(p: RocePacket): unknown {
  return JSON.parse(
    JSON.stringify(
      {
        info: p.info?.name ?? null,
        headers: p.headers,
        bth: p.bth,
        reth: p.reth,
        aeth: p.aeth,
        atomicEth: p.atomicEth,
        atomicAckEth: p.atomicAckEth,
        immDt: p.immDt,
        ieth: p.ieth,
        deth: p.deth,
        feth: p.feth,
        offset: p.offset,
        length: p.length,
        payloadOffset: p.payloadOffset,
        payloadLength: p.payloadLength,
        icrc: p.icrc,
        buffer: toHex(p.buffer),
      },
      (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v),
    ),
  );
}

/** The fields of `p` its opcode actually carries. */
function carried(p: RocePacket): Record<string, unknown> {
  const h = p.headers;
  const { padCount: _pad, tver: _tver, ...bth } = p.bth;
  return {
    bth,
    reth: h & Hdr.RETH ? { ...p.reth } : null,
    aeth: h & Hdr.AETH ? { ...p.aeth } : null,
    atomicEth: h & Hdr.ATOMIC_ETH ? { ...p.atomicEth } : null,
    atomicAckEth: h & Hdr.ATOMIC_ACK_ETH ? { ...p.atomicAckEth } : null,
    immDt: h & Hdr.IMMDT ? { ...p.immDt } : null,
    ieth: h & Hdr.IETH ? { ...p.ieth } : null,
    deth: h & Hdr.DETH ? { ...p.deth } : null,
    feth: h & Hdr.FETH ? { ...p.feth } : null,
    payloadLength: p.payloadLength,
  };
}

describe('header codecs', () => {
  it('BTH: lays out the bytes as the reference table says and reads them back', () => {
    const v = { ...newBth(), opcode: 0x0b, se: true, migReq: true, padCount: 2, tver: 0, pkey: 0xfffe, fecn: true, becn: false, destQp: 0x123456, ackReq: true, psn: 0xfedcba };
    const b = new Uint8Array(12);
    BthCodec.encode(b, 0, v);
    expect(toHex(b)).toBe('0be0fffe80123456' + '80fedcba');
    const out = newBth();
    expect(BthCodec.decode(b, 0, out)).toBe(true);
    expect(out).toEqual(v);
    // Reserved bits are ignored on receive; TVer is reported as received.
    const r = hex('04 3f ffff 7f 000001 7f 000002');
    expect(BthCodec.decode(r, 0, out)).toBe(true);
    expect(out).toMatchObject({ opcode: 4, se: false, migReq: false, padCount: 3, tver: 0xf, fecn: false, becn: true, destQp: 1, ackReq: false, psn: 2 });
  });

  it('RETH, AETH, AtomicETH, AtomicAckETH, ImmDt, IETH, DETH, FETH: big-endian layouts at the reference offsets', () => {
    const cases: [string, { size: number; encode(b: Uint8Array, o: number, v: never): void; decode(b: Uint8Array, o: number, out: never): boolean }, () => object, object, string][] = [
      ['RETH', RethCodec, newReth, { va: 0xfedcba9876543210n, rkey: 0x89abcdef, dmaLength: 0x80000000 }, 'fedcba9876543210 89abcdef 80000000'],
      ['AETH', AethCodec, newAeth, { syndrome: 0x61, msn: 0xabcdef }, '61abcdef'],
      ['AtomicETH', AtomicEthCodec, newAtomicEth, { va: 0x1000n, rkey: 0xffffffff, swapAdd: 0xffffffffffffffffn, compare: 0x0102030405060708n }, '0000000000001000 ffffffff ffffffffffffffff 0102030405060708'],
      ['AtomicAckETH', AtomicAckEthCodec, newAtomicAckEth, { origRemoteData: 0x8000000000000001n }, '8000000000000001'],
      ['ImmDt', ImmDtCodec, newImmDt, { imm: 0xc0ffee01 }, 'c0ffee01'],
      ['IETH', IethCodec, newIeth, { rkey: 0x00abcdef }, '00abcdef'],
      ['DETH', DethCodec, newDeth, { qkey: 0x80010000, srcQp: 0xfffffe }, '80010000 00 fffffe'],
      ['FETH', FethCodec, newFeth, { placementType: 0xa, selectivityLevel: 3 }, '0000003a'],
    ];
    for (const [name, codec, fresh, value, bytes] of cases) {
      const b = new Uint8Array(codec.size + 2).fill(0xcc);
      codec.encode(b, 1, value as never);
      expect(toHex(b), name).toBe('cc' + bytes.replace(/\s+/g, '') + 'cc');
      const out = fresh();
      expect(codec.decode(b, 1, out as never), name).toBe(true);
      expect(out, name).toEqual(value);
    }
  });

  it('decode refuses a header that does not fit, without touching the output', () => {
    const all = [
      [BthCodec, newBth],
      [RethCodec, newReth],
      [AethCodec, newAeth],
      [AtomicEthCodec, newAtomicEth],
      [AtomicAckEthCodec, newAtomicAckEth],
      [ImmDtCodec, newImmDt],
      [IethCodec, newIeth],
      [DethCodec, newDeth],
      [FethCodec, newFeth],
    ] as const;
    for (const [codec, fresh] of all) {
      const b = new Uint8Array(codec.size).fill(0xff);
      const out = fresh();
      const before = JSON.stringify(out, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
      expect(codec.decode(b, 1, out as never)).toBe(false);
      expect(codec.decode(b.subarray(1), 0, out as never)).toBe(false);
      expect(codec.decode(b, -1, out as never)).toBe(false);
      expect(JSON.stringify(out, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))).toBe(before);
    }
  });

  it('encode throws on a field too wide for the wire or a buffer too small', () => {
    const b = new Uint8Array(64);
    expect(() => BthCodec.encode(b, 0, { ...newBth(), psn: 0x1000000 })).toThrow(RangeError);
    expect(() => BthCodec.encode(b, 0, { ...newBth(), destQp: -1 })).toThrow(RangeError);
    expect(() => BthCodec.encode(b, 0, { ...newBth(), pkey: 0x10000 })).toThrow(RangeError);
    expect(() => BthCodec.encode(b, 0, { ...newBth(), padCount: 4 })).toThrow(RangeError);
    expect(() => BthCodec.encode(b, 60, newBth())).toThrow(RangeError);
    expect(() => RethCodec.encode(b, 0, { ...newReth(), va: 1n << 64n })).toThrow(RangeError);
    expect(() => RethCodec.encode(b, 0, { ...newReth(), dmaLength: 2 ** 32 })).toThrow(RangeError);
    expect(() => AethCodec.encode(b, 0, { syndrome: 256, msn: 0 })).toThrow(RangeError);
    expect(() => AtomicEthCodec.encode(b, 0, { ...newAtomicEth(), compare: -1n })).toThrow(RangeError);
    expect(() => DethCodec.encode(b, 0, { qkey: 1.5, srcQp: 0 })).toThrow(RangeError);
    expect(() => FethCodec.encode(b, 0, { placementType: 16, selectivityLevel: 0 })).toThrow(RangeError);
    expect(() => ImmDtCodec.encode(b, 63, { imm: 0 })).toThrow(RangeError);
  });

  it('AETH syndromes split into kind and value as the reference describes', () => {
    expect(syndromeKind(Syndrome.ACK_UNLIMITED)).toBe('ack');
    expect(syndromeValue(Syndrome.ACK_UNLIMITED)).toBe(31);
    expect(syndromeKind(Syndrome.RNR_NAK | 12)).toBe('rnr_nak');
    expect(syndromeValue(Syndrome.RNR_NAK | 12)).toBe(12);
    expect(syndromeKind(Syndrome.NAK_PSN_SEQ_ERROR)).toBe('nak');
    expect(syndromeValue(Syndrome.NAK_REMOTE_OPERATIONAL_ERROR)).toBe(3);
    expect(syndromeKind(0x40)).toBe('reserved');
    expect(syndromeKind(0x80 | 0x1f)).toBe('ack'); // bit 7 is reserved
  });
});

describe('opcode table', () => {
  it('puts the extension headers where the reference table says', () => {
    const at = (op: number) => OPCODES[op]!;
    expect(at(Opcode.RC_SEND_ONLY).headerLength).toBe(12);
    expect(at(Opcode.RC_SEND_LAST_WITH_IMMEDIATE).immAt).toBe(12);
    expect(at(Opcode.UC_RDMA_WRITE_LAST_WITH_IMMEDIATE).immAt).toBe(12);
    expect(at(Opcode.RC_RDMA_WRITE_FIRST).rethAt).toBe(12);
    expect(at(Opcode.UC_RDMA_WRITE_ONLY).rethAt).toBe(12);
    expect([at(Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE).rethAt, at(Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE).immAt]).toEqual([12, 28]);
    expect(at(Opcode.RC_RDMA_READ_REQUEST)).toMatchObject({ rethAt: 12, headerLength: 28, payload: PayloadRule.NONE });
    for (const op of [Opcode.RC_RDMA_READ_RESPONSE_FIRST, Opcode.RC_RDMA_READ_RESPONSE_LAST, Opcode.RC_RDMA_READ_RESPONSE_ONLY, Opcode.RC_ACKNOWLEDGE]) expect(at(op).aethAt).toBe(12);
    expect(at(Opcode.RC_RDMA_READ_RESPONSE_MIDDLE).headers).toBe(0);
    expect([at(Opcode.RC_ATOMIC_ACKNOWLEDGE).aethAt, at(Opcode.RC_ATOMIC_ACKNOWLEDGE).atomicAckEthAt, at(Opcode.RC_ATOMIC_ACKNOWLEDGE).headerLength]).toEqual([12, 16, 24]);
    expect(at(Opcode.RC_COMPARE_SWAP)).toMatchObject({ atomicEthAt: 12, headerLength: 40 });
    expect(at(Opcode.RC_FETCH_ADD)).toMatchObject({ atomicEthAt: 12, headerLength: 40 });
    expect(at(Opcode.RC_SEND_ONLY_WITH_INVALIDATE).iethAt).toBe(12);
    expect(at(Opcode.RC_SEND_LAST_WITH_INVALIDATE).iethAt).toBe(12);
    expect([at(Opcode.UD_SEND_ONLY).dethAt, at(Opcode.UD_SEND_ONLY).headerLength]).toEqual([12, 20]);
    expect([at(Opcode.UD_SEND_ONLY_WITH_IMMEDIATE).dethAt, at(Opcode.UD_SEND_ONLY_WITH_IMMEDIATE).immAt]).toEqual([12, 20]);
    // rxe_opcode.c: FLUSH is FETH@12 + RETH@16; ATOMIC_WRITE is RETH@12 + an 8-byte payload.
    expect(at(Opcode.RC_FLUSH)).toMatchObject({ fethAt: 12, rethAt: 16, headerLength: 32, payload: PayloadRule.NONE });
    expect(at(Opcode.RC_ATOMIC_WRITE)).toMatchObject({ rethAt: 12, headerLength: 28, payload: PayloadRule.EIGHT });
  });

  it('covers exactly RC 0x00–0x14, 0x16, 0x17, 0x1C, 0x1D, UC 0x20–0x2B and UD 0x64, 0x65', () => {
    const want = [...Array.from({ length: 0x15 }, (_, i) => i), 0x16, 0x17, 0x1c, 0x1d, ...Array.from({ length: 12 }, (_, i) => 0x20 + i), 0x64, 0x65];
    expect(SUPPORTED_OPCODES).toEqual(want);
    for (const op of SUPPORTED_OPCODES) {
      expect(OPCODES[op]!.transport).toBe(op & 0xe0);
      expect(opcodeName(op)).toMatch(/^(RC|UC|UD)_/);
      expect(Opcode[opcodeName(op) as keyof typeof Opcode]).toBe(op);
    }
    expect(OPCODES[Opcode.UD_SEND_ONLY]!.transport).toBe(Transport.UD);
    expect(opcodeName(0x15)).toBe('0x15');
  });
});

describe('packets: sizes', () => {
  it('at path MTU 1024 the largest IPv4 frame is RDMA WRITE_ONLY_WITH_IMMEDIATE, 1102 bytes (WRITE_FIRST/ONLY are 1098)', () => {
    const frame = (op: number) => headersLength(4) + packetLength(op, allowedPayload(op, 1024));
    expect(frame(Opcode.RC_RDMA_WRITE_FIRST)).toBe(1098);
    expect(frame(Opcode.RC_RDMA_WRITE_ONLY)).toBe(1098);
    const largest = Math.max(...SUPPORTED_OPCODES.map(frame));
    expect(largest).toBe(1102);
    expect(SUPPORTED_OPCODES.filter((op) => frame(op) === largest).map(opcodeName)).toEqual(['RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE', 'UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE']);
    // 4096-byte payloads fit a 9000-byte netdev MTU; IPv6 adds 20 bytes.
    expect(headersLength(6) + packetLength(Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE, 4096) - 14).toBeLessThanOrEqual(9000);
  });
});

describe('packets: round trips', () => {
  it('every opcode encodes and decodes to the same fields, at payload sizes 0…5, 255, 1024 and 4096', () => {
    let n = 0;
    for (const op of SUPPORTED_OPCODES) {
      for (const want of [0, 1, 2, 3, 4, 5, 255, 1024, 4096]) {
        const p = samplePacket(op, want, op * 31 + want);
        const payload = pattern(p.payloadLength, want + 1);
        const b = encode(p, payload);
        const info = OPCODES[op]!;
        expect(b.length).toBe(info.headerLength + p.payloadLength + padFor(p.payloadLength) + 4);
        const { st, p: q } = decode(b);
        expect(st, `${info.name} with ${p.payloadLength} bytes`).toBe('ok');
        expect(carried(q)).toEqual(carried(p));
        expect(q.info).toBe(info);
        expect(q.bth.padCount).toBe(-p.payloadLength & 3);
        expect(q.bth.tver).toBe(0);
        expect(toHex(q.payload())).toBe(toHex(payload));
        expect([...b.subarray(q.payloadOffset + q.payloadLength, b.length - 4)].every((x) => x === 0)).toBe(true);
        expect(checkIcrc(FLOW_V4, b, 0, b.length)).toBe(true);
        // Re-encoding what was decoded gives the same bytes.
        const again = new Uint8Array(b.length);
        encodePacket(again, 0, q, q.payload(), FLOW_V4);
        expect(toHex(again)).toBe(toHex(b));
        n++;
      }
    }
    expect(n).toBe(SUPPORTED_OPCODES.length * 9);
  });

  it('decodes in place at an offset, and reuses one packet object without stale headers', () => {
    const p = new RocePacket();
    const write = samplePacket(Opcode.RC_RDMA_WRITE_FIRST, 64, 1);
    const ack = samplePacket(Opcode.RC_ACKNOWLEDGE, 0, 2);
    const big = new Uint8Array(4096);
    const n1 = encodePacket(big, 7, write, pattern(64), FLOW_V4);
    const n2 = encodePacket(big, 7 + n1, ack, null, FLOW_V4);
    expect(decodePacket(big, p, 7, n1)).toBe('ok');
    expect(p.headers).toBe(Hdr.RETH);
    expect(p.payloadOffset).toBe(7 + 28);
    expect(p.reth.va).toBe(write.reth.va);
    expect(decodePacket(big, p, 7 + n1, n2)).toBe('ok');
    expect(p.headers).toBe(Hdr.AETH);
    expect(p.opcode).toBe(Opcode.RC_ACKNOWLEDGE);
    expect(p.payloadLength).toBe(0);
    expect(p.aeth).toEqual(ack.aeth);
    expect(p.buffer).toBe(big);
  });

  it('takes the payload in place when none is passed (gathered straight into the packet buffer)', () => {
    const p = samplePacket(Opcode.UD_SEND_ONLY_WITH_IMMEDIATE, 13, 5);
    const data = pattern(13, 9);
    const b = new Uint8Array(packetLength(p.bth.opcode, 13)).fill(0xaa);
    b.set(data, OPCODES[p.bth.opcode]!.headerLength);
    encodePacket(b, 0, p, null, FLOW_V4);
    expect(toHex(b)).toBe(toHex(encode(p, data)));
  });

  it('computes the pad count and sends TVer 0 whatever the packet object says', () => {
    const p = samplePacket(Opcode.RC_SEND_ONLY, 5, 1);
    p.bth.padCount = 0;
    p.bth.tver = 7;
    const { st, p: q } = decode(encode(p));
    expect(st).toBe('ok');
    expect(q.bth.padCount).toBe(3);
    expect(q.bth.tver).toBe(0);
    expect(p.bth.tver).toBe(7); // the input is not modified
  });

  it('leaves the ICRC zero without a path, for sealing later', () => {
    const p = samplePacket(Opcode.RC_SEND_ONLY, 4, 1);
    const b = new Uint8Array(packetLength(p.bth.opcode, 4)).fill(0xff);
    encodePacket(b, 0, p, pattern(4), null);
    expect(toHex(b.subarray(b.length - 4))).toBe('00000000');
  });

  it('encode refuses what the wire cannot carry', () => {
    const b = new Uint8Array(8192);
    const bad = (p: RocePacket, payload: Uint8Array | null = null, buf = b) => () => encodePacket(buf, 0, p, payload, null);
    const p = new RocePacket();
    p.bth.opcode = 0x15;
    expect(bad(p)).toThrow(/not an RC\/UC\/UD opcode/);
    p.bth.opcode = 0x104;
    expect(bad(p)).toThrow(RangeError);
    expect(() => new RocePacket().setOpcode(0x40)).toThrow(RangeError);
    const ack = samplePacket(Opcode.RC_ACKNOWLEDGE, 0, 1);
    ack.payloadLength = 4;
    expect(bad(ack)).toThrow(/carries no payload/);
    const aw = samplePacket(Opcode.RC_ATOMIC_WRITE, 8, 1);
    aw.payloadLength = 4;
    expect(bad(aw)).toThrow(/exactly 8/);
    const big = samplePacket(Opcode.RC_SEND_ONLY, MAX_MTU + 1, 1);
    expect(bad(big)).toThrow(/0…4096/);
    const small = samplePacket(Opcode.RC_SEND_ONLY, 100, 1);
    expect(bad(small, new Uint8Array(99))).toThrow(/holds 99 bytes/);
    expect(bad(small, null, new Uint8Array(100))).toThrow(/does not fit/);
    const psn = samplePacket(Opcode.RC_SEND_ONLY, 0, 1);
    psn.bth.psn = 1 << 24;
    expect(bad(psn)).toThrow(/PSN/);
  });
});

describe('packets: malformed input is refused with its reason', () => {
  const cut = (b: Uint8Array, n: number) => b.slice(0, n);

  it('truncated at every header boundary: short of the BTH, of the extension headers, of the ICRC', () => {
    for (const op of SUPPORTED_OPCODES) {
      const p = samplePacket(op, 0, op);
      const b = encode(p);
      const hl = OPCODES[op]!.headerLength;
      const boundaries = [0, 1, 11, 12, ...[16, 20, 24, 28, 32, 40].filter((x) => x < hl), hl - 1, hl, hl + 1, hl + 3];
      for (const n of boundaries) {
        const want = n < 12 ? 'truncated_bth' : n < hl ? 'truncated_header' : 'truncated_icrc';
        expect(decode(cut(b, n)).st, `${opcodeName(op)} cut to ${n}`).toBe(want);
      }
      expect(decode(b).st).toBe('ok');
    }
  });

  it('truncated anywhere: never throws, and whatever still parses fails its ICRC', () => {
    for (const op of SUPPORTED_OPCODES) {
      for (const len of [0, 3, 8, 9]) {
        const p = samplePacket(op, allowedPayload(op, len), len);
        const b = encode(p);
        for (let n = 0; n < b.length; n++) {
          const t = cut(b, n);
          const { st } = decode(t);
          if (st === 'ok') expect(checkIcrc(FLOW_V4, t, 0, t.length), `${opcodeName(op)} cut to ${n}`).toBe(false);
        }
      }
    }
  });

  it('bad TVer (1–15) is refused before anything else is looked at', () => {
    const b = encode(samplePacket(Opcode.RC_SEND_ONLY, 5, 1));
    for (let t = 1; t < 16; t++) {
      const x = b.slice();
      x[1] = (x[1]! & 0xf0) | t;
      expect(decode(x).st).toBe('bad_tver');
    }
  });

  it('reserved and unsupported opcodes are refused: 0x15, 0x18–0x1B, 0x1E–0x1F, UC 0x2C–0x3F, RD, UD 0x60–0x63/0x66+, CNP, XRC, vendor', () => {
    const supported = new Set(SUPPORTED_OPCODES);
    const b = encode(samplePacket(Opcode.RC_SEND_ONLY, 8, 1));
    let refused = 0;
    for (let op = 0; op < 256; op++) {
      if (supported.has(op)) continue;
      const x = b.slice();
      x[0] = op;
      expect(decode(x).st, opcodeName(op)).toBe('bad_opcode');
      refused++;
    }
    expect(refused).toBe(256 - SUPPORTED_OPCODES.length);
    expect(SUPPORTED_OPCODES.length).toBe(39);
  });

  it('pad count larger than the bytes after the headers, or on an opcode without payload, is a bad pad', () => {
    const empty = encode(samplePacket(Opcode.RC_SEND_ONLY, 0, 1));
    for (const pad of [1, 2, 3]) {
      const x = empty.slice();
      x[1] = (x[1]! & 0xcf) | (pad << 4);
      expect(decode(x).st).toBe('bad_pad');
    }
    for (const op of [Opcode.RC_ACKNOWLEDGE, Opcode.RC_RDMA_READ_REQUEST, Opcode.RC_COMPARE_SWAP, Opcode.RC_ATOMIC_ACKNOWLEDGE, Opcode.RC_FLUSH]) {
      const x = encode(samplePacket(op, 0, 1));
      x[1] = (x[1]! & 0xcf) | (1 << 4);
      expect(decode(x).st, opcodeName(op)).toBe('bad_pad');
    }
    // A pad count that disagrees with the payload length is not detectable structurally,
    // only by the payload coming out a different length; the ICRC still covers it.
    const five = encode(samplePacket(Opcode.RC_SEND_ONLY, 5, 1));
    five[1] = (five[1]! & 0xcf) | (1 << 4);
    const r = decode(five);
    expect(r.st).toBe('ok');
    expect(r.p.payloadLength).toBe(7);
    expect(checkIcrc(FLOW_V4, five, 0, five.length)).toBe(false);
  });

  it('payload + pad that is not a multiple of four is misaligned', () => {
    const b = encode(samplePacket(Opcode.RC_SEND_ONLY, 8, 1));
    for (const extra of [1, 2, 3]) {
      const x = new Uint8Array(b.length + extra);
      x.set(b);
      expect(decode(x).st).toBe('misaligned_length');
    }
    const ack = encode(samplePacket(Opcode.RC_ACKNOWLEDGE, 0, 1));
    expect(decode(Uint8Array.from([...ack, 0])).st).toBe('misaligned_length');
  });

  it('payload on an opcode that carries none is refused', () => {
    for (const op of SUPPORTED_OPCODES.filter((o) => OPCODES[o]!.payload === PayloadRule.NONE)) {
      const b = encode(samplePacket(op, 0, 1));
      const x = new Uint8Array(b.length + 4);
      x.set(b);
      expect(decode(x).st, opcodeName(op)).toBe('unexpected_payload');
    }
  });

  it('ATOMIC_WRITE with anything but 8 bytes of payload is refused', () => {
    const b = encode(samplePacket(Opcode.RC_ATOMIC_WRITE, 8, 1));
    expect(decode(b).st).toBe('ok');
    expect(decode(Uint8Array.from([...b.subarray(0, 28), 0, 0, 0, 0, 0, 0, 0, 0])).st).toBe('bad_payload_length');
    expect(decode(Uint8Array.from([...b.subarray(0, 36), 0, 0, 0, 0, ...b.subarray(36)])).st).toBe('bad_payload_length');
  });

  it('payload longer than the MTU is refused; exactly the MTU passes', () => {
    for (const mtu of [256, 512, 1024, 2048]) {
      const ok = encode(samplePacket(Opcode.RC_RDMA_WRITE_MIDDLE, mtu, 1));
      expect(decode(ok, mtu).st).toBe('ok');
      const over = encode(samplePacket(Opcode.RC_RDMA_WRITE_MIDDLE, mtu + 1, 1));
      expect(decode(over, mtu).st, `${mtu}`).toBe('payload_exceeds_mtu');
      expect(decode(encode(samplePacket(Opcode.UD_SEND_ONLY, mtu + 3, 1)), mtu).st).toBe('payload_exceeds_mtu');
    }
    expect(decode(encode(samplePacket(Opcode.RC_RDMA_WRITE_MIDDLE, 4096, 1))).st).toBe('ok');
    // Beyond 4096 nothing is valid: the default limit is the largest IB MTU.
    const huge = new Uint8Array(12 + 4100 + 4);
    huge.set(encode(samplePacket(Opcode.RC_SEND_MIDDLE, 0, 1)).subarray(0, 12));
    expect(decode(huge).st).toBe('payload_exceeds_mtu');
  });

  it('an offset/length outside the buffer is a bad range, not an exception', () => {
    const b = encode(samplePacket(Opcode.RC_SEND_ONLY, 8, 1));
    const p = new RocePacket();
    expect(decodePacket(b, p, -1, 10)).toBe('bad_range');
    expect(decodePacket(b, p, 0, b.length + 1)).toBe('bad_range');
    expect(decodePacket(b, p, 4, b.length)).toBe('bad_range');
    expect(decodePacket(b, p, 0.5, 12)).toBe('bad_range');
    expect(decodePacket(b, p, 0, Number.NaN)).toBe('bad_range');
  });

  it('a refused packet leaves the output object exactly as it was', () => {
    const p = new RocePacket();
    const good = encode(samplePacket(Opcode.RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE, 9, 3));
    expect(decodePacket(good, p)).toBe('ok');
    const before = snapshot(p);
    const bads: Uint8Array[] = [good.slice(0, 11), good.slice(0, 30), good.slice(0, 33), Uint8Array.from([0x15, ...good.subarray(1)]), Uint8Array.from([good[0]!, 0x01, ...good.subarray(2)]), Uint8Array.from([...good, 0])];
    for (const x of bads) {
      expect(decodePacket(x, p)).not.toBe('ok');
      expect(snapshot(p)).toEqual(before);
    }
  });

  it('fuzz: random bytes and mutated packets never throw, and what parses is self-consistent', () => {
    let seed = 12345;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const samples = SUPPORTED_OPCODES.map((op) => encode(samplePacket(op, allowedPayload(op, 13), op)));
    const p = new RocePacket();
    const counts: Record<string, number> = {};
    for (let i = 0; i < 30_000; i++) {
      let b: Uint8Array;
      if (i % 3 === 0) {
        b = pattern(rnd(80), i);
      } else {
        b = samples[rnd(samples.length)]!.slice();
        for (let k = rnd(4); k >= 0; k--) b[rnd(b.length)] = rnd(256);
        if (rnd(4) === 0) b = b.slice(0, rnd(b.length + 1));
      }
      const st = decodePacket(b, p, 0, b.length, rnd(2) ? MAX_MTU : 4);
      counts[st] = (counts[st] ?? 0) + 1;
      if (st === 'ok') {
        expect(p.payloadOffset + p.payloadLength + p.bth.padCount + 4).toBe(b.length);
        expect(p.payloadOffset).toBe(p.info!.headerLength);
        expect(p.bth.tver).toBe(0);
      }
    }
    expect(counts.ok).toBeGreaterThan(200);
    expect(Object.keys(counts).length).toBeGreaterThan(6);
  });
});
