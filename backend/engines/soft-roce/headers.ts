/**
 * One codec per InfiniBand transport header (IBTA vol. 1 §9.2–9.5,
 * rxe_hdr.h), all big-endian. Each decodes into a caller-owned object and
 * encodes into a caller-owned buffer.
 *
 * `decode` returns false, touching nothing, when the header does not fit
 * in the buffer; otherwise it cannot fail (reserved bits are ignored, as
 * IBTA asks of receivers). `encode` throws RangeError on a value that does
 * not fit its field or a header that does not fit the buffer: encoders are
 * fed by our own code, so that is a bug, not a bad packet.
 */
import { AETH_SIZE, ATOMIC_ACK_ETH_SIZE, ATOMIC_ETH_SIZE, BTH_SIZE, DETH_SIZE, FETH_SIZE, IETH_SIZE, IMMDT_SIZE, RETH_SIZE } from './opcodes.js';

// --- byte helpers (callers have checked bounds) ------------------------------

export function rd16(b: Uint8Array, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}
export function rd24(b: Uint8Array, o: number): number {
  return (b[o]! << 16) | (b[o + 1]! << 8) | b[o + 2]!;
}
export function rd32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
export function rd64(b: Uint8Array, o: number): bigint {
  return (BigInt(rd32(b, o)) << 32n) | BigInt(rd32(b, o + 4));
}
export function wr16(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 8) & 0xff;
  b[o + 1] = v & 0xff;
}
export function wr24(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 16) & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
  b[o + 2] = v & 0xff;
}
export function wr32(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 24) & 0xff;
  b[o + 1] = (v >>> 16) & 0xff;
  b[o + 2] = (v >>> 8) & 0xff;
  b[o + 3] = v & 0xff;
}
export function wr64(b: Uint8Array, o: number, v: bigint): void {
  wr32(b, o, Number((v >> 32n) & 0xffffffffn));
  wr32(b, o + 4, Number(v & 0xffffffffn));
}

function fits(b: Uint8Array, o: number, size: number): boolean {
  return Number.isInteger(o) && o >= 0 && o + size <= b.length;
}

function need(b: Uint8Array, o: number, size: number, what: string): void {
  if (!fits(b, o, size)) throw new RangeError(`${what}: ${size} bytes at ${o} do not fit a ${b.length}-byte buffer`);
}

function uint(v: number, bits: number, what: string): number {
  if (!Number.isInteger(v) || v < 0 || v > 2 ** bits - 1) throw new RangeError(`${what} ${v} is not a ${bits}-bit unsigned integer`);
  return v;
}

