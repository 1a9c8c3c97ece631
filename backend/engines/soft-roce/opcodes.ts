/**
 * BTH opcodes of the RC, UC and UD transports (IBTA vol. 1 §9.2 table 38;
 * rxe_opcode.c) and, per opcode, which extension headers follow the BTH,
 * where, and whether a payload may follow them.
 */

export const Opcode = {
  RC_SEND_FIRST: 0x00,
  RC_SEND_MIDDLE: 0x01,
  RC_SEND_LAST: 0x02,
  RC_SEND_LAST_WITH_IMMEDIATE: 0x03,
  RC_SEND_ONLY: 0x04,
  RC_SEND_ONLY_WITH_IMMEDIATE: 0x05,
  RC_RDMA_WRITE_FIRST: 0x06,
  RC_RDMA_WRITE_MIDDLE: 0x07,
  RC_RDMA_WRITE_LAST: 0x08,
  RC_RDMA_WRITE_LAST_WITH_IMMEDIATE: 0x09,
  RC_RDMA_WRITE_ONLY: 0x0a,
  RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE: 0x0b,
  RC_RDMA_READ_REQUEST: 0x0c,
  RC_RDMA_READ_RESPONSE_FIRST: 0x0d,
  RC_RDMA_READ_RESPONSE_MIDDLE: 0x0e,
  RC_RDMA_READ_RESPONSE_LAST: 0x0f,
  RC_RDMA_READ_RESPONSE_ONLY: 0x10,
  RC_ACKNOWLEDGE: 0x11,
  RC_ATOMIC_ACKNOWLEDGE: 0x12,
  RC_COMPARE_SWAP: 0x13,
  RC_FETCH_ADD: 0x14,
  RC_SEND_LAST_WITH_INVALIDATE: 0x16,
  RC_SEND_ONLY_WITH_INVALIDATE: 0x17,
  /** IBTA 1.5 memory placement extensions (rxe ≥ 6.2). */
  RC_FLUSH: 0x1c,
  RC_ATOMIC_WRITE: 0x1d,

  UC_SEND_FIRST: 0x20,
  UC_SEND_MIDDLE: 0x21,
  UC_SEND_LAST: 0x22,
  UC_SEND_LAST_WITH_IMMEDIATE: 0x23,
  UC_SEND_ONLY: 0x24,
  UC_SEND_ONLY_WITH_IMMEDIATE: 0x25,
  UC_RDMA_WRITE_FIRST: 0x26,
  UC_RDMA_WRITE_MIDDLE: 0x27,
  UC_RDMA_WRITE_LAST: 0x28,
  UC_RDMA_WRITE_LAST_WITH_IMMEDIATE: 0x29,
  UC_RDMA_WRITE_ONLY: 0x2a,
  UC_RDMA_WRITE_ONLY_WITH_IMMEDIATE: 0x2b,

  UD_SEND_ONLY: 0x64,
  UD_SEND_ONLY_WITH_IMMEDIATE: 0x65,
} as const;
export type Opcode = (typeof Opcode)[keyof typeof Opcode];

/** Transport base in the opcode's top three bits. */
export const Transport = { RC: 0x00, UC: 0x20, RD: 0x40, UD: 0x60, CNP: 0x80, XRC: 0xa0 } as const;
export type Transport = (typeof Transport)[keyof typeof Transport];

/** Extension-header presence bits. */
export const Hdr = {
  RETH: 1 << 0,
  AETH: 1 << 1,
  ATOMIC_ETH: 1 << 2,
  ATOMIC_ACK_ETH: 1 << 3,
  IMMDT: 1 << 4,
  IETH: 1 << 5,
  DETH: 1 << 6,
  FETH: 1 << 7,
} as const;

export const BTH_SIZE = 12;
export const RETH_SIZE = 16;
export const AETH_SIZE = 4;
export const ATOMIC_ETH_SIZE = 28;
export const ATOMIC_ACK_ETH_SIZE = 8;
export const IMMDT_SIZE = 4;
export const IETH_SIZE = 4;
export const DETH_SIZE = 8;
export const FETH_SIZE = 4;

/** What may follow the headers. */
export const PayloadRule = {
  /** No payload and no pad (requests for READ/atomics/FLUSH, ACKs). */
  NONE: 0,
  /** 0 … MTU bytes. */
  ANY: 1,
  /** Exactly 8 bytes (ATOMIC_WRITE's value). */
  EIGHT: 2,
} as const;
export type PayloadRule = (typeof PayloadRule)[keyof typeof PayloadRule];

