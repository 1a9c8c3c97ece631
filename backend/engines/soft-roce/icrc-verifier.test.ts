import { describe, expect, it } from 'vitest';
import { makePath } from './addressing.js';
import { IcrcVerifier, ZERO_ID_PROOF, recoverIpv4Id } from './icrc-verifier.js';
import { checkIcrc } from './icrc.js';
import { Opcode } from './opcodes.js';
import { RocePacket, encodePacket } from './packet.js';
import { udpPeer, type UdpPeer } from './udp-transport.js';

const SENDER = udpPeer('10.9.0.2', 4791);
const RECEIVER = udpPeer('10.9.0.1', 4791);

/** An RC SEND_ONLY of `n` pattern bytes from SENDER to RECEIVER, its ICRC computed with IPv4 ID `ipId`. */
function packet(n: number, ipId: number, psn = 7, src: UdpPeer = SENDER): Uint8Array {
  const p = new RocePacket().setOpcode(Opcode.RC_SEND_ONLY);
  p.bth.destQp = 0x11;
  p.bth.psn = psn;
  p.bth.pkey = 0xffff;
  p.payloadLength = n;
  const payload = new Uint8Array(n).map((_, i) => (i * 31 + 7) & 0xff);
  const out = new Uint8Array(n + 64);
  const len = encodePacket(out, 0, p, payload, { ...makePath(src, RECEIVER), ipId });
  return out.subarray(0, len);
}

describe('recoverIpv4Id', () => {
  it('finds the IPv4 ID a sender (like rxe) put under its ICRC, for any ID and length', () => {
    const path = makePath(SENDER, RECEIVER);
    for (const n of [0, 1, 3, 64, 1024, 4096]) {
      for (const id of [1, 0x00ff, 0x1234, 0x8000, 0xbeef, 0xffff]) {
        const pkt = packet(n, id);
        expect(checkIcrc(path, pkt, 0, pkt.length), `n=${n} id=${id}: fails with ID 0`).toBe(false);
        expect(recoverIpv4Id(path, pkt, 0, pkt.length), `n=${n}`).toBe(id);
      }
    }
    const zero = packet(100, 0);
    expect(recoverIpv4Id(path, zero, 0, zero.length)).toBe(0);
  });

  it('explains almost no corrupted packet by an IPv4 ID (16 of 32 check bits remain)', () => {
    const path = makePath(SENDER, RECEIVER);
    const good = packet(1024, 0);
    let explained = 0;
    let flips = 0;
    for (let bit = 12 * 8; bit < good.length * 8; bit += 3) {
      const bad = good.slice();
      bad[bit >> 3]! ^= 1 << (bit & 7);
      flips++;
      if (recoverIpv4Id(path, bad, 0, bad.length) >= 0) explained++;
    }
    expect(flips).toBeGreaterThan(2000);
    expect(explained).toBeLessThanOrEqual(2);
  });
});

describe('IcrcVerifier', () => {
  it('learns that a sender uses ID 0 and then refuses anything that needs another ID', () => {
    const v = new IcrcVerifier(RECEIVER);
    for (let i = 0; i < ZERO_ID_PROOF; i++) {
      const pkt = packet(200, 0, i);
      expect(v.verify(SENDER, pkt, 0, pkt.length)).toBe(true);
    }
    expect(v.kindOf(SENDER)).toBe('zero-id');
    const hashed = packet(200, 0x4242);
    expect(v.verify(SENDER, hashed, 0, hashed.length)).toBe(false);
    expect(v.recoveredIds).toBe(0);
  });

  it('accepts a hashed-ID sender (rxe) and still refuses its corrupted packets', () => {
    const v = new IcrcVerifier(RECEIVER);
    const rxe = udpPeer('10.9.0.3', 4791);
    for (let i = 0; i < 20; i++) {
      const pkt = packet(1024, (0x1000 + i * 7919) & 0xffff, i, rxe);
      expect(v.verify(rxe, pkt, 0, pkt.length), `packet ${i}`).toBe(true);
    }
    expect(v.kindOf(rxe)).toBe('hashed-id');
    expect(v.recoveredIds).toBe(20);
    const bad = packet(1024, 0x2222, 99, rxe);
    bad[500]! ^= 0x10;
    expect(v.verify(rxe, bad, 0, bad.length)).toBe(false);
  });

  it('refuses packets too short to hold a BTH and an ICRC, and packets of the other IP family', () => {
    const v = new IcrcVerifier(RECEIVER);
    const pkt = packet(8, 0);
    expect(v.verify(SENDER, pkt, 0, 15)).toBe(false);
    expect(v.verify(udpPeer('fd00::1', 4791), pkt, 0, pkt.length)).toBe(false);
  });
});
