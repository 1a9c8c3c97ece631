/**
 * Device state version 1: the device's tables and the engine's state, and
 * nothing about the device they came from beyond its slot counts. This
 * back-end no longer writes it (index.ts writes version 2, which carries
 * these same tables), but loads it, so that a VM saved by an older
 * back-end still migrates here. A version 1 state cannot say which GIDs,
 * limits or engine its source had: its tables are checked against this
 * device's limits, and its engine state is left to the engine to refuse.
 *
 * The tables part (V1Tables) is also the `tables` member of version 2, so
 * the parser and apply here serve both versions.
 */
import { QpType } from '../../abi/constants.js';
import { Cqe } from '../../abi/structs.js';
import type { Engine, QpAttributes } from '../../engine/engine.js';
import { avToJson, hexOf, qpAttributesToJson, type Json } from '../../engine/plain-data.js';
import { GuestMemory } from '../../../virtio/memory/guest-memory.js';
import { DeviceError } from '../../../virtio/device.js';
import type { RdmaLimits } from '../limits.js';
import { MrTable } from '../mr-table.js';
import type { AhRecord, CqRecord, QpCaps, QpRecord, Resources } from '../resources.js';
import { DeviceStateError as Bad, FORMAT, base64, read, type DeviceStateHost, type DeviceStateImage, type DeviceTables } from './common.js';

export const V1 = 1;

// ---------------------------------------------------------------------------
// Schema

/** An address vector (plain-data.ts avToJson): dgid as 32 hex digits. */
export interface AvJson {
  dgid: string;
  sgidIndex: number;
  hopLimit: number;
  trafficClass: number;
  flowLabel: number;
  sl: number;
}

/** QP attributes (plain-data.ts qpAttributesToJson): QpAttributes with qkey unsigned and av as AvJson. */
export type QpAttributesJson = Omit<QpAttributes, 'av'> & { av: AvJson | null };

export interface V1Cq {
  cqn: number;
  slot: number;
  /** CQEs the CQ was created with. */
  cqe: number;
  /** CqNotify bits armed. */
  armed: number;
  /** Overflowed. */
  error: boolean;
  /** The QPN an overflow event still has to be written for; null when none is due. */
  errorEventQpn: number | null;
  /** CQEs waiting for their ring: [the 48-byte CQE as hex, whether it wakes a SOLICITED arm]. */
  backlog: [cqe: string, wake: boolean][];
}

export interface V1Qp {
  qpn: number;
  slot: number;
  type: QpType;
  pdn: number;
  sendCqn: number;
  recvCqn: number;
  sqSigAll: boolean;
  caps: QpCaps;
  attrs: QpAttributesJson;
  /** SQ chains the engine holds: [descriptor head, wr_id as decimal, signalled]. */
  sendOut: [head: number, wrId: string, signaled: boolean][];
  /** RQ chains the engine holds: [descriptor head, wr_id as decimal]. */
  recvOut: [head: number, wrId: string][];
}

export interface V1Ah {
  ahn: number;
  pdn: number;
  av: AvJson;
}

export interface V1Deferred {
  vq: number;
  head: number;
  len: number;
}

/** The device's tables: version 1 without its header and engine, and version 2's `tables`. */
export interface V1Tables {
  /** The source's slot counts; they must equal this device's (they fix the number of virtqueues). */
  slots: { cq: number; qp: number };
  pds: number[];
  /** The MR table's own versioned form (mr-table.ts saveState). */
  mrs: Json;
  cqs: V1Cq[];
  qps: V1Qp[];
  ahs: V1Ah[];
  /** Used-ring returns waiting for a stopped ring. */
  deferred: V1Deferred[];
}

export interface V1Document extends V1Tables {
  format: typeof FORMAT;
  version: typeof V1;
  /** The engine's state (Engine.saveState), base64. */
  engine: string;
}

// ---------------------------------------------------------------------------
// Save

function cqeToHex(c: CqRecord['backlog'][number]['cqe']): string {
  return hexOf(Cqe.encodeBytes(c));
}