export interface OpcodeInfo {
  readonly opcode: number;
  readonly name: string;
  readonly transport: Transport;
  /** Hdr bits. */
  readonly headers: number;
  /** BTH plus extension headers, bytes. */
  readonly headerLength: number;
  /** Offsets from the start of the BTH (-1 when absent). */
  readonly rethAt: number;
  readonly aethAt: number;
  readonly atomicEthAt: number;
  readonly atomicAckEthAt: number;
  readonly immAt: number;
  readonly iethAt: number;
  readonly dethAt: number;
  readonly fethAt: number;
  readonly payload: PayloadRule;
  /** First / last packet of a message (SEND_FIRST is first, READ_RESPONSE_MIDDLE neither, *_ONLY both). */
  readonly first: boolean;
  readonly last: boolean;
}

const SIZES: readonly [number, number][] = [
  [Hdr.RETH, RETH_SIZE],
  [Hdr.AETH, AETH_SIZE],
  [Hdr.ATOMIC_ETH, ATOMIC_ETH_SIZE],
  [Hdr.ATOMIC_ACK_ETH, ATOMIC_ACK_ETH_SIZE],
  [Hdr.IMMDT, IMMDT_SIZE],
  [Hdr.IETH, IETH_SIZE],
  [Hdr.DETH, DETH_SIZE],
  [Hdr.FETH, FETH_SIZE],
];

/**
 * Header order on the wire. IBTA: DETH, then FETH, RETH, AtomicETH, AETH,
 * AtomicAckETH, ImmDt/IETH. (FLUSH carries FETH before RETH; WRITE_ONLY_WITH_IMM
 * RETH before ImmDt; UD DETH before ImmDt; ATOMIC_ACK AETH before AtomicAckETH.)
 */
const ORDER = [Hdr.DETH, Hdr.FETH, Hdr.RETH, Hdr.ATOMIC_ETH, Hdr.AETH, Hdr.ATOMIC_ACK_ETH, Hdr.IMMDT, Hdr.IETH] as const;

function sizeOf(bit: number): number {
  for (const [b, s] of SIZES) if (b === bit) return s;
  throw new Error(`no header ${bit}`);
}

function info(opcode: number, name: string, headers: number, payload: PayloadRule, first: boolean, last: boolean): OpcodeInfo {
  const at: Record<number, number> = {};
  let off = BTH_SIZE;
  for (const bit of ORDER) {
    if (headers & bit) {
      at[bit] = off;
      off += sizeOf(bit);
    }
  }
  return {
    opcode,
    name,
    transport: (opcode & 0xe0) as Transport,
    headers,
    headerLength: off,
    rethAt: at[Hdr.RETH] ?? -1,
    aethAt: at[Hdr.AETH] ?? -1,
    atomicEthAt: at[Hdr.ATOMIC_ETH] ?? -1,
    atomicAckEthAt: at[Hdr.ATOMIC_ACK_ETH] ?? -1,
    immAt: at[Hdr.IMMDT] ?? -1,
    iethAt: at[Hdr.IETH] ?? -1,
    dethAt: at[Hdr.DETH] ?? -1,
    fethAt: at[Hdr.FETH] ?? -1,
    payload,
    first,
    last,
  };
}

const { NONE, ANY, EIGHT } = PayloadRule;
const { RETH, AETH, ATOMIC_ETH, ATOMIC_ACK_ETH, IMMDT, IETH, DETH, FETH } = Hdr;

