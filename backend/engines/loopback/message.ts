/**
 * A request as it travels from a requester to a responder: what the
 * packets of one message carry (BTH opcode, RETH, AtomicETH, DETH, ImmDt)
 * plus a reader for its payload. Payloads are moved in chunks through a
 * fixed staging buffer, so a guest cannot make the engine allocate the size
 * of its message.
 */
import { WcStatus, type QpType } from '../../abi/constants.js';
import type { MemoryAccess, Sge } from '../../engine/engine.js';

/** Bytes moved per copy step. A message up to this size is read completely before anything is delivered. */
export const CHUNK = 256 * 1024;
/** Largest message (the port's max_msg_sz). */
export const MAX_MESSAGE = 0x8000_0000;
/** Largest UD payload: the 4096-byte path MTU. */
export const UD_MAX_PAYLOAD = 4096;

export type MessageOp = 'send' | 'write' | 'read' | 'cmp_swap' | 'fetch_add';

export interface Message {
  op: MessageOp;
  /** Transport of the sending QP (a responder drops what its own type does not speak). */
  transport: QpType;
  srcQpn: number;
  /** Payload bytes (SEND, WRITE) or bytes requested (READ); 8 for atomics. */
  length: number;
  /** Immediate data (SEND/WRITE with immediate), else null. */
  imm: number | null;
  solicited: boolean;
  remoteAddr: bigint;
  rkey: number;
  compareAdd: bigint;
  swap: bigint;
  /** UD: the Q_Key in the DETH. */
  qkey: number;
  /** UD: the GRH the receive buffer starts with. */
  grh: Uint8Array | null;
  /** SEND and WRITE data. */
  payload: Payload | null;
}

const EMPTY = new Uint8Array(0);

/** The part [offset, offset+len) of an SGE list, as SGEs (zero-length ones left out). */
export function sliceSges(sges: readonly Sge[], offset: number, len: number): Sge[] {
  const out: Sge[] = [];
  let skip = offset;
  let left = len;
  for (const s of sges) {
    if (left === 0) break;
    if (skip >= s.length) {
      skip -= s.length;
      continue;
    }
    const n = Math.min(s.length - skip, left);
    out.push({ addr: s.addr + BigInt(skip), length: n, lkey: s.lkey });
    left -= n;
    skip = 0;
  }
  return out;
}

export function sgeTotal(sges: readonly Sge[]): number {
  let n = 0;
  for (const s of sges) n += s.length;
  return n;
}

/**
 * The payload of a SEND or WRITE, read from the sender's memory (or inline
 * data) one chunk at a time. `load` leaves the chunk in `view`.
 */
export class Payload {
  view: Uint8Array = EMPTY;
  private loadedAt = -1;
  private loadedLen = 0;

  constructor(
    private readonly memory: MemoryAccess,
    private readonly pdn: number,
    private readonly sges: readonly Sge[],
    private readonly inline: Uint8Array | null,
    readonly length: number,
    private readonly staging: Uint8Array,
  ) {}

  /** Makes bytes [offset, offset+n) of the payload available in `view`; a local error status when the sender's SGEs refuse. */
  load(offset: number, n: number): WcStatus {
    if (n > this.staging.length || offset + n > this.length) return WcStatus.LOC_LEN_ERR;
    if (this.inline !== null) {
      this.view = this.inline.subarray(offset, offset + n);
      return WcStatus.SUCCESS;
    }
    if (offset === this.loadedAt && n <= this.loadedLen) {
      this.view = this.staging.subarray(0, n);
      return WcStatus.SUCCESS;
    }
    this.loadedAt = -1;
    const status = this.memory.gather(this.pdn, sliceSges(this.sges, offset, n), this.staging, 0);
    if (status !== WcStatus.SUCCESS) return status;
    this.loadedAt = offset;
    this.loadedLen = n;
    this.view = this.staging.subarray(0, n);
    return WcStatus.SUCCESS;
  }
}
