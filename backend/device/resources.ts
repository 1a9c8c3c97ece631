/**
 * The device's objects and their tables. Records are plain data so the
 * whole set can be saved and restored (device-state.ts).
 */
import type { QpType } from '../abi/constants.js';
import { Cqe } from '../abi/structs.js';
import type { AddressVector, QpAttributes } from '../engine/engine.js';
import { HandleTable } from './handle-table.js';
import type { RdmaLimits } from './limits.js';
import type { MrTable } from './mr-table.js';

export type CqeValue = ReturnType<typeof Cqe.zero>;

export interface BacklogEntry {
  cqe: CqeValue;
  wake: boolean;
}

export interface PdRecord {
  pdn: number;
}

export interface CqRecord {
  cqn: number;
  slot: number;
  cqe: number;
  /** CqNotify bits armed now (0 = not armed). */
  armed: number;
  /** Overflowed: completions are dropped from now on. */
  error: boolean;
  /** The overflow event could not be written yet (no buffer was posted). */
  errorEventPending: { qpn: number } | null;
  /**
   * CQEs due while the CQ's ring was not running, in order, each with
   * whether it wakes a SOLICITED arm. Never longer than `cqe`: more would
   * be an overflow whatever the driver does next.
   */
  backlog: BacklogEntry[];
}

export interface OutstandingSend {
  wrId: bigint;
  signaled: boolean;
}

export interface QpCaps {
  maxSendWr: number;
  maxRecvWr: number;
  maxSendSge: number;
  maxRecvSge: number;
  maxInlineData: number;
}

export interface QpRecord {
  qpn: number;
  slot: number;
  type: QpType;
  pdn: number;
  sendCqn: number;
  recvCqn: number;
  sqSigAll: boolean;
  caps: QpCaps;
  attrs: QpAttributes;
  /** SQ chains the engine holds, by head (the engine's token). */
  sendOut: Map<number, OutstandingSend>;
  /** RQ chains the engine holds, by head. */
  recvOut: Map<number, bigint>;
}

export interface AhRecord {
  ahn: number;
  pdn: number;
  av: AddressVector;
}

/** A used-ring return that has to wait until its ring runs again. */
export interface DeferredReturn {
  vq: number;
  head: number;
  len: number;
}

export class Resources {
  readonly pds: HandleTable<PdRecord>;
  readonly cqs: HandleTable<CqRecord>;
  readonly ahs: HandleTable<AhRecord>;
  readonly qps = new Map<number, QpRecord>();
  /** CQ slot -> cqn (0 = free). */
  readonly cqSlots: Int32Array;
  /** QP slot -> qpn (-1 = free). */
  readonly qpSlots: Int32Array;
  deferred: DeferredReturn[] = [];

  constructor(
    readonly limits: RdmaLimits,
    readonly mrs: MrTable,
  ) {
    this.pds = new HandleTable(limits.maxPd);
    this.cqs = new HandleTable(limits.maxCq);
    this.ahs = new HandleTable(limits.maxAh);
    this.cqSlots = new Int32Array(limits.numCqSlots);
    this.qpSlots = new Int32Array(limits.numQpSlots).fill(-1);
  }

  freeCqSlot(): number {
    return this.cqSlots.indexOf(0);
  }

  freeQpSlot(): number {
    return this.qpSlots.indexOf(-1);
  }

  qpBySlot(slot: number): QpRecord | undefined {
    const qpn = this.qpSlots[slot];
    return qpn === undefined || qpn < 0 ? undefined : this.qps.get(qpn);
  }

  cqBySlot(slot: number): CqRecord | undefined {
    const cqn = this.cqSlots[slot];
    return cqn === undefined || cqn === 0 ? undefined : this.cqs.get(cqn);
  }

  qpsUsingCq(cqn: number): QpRecord[] {
    return [...this.qps.values()].filter((q) => q.sendCqn === cqn || q.recvCqn === cqn);
  }

  pdInUse(pdn: number): string | null {
    if (this.mrs.countForPd(pdn) > 0) return 'an MR';
    for (const q of this.qps.values()) if (q.pdn === pdn) return `QP 0x${q.qpn.toString(16)}`;
    for (const a of this.ahs.values()) if (a.pdn === pdn) return `AH ${a.ahn}`;
    return null;
  }

  clear(): void {
    this.pds.clear();
    this.cqs.clear();
    this.ahs.clear();
    this.qps.clear();
    this.cqSlots.fill(0);
    this.qpSlots.fill(-1);
    this.deferred = [];
    for (const mr of this.mrs.all()) this.mrs.deregister(mr.mrn);
  }
}
