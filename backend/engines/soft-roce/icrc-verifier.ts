/**
 * Receive-side ICRC checking that works with Linux rdma_rxe as the sender.
 *
 * The ICRC covers the IPv4 Identification field. A UDP socket never sees
 * the IP header, so the receiver must assume a value. Senders that use an
 * unconnected UDP socket with DF (this engine) put 0 there; rxe puts a
 * hashed, per-packet ID (`__ip_select_ident`) there, so its packets never
 * match with ID 0 (reference §6).
 *
 * The CRC is linear, so the ID is recoverable instead of guessed: for
 * two strings of equal length that differ only in the ID bytes, the
 * registers differ by the ID's contribution shifted through the bytes
 * that follow it. Shifting the observed difference back (the CRC step is
 * invertible) and undoing two byte steps from a zero register gives the
 * one ID that explains it, or shows that none does. That leaves 16 of the
 * 32 check bits for such packets.
 *
 * To keep all 32 bits where they are available, each sending endpoint is
 * classified by what it sends: after ZERO_ID_PROOF packets that passed with
 * ID 0 (and none that needed another ID) it is an ID-0 sender and gets the
 * exact check only; one packet that passes only with a recovered ID makes
 * it a hashed-ID sender (rxe), checked modulo the ID from then on.
 */
import { putPeerBytes } from './addressing.js';
import type { IcrcPath } from './icrc.js';
import { ICRC_SIZE, IPV4_DF, icrc, readIcrc } from './icrc.js';
import type { UdpPeer } from './udp-transport.js';

/** Packets that must pass with ID 0 before a sender is trusted to always use 0. */
export const ZERO_ID_PROOF = 4;
/** Senders remembered; beyond this, unknown senders are checked modulo the ID without being learned. */
const MAX_SENDERS = 4096;
/** CRC'd bytes after the IPv4 ID field: the rest of the IPv4 header (14) and the UDP header (8). */
const AFTER_ID_IN_HEADERS = 14 + 8;
const BTH_SIZE = 12;

const POLY = 0xedb88320;
/** The byte-step table of the reflected CRC-32 (linear: T[a ^ b] = T[a] ^ T[b]). */
const T = new Uint32Array(256);
/** REV[T[i] >>> 24] = i: the top byte of a table entry names the entry. */
const REV = new Uint8Array(256);
for (let i = 0; i < 256; i++) {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
  T[i] = c >>> 0;
  REV[c >>> 24] = i;
}

/** Undoes one CRC step over a zero byte: the register before, given the one after. */
function unstepZero(s: number): number {
  const i = REV[s >>> 24]!;
  return (((s ^ T[i]!) << 8) | i) >>> 0;
}

/**
 * The IPv4 ID under which `pkt[off, off+len)` (ICRC included) carries a
 * valid ICRC for `path` (whose own ipId is ignored), or -1 when none does.
 */
export function recoverIpv4Id(path: IcrcPath, pkt: Uint8Array, off: number, len: number): number {
  if (path.family !== 4 || len < BTH_SIZE + ICRC_SIZE || off < 0 || off + len > pkt.length) return -1;
  const covered = len - ICRC_SIZE;
  const withZero = icrc(path.ipId === 0 ? path : { ...path, ipId: 0 }, pkt, off, covered);
  return idForDifference(withZero ^ readIcrc(pkt, off + covered), covered);
}

/**
 * The IPv4 ID that explains `difference`, the XOR of the ICRC computed with
 * ID 0 and the one received over `covered` transport bytes (the final
 * inversions cancel: it is the ID's linear contribution), or -1.
 */
function idForDifference(difference: number, covered: number): number {
  let d = difference >>> 0;
  if (d === 0) return 0;
  for (let n = AFTER_ID_IN_HEADERS + covered; n > 0; n--) d = unstepZero(d);
  // d = the register after the two ID bytes (high byte first) from zero:
  // s1 = T[b0]; d = (s1 >>> 8) ^ T[(s1 ^ b1) & 0xff].
  const i1 = REV[d >>> 24]!;
  const s1High = (d ^ T[i1]!) >>> 0; // s1 >>> 8
  const b0 = REV[(s1High >>> 16) & 0xff]!;
  if (T[b0]! >>> 8 !== s1High) return -1;
  const b1 = (T[b0]! ^ i1) & 0xff;
  return (b0 << 8) | b1;
}

type SenderKind = 'zero-id' | 'hashed-id';

interface Sender {
  kind: SenderKind | null;
  /** Packets that passed with ID 0 while unclassified. */
  zeroPasses: number;
}

/** Checks received ICRCs for one local endpoint, learning each sender's IPv4 ID habit. */
export class IcrcVerifier {
  private readonly senders = new Map<number, Sender>();
  /** Reused for every IPv4 packet: the path as the sender built it. */
  private readonly v4 = { family: 4 as const, src: new Uint8Array(4), dst: new Uint8Array(4), sport: 0, dport: 0, ipId: 0, ipFlagsFragment: IPV4_DF };
  private readonly v6 = { family: 6 as const, src: new Uint8Array(16), dst: new Uint8Array(16), sport: 0, dport: 0, ipId: 0, ipFlagsFragment: 0 };
  /** Packets accepted only with a recovered, non-zero IPv4 ID (diagnostics). */
  recoveredIds = 0;

  constructor(private readonly local: UdpPeer) {
    putPeerBytes(this.v4.dst, local);
    putPeerBytes(this.v6.dst, local);
    this.v4.dport = local.port;
    this.v6.dport = local.port;
  }

  /** Whether `pkt[off, off+len)` from `src` ends in a valid ICRC. */
  verify(src: UdpPeer, pkt: Uint8Array, off: number, len: number): boolean {
    if (len < BTH_SIZE + ICRC_SIZE || src.family !== this.local.family) return false;
    const covered = len - ICRC_SIZE;
    if (src.family === 6) {
      putPeerBytes(this.v6.src, src);
      this.v6.sport = src.port;
      return icrc(this.v6, pkt, off, covered) === readIcrc(pkt, off + covered);
    }
    const path = this.v4;
    putPeerBytes(path.src, src);
    path.sport = src.port;
    const key = src.words[0] * 0x1_0000 + src.port;
    const computed = icrc(path, pkt, off, covered);
    const received = readIcrc(pkt, off + covered);
    if (computed === received) {
      const sender = this.senderOf(key);
      if (sender !== undefined && sender.kind === null && ++sender.zeroPasses >= ZERO_ID_PROOF) sender.kind = 'zero-id';
      return true;
    }
    if (this.senders.get(key)?.kind === 'zero-id') return false;
    // The ICRC just computed (with ID 0) is all the recovery needs.
    if (idForDifference(computed ^ received, covered) < 0) return false;
    this.recoveredIds++;
    const sender = this.senderOf(key);
    if (sender !== undefined) sender.kind = 'hashed-id';
    return true;
  }

  /** The record of a sender, made on first sight while there is room for it. */
  private senderOf(key: number): Sender | undefined {
    let sender = this.senders.get(key);
    if (sender === undefined && this.senders.size < MAX_SENDERS) this.senders.set(key, (sender = { kind: null, zeroPasses: 0 }));
    return sender;
  }

  /** What a sender was classified as (tests, diagnostics). */
  kindOf(src: UdpPeer): SenderKind | null {
    return src.family === 4 ? (this.senders.get(src.words[0] * 0x1_0000 + src.port)?.kind ?? null) : 'zero-id';
  }
}
