/**
 * Ethernet / IPv4 or IPv6 / UDP around a RoCEv2 packet: built for captures
 * (pcap.ts) and raw transmission, parsed from captures or raw sockets.
 * Field choices follow rxe_net.c (reference §6): IPv4 with DF and the ID
 * the flow gives (0 from an unconnected socket), UDP checksum 0 unless
 * asked for.
 *
 * Parsing takes untrusted bytes: every length is checked, and a frame that
 * is not a well-formed RoCEv2 datagram yields a {@link FrameError}.
 */
import { rd16, rd32, wr16, wr32 } from './headers.js';
import { type IcrcPath, ROCE_UDP_PORT } from './icrc.js';

export const ETH_HEADER = 14;
export const VLAN_TAG = 4;
export const IPV4_HEADER = 20;
export const IPV6_HEADER = 40;
export const UDP_HEADER = 8;
export const ETHERTYPE_IPV4 = 0x0800;
export const ETHERTYPE_IPV6 = 0x86dd;
export const ETHERTYPE_VLAN = 0x8100;
const IPPROTO_UDP = 17;

/** A RoCEv2 flow as the IP layer sees it: what the ICRC covers plus the masked fields. */
export interface RoceFlow extends IcrcPath {
  /** IPv4 TOS / IPv6 traffic class (the GRH traffic class). */
  readonly trafficClass: number;
  /** IPv4 TTL / IPv6 hop limit (the GRH hop limit). */
  readonly hopLimit: number;
  /** IPv6 flow label (20 bits); ignored for IPv4. */
  readonly flowLabel: number;
}

export interface EthernetAddresses {
  readonly srcMac: Uint8Array;
  readonly dstMac: Uint8Array;
}

export interface FrameOptions {
  /** Fill in the UDP checksum instead of sending 0 (rxe sends 0 on both IP versions). */
  readonly udpChecksum?: boolean;
}

/** Bytes of Ethernet + IP + UDP headers for a flow. */
export function headersLength(family: 4 | 6): number {
  return ETH_HEADER + (family === 4 ? IPV4_HEADER : IPV6_HEADER) + UDP_HEADER;
}

/** The Internet checksum (RFC 1071) of `b[o, o+n)`, starting from partial sum `sum`, not yet folded or inverted. */
function sum16(b: Uint8Array, o: number, n: number, sum: number): number {
  let s = sum;
  const end = o + (n & ~1);
  for (let i = o; i < end; i += 2) s += (b[i]! << 8) | b[i + 1]!;
  if (n & 1) s += b[o + n - 1]! << 8;
  return s;
}

function fold(sum: number): number {
  let s = sum;
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 0x10000);
  return s;
}

/** IPv4 header checksum of the 20 bytes at `o` (with the checksum field as it is). */
export function ipv4HeaderChecksum(b: Uint8Array, o: number): number {
  return ~fold(sum16(b, o, IPV4_HEADER, 0)) & 0xffff;
}

/**
 * Writes Ethernet, IP and UDP headers for a UDP payload of `roceLength`
 * bytes (BTH through ICRC) at `dst[off..]` and returns their length; the
 * RoCE packet goes right after. With `udpChecksum`, the payload must
 * already be in place.
 */