function u64(v: bigint, what: string): bigint {
  if (typeof v !== 'bigint' || v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new RangeError(`${what} ${String(v)} is not a 64-bit unsigned integer`);
  return v;
}

// --- BTH ---------------------------------------------------------------------

export interface Bth {
  opcode: number;
  /** Solicited event. */
  se: boolean;
  migReq: boolean;
  /** Pad bytes after the payload, 0–3. */
  padCount: number;
  /** Transport header version; must be 0. */
  tver: number;
  pkey: number;
  fecn: boolean;
  becn: boolean;
  destQp: number;
  ackReq: boolean;
  psn: number;
}

export function newBth(): Bth {
  return { opcode: 0, se: false, migReq: false, padCount: 0, tver: 0, pkey: 0xffff, fecn: false, becn: false, destQp: 0, ackReq: false, psn: 0 };
}

export const BthCodec = {
  size: BTH_SIZE,
  decode(b: Uint8Array, o: number, out: Bth): boolean {
    if (!fits(b, o, BTH_SIZE)) return false;
    const f = b[o + 1]!;
    const r = b[o + 4]!;
    out.opcode = b[o]!;
    out.se = (f & 0x80) !== 0;
    out.migReq = (f & 0x40) !== 0;
    out.padCount = (f >>> 4) & 3;
    out.tver = f & 0x0f;
    out.pkey = rd16(b, o + 2);
    out.fecn = (r & 0x80) !== 0;
    out.becn = (r & 0x40) !== 0;
    out.destQp = rd24(b, o + 5);
    out.ackReq = (b[o + 8]! & 0x80) !== 0;
    out.psn = rd24(b, o + 9);
    return true;
  },
  encode(b: Uint8Array, o: number, v: Bth): void {
    need(b, o, BTH_SIZE, 'BTH');
    b[o] = uint(v.opcode, 8, 'BTH opcode');
    b[o + 1] = (v.se ? 0x80 : 0) | (v.migReq ? 0x40 : 0) | (uint(v.padCount, 2, 'BTH pad count') << 4) | uint(v.tver, 4, 'BTH TVer');
    wr16(b, o + 2, uint(v.pkey, 16, 'BTH P_Key'));
    b[o + 4] = (v.fecn ? 0x80 : 0) | (v.becn ? 0x40 : 0);
    wr24(b, o + 5, uint(v.destQp, 24, 'BTH DestQP'));
    b[o + 8] = v.ackReq ? 0x80 : 0;
    wr24(b, o + 9, uint(v.psn, 24, 'BTH PSN'));
  },
};

// --- RETH --------------------------------------------------------------------

export interface Reth {
  va: bigint;
  rkey: number;
  /** Length of the whole message (DMA length). */
  dmaLength: number;
}

export function newReth(): Reth {
  return { va: 0n, rkey: 0, dmaLength: 0 };
}

export const RethCodec = {
  size: RETH_SIZE,
  decode(b: Uint8Array, o: number, out: Reth): boolean {
    if (!fits(b, o, RETH_SIZE)) return false;
    out.va = rd64(b, o);
    out.rkey = rd32(b, o + 8);
    out.dmaLength = rd32(b, o + 12);
    return true;
  },
  encode(b: Uint8Array, o: number, v: Reth): void {
    need(b, o, RETH_SIZE, 'RETH');
    wr64(b, o, u64(v.va, 'RETH VA'));
    wr32(b, o + 8, uint(v.rkey, 32, 'RETH R_Key'));
    wr32(b, o + 12, uint(v.dmaLength, 32, 'RETH DMA length'));
  },
};

// --- AETH --------------------------------------------------------------------

export interface Aeth {
  /** Bit 7 reserved; bits 6:5 type (ACK 00, RNR NAK 01, NAK 11); bits 4:0 value. */
  syndrome: number;
  msn: number;
}

export function newAeth(): Aeth {
  return { syndrome: 0, msn: 0 };
}

export const AethCodec = {
  size: AETH_SIZE,
  decode(b: Uint8Array, o: number, out: Aeth): boolean {
    if (!fits(b, o, AETH_SIZE)) return false;
    out.syndrome = b[o]!;
    out.msn = rd24(b, o + 1);
    return true;
  },
  encode(b: Uint8Array, o: number, v: Aeth): void {
    need(b, o, AETH_SIZE, 'AETH');
    b[o] = uint(v.syndrome, 8, 'AETH syndrome');
    wr24(b, o + 1, uint(v.msn, 24, 'AETH MSN'));
  },
};

/** AETH syndromes (§3 of the reference). */
export const Syndrome = {
  /** ACK with "unlimited" credits, what rxe always sends. */
  ACK_UNLIMITED: 0x1f,
  RNR_NAK: 0x20,
  NAK_PSN_SEQ_ERROR: 0x60,
  NAK_INVALID_REQUEST: 0x61,
  NAK_REMOTE_ACCESS_ERROR: 0x62,
  NAK_REMOTE_OPERATIONAL_ERROR: 0x63,
  NAK_INVALID_RD_REQUEST: 0x64,
} as const;

export type SyndromeKind = 'ack' | 'rnr_nak' | 'reserved' | 'nak';
const KINDS: readonly SyndromeKind[] = ['ack', 'rnr_nak', 'reserved', 'nak'];

export function syndromeKind(syndrome: number): SyndromeKind {
  return KINDS[(syndrome >>> 5) & 3]!;
}

/** Credit count (ACK) or timer code (RNR NAK) or NAK code: the low five bits. */
export function syndromeValue(syndrome: number): number {
  return syndrome & 0x1f;
}

// --- AtomicETH ---------------------------------------------------------------

export interface AtomicEth {
  /** 8-byte aligned target address. */
  va: bigint;
  rkey: number;
  /** Swap value (COMPARE_SWAP) or addend (FETCH_ADD). */
  swapAdd: bigint;
  compare: bigint;
}

export function newAtomicEth(): AtomicEth {
  return { va: 0n, rkey: 0, swapAdd: 0n, compare: 0n };
}

export const AtomicEthCodec = {
  size: ATOMIC_ETH_SIZE,
  decode(b: Uint8Array, o: number, out: AtomicEth): boolean {
    if (!fits(b, o, ATOMIC_ETH_SIZE)) return false;
    out.va = rd64(b, o);
    out.rkey = rd32(b, o + 8);
    out.swapAdd = rd64(b, o + 12);
    out.compare = rd64(b, o + 20);
    return true;
  },
  encode(b: Uint8Array, o: number, v: AtomicEth): void {
    need(b, o, ATOMIC_ETH_SIZE, 'AtomicETH');
    wr64(b, o, u64(v.va, 'AtomicETH VA'));
    wr32(b, o + 8, uint(v.rkey, 32, 'AtomicETH R_Key'));
    wr64(b, o + 12, u64(v.swapAdd, 'AtomicETH swap/add'));
    wr64(b, o + 20, u64(v.compare, 'AtomicETH compare'));
  },
};

// --- AtomicAckETH ------------------------------------------------------------

export interface AtomicAckEth {
  /** The value at the target before the atomic. */
  origRemoteData: bigint;
}

export function newAtomicAckEth(): AtomicAckEth {
  return { origRemoteData: 0n };
}

export const AtomicAckEthCodec = {
  size: ATOMIC_ACK_ETH_SIZE,
  decode(b: Uint8Array, o: number, out: AtomicAckEth): boolean {
    if (!fits(b, o, ATOMIC_ACK_ETH_SIZE)) return false;
    out.origRemoteData = rd64(b, o);
    return true;
  },
  encode(b: Uint8Array, o: number, v: AtomicAckEth): void {
    need(b, o, ATOMIC_ACK_ETH_SIZE, 'AtomicAckETH');
    wr64(b, o, u64(v.origRemoteData, 'AtomicAckETH original data'));
  },
};

// --- ImmDt, IETH -------------------------------------------------------------

/**
 * Immediate data: four opaque bytes. `imm` is them read big-endian, so the
 * byte string a verbs consumer put in its (network-order) imm_data comes
 * out unchanged when written back big-endian.
 */
export interface ImmDt {
  imm: number;
}

export function newImmDt(): ImmDt {
  return { imm: 0 };
}

export const ImmDtCodec = {
  size: IMMDT_SIZE,
  decode(b: Uint8Array, o: number, out: ImmDt): boolean {
    if (!fits(b, o, IMMDT_SIZE)) return false;
    out.imm = rd32(b, o);
    return true;
  },
  encode(b: Uint8Array, o: number, v: ImmDt): void {
    need(b, o, IMMDT_SIZE, 'ImmDt');
    wr32(b, o, uint(v.imm, 32, 'ImmDt'));
  },
};

/** Invalidate ETH: the R_Key the responder invalidates (SEND_*_WITH_INVALIDATE). */
export interface Ieth {
  rkey: number;
}

export function newIeth(): Ieth {
  return { rkey: 0 };
}

export const IethCodec = {
  size: IETH_SIZE,
  decode(b: Uint8Array, o: number, out: Ieth): boolean {
    if (!fits(b, o, IETH_SIZE)) return false;
    out.rkey = rd32(b, o);
    return true;
  },
  encode(b: Uint8Array, o: number, v: Ieth): void {
    need(b, o, IETH_SIZE, 'IETH');
    wr32(b, o, uint(v.rkey, 32, 'IETH R_Key'));
  },
};

// --- DETH --------------------------------------------------------------------

export interface Deth {
  qkey: number;
  srcQp: number;
}

export function newDeth(): Deth {
  return { qkey: 0, srcQp: 0 };
}

/** The Q_Key of QP1 (GSI). */
export const GSI_QKEY = 0x80010000;

export const DethCodec = {
  size: DETH_SIZE,
  decode(b: Uint8Array, o: number, out: Deth): boolean {
    if (!fits(b, o, DETH_SIZE)) return false;
    out.qkey = rd32(b, o);
    out.srcQp = rd24(b, o + 5);
    return true;
  },
  encode(b: Uint8Array, o: number, v: Deth): void {
    need(b, o, DETH_SIZE, 'DETH');
    wr32(b, o, uint(v.qkey, 32, 'DETH Q_Key'));
    b[o + 4] = 0;
    wr24(b, o + 5, uint(v.srcQp, 24, 'DETH SrcQP'));
  },
};

// --- FETH (FLUSH) ------------------------------------------------------------

/** FLUSH extended transport header: bits 3:0 placement type, 5:4 selectivity level, rest reserved. */
export interface Feth {
  placementType: number;
  selectivityLevel: number;
}

export function newFeth(): Feth {
  return { placementType: 0, selectivityLevel: 0 };
}

export const FethCodec = {
  size: FETH_SIZE,
  decode(b: Uint8Array, o: number, out: Feth): boolean {
    if (!fits(b, o, FETH_SIZE)) return false;
    const v = b[o + 3]!;
    out.placementType = v & 0x0f;
    out.selectivityLevel = (v >>> 4) & 3;
    return true;
  },
  encode(b: Uint8Array, o: number, v: Feth): void {
    need(b, o, FETH_SIZE, 'FETH');
    wr32(b, o, (uint(v.selectivityLevel, 2, 'FETH selectivity level') << 4) | uint(v.placementType, 4, 'FETH placement type'));
  },
};
