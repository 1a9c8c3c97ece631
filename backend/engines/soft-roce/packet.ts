/**
 * The RoCEv2 transport packet — a UDP payload: BTH, the extension headers
 * its opcode calls for, payload, 0–3 pad bytes, ICRC (reference §1–§4).
 *
 * Decoding takes bytes from the network: every length is checked before
 * anything is read, a malformed packet returns the reason (a
 * {@link DecodeError}), and the output object is written only once the
 * packet has passed every check. Nothing here throws on input bytes.
 *
 * Hot path: decode fills a reusable {@link RocePacket} (the payload stays in
 * the caller's buffer; only packets with 64-bit fields — RETH, atomics —
 * allocate, for their bigints), and encode writes into a caller's buffer,
 * with the payload either copied from a source or already in place.
 *
 * The ICRC needs the IP/UDP context, so decode only records it; check it
 * with icrc.ts (checkIcrc / icrcOfDatagram) where the path is known.
 */
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
  newAeth,
  newAtomicAckEth,
  newAtomicEth,
  newBth,
  newDeth,
  newFeth,
  newIeth,
  newImmDt,
  newReth,
  type Aeth,
  type AtomicAckEth,
  type AtomicEth,
  type Bth,
  type Deth,
  type Feth,
  type Ieth,
  type ImmDt,
  type Reth,
} from './headers.js';
import { ICRC_SIZE, type IcrcPath, readIcrc, sealIcrc } from './icrc.js';
import { BTH_SIZE, Hdr, OPCODES, type OpcodeInfo, PayloadRule, opcodeName } from './opcodes.js';

/** The largest IB path MTU; no RoCE packet carries more payload. */
export const MAX_MTU = 4096;

/** Why a packet was refused. */
export type DecodeError =
  /** The given offset/length do not lie inside the buffer. */
  | 'bad_range'
  /** Shorter than a BTH. */
  | 'truncated_bth'
  /** BTH TVer is not 0. */
  | 'bad_tver'
  /** Reserved opcode, or one of a transport this codec does not speak (RD, CNP, XRC, vendor). */
  | 'bad_opcode'
  /** Shorter than the BTH plus the extension headers the opcode calls for. */
  | 'truncated_header'
  /** No room for the 4-byte ICRC after the headers. */
  | 'truncated_icrc'
  /** Payload plus pad is not a multiple of 4 bytes. */
  | 'misaligned_length'
  /** Pad count larger than the bytes after the headers, or non-zero on an opcode without payload. */
  | 'bad_pad'
  /** Payload on an opcode that carries none (READ_REQUEST, ACKs, atomics, FLUSH). */
  | 'unexpected_payload'
  /** ATOMIC_WRITE whose payload is not exactly 8 bytes. */
  | 'bad_payload_length'
  /** Payload longer than the MTU the caller allows. */
  | 'payload_exceeds_mtu';

export type DecodeStatus = 'ok' | DecodeError;

export const DECODE_ERROR_TEXT: Readonly<Record<DecodeError, string>> = {
  bad_range: 'offset/length outside the buffer',
  truncated_bth: 'shorter than a BTH',
  bad_tver: 'BTH transport header version is not 0',
  bad_opcode: 'reserved or unsupported opcode',
  truncated_header: 'shorter than the headers its opcode needs',
  truncated_icrc: 'no room for the ICRC',
  misaligned_length: 'payload + pad is not a multiple of 4',
  bad_pad: 'pad count inconsistent with the packet',
  unexpected_payload: 'payload on an opcode without one',
  bad_payload_length: 'payload length wrong for the opcode',
  payload_exceeds_mtu: 'payload longer than the MTU',
};

/**
 * A decoded packet, or the description of one to encode. Allocate one per
 * receive/transmit loop and reuse it. Header objects are always present;
 * `headers` (Hdr bits) says which ones the opcode carries.
 */
