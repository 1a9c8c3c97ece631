/**
 * Device state as plain, versioned data (JSON in UTF-8): every table, every
 * outstanding WQE head, CQ arming and backlog, and the engine's own state.
 * Loading validates every field before anything is applied, so a corrupt
 * or hostile blob is reported (CHECK_DEVICE_STATE fails) and changes
 * nothing.
 */
import { DeviceError } from '../../virtio/device.js';
import { QpType } from '../abi/constants.js';
import { Cqe } from '../abi/structs.js';
import type { AddressVector, Engine } from '../engine/engine.js';
import { avToJson, hexOf, plainReader, qpAttributesToJson, type Json } from '../engine/plain-data.js';
import type { RdmaLimits } from './limits.js';
import { MrTable } from './mr-table.js';
import { GuestMemory } from '../../virtio/memory/guest-memory.js';
import type { CqRecord, CqeValue, QpRecord, Resources } from './resources.js';

const FORMAT = 'vrdma-device-state';
const VERSION = 1;

function cqeToHex(c: CqeValue): string {
  return hexOf(Cqe.encodeBytes(c));
}

export function saveDeviceState(res: Resources, engine: Engine): Uint8Array {
  const l = res.limits;
  const state: Json = {
    format: FORMAT,
    version: VERSION,
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
      backlog: c.backlog.map((b) => [cqeToHex(b.cqe), b.wake]),
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
      attrs: qpAttributesToJson(q.attrs),
      sendOut: [...q.sendOut].map(([head, o]) => [head, o.wrId.toString(), o.signaled]),
      recvOut: [...q.recvOut].map(([head, wrId]) => [head, wrId.toString()]),
    })),
    ahs: [...res.ahs.values()].map((a) => ({ ahn: a.ahn, pdn: a.pdn, av: avToJson(a.av) })),
    deferred: res.deferred.map((d) => ({ vq: d.vq, head: d.head, len: d.len })),
    engine: Buffer.from(engine.saveState()).toString('base64'),
  };
  return new TextEncoder().encode(JSON.stringify(state));
}

// ---------------------------------------------------------------------------
// Validation

class Bad extends DeviceError {
  constructor(where: string, what: string) {
    super(`device state: ${where}: ${what}`);
  }
}

const { obj, arr, int, bool, u64, bytes, av: readAv, qpAttributes } = plainReader((where, what) => new Bad(where, what));

interface Parsed {
  pds: number[];
  mrs: unknown;
  cqs: CqRecord[];
  qps: QpRecord[];
  ahs: { ahn: number; pdn: number; av: AddressVector }[];
  deferred: { vq: number; head: number; len: number }[];
  engine: Uint8Array;
}

