/**
 * Device state version 2: version 1's tables, unchanged, under `tables`,
 * plus what a destination needs to know whether it can be this VM's device
 * at all:
 *
 * - `gids`: the source's GID table. A RoCE GID is the VM's network address;
 *   its peers' QPs and AHs point at it, so the destination must have been
 *   started with exactly the same table.
 * - `limits`: every RdmaLimits value the source offered. The guest has read
 *   them (config space, QUERY_DEVICE) and sized its objects by them, so the
 *   destination must offer at least as much; the slot counts fix the number
 *   of virtqueues and must be equal.
 * - `engine.name`: the engine's state is only meaningful to the same engine.
 *
 * The tables are checked against the source's limits once those are known
 * to fit this device, so a state that breaks its own limits is refused even
 * where this device would have room.
 */
import { hexOf } from '../../engine/plain-data.js';
import { gidToString } from '../../gid.js';
import { resolveLimits, type RdmaLimits } from '../limits.js';
import type { Resources } from '../resources.js';
import { DeviceStateError as Bad, FORMAT, base64, read, type DeviceStateHost, type DeviceStateImage } from './common.js';
import { parseV1Tables, saveV1Tables, type V1Tables } from './v1.js';

export const V2 = 2;

// ---------------------------------------------------------------------------
// Schema

/** RdmaLimits as JSON: maxMrSize, a bigint, as a decimal string. */
export type LimitsJson = Omit<RdmaLimits, 'maxMrSize'> & { maxMrSize: string };

export interface V2Document {
  format: typeof FORMAT;
  version: typeof V2;
  limits: LimitsJson;
  /** The GID table, index 0 first, each 16 bytes as 32 hex digits. */
  gids: string[];
  engine: {
    /** Engine.name: 'soft-roce', 'loopback'. */
    name: string;
    /** Engine.saveState(), base64. */
    state: string;
  };
  tables: V1Tables;
}

// ---------------------------------------------------------------------------
// Save

function limitsToJson(l: RdmaLimits): LimitsJson {
  return { ...l, maxMrSize: l.maxMrSize.toString() };
}

export function saveV2(res: Resources, host: DeviceStateHost): V2Document {
  return {
    format: FORMAT,
    version: V2,
    limits: limitsToJson(host.limits),
    gids: host.gids.map(hexOf),
    engine: { name: host.engine.name, state: Buffer.from(host.engine.saveState()).toString('base64') },
    tables: saveV1Tables(res),
  };
}

// ---------------------------------------------------------------------------
// Parse

const { obj, arr, int, u64, bytes } = read;

/** Wide enough for every limit; resolveLimits then applies the real ranges and the rules between limits. */
const LIMIT_MAX = 0xffff_ffff;

function parseLimits(x: unknown, where: string): RdmaLimits {
  const o = obj(x, where);
  const n = (k: Exclude<keyof RdmaLimits, 'maxMrSize'>): number => int(o[k], `${where}.${k}`, 0, LIMIT_MAX);
  // Spelled out rather than looped, so that a new RdmaLimits field does not compile until a version decides about it.
  const l: RdmaLimits = {
    numCqSlots: n('numCqSlots'),
    numQpSlots: n('numQpSlots'),
    maxPd: n('maxPd'),
    maxMr: n('maxMr'),
    maxCq: n('maxCq'),
    maxQp: n('maxQp'),
    maxAh: n('maxAh'),
    maxCqe: n('maxCqe'),
    maxQpWr: n('maxQpWr'),
    maxSge: n('maxSge'),
    maxInlineData: n('maxInlineData'),
    maxQpRdAtom: n('maxQpRdAtom'),
    maxMrSize: u64(o.maxMrSize, `${where}.maxMrSize`),
    gidTblLen: n('gidTblLen'),
  };
  try {
    return resolveLimits(l);
  } catch (err) {
    if (err instanceof RangeError) throw new Bad(where, err.message);
    throw err;
  }
}

/** They fix the number of virtqueues, which QEMU and the guest already know. */
const EQUAL_LIMITS: ReadonlySet<keyof RdmaLimits> = new Set(['numCqSlots', 'numQpSlots']);

function checkLimitsFit(source: RdmaLimits, mine: RdmaLimits): void {
  for (const k of Object.keys(source) as (keyof RdmaLimits)[]) {
    const s = source[k];
    const m = mine[k];
    if (EQUAL_LIMITS.has(k)) {
      if (s !== m) throw new Bad(`limits.${k}`, `the source had ${s}, this back-end has ${m}; they must be equal`);
    } else if (s > m) {
      throw new Bad(`limits.${k}`, `the source offered ${s}, this back-end only ${m}`);
    }
  }
}

function sameGid(a: Uint8Array | undefined, b: Uint8Array | undefined): boolean {
  return a !== undefined && b !== undefined && Buffer.compare(a, b) === 0;
}

function checkGids(source: Uint8Array[], mine: readonly Uint8Array[]): void {
  const name = (g: Uint8Array | undefined): string => (g === undefined ? 'not set' : gidToString(g));
  for (let i = 0; i < Math.max(source.length, mine.length); i++) {
    if (!sameGid(source[i], mine[i])) throw new Bad('gids', `the source's GID ${i} is ${name(source[i])}, this back-end's is ${name(mine[i])}`);
  }
}

/** Checks a version 2 document against the device it is loaded into. */
export function parseV2(r: Record<string, unknown>, host: DeviceStateHost): DeviceStateImage {
  const limits = parseLimits(r.limits, 'limits');
  checkLimitsFit(limits, host.limits);
  const gids = arr(r.gids, 'gids', limits.gidTblLen).map((g, i) => bytes(g, `gids[${i}]`, 16));
  checkGids(gids, host.gids);
  const e = obj(r.engine, 'engine');
  if (typeof e.name !== 'string') throw new Bad('engine.name', 'not a string');
  if (e.name !== host.engine.name) throw new Bad('engine.name', `the source ran the ${JSON.stringify(e.name).slice(0, 40)} engine, this back-end runs ${JSON.stringify(host.engine.name)}`);
  const tables = parseV1Tables(obj(r.tables, 'tables'), limits, 'tables.');
  return { version: V2, tables, engine: base64(e.state, 'engine.state') };
}