/** The SEND/WRITE opcodes RC and UC share (same low five bits). */
function connected(base: number, prefix: string): OpcodeInfo[] {
  return [
    info(base + 0x00, `${prefix}_SEND_FIRST`, 0, ANY, true, false),
    info(base + 0x01, `${prefix}_SEND_MIDDLE`, 0, ANY, false, false),
    info(base + 0x02, `${prefix}_SEND_LAST`, 0, ANY, false, true),
    info(base + 0x03, `${prefix}_SEND_LAST_WITH_IMMEDIATE`, IMMDT, ANY, false, true),
    info(base + 0x04, `${prefix}_SEND_ONLY`, 0, ANY, true, true),
    info(base + 0x05, `${prefix}_SEND_ONLY_WITH_IMMEDIATE`, IMMDT, ANY, true, true),
    info(base + 0x06, `${prefix}_RDMA_WRITE_FIRST`, RETH, ANY, true, false),
    info(base + 0x07, `${prefix}_RDMA_WRITE_MIDDLE`, 0, ANY, false, false),
    info(base + 0x08, `${prefix}_RDMA_WRITE_LAST`, 0, ANY, false, true),
    info(base + 0x09, `${prefix}_RDMA_WRITE_LAST_WITH_IMMEDIATE`, IMMDT, ANY, false, true),
    info(base + 0x0a, `${prefix}_RDMA_WRITE_ONLY`, RETH, ANY, true, true),
    info(base + 0x0b, `${prefix}_RDMA_WRITE_ONLY_WITH_IMMEDIATE`, RETH | IMMDT, ANY, true, true),
  ];
}

const ALL: OpcodeInfo[] = [
  ...connected(Transport.RC, 'RC'),
  info(Opcode.RC_RDMA_READ_REQUEST, 'RC_RDMA_READ_REQUEST', RETH, NONE, true, true),
  info(Opcode.RC_RDMA_READ_RESPONSE_FIRST, 'RC_RDMA_READ_RESPONSE_FIRST', AETH, ANY, true, false),
  info(Opcode.RC_RDMA_READ_RESPONSE_MIDDLE, 'RC_RDMA_READ_RESPONSE_MIDDLE', 0, ANY, false, false),
  info(Opcode.RC_RDMA_READ_RESPONSE_LAST, 'RC_RDMA_READ_RESPONSE_LAST', AETH, ANY, false, true),
  info(Opcode.RC_RDMA_READ_RESPONSE_ONLY, 'RC_RDMA_READ_RESPONSE_ONLY', AETH, ANY, true, true),
  info(Opcode.RC_ACKNOWLEDGE, 'RC_ACKNOWLEDGE', AETH, NONE, true, true),
  info(Opcode.RC_ATOMIC_ACKNOWLEDGE, 'RC_ATOMIC_ACKNOWLEDGE', AETH | ATOMIC_ACK_ETH, NONE, true, true),
  info(Opcode.RC_COMPARE_SWAP, 'RC_COMPARE_SWAP', ATOMIC_ETH, NONE, true, true),
  info(Opcode.RC_FETCH_ADD, 'RC_FETCH_ADD', ATOMIC_ETH, NONE, true, true),
  info(Opcode.RC_SEND_LAST_WITH_INVALIDATE, 'RC_SEND_LAST_WITH_INVALIDATE', IETH, ANY, false, true),
  info(Opcode.RC_SEND_ONLY_WITH_INVALIDATE, 'RC_SEND_ONLY_WITH_INVALIDATE', IETH, ANY, true, true),
  info(Opcode.RC_FLUSH, 'RC_FLUSH', FETH | RETH, NONE, true, true),
  info(Opcode.RC_ATOMIC_WRITE, 'RC_ATOMIC_WRITE', RETH, EIGHT, true, true),
  ...connected(Transport.UC, 'UC'),
  info(Opcode.UD_SEND_ONLY, 'UD_SEND_ONLY', DETH, ANY, true, true),
  info(Opcode.UD_SEND_ONLY_WITH_IMMEDIATE, 'UD_SEND_ONLY_WITH_IMMEDIATE', DETH | IMMDT, ANY, true, true),
];

/** Indexed by opcode; undefined for reserved, RD, CNP, XRC and vendor opcodes. */
export const OPCODES: readonly (OpcodeInfo | undefined)[] = (() => {
  const t: (OpcodeInfo | undefined)[] = new Array<OpcodeInfo | undefined>(256).fill(undefined);
  for (const i of ALL) t[i.opcode] = i;
  return t;
})();

/** Every opcode this codec speaks, ascending. */
export const SUPPORTED_OPCODES: readonly number[] = ALL.map((i) => i.opcode).sort((a, b) => a - b);

export function opcodeInfo(opcode: number): OpcodeInfo | undefined {
  return OPCODES[opcode & 0xff];
}

export function opcodeName(opcode: number): string {
  return OPCODES[opcode & 0xff]?.name ?? `0x${(opcode & 0xff).toString(16).padStart(2, '0')}`;
}
