import { describe, expect, it } from 'vitest';
import { ETH_HEADER, FrameInfo, type FrameStatus, type RoceFlow, headersLength, ipv4HeaderChecksum, parseDatagram, parseFrame, writeFrame } from './frame.js';
import { checkIcrc, icrcOfDatagram, readIcrc } from './icrc.js';
import { Opcode } from './opcodes.js';
import { RocePacket, decodePacket, encodePacket, packetLength } from './packet.js';
import { ETH, FLOW_V4, FLOW_V6, pattern, samplePacket } from './test-support.js';

function build(flow: RoceFlow, payloadLen = 21, udpChecksum = false): { frame: Uint8Array; roceLen: number } {
  const p = samplePacket(Opcode.RC_SEND_ONLY, payloadLen, 3);
  const roce = new Uint8Array(packetLength(p.bth.opcode, payloadLen));
  encodePacket(roce, 0, p, pattern(payloadLen), flow);
  const frame = new Uint8Array(headersLength(flow.family) + roce.length);
  expect(writeFrame(frame, 0, ETH, flow, roce, 0, roce.length, { udpChecksum })).toBe(frame.length);
  return { frame, roceLen: roce.length };
}

/** RFC 1071 sum of 16-bit words, folded (independent of frame.ts). */
function onesSum(words: number[]): number {
  let s = words.reduce((a, b) => a + b, 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s;
}
const words = (b: Uint8Array): number[] => Array.from({ length: Math.ceil(b.length / 2) }, (_, i) => (b[2 * i]! << 8) | (b[2 * i + 1] ?? 0));

describe('frames', () => {
  it('IPv4: writes the header rxe sends (DF, given ID, TOS, TTL, proto 17, valid checksum, UDP checksum 0) and parses it back', () => {
    const { frame, roceLen } = build({ ...FLOW_V4, ipId: 0x1234, trafficClass: 0x60, hopLimit: 1 });
    const ip = frame.subarray(ETH_HEADER, ETH_HEADER + 20);
    expect(Buffer.from(frame.subarray(0, 14)).toString('hex')).toBe('020000000002' + '020000000001' + '0800');
    expect([ip[0], ip[1], ip[8], ip[9]]).toEqual([0x45, 0x60, 1, 17]);
    expect((ip[2]! << 8) | ip[3]!).toBe(20 + 8 + roceLen);
    expect((ip[4]! << 8) | ip[5]!).toBe(0x1234);
    expect((ip[6]! << 8) | ip[7]!).toBe(0x4000);
    expect(onesSum(words(ip))).toBe(0xffff);
    expect(ipv4HeaderChecksum(frame, ETH_HEADER)).toBe(0);
    const udp = frame.subarray(ETH_HEADER + 20, ETH_HEADER + 28);
    expect(Buffer.from(udp).toString('hex')).toBe('c00012b7' + (8 + roceLen).toString(16).padStart(4, '0') + '0000');

    const info = new FrameInfo();
    expect(parseFrame(frame, info)).toBe('ok');
    expect(info).toMatchObject({ family: 4, ipOffset: 14, udpOffset: 34, roceOffset: 42, roceLength: roceLen, sport: 0xc000, dport: 4791, ipId: 0x1234, ipFlagsFragment: 0x4000, trafficClass: 0x60, hopLimit: 1 });
    const path = info.path(frame);
    expect([...path.src]).toEqual([...FLOW_V4.src]);
    expect([...path.dst]).toEqual([...FLOW_V4.dst]);
    expect(checkIcrc(path, frame, info.roceOffset, info.roceLength)).toBe(true);
    expect(icrcOfDatagram(frame, info.ipOffset, info.roceLength - 4)).toBe(readIcrc(frame, frame.length - 4));
    expect(checkIcrc({ ...path, ipId: 0 }, frame, info.roceOffset, info.roceLength)).toBe(false); // the ID is covered
  });

  it('IPv6: writes version/traffic class/flow label, payload length, next header 17, hop limit, and parses it back', () => {
    const { frame, roceLen } = build(FLOW_V6);
    const ip = frame.subarray(ETH_HEADER, ETH_HEADER + 40);
    expect(Buffer.from(ip.subarray(0, 8)).toString('hex')).toBe('66812345' + (8 + roceLen).toString(16).padStart(4, '0') + '1101');
    const info = new FrameInfo();
    expect(parseFrame(frame, info)).toBe('ok');
    expect(info).toMatchObject({ family: 6, roceOffset: 62, roceLength: roceLen, trafficClass: 0x68, flowLabel: 0x12345, hopLimit: 1 });
    expect(checkIcrc(info.path(frame), frame, info.roceOffset, info.roceLength)).toBe(true);
    const p = new RocePacket();
    expect(decodePacket(frame, p, info.roceOffset, info.roceLength)).toBe('ok');
    expect(p.payloadLength).toBe(21);
  });

  it('fills in a correct UDP checksum on request (verified by an independent one\'s-complement sum)', () => {
    for (const flow of [FLOW_V4, FLOW_V6]) {
      for (const len of [0, 1, 21, 1000]) {
        const { frame } = build(flow, len, true);
        const ipLen = flow.family === 4 ? 20 : 40;
        const udp = frame.subarray(ETH_HEADER + ipLen);
        const pseudo = [...words(flow.src), ...words(flow.dst), 17, udp.length];
        expect(onesSum([...pseudo, ...words(udp)]), `IPv${flow.family} ${len}`).toBe(0xffff);
        expect((udp[6]! << 8) | udp[7]!).not.toBe(0);
      }
    }
  });

  it('ICRC computed from the path equals the one computed from the frame: what a UDP-socket sender and a capture agree on', () => {
    for (const flow of [FLOW_V4, FLOW_V6]) {
      const { frame } = build(flow, 77);
      const info = new FrameInfo();
      expect(parseFrame(frame, info)).toBe('ok');
      expect(icrcOfDatagram(frame, info.ipOffset, info.roceLength - 4)).toBe(readIcrc(frame, frame.length - 4));
    }
  });

  it('skips one 802.1Q tag, and parses a bare IP datagram', () => {
    const { frame } = build(FLOW_V4);
    const tagged = new Uint8Array(frame.length + 4);
    tagged.set(frame.subarray(0, 12));
    tagged.set([0x81, 0x00, 0x00, 0x05], 12);
    tagged.set(frame.subarray(12), 16);
    const info = new FrameInfo();
    expect(parseFrame(tagged, info)).toBe('ok');
    expect(info.ipOffset).toBe(18);
    expect(parseDatagram(frame, info, ETH_HEADER)).toBe('ok');
    expect(info.roceOffset).toBe(42);
  });

  it('accepts Ethernet padding after the datagram and trims it', () => {
    const { frame, roceLen } = build(FLOW_V4, 0);
    const padded = new Uint8Array(frame.length + 6);
    padded.set(frame);
    const info = new FrameInfo();
    expect(parseFrame(padded, info)).toBe('ok');
    expect(info.roceLength).toBe(roceLen);
  });

  it('refuses malformed frames with the reason, leaving the output untouched', () => {
    const v4 = build(FLOW_V4).frame;
    const v6 = build(FLOW_V6).frame;
    const set = (f: Uint8Array, at: number, ...bytes: number[]) => {
      const x = f.slice();
      x.set(bytes, at);
      return x;
    };
    const fixSum = (f: Uint8Array) => {
      f[ETH_HEADER + 10] = 0;
      f[ETH_HEADER + 11] = 0;
      const c = ipv4HeaderChecksum(f, ETH_HEADER);
      f[ETH_HEADER + 10] = c >>> 8;
      f[ETH_HEADER + 11] = c & 0xff;
      return f;
    };
    const cases: [string, Uint8Array, FrameStatus][] = [
      ['13 bytes', v4.slice(0, 13), 'truncated_ethernet'],
      ['VLAN tag cut', set(v4.slice(0, 16), 12, 0x81, 0x00), 'truncated_ethernet'],
      ['ARP', set(v4, 12, 0x08, 0x06), 'not_ip'],
      ['no IP byte', v4.slice(0, 14), 'truncated_ip'],
      ['IPv4 cut', v4.slice(0, 30), 'truncated_ip'],
      ['IPv6 cut', v6.slice(0, 50), 'truncated_ip'],
      ['version 5', set(v4, 14, 0x55), 'bad_ip_version'],
      ['IPv6 in an IPv4 ethertype', set(v6, 12, 0x08, 0x00), 'bad_ip_version'],
      ['IHL 6', set(v4, 14, 0x46), 'ip_options'],
      ['bad checksum', set(v4, 24, 0x12, 0x34), 'bad_ip_checksum'],
      ['total length beyond capture', fixSum(set(v4, 16, 0x7f, 0xff)), 'bad_ip_length'],
      ['total length below 20', fixSum(set(v4, 16, 0x00, 0x13)), 'bad_ip_length'],
      ['IPv6 payload length beyond capture', set(v6, 18, 0x7f, 0xff), 'bad_ip_length'],
      ['more fragments', fixSum(set(v4, 20, 0x20, 0x00)), 'fragmented'],
      ['fragment offset', fixSum(set(v4, 20, 0x40, 0x01)), 'fragmented'],
      ['TCP', fixSum(set(v4, 23, 6)), 'not_udp'],
      ['IPv6 hop-by-hop header', set(v6, 20, 0), 'not_udp'],
      ['no room for UDP', fixSum(set(v4, 16, 0x00, 0x18)), 'truncated_udp'],
      ['UDP length 7', set(v4, 38, 0x00, 0x07), 'bad_udp_length'],
      ['UDP length beyond IP', set(v4, 38, 0x7f, 0x00), 'bad_udp_length'],
      ['other port', set(v4, 36, 0x12, 0xb8), 'not_roce'],
    ];
    const info = new FrameInfo();
    expect(parseFrame(v4, info)).toBe('ok');
    const before = JSON.stringify(info);
    for (const [what, f, want] of cases) {
      expect(parseFrame(f, info), what).toBe(want);
      expect(JSON.stringify(info), what).toBe(before);
    }
    expect(parseFrame(v4, info, 5, v4.length)).toBe('bad_range');
    expect(parseDatagram(v4, info, 0, -1)).toBe('bad_range');
  });

  it('parsing never throws on random or mutated frames', () => {
    const base = [build(FLOW_V4).frame, build(FLOW_V6).frame];
    const info = new FrameInfo();
    let seed = 99;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    for (let i = 0; i < 20_000; i++) {
      let f = i % 4 === 0 ? pattern(rnd(120), i) : base[i & 1]!.slice();
      for (let k = rnd(3); k >= 0; k--) f[rnd(f.length || 1)] = rnd(256);
      if (rnd(3) === 0) f = f.slice(0, rnd(f.length + 1));
      const st = parseFrame(f, info);
      if (st === 'ok') expect(info.roceOffset + info.roceLength).toBeLessThanOrEqual(f.length);
    }
  });

  it('refuses to build what cannot be sent', () => {
    const roce = new Uint8Array(16);
    const out = new Uint8Array(100);
    expect(() => writeFrame(out, 0, ETH, { ...FLOW_V4, src: new Uint8Array(16) }, roce)).toThrow(RangeError);
    expect(() => writeFrame(out, 0, { ...ETH, srcMac: new Uint8Array(5) }, FLOW_V4, roce)).toThrow(RangeError);
    expect(() => writeFrame(out, 60, ETH, FLOW_V4, roce)).toThrow(RangeError);
    expect(() => writeFrame(new Uint8Array(70_000), 0, ETH, FLOW_V4, new Uint8Array(65_520))).toThrow(RangeError);
  });
});