function parse(blob: Uint8Array, limits: RdmaLimits): Parsed {
  let root: unknown;
  try {
    root = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(blob));
  } catch (err) {
    throw new Bad('blob', `not UTF-8 JSON (${(err as Error).message})`);
  }
  const r = obj(root, 'root');
  if (r.format !== FORMAT) throw new Bad('format', `is not ${FORMAT}`);
  if (r.version !== VERSION) throw new Bad('version', `${String(r.version)} is not ${VERSION}`);
  const slots = obj(r.slots, 'slots');
  if (slots.cq !== limits.numCqSlots || slots.qp !== limits.numQpSlots) {
    throw new Bad('slots', `source had ${String(slots.cq)} CQ and ${String(slots.qp)} QP slots; this device has ${limits.numCqSlots} and ${limits.numQpSlots}`);
  }
  const pds = arr(r.pds, 'pds').map((p, i) => int(p, `pds[${i}]`, 1, limits.maxPd));
  const pdSet = new Set(pds);
  if (pdSet.size !== pds.length) throw new Bad('pds', 'duplicate PD');
  const cqSlots = new Set<number>();
  const cqs = arr(r.cqs, 'cqs').map((x, i): CqRecord => {
    const w = `cqs[${i}]`;
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
        return { cqe: Cqe.decodeBytes(bytes(e[0], `${w}.backlog[${k}][0]`, Cqe.size)), wake: bool(e[1], `${w}.backlog[${k}][1]`) };
      }),
    };
  });
  for (const c of cqs) if (c.backlog.length > c.cqe) throw new Bad(`cq ${c.cqn}`, `backlog of ${c.backlog.length} exceeds its ${c.cqe} entries`);
  const cqns = new Set(cqs.map((c) => c.cqn));
  if (cqns.size !== cqs.length) throw new Bad('cqs', 'duplicate CQ');
  const qpSlots = new Set<number>();
  const qps = arr(r.qps, 'qps').map((x, i): QpRecord => {
    const w = `qps[${i}]`;
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
    const caps = {
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
      const h = head(t[0], `${w}.sendOut[${k}][0]`);
      if (sendOut.has(h)) throw new Bad(w, `send head ${h} twice`);
      sendOut.set(h, { wrId: u64(t[1], `${w}.sendOut[${k}][1]`), signaled: bool(t[2], `${w}.sendOut[${k}][2]`) });
    });
    const recvOut = new Map<number, bigint>();
    arr(o.recvOut, `${w}.recvOut`).forEach((e, k) => {
      const t = arr(e, `${w}.recvOut[${k}]`);
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
  if (new Set(qps.map((q) => q.qpn)).size !== qps.length) throw new Bad('qps', 'duplicate QPN');
  if (qps.length > limits.maxQp) throw new Bad('qps', `${qps.length} QPs exceed ${limits.maxQp}`);
  const ahs = arr(r.ahs, 'ahs').map((x, i) => {
    const o = obj(x, `ahs[${i}]`);
    const pdn = int(o.pdn, `ahs[${i}].pdn`, 1, limits.maxPd);
    if (!pdSet.has(pdn)) throw new Bad(`ahs[${i}]`, `PD ${pdn} does not exist`);
    const a = readAv(o.av, `ahs[${i}].av`);
    if (a === null) throw new Bad(`ahs[${i}]`, 'no address vector');
    return { ahn: int(o.ahn, `ahs[${i}].ahn`, 1, limits.maxAh), pdn, av: a };
  });
  const nq = 1 + limits.numCqSlots + 2 * limits.numQpSlots;
  const deferred = arr(r.deferred, 'deferred').map((x, i) => {
    const o = obj(x, `deferred[${i}]`);
    return { vq: int(o.vq, `deferred[${i}].vq`, 0, nq - 1), head: int(o.head, `deferred[${i}].head`, 0, 32767), len: int(o.len, `deferred[${i}].len`, 0, 0xffffffff) };
  });
  if (typeof r.engine !== 'string' || !/^[A-Za-z0-9+/]*=*$/.test(r.engine)) throw new Bad('engine', 'not base64');
  return { pds, mrs: r.mrs, cqs, qps, ahs, deferred, engine: new Uint8Array(Buffer.from(r.engine, 'base64')) };
}

/**
 * Validates `blob`; when `res` is given, replaces its contents and loads the
 * engine. With `res` null it only validates (and loads the engine, which is
 * loaded again when the state is applied).
 */
export function loadDeviceState(blob: Uint8Array, res: Resources | null, engine: Engine, limits: RdmaLimits): void {
  const p = parse(blob, limits);
  if (res === null) {
    // No guest memory yet: check the MR part against a scratch table, which needs none to load.
    new MrTable(limits.maxMr, new GuestMemory(1), limits.maxMrSize).loadState(p.mrs);
    engine.loadState(p.engine);
    return;
  }
  engine.loadState(p.engine);
  res.mrs.loadState(p.mrs);
  for (const pdn of p.pds) res.pds.put(pdn, { pdn });
  for (const cq of p.cqs) {
    res.cqs.put(cq.cqn, cq);
    res.cqSlots[cq.slot] = cq.cqn;
  }
  for (const qp of p.qps) {
    res.qps.set(qp.qpn, qp);
    res.qpSlots[qp.slot] = qp.qpn;
  }
  for (const ah of p.ahs) res.ahs.put(ah.ahn, ah);
  res.deferred = p.deferred;
}
