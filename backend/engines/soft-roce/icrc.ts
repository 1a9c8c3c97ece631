/**
 * The RoCEv2 Invariant CRC (docs: shared/reference/rocev2-rxe.md §5;
 * rxe_icrc.c). CRC-32 over
 *
 *   8 × 0xFF (the masked LRH)
 *   IPv4 header with TOS, TTL → 0xFF and header checksum → 0xFFFF
 *     (IPv6: bytes 0–3 → version|0xF, 0xFF, 0xFF, 0xFF; hop limit → 0xFF)
 *   UDP header with checksum → 0xFFFF
 *   BTH with byte 4 (FECN, BECN, reserved) → 0xFF
 *   the remaining transport headers, payload and pad
 *
 * and the ICRC is the bitwise NOT of the register, i.e. zlib's crc32 of
 * that string, sent least significant byte first.
 *
 * Only the 20 + 8 + 12 (IPv6: 40 + 8 + 12) masked header bytes are staged
 * in a scratch buffer; the rest of the packet is hashed where it lies.
 */
import { crc32Update } from './crc32.js';

/** The CRC register after the eight 0xFF bytes of the masked LRH (rxe's seed). */
export const ICRC_SEED = 0xdebb20e3;
export const ICRC_SIZE = 4;
export const ROCE_UDP_PORT = 4791;
/** IPv4 flags/fragment-offset field with only Don't Fragment set. */
export const IPV4_DF = 0x4000;

const IPV4_HEADER = 20;
const IPV6_HEADER = 40;
const UDP_HEADER = 8;
const BTH_SIZE = 12;
const IPPROTO_UDP = 17;

/** The IP/UDP fields the ICRC covers (the masked ones are not needed). */
export interface IcrcPath {
  readonly family: 4 | 6;
  /** Source address: 4 bytes for IPv4, 16 for IPv6, network order. */
  readonly src: Uint8Array;
  readonly dst: Uint8Array;
  readonly sport: number;
  readonly dport: number;
  /** IPv4 Identification (covered by the ICRC; Linux sends 0 from an unconnected socket). Ignored for IPv6. */
  readonly ipId: number;
  /** IPv4 flags + fragment offset as the 16-bit field (IPV4_DF = DF only). Ignored for IPv6. */
  readonly ipFlagsFragment: number;
}

const scratch = new Uint8Array(IPV6_HEADER + UDP_HEADER + BTH_SIZE);

function putU16(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 8) & 0xff;
  b[o + 1] = v & 0xff;
}

/** Copies the BTH from `pkt[off..off+12)` into scratch at `at`, masking byte 4. */
function stageBth(at: number, pkt: Uint8Array, off: number): void {
  for (let i = 0; i < BTH_SIZE; i++) scratch[at + i] = pkt[off + i]!;
  scratch[at + 4] = 0xff;
}

function finish(pseudoLen: number, pkt: Uint8Array, off: number, len: number): number {
  let c = crc32Update(ICRC_SEED, scratch, 0, pseudoLen);
  c = crc32Update(c, pkt, off + BTH_SIZE, len - BTH_SIZE);
  return ~c >>> 0;
}

/**
 * The ICRC of a RoCEv2 packet whose UDP payload is `pkt[off, off+len+4)`:
 * `len` counts the BTH, extension headers, payload and pad, not the ICRC
 * itself. The IP and UDP headers are synthesised from `path` (lengths follow
 * from `len`), as a sender that owns no IP header (a UDP socket) needs.
 */