export function writeFrameHeaders(dst: Uint8Array, off: number, eth: EthernetAddresses, flow: RoceFlow, roceLength: number, opts: FrameOptions = {}): number {
  const v4 = flow.family === 4;
  const ipLen = v4 ? IPV4_HEADER : IPV6_HEADER;
  const hl = ETH_HEADER + ipLen + UDP_HEADER;
  const udpLen = UDP_HEADER + roceLength;
  if (eth.srcMac.length !== 6 || eth.dstMac.length !== 6) throw new RangeError('MAC addresses are 6 bytes');
  if (flow.src.length !== (v4 ? 4 : 16) || flow.dst.length !== (v4 ? 4 : 16)) throw new RangeError(`IPv${flow.family} addresses are ${v4 ? 4 : 16} bytes`);
  if (!Number.isInteger(roceLength) || roceLength < 0 || udpLen + (v4 ? IPV4_HEADER : 0) > 0xffff) throw new RangeError(`UDP payload of ${roceLength} bytes does not fit an IP datagram`);
  if (!Number.isInteger(off) || off < 0 || off + hl > dst.length) throw new RangeError(`frame headers of ${hl} bytes at ${off} do not fit a ${dst.length}-byte buffer`);
  if (opts.udpChecksum && off + hl + roceLength > dst.length) throw new RangeError('UDP checksum needs the payload in place');

  dst.set(eth.dstMac, off);
  dst.set(eth.srcMac, off + 6);
  wr16(dst, off + 12, v4 ? ETHERTYPE_IPV4 : ETHERTYPE_IPV6);
  const ip = off + ETH_HEADER;
  let pseudo: number;
  if (v4) {
    dst[ip] = 0x45;
    dst[ip + 1] = flow.trafficClass & 0xff;
    wr16(dst, ip + 2, IPV4_HEADER + udpLen);
    wr16(dst, ip + 4, flow.ipId & 0xffff);
    wr16(dst, ip + 6, flow.ipFlagsFragment & 0xffff);
    dst[ip + 8] = flow.hopLimit & 0xff;
    dst[ip + 9] = IPPROTO_UDP;
    wr16(dst, ip + 10, 0);
    dst.set(flow.src, ip + 12);
    dst.set(flow.dst, ip + 16);
    wr16(dst, ip + 10, ipv4HeaderChecksum(dst, ip));
    pseudo = sum16(dst, ip + 12, 8, IPPROTO_UDP + udpLen);
  } else {
    wr32(dst, ip, ((6 << 28) | ((flow.trafficClass & 0xff) << 20) | (flow.flowLabel & 0xfffff)) >>> 0);
    wr16(dst, ip + 4, udpLen);
    dst[ip + 6] = IPPROTO_UDP;
    dst[ip + 7] = flow.hopLimit & 0xff;
    dst.set(flow.src, ip + 8);
    dst.set(flow.dst, ip + 24);
    pseudo = sum16(dst, ip + 8, 32, IPPROTO_UDP + udpLen);
  }
  const udp = ip + ipLen;
  wr16(dst, udp, flow.sport);
  wr16(dst, udp + 2, flow.dport);
  wr16(dst, udp + 4, udpLen);
  wr16(dst, udp + 6, 0);
  if (opts.udpChecksum) {
    let c = ~fold(sum16(dst, udp, udpLen, pseudo)) & 0xffff;
    if (c === 0) c = 0xffff;
    wr16(dst, udp + 6, c);
  }
  return hl;
}

/** Writes a whole frame: headers, then `roce[roceOff, roceOff+roceLen)` (BTH through ICRC). Returns its length. */
export function writeFrame(dst: Uint8Array, off: number, eth: EthernetAddresses, flow: RoceFlow, roce: Uint8Array, roceOff = 0, roceLen = roce.length - roceOff, opts: FrameOptions = {}): number {
  const hl = headersLength(flow.family);
  if (off + hl + roceLen > dst.length) throw new RangeError(`frame of ${hl + roceLen} bytes at ${off} does not fit a ${dst.length}-byte buffer`);
  dst.set(roce.subarray(roceOff, roceOff + roceLen), off + hl);
  return writeFrameHeaders(dst, off, eth, flow, roceLen, opts) + roceLen;
}

// --- parsing -------------------------------------------------------------------

export type FrameError =
  | 'bad_range'
  | 'truncated_ethernet'
  /** Ethertype is not IPv4 or IPv6 (after at most one VLAN tag). */
  | 'not_ip'
  | 'truncated_ip'
  /** IP version nibble does not match the ethertype (or is neither 4 nor 6). */
  | 'bad_ip_version'
  /** IPv4 header with options (IHL ≠ 5): rxe's ICRC assumes a bare header. */
  | 'ip_options'
  | 'bad_ip_checksum'
  /** IP total/payload length shorter than its headers or longer than the bytes captured. */
  | 'bad_ip_length'
  | 'fragmented'
  /** Not UDP (for IPv6 this includes any extension header). */
  | 'not_udp'
  | 'truncated_udp'
  /** UDP length below 8 or beyond the IP payload. */
  | 'bad_udp_length'
  /** UDP destination port is not the RoCEv2 port. */
  | 'not_roce';

export type FrameStatus = 'ok' | FrameError;

/** Where the parts of a parsed frame lie. Addresses are offsets into the parsed buffer (no copies). */
export class FrameInfo {
  family: 4 | 6 = 4;
  ipOffset = 0;
  udpOffset = 0;
  srcAddrOffset = 0;
  dstAddrOffset = 0;
  sport = 0;
  dport = 0;
  ipId = 0;
  ipFlagsFragment = 0;
  trafficClass = 0;
  hopLimit = 0;
  flowLabel = 0;
  /** The UDP payload: the RoCE packet, BTH through ICRC. */
  roceOffset = 0;
  roceLength = 0;

  /** The ICRC path of this frame (copies the addresses out of `buf`). */
  path(buf: Uint8Array): IcrcPath & RoceFlow {
    const n = this.family === 4 ? 4 : 16;
    return {
      family: this.family,
      src: buf.slice(this.srcAddrOffset, this.srcAddrOffset + n),
      dst: buf.slice(this.dstAddrOffset, this.dstAddrOffset + n),
      sport: this.sport,
      dport: this.dport,
      ipId: this.ipId,
      ipFlagsFragment: this.ipFlagsFragment,
      trafficClass: this.trafficClass,
      hopLimit: this.hopLimit,
      flowLabel: this.flowLabel,
    };
  }
}