export class RocePacket {
  info: OpcodeInfo | null = null;
  headers = 0;
  readonly bth: Bth = newBth();
  readonly reth: Reth = newReth();
  readonly aeth: Aeth = newAeth();
  readonly atomicEth: AtomicEth = newAtomicEth();
  readonly atomicAckEth: AtomicAckEth = newAtomicAckEth();
  readonly immDt: ImmDt = newImmDt();
  readonly ieth: Ieth = newIeth();
  readonly deth: Deth = newDeth();
  readonly feth: Feth = newFeth();
  /** Decode: the buffer the packet lies in (payload bytes are read from it). */
  buffer: Uint8Array = EMPTY;
  /** Decode: where the packet (its BTH) starts in `buffer`. */
  offset = 0;
  /** Decode: whole packet, BTH through ICRC. */
  length = 0;
  /** Decode: payload position in `buffer`. */
  payloadOffset = 0;
  /** Payload bytes, without pad. Encode: the length to send. */
  payloadLength = 0;
  /** Decode: the ICRC as received (little-endian on the wire). */
  icrc = 0;

  get opcode(): number {
    return this.bth.opcode;
  }

  /** The payload as a view into `buffer` (allocates the view). */
  payload(): Uint8Array {
    return this.buffer.subarray(this.payloadOffset, this.payloadOffset + this.payloadLength);
  }

  /** Sets the opcode and the header bits it implies (for building a packet to encode). */
  setOpcode(opcode: number): this {
    const info = OPCODES[opcode & 0xff];
    if (info === undefined || opcode !== (opcode & 0xff)) throw new RangeError(`opcode ${opcodeName(opcode)} is not an RC/UC/UD opcode`);
    this.bth.opcode = opcode;
    this.info = info;
    this.headers = info.headers;
    return this;
  }
}

const EMPTY = new Uint8Array(0);

/** Bytes a packet of `opcode` with `payloadLength` payload bytes occupies on the wire (headers, payload, pad, ICRC). */
export function packetLength(opcode: number, payloadLength: number): number {
  const info = OPCODES[opcode & 0xff];
  if (info === undefined) throw new RangeError(`opcode ${opcodeName(opcode)} is not an RC/UC/UD opcode`);
  return info.headerLength + payloadLength + padFor(payloadLength) + ICRC_SIZE;
}

/** Pad bytes after a payload of `n` bytes. */
export function padFor(n: number): number {
  return -n & 3;
}

/**
 * Decodes the packet in `buf[off, off+len)` into `out`. Returns 'ok', or the
 * reason the packet is malformed, in which case `out` is untouched.
 *
 * `maxPayload` is the MTU to enforce (default {@link MAX_MTU}, the absolute
 * limit). rxe answers an over-long RC/UC packet with NAK "invalid request"
 * rather than dropping it; a responder that wants to do the same decodes
 * with the default and applies its path MTU itself.
 */
export function decodePacket(buf: Uint8Array, out: RocePacket, off = 0, len = buf.length - off, maxPayload = MAX_MTU): DecodeStatus {
  if (!Number.isInteger(off) || !Number.isInteger(len) || off < 0 || len < 0 || off + len > buf.length) return 'bad_range';
  if (len < BTH_SIZE) return 'truncated_bth';
  const flags = buf[off + 1]!;
  if ((flags & 0x0f) !== 0) return 'bad_tver';
  const info = OPCODES[buf[off]!];
  if (info === undefined) return 'bad_opcode';
  const hl = info.headerLength;
  if (len < hl) return 'truncated_header';
  if (len < hl + ICRC_SIZE) return 'truncated_icrc';
  const padded = len - hl - ICRC_SIZE;
  if ((padded & 3) !== 0) return 'misaligned_length';
  const pad = (flags >>> 4) & 3;
  if (info.payload === PayloadRule.NONE) {
    if (pad !== 0) return 'bad_pad';
    if (padded !== 0) return 'unexpected_payload';
  } else if (pad > padded) {
    return 'bad_pad';
  }
  const payloadLength = padded - pad;
  if (info.payload === PayloadRule.EIGHT && payloadLength !== 8) return 'bad_payload_length';
  if (payloadLength > maxPayload) return 'payload_exceeds_mtu';

  // Every check passed: fill `out`. The header decoders cannot fail now.
  BthCodec.decode(buf, off, out.bth);
  const h = info.headers;
  if (h & Hdr.RETH) RethCodec.decode(buf, off + info.rethAt, out.reth);
  if (h & Hdr.AETH) AethCodec.decode(buf, off + info.aethAt, out.aeth);
  if (h & Hdr.ATOMIC_ETH) AtomicEthCodec.decode(buf, off + info.atomicEthAt, out.atomicEth);
  if (h & Hdr.ATOMIC_ACK_ETH) AtomicAckEthCodec.decode(buf, off + info.atomicAckEthAt, out.atomicAckEth);
  if (h & Hdr.IMMDT) ImmDtCodec.decode(buf, off + info.immAt, out.immDt);
  if (h & Hdr.IETH) IethCodec.decode(buf, off + info.iethAt, out.ieth);
  if (h & Hdr.DETH) DethCodec.decode(buf, off + info.dethAt, out.deth);
  if (h & Hdr.FETH) FethCodec.decode(buf, off + info.fethAt, out.feth);
  out.info = info;
  out.headers = h;
  out.buffer = buf;
  out.offset = off;
  out.length = len;
  out.payloadOffset = off + hl;
  out.payloadLength = payloadLength;
  out.icrc = readIcrc(buf, off + len - ICRC_SIZE);
  return 'ok';
}

