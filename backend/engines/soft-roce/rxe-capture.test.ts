/**
 * Packets captured from Linux rdma_rxe (Debian 6.1 kernel in a TCG guest,
 * test/vm/rxe-interop.test.ts), checked by the receive path's ICRC
 * verifier: real rxe bytes, not ones we built, so a change that breaks
 * compatibility with rxe's hashed IPv4 ID fails here without a VM.
 */
import { describe, expect, it } from 'vitest';
import { IcrcVerifier, recoverIpv4Id } from './icrc-verifier.js';
import { makePath } from './addressing.js';
import { decodePacket, RocePacket } from './packet.js';
import { udpPeer } from './udp-transport.js';

/** rxe's RC ACKNOWLEDGE of PSN 0x8b86c1, MSN 1, to QPN 0x11, from 10.202.130.2:49441 (IPv4 ID 0x3821 on the wire). */
const RXE_ACK = Uint8Array.from(Buffer.from('1100ffff00000011008b86c11f000001ac6050ed', 'hex'));
const RXE = udpPeer('10.202.130.2', 49441);
const US = udpPeer('10.202.130.1', 4791);

describe('packets captured from Linux rxe', () => {
  it('an rxe ACK decodes and its ICRC holds only under the IPv4 ID rxe put on the wire', () => {
    const p = new RocePacket();
    expect(decodePacket(RXE_ACK, p, 0, RXE_ACK.length)).toBe('ok');
    expect(p.bth.psn).toBe(0x8b86c1);
    expect(p.aeth.msn).toBe(1);
    expect(recoverIpv4Id(makePath(RXE, US), RXE_ACK, 0, RXE_ACK.length)).toBe(0x3821);
  });

  it('the receive verifier accepts the rxe ACK and refuses it with one payload bit flipped', () => {
    const v = new IcrcVerifier(US);
    expect(v.verify(RXE, RXE_ACK, 0, RXE_ACK.length)).toBe(true);
    const bad = RXE_ACK.slice();
    bad[13] = bad[13]! ^ 0x01; // MSN
    expect(v.verify(RXE, bad, 0, bad.length)).toBe(false);
  });
});
