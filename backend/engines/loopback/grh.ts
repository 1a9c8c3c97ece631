/**
 * The 40-byte Global Routing Header a UD receive buffer starts with
 * (docs/virtio-rdma.md §6), in the layout the driver negotiated:
 * - 'rocev2': the IPv6 header of the RoCEv2 packet, or for IPv4-mapped
 *   GIDs 20 zero bytes followed by the IPv4 header, as Linux presents it;
 * - 'ib': an IB / RoCE v1 GRH for every GID (IPv6-format header, next
 *   header 0x1B), what consumers of IB-typed GIDs parse.
 */
import type { AddressVector, GrhLayout } from '../../engine/engine.js';

export const GRH_SIZE = 40;
const UDP_HEADER = 8;
const BTH = 12;
const DETH = 8;
const IMMDT = 4;
const ICRC = 4;
const IPPROTO_UDP = 17;
/** IPv6 next header value of a GRH followed by a BTH (IBTA). */
const NEXT_HEADER_BTH = 0x1b;

export function isIpv4Mapped(gid: Uint8Array): boolean {
  for (let i = 0; i < 10; i++) if (gid[i] !== 0) return false;
  return gid[10] === 0xff && gid[11] === 0xff;
}

/** Bytes of a UD packet after the BTH's predecessor header: BTH, DETH, optional ImmDt, padded payload, ICRC. */
function transportLength(payloadLen: number, withImm: boolean): number {
  const pad = (4 - (payloadLen % 4)) % 4;
  return BTH + DETH + (withImm ? IMMDT : 0) + payloadLen + pad + ICRC;
}

function ipv4Checksum(h: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < h.length; i += 2) sum += (h[i]! << 8) | h[i + 1]!;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

function put16(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >>> 8) & 0xff;
  b[at + 1] = v & 0xff;
}

/** Writes the GRH of a UD message from `sgid` to `av.dgid` into `grh` (GRH_SIZE bytes, overwritten whole; nothing allocated). */
export function buildGrh(grh: Uint8Array, layout: GrhLayout, sgid: Uint8Array, av: AddressVector, payloadLen: number, withImm: boolean): void {
  grh.fill(0, 0, GRH_SIZE);
  const transport = transportLength(payloadLen, withImm);
  if (layout === 'rocev2' && isIpv4Mapped(av.dgid)) {
    const ip = grh.subarray(20, 40);
    ip[0] = 0x45;
    ip[1] = av.trafficClass & 0xff;
    put16(ip, 2, 20 + UDP_HEADER + transport);
    put16(ip, 6, 0x4000); // don't fragment
    ip[8] = av.hopLimit & 0xff;
    ip[9] = IPPROTO_UDP;
    ip.set(sgid.subarray(12, 16), 12);
    ip.set(av.dgid.subarray(12, 16), 16);
    put16(ip, 10, ipv4Checksum(ip));
    return;
  }
  const ib = layout === 'ib';
  const word0 = ((6 << 28) | ((av.trafficClass & 0xff) << 20) | (av.flowLabel & 0xfffff)) >>> 0;
  put16(grh, 0, word0 >>> 16);
  put16(grh, 2, word0 & 0xffff);
  put16(grh, 4, ib ? transport : UDP_HEADER + transport);
  grh[6] = ib ? NEXT_HEADER_BTH : IPPROTO_UDP;
  grh[7] = av.hopLimit & 0xff;
  grh.set(sgid.subarray(0, 16), 8);
  grh.set(av.dgid.subarray(0, 16), 24);
}