/**
 * Encodes `pkt` into `dst` at `off`: BTH (pad count computed, TVer 0),
 * the extension headers of its opcode, `pkt.payloadLength` payload bytes,
 * zero pad, and the ICRC — computed when `path` is given, else left zero
 * for {@link sealIcrc}. The payload is copied from `payload` (its first
 * `pkt.payloadLength` bytes), or, when `payload` is null, is taken to be in
 * place already (gathered straight into `dst` at `off + headerLength`).
 * Returns the packet's length. Throws RangeError on an unsupported opcode, a
 * payload the opcode forbids or longer than {@link MAX_MTU}, a field out of
 * range, or a buffer too small.
 */
export function encodePacket(dst: Uint8Array, off: number, pkt: RocePacket, payload: Uint8Array | null, path: IcrcPath | null = null): number {
  const opcode = pkt.bth.opcode;
  const info = OPCODES[opcode & 0xff];
  if (info === undefined || opcode !== (opcode & 0xff)) throw new RangeError(`opcode ${opcodeName(opcode)} is not an RC/UC/UD opcode`);
  const n = pkt.payloadLength;
  if (!Number.isInteger(n) || n < 0 || n > MAX_MTU) throw new RangeError(`payload of ${n} bytes: must be 0…${MAX_MTU}`);
  if (info.payload === PayloadRule.NONE && n !== 0) throw new RangeError(`${info.name} carries no payload (got ${n} bytes)`);
  if (info.payload === PayloadRule.EIGHT && n !== 8) throw new RangeError(`${info.name} carries exactly 8 payload bytes (got ${n})`);
  if (payload !== null && payload.length < n) throw new RangeError(`payload source holds ${payload.length} bytes, packet wants ${n}`);
  const hl = info.headerLength;
  const pad = padFor(n);
  const total = hl + n + pad + ICRC_SIZE;
  if (!Number.isInteger(off) || off < 0 || off + total > dst.length) throw new RangeError(`${info.name} packet of ${total} bytes at ${off} does not fit a ${dst.length}-byte buffer`);

  BthCodec.encode(dst, off, pkt.bth);
  // The pad count follows from the payload, and TVer is always 0 on transmit.
  dst[off + 1] = (dst[off + 1]! & 0xc0) | (pad << 4);
  const h = info.headers;
  if (h & Hdr.RETH) RethCodec.encode(dst, off + info.rethAt, pkt.reth);
  if (h & Hdr.AETH) AethCodec.encode(dst, off + info.aethAt, pkt.aeth);
  if (h & Hdr.ATOMIC_ETH) AtomicEthCodec.encode(dst, off + info.atomicEthAt, pkt.atomicEth);
  if (h & Hdr.ATOMIC_ACK_ETH) AtomicAckEthCodec.encode(dst, off + info.atomicAckEthAt, pkt.atomicAckEth);
  if (h & Hdr.IMMDT) ImmDtCodec.encode(dst, off + info.immAt, pkt.immDt);
  if (h & Hdr.IETH) IethCodec.encode(dst, off + info.iethAt, pkt.ieth);
  if (h & Hdr.DETH) DethCodec.encode(dst, off + info.dethAt, pkt.deth);
  if (h & Hdr.FETH) FethCodec.encode(dst, off + info.fethAt, pkt.feth);
  const p = off + hl;
  if (payload !== null && n > 0) dst.set(n === payload.length ? payload : payload.subarray(0, n), p);
  for (let i = p + n, end = p + n + pad + ICRC_SIZE; i < end; i++) dst[i] = 0;
  if (path !== null) sealIcrc(path, dst, off, total);
  return total;
}