/** Parses an Ethernet frame carrying RoCEv2 in `buf[off, off+len)`. `out` is written only on 'ok'. */
export function parseFrame(buf: Uint8Array, out: FrameInfo, off = 0, len = buf.length - off, port = ROCE_UDP_PORT): FrameStatus {
  if (!Number.isInteger(off) || !Number.isInteger(len) || off < 0 || len < 0 || off + len > buf.length) return 'bad_range';
  if (len < ETH_HEADER) return 'truncated_ethernet';
  let type = rd16(buf, off + 12);
  let ip = off + ETH_HEADER;
  if (type === ETHERTYPE_VLAN) {
    if (len < ETH_HEADER + VLAN_TAG) return 'truncated_ethernet';
    type = rd16(buf, off + 16);
    ip += VLAN_TAG;
  }
  if (type !== ETHERTYPE_IPV4 && type !== ETHERTYPE_IPV6) return 'not_ip';
  if (ip >= off + len) return 'truncated_ip';
  if (buf[ip]! >>> 4 !== (type === ETHERTYPE_IPV4 ? 4 : 6)) return 'bad_ip_version';
  return parseDatagram(buf, out, ip, off + len - ip, port);
}

/** Parses an IP datagram (IPv4 or IPv6, by its version nibble) carrying RoCEv2 in `buf[off, off+len)`. `out` is written only on 'ok'. */
export function parseDatagram(buf: Uint8Array, out: FrameInfo, off = 0, len = buf.length - off, port = ROCE_UDP_PORT): FrameStatus {
  if (!Number.isInteger(off) || !Number.isInteger(len) || off < 0 || len < 0 || off + len > buf.length) return 'bad_range';
  if (len < 1) return 'truncated_ip';
  const version = buf[off]! >>> 4;
  let ipLen: number;
  let ipTotal: number;
  let family: 4 | 6;
  if (version === 4) {
    family = 4;
    if (len < IPV4_HEADER) return 'truncated_ip';
    if ((buf[off]! & 0x0f) !== 5) return 'ip_options';
    if (ipv4HeaderChecksum(buf, off) !== 0) return 'bad_ip_checksum';
    ipLen = IPV4_HEADER;
    ipTotal = rd16(buf, off + 2);
    if (ipTotal < IPV4_HEADER || ipTotal > len) return 'bad_ip_length';
    if ((rd16(buf, off + 6) & 0x3fff) !== 0) return 'fragmented'; // MF or a fragment offset
    if (buf[off + 9] !== IPPROTO_UDP) return 'not_udp';
  } else if (version === 6) {
    family = 6;
    if (len < IPV6_HEADER) return 'truncated_ip';
    ipLen = IPV6_HEADER;
    ipTotal = IPV6_HEADER + rd16(buf, off + 4);
    if (ipTotal > len) return 'bad_ip_length';
    if (buf[off + 6] !== IPPROTO_UDP) return 'not_udp';
  } else {
    return 'bad_ip_version';
  }
  const udp = off + ipLen;
  if (ipTotal < ipLen + UDP_HEADER) return 'truncated_udp';
  const udpLen = rd16(buf, udp + 4);
  if (udpLen < UDP_HEADER || udpLen > ipTotal - ipLen) return 'bad_udp_length';
  const dport = rd16(buf, udp + 2);
  if (dport !== port) return 'not_roce';

  out.family = family;
  out.ipOffset = off;
  out.udpOffset = udp;
  out.sport = rd16(buf, udp);
  out.dport = dport;
  out.roceOffset = udp + UDP_HEADER;
  out.roceLength = udpLen - UDP_HEADER;
  if (family === 4) {
    out.srcAddrOffset = off + 12;
    out.dstAddrOffset = off + 16;
    out.ipId = rd16(buf, off + 4);
    out.ipFlagsFragment = rd16(buf, off + 6);
    out.trafficClass = buf[off + 1]!;
    out.hopLimit = buf[off + 8]!;
    out.flowLabel = 0;
  } else {
    const w = rd32(buf, off);
    out.srcAddrOffset = off + 8;
    out.dstAddrOffset = off + 24;
    out.ipId = 0;
    out.ipFlagsFragment = 0;
    out.trafficClass = (w >>> 20) & 0xff;
    out.hopLimit = buf[off + 7]!;
    out.flowLabel = w & 0xfffff;
  }
  return 'ok';
}