export function saveV1Tables(res: Resources): V1Tables {
  const l = res.limits;
  return {
    slots: { cq: l.numCqSlots, qp: l.numQpSlots },
    pds: [...res.pds.values()].map((p) => p.pdn),
    mrs: res.mrs.saveState() as Json,
    cqs: [...res.cqs.values()].map((c) => ({
      cqn: c.cqn,
      slot: c.slot,
      cqe: c.cqe,
      armed: c.armed,
      error: c.error,
      errorEventQpn: c.errorEventPending?.qpn ?? null,
      backlog: c.backlog.map((b): [string, boolean] => [cqeToHex(b.cqe), b.wake]),
    })),
    qps: [...res.qps.values()].map((q) => ({
      qpn: q.qpn,
      slot: q.slot,
      type: q.type,
      pdn: q.pdn,
      sendCqn: q.sendCqn,
      recvCqn: q.recvCqn,
      sqSigAll: q.sqSigAll,
      caps: { ...q.caps },
      // plain-data.ts writes these as untyped Json; their shape is the one its readers check.
      attrs: qpAttributesToJson(q.attrs) as unknown as QpAttributesJson,
      sendOut: [...q.sendOut].map(([head, o]): [number, string, boolean] => [head, o.wrId.toString(), o.signaled]),
      recvOut: [...q.recvOut].map(([head, wrId]): [number, string] => [head, wrId.toString()]),
    })),
    ahs: [...res.ahs.values()].map((a) => ({ ahn: a.ahn, pdn: a.pdn, av: avToJson(a.av) as unknown as AvJson })),
    deferred: res.deferred.map((d) => ({ vq: d.vq, head: d.head, len: d.len })),
  };
}

// ---------------------------------------------------------------------------
// Parse

const { obj, arr, int, bool, u64, bytes, av: readAv, qpAttributes } = read;

/**
 * Checks the tables of a saved device against `limits` (the limits their
 * source ran with, or this device's when the state does not say), field
 * by field and across tables (every PD, CQ and slot a QP, MR or AH names
 * exists; no number or slot twice). `at` prefixes every path ("tables.").
 * Changes nothing.
 */
