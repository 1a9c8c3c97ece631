/**
 * The 40-byte Global Routing Header a UD receive buffer starts with
 * (docs/virtio-rdma.md §6): the IPv6 header of the RoCEv2 packet, or for
 * IPv4-mapped GIDs 20 zero bytes followed by the IPv4 header, as Linux
 * presents it.
 */
import type { AddressVector } from '../../engine/engine.js';

export const GRH_SIZE = 40;
const UDP_HEADER = 8;
const BTH = 12;
const DETH = 8;
const IMMDT = 4;
const ICRC = 4;
const IPPROTO_UDP = 17;

export function isIpv4Mapped(gid: Uint8Array): boolean {
  for (let i = 0; i < 10; i++) if (gid[i] !== 0) return false;
  return gid[10] === 0xff && gid[11] === 0xff;
}

/** Bytes of a UD packet after the IP header: UDP, BTH, DETH, optional ImmDt, padded payload, ICRC. */
function udpLength(payloadLen: number, withImm: boolean): number {
  const pad = (4 - (payloadLen % 4)) % 4;
  return UDP_HEADER + BTH + DETH + (withImm ? IMMDT : 0) + payloadLen + pad + ICRC;
}

function ipv4Checksum(h: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < h.length; i += 2) sum += (h[i]! << 8) | h[i + 1]!;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

export function buildGrh(sgid: Uint8Array, av: AddressVector, payloadLen: number, withImm: boolean): Uint8Array {
  const grh = new Uint8Array(GRH_SIZE);
  const dv = new DataView(grh.buffer);
  const udp = udpLength(payloadLen, withImm);
  if (isIpv4Mapped(av.dgid)) {
    const ip = grh.subarray(20);
    const ipDv = new DataView(grh.buffer, 20, 20);
    ip[0] = 0x45;
    ip[1] = av.trafficClass & 0xff;
    ipDv.setUint16(2, 20 + udp, false);
    ipDv.setUint16(6, 0x4000, false); // don't fragment
    ip[8] = av.hopLimit & 0xff;
    ip[9] = IPPROTO_UDP;
    ip.set(sgid.subarray(12, 16), 12);
    ip.set(av.dgid.subarray(12, 16), 16);
    ipDv.setUint16(10, ipv4Checksum(ip), false);
  } else {
    dv.setUint32(0, ((6 << 28) | ((av.trafficClass & 0xff) << 20) | (av.flowLabel & 0xfffff)) >>> 0, false);
    dv.setUint16(4, udp, false);
    grh[6] = IPPROTO_UDP;
    grh[7] = av.hopLimit & 0xff;
    grh.set(sgid.subarray(0, 16), 8);
    grh.set(av.dgid.subarray(0, 16), 24);
  }
  return grh;
}