export function icrc(path: IcrcPath, pkt: Uint8Array, off: number, len: number): number {
  if (len < BTH_SIZE || off < 0 || off + len > pkt.length) throw new RangeError(`ICRC over ${len} bytes at ${off} of ${pkt.length}: needs at least a BTH inside the buffer`);
  const udpLen = UDP_HEADER + len + ICRC_SIZE;
  let at: number;
  if (path.family === 4) {
    if (path.src.length !== 4 || path.dst.length !== 4) throw new RangeError('IPv4 ICRC path needs 4-byte addresses');
    scratch[0] = 0x45;
    scratch[1] = 0xff; // TOS
    putU16(scratch, 2, IPV4_HEADER + udpLen);
    putU16(scratch, 4, path.ipId);
    putU16(scratch, 6, path.ipFlagsFragment);
    scratch[8] = 0xff; // TTL
    scratch[9] = IPPROTO_UDP;
    scratch[10] = 0xff; // header checksum
    scratch[11] = 0xff;
    scratch.set(path.src, 12);
    scratch.set(path.dst, 16);
    at = IPV4_HEADER;
  } else {
    if (path.src.length !== 16 || path.dst.length !== 16) throw new RangeError('IPv6 ICRC path needs 16-byte addresses');
    scratch[0] = 0x6f; // version 6, traffic class and flow label masked
    scratch[1] = 0xff;
    scratch[2] = 0xff;
    scratch[3] = 0xff;
    putU16(scratch, 4, udpLen); // payload length
    scratch[6] = IPPROTO_UDP;
    scratch[7] = 0xff; // hop limit
    scratch.set(path.src, 8);
    scratch.set(path.dst, 24);
    at = IPV6_HEADER;
  }
  putU16(scratch, at, path.sport);
  putU16(scratch, at + 2, path.dport);
  putU16(scratch, at + 4, udpLen);
  scratch[at + 6] = 0xff; // UDP checksum
  scratch[at + 7] = 0xff;
  stageBth(at + UDP_HEADER, pkt, off);
  return finish(at + UDP_HEADER + BTH_SIZE, pkt, off, len);
}

/**
 * The ICRC of a RoCEv2 packet inside an IP datagram at `buf[ipOff..]`, the
 * IP and UDP headers taken as they are on the wire (what a raw socket or a
 * capture sees). The caller has validated the headers: IPv4 without
 * options, or IPv6 with UDP as the next header. `roceLen` counts the BTH
 * through the pad (the UDP payload less the ICRC).
 */
export function icrcOfDatagram(buf: Uint8Array, ipOff: number, roceLen: number): number {
  const version = buf[ipOff]! >>> 4;
  const ipLen = version === 4 ? IPV4_HEADER : IPV6_HEADER;
  const bthOff = ipOff + ipLen + UDP_HEADER;
  if (roceLen < BTH_SIZE || bthOff + roceLen > buf.length || (version !== 4 && version !== 6)) {
    throw new RangeError(`ICRC over an IPv${version} datagram at ${ipOff} with ${roceLen} transport bytes does not fit ${buf.length}`);
  }
  for (let i = 0; i < ipLen + UDP_HEADER; i++) scratch[i] = buf[ipOff + i]!;
  if (version === 4) {
    scratch[1] = 0xff;
    scratch[8] = 0xff;
    scratch[10] = 0xff;
    scratch[11] = 0xff;
  } else {
    scratch[0] = (scratch[0]! & 0xf0) | 0x0f;
    scratch[1] = 0xff;
    scratch[2] = 0xff;
    scratch[3] = 0xff;
    scratch[7] = 0xff;
  }
  scratch[ipLen + 6] = 0xff;
  scratch[ipLen + 7] = 0xff;
  stageBth(ipLen + UDP_HEADER, buf, bthOff);
  return finish(ipLen + UDP_HEADER + BTH_SIZE, buf, bthOff, roceLen);
}

/** Stores an ICRC in wire order (little-endian). */
export function writeIcrc(buf: Uint8Array, at: number, value: number): void {
  buf[at] = value & 0xff;
  buf[at + 1] = (value >>> 8) & 0xff;
  buf[at + 2] = (value >>> 16) & 0xff;
  buf[at + 3] = (value >>> 24) & 0xff;
}

/** Reads an ICRC stored in wire order (little-endian). */
export function readIcrc(buf: Uint8Array, at: number): number {
  return (buf[at]! | (buf[at + 1]! << 8) | (buf[at + 2]! << 16) | (buf[at + 3]! << 24)) >>> 0;
}

/** Computes the ICRC of the packet `pkt[off, off+len)` (ICRC included in `len`) and stores it in its last four bytes. */
export function sealIcrc(path: IcrcPath, pkt: Uint8Array, off: number, len: number): number {
  const v = icrc(path, pkt, off, len - ICRC_SIZE);
  writeIcrc(pkt, off + len - ICRC_SIZE, v);
  return v;
}

/** Whether the last four bytes of `pkt[off, off+len)` are its ICRC. */
export function checkIcrc(path: IcrcPath, pkt: Uint8Array, off: number, len: number): boolean {
  if (len < BTH_SIZE + ICRC_SIZE || off < 0 || off + len > pkt.length) return false;
  return icrc(path, pkt, off, len - ICRC_SIZE) === readIcrc(pkt, off + len - ICRC_SIZE);
}