export function parseV1Tables(r: Record<string, unknown>, limits: RdmaLimits, at: string): DeviceTables {
  const p = (s: string): string => at + s;
  const slots = obj(r.slots, p('slots'));
  if (slots.cq !== limits.numCqSlots || slots.qp !== limits.numQpSlots) {
    throw new Bad(p('slots'), `source had ${String(slots.cq)} CQ and ${String(slots.qp)} QP slots; this device has ${limits.numCqSlots} and ${limits.numQpSlots}`);
  }
  const pds = arr(r.pds, p('pds')).map((x, i) => int(x, p(`pds[${i}]`), 1, limits.maxPd));
  const pdSet = new Set(pds);
  if (pdSet.size !== pds.length) throw new Bad(p('pds'), 'duplicate PD');
  const mrs = checkMrs(r.mrs, limits, pdSet, p('mrs'));
  const cqSlots = new Set<number>();
  const cqs = arr(r.cqs, p('cqs')).map((x, i): CqRecord => {
    const w = p(`cqs[${i}]`);
    const o = obj(x, w);
    const slot = int(o.slot, `${w}.slot`, 0, limits.numCqSlots - 1);
    if (cqSlots.has(slot)) throw new Bad(w, `slot ${slot} used twice`);
    cqSlots.add(slot);
    const evQpn = o.errorEventQpn === null ? null : int(o.errorEventQpn, `${w}.errorEventQpn`, 0, 0xffffff);
    return {
      cqn: int(o.cqn, `${w}.cqn`, 1, limits.maxCq),
      slot,
      cqe: int(o.cqe, `${w}.cqe`, 1, limits.maxCqe),
      armed: int(o.armed, `${w}.armed`, 0, 3),
      error: bool(o.error, `${w}.error`),
      errorEventPending: evQpn === null ? null : { qpn: evQpn },
      backlog: arr(o.backlog, `${w}.backlog`).map((b, k) => {
        const e = arr(b, `${w}.backlog[${k}]`);
        if (e.length !== 2) throw new Bad(`${w}.backlog[${k}]`, 'not [cqe, wake]');
        return { cqe: Cqe.decodeBytes(bytes(e[0], `${w}.backlog[${k}][0]`, Cqe.size)), wake: bool(e[1], `${w}.backlog[${k}][1]`) };
      }),
    };
  });
  for (const c of cqs) if (c.backlog.length > c.cqe) throw new Bad(p(`cq ${c.cqn}`), `backlog of ${c.backlog.length} exceeds its ${c.cqe} entries`);
  const cqns = new Set(cqs.map((c) => c.cqn));
  if (cqns.size !== cqs.length) throw new Bad(p('cqs'), 'duplicate CQ');
  const qpSlots = new Set<number>();
  const qps = arr(r.qps, p('qps')).map((x, i): QpRecord => {
    const w = p(`qps[${i}]`);
    const o = obj(x, w);
    const slot = int(o.slot, `${w}.slot`, 0, limits.numQpSlots - 1);
    if (qpSlots.has(slot)) throw new Bad(w, `slot ${slot} used twice`);
    qpSlots.add(slot);
    const type = int(o.type, `${w}.type`, QpType.RC, QpType.UD) as QpType;
    const pdn = int(o.pdn, `${w}.pdn`, 1, limits.maxPd);
    if (!pdSet.has(pdn)) throw new Bad(w, `PD ${pdn} does not exist`);
    const sendCqn = int(o.sendCqn, `${w}.sendCqn`, 1, limits.maxCq);
    const recvCqn = int(o.recvCqn, `${w}.recvCqn`, 1, limits.maxCq);
    if (!cqns.has(sendCqn) || !cqns.has(recvCqn)) throw new Bad(w, 'names a CQ that does not exist');
    const c = obj(o.caps, `${w}.caps`);
    const caps: QpCaps = {
      maxSendWr: int(c.maxSendWr, `${w}.caps.maxSendWr`, 1, limits.maxQpWr),
      maxRecvWr: int(c.maxRecvWr, `${w}.caps.maxRecvWr`, 1, limits.maxQpWr),
      maxSendSge: int(c.maxSendSge, `${w}.caps.maxSendSge`, 0, limits.maxSge),
      maxRecvSge: int(c.maxRecvSge, `${w}.caps.maxRecvSge`, 0, limits.maxSge),
      maxInlineData: int(c.maxInlineData, `${w}.caps.maxInlineData`, 0, limits.maxInlineData),
    };
    const head = (h: unknown, where: string): number => int(h, where, 0, 32767);
    const sendOut = new Map<number, { wrId: bigint; signaled: boolean }>();
    arr(o.sendOut, `${w}.sendOut`).forEach((e, k) => {
      const t = arr(e, `${w}.sendOut[${k}]`);
      if (t.length !== 3) throw new Bad(`${w}.sendOut[${k}]`, 'not [head, wrId, signaled]');
      const h = head(t[0], `${w}.sendOut[${k}][0]`);
      if (sendOut.has(h)) throw new Bad(w, `send head ${h} twice`);
      sendOut.set(h, { wrId: u64(t[1], `${w}.sendOut[${k}][1]`), signaled: bool(t[2], `${w}.sendOut[${k}][2]`) });
    });
    const recvOut = new Map<number, bigint>();
    arr(o.recvOut, `${w}.recvOut`).forEach((e, k) => {
      const t = arr(e, `${w}.recvOut[${k}]`);
      if (t.length !== 2) throw new Bad(`${w}.recvOut[${k}]`, 'not [head, wrId]');
      const h = head(t[0], `${w}.recvOut[${k}][0]`);
      if (recvOut.has(h)) throw new Bad(w, `receive head ${h} twice`);
      recvOut.set(h, u64(t[1], `${w}.recvOut[${k}][1]`));
    });
    return {
      qpn: int(o.qpn, `${w}.qpn`, 1, 0xffffff),
      slot,
      type,
      pdn,
      sendCqn,
      recvCqn,
      sqSigAll: bool(o.sqSigAll, `${w}.sqSigAll`),
      caps,
      attrs: qpAttributes(o.attrs, `${w}.attrs`, { maxRdAtomic: limits.maxQpRdAtom, maxPkeyIndex: 0 }),
      sendOut,
      recvOut,
    };
  });
  if (new Set(qps.map((q) => q.qpn)).size !== qps.length) throw new Bad(p('qps'), 'duplicate QPN');
  if (qps.length > limits.maxQp) throw new Bad(p('qps'), `${qps.length} QPs exceed ${limits.maxQp}`);
  const ahs = arr(r.ahs, p('ahs')).map((x, i): AhRecord => {
    const w = p(`ahs[${i}]`);
    const o = obj(x, w);
    const pdn = int(o.pdn, `${w}.pdn`, 1, limits.maxPd);
    if (!pdSet.has(pdn)) throw new Bad(w, `PD ${pdn} does not exist`);
    const a = readAv(o.av, `${w}.av`);
    if (a === null) throw new Bad(w, 'no address vector');
    return { ahn: int(o.ahn, `${w}.ahn`, 1, limits.maxAh), pdn, av: a };
  });
  // HandleTable.put drops a second AH under a taken number without a word: refuse it here.
  if (new Set(ahs.map((a) => a.ahn)).size !== ahs.length) throw new Bad(p('ahs'), 'duplicate AH');
  const nq = 1 + limits.numCqSlots + 2 * limits.numQpSlots;
  const deferred = arr(r.deferred, p('deferred')).map((x, i) => {
    const w = p(`deferred[${i}]`);
    const o = obj(x, w);
    return { vq: int(o.vq, `${w}.vq`, 0, nq - 1), head: int(o.head, `${w}.head`, 0, 32767), len: int(o.len, `${w}.len`, 0, 0xffffffff) };
  });
  return { pds, mrs, cqs, qps, ahs, deferred };
}

/**
 * Loads the MR part into a scratch table, which checks it completely and
 * needs no guest memory (page lists are kept, not read, on load), and
 * checks what the MR table cannot: that each MR's PD exists.
 */
function checkMrs(mrs: unknown, limits: RdmaLimits, pds: ReadonlySet<number>, where: string): unknown {
  const scratch = new MrTable(limits.maxMr, new GuestMemory(1), limits.maxMrSize);
  try {
    scratch.loadState(mrs);
  } catch (err) {
    if (err instanceof DeviceError) throw new Bad(where, err.message);
    throw err;
  }
  for (const mr of scratch.all()) if (!pds.has(mr.pdn)) throw new Bad(where, `MR ${mr.mrn} is in PD ${mr.pdn}, which does not exist`);
  return mrs;
}

/** Checks a version 1 document against the device it is loaded into. */
export function parseV1(r: Record<string, unknown>, host: DeviceStateHost): DeviceStateImage {
  const tables = parseV1Tables(r, host.limits, '');
  return { version: V1, tables, engine: base64(r.engine, 'engine') };
}

// ---------------------------------------------------------------------------
// Apply

/**
 * Replaces the device's tables and the engine's state with a checked image
 * (of any version). The engine has already accepted `image.engine` once
 * (index.ts), and the tables were checked against limits no larger than
 * this device's, so nothing here can refuse.
 */
export function applyImage(image: DeviceStateImage, res: Resources, engine: Engine): void {
  res.clear();
  engine.reset();
  engine.loadState(image.engine);
  const t = image.tables;
  res.mrs.loadState(t.mrs);
  for (const pdn of t.pds) res.pds.put(pdn, { pdn });
  for (const cq of t.cqs) {
    res.cqs.put(cq.cqn, cq);
    res.cqSlots[cq.slot] = cq.cqn;
  }
  for (const qp of t.qps) {
    res.qps.set(qp.qpn, qp);
    res.qpSlots[qp.slot] = qp.qpn;
  }
  for (const ah of t.ahs) res.ahs.put(ah.ahn, ah);
  res.deferred = t.deferred;
}
