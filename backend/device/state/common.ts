/**
 * What every device-state version shares: the format name, the error a
 * refused state throws, the readers, and the in-memory image a version's
 * parser produces. Every version parses into the same image, so one apply
 * (v1.ts) serves them all; a version only decides what it accepts.
 */
import { DeviceError } from '../../../virtio/device.js';
import type { Engine } from '../../engine/engine.js';
import { plainReader } from '../../engine/plain-data.js';
import type { RdmaLimits } from '../limits.js';
import type { AhRecord, CqRecord, DeferredReturn, QpRecord } from '../resources.js';

export const FORMAT = 'vrdma-device-state';

/** A refused device state: `where` is the path of the offending field ("tables.qps[2].attrs.sqPsn"). */
export class DeviceStateError extends DeviceError {
  constructor(
    readonly where: string,
    what: string,
  ) {
    super(`device state: ${where}: ${what}`);
    this.name = 'DeviceStateError';
  }
}

export const read = plainReader((where, what) => new DeviceStateError(where, what));

/** The device a state is saved from or loaded into, as far as the state cares. */
export interface DeviceStateHost {
  readonly limits: RdmaLimits;
  /** The GID table, index 0 first, 16 bytes each. */
  readonly gids: readonly Uint8Array[];
  readonly engine: Engine;
}

/** Every table of a device, checked and ready to be put into a Resources. */
export interface DeviceTables {
  pds: number[];
  /** The MR table's own saved form (mr-table.ts), already loaded once into a scratch table. */
  mrs: unknown;
  cqs: CqRecord[];
  qps: QpRecord[];
  ahs: AhRecord[];
  deferred: DeferredReturn[];
}

/** A state that passed every check of its version: what apply puts into the device and engine. */
export interface DeviceStateImage {
  version: number;
  tables: DeviceTables;
  /** The engine's own state, opaque here; the engine checks it when it loads it. */
  engine: Uint8Array;
}

/** The blob as a JSON object; anything else (not UTF-8, not JSON, trailing bytes, not an object) is refused. */
export function decodeRoot(blob: Uint8Array): Record<string, unknown> {
  let root: unknown;
  try {
    root = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(blob));
  } catch (err) {
    throw new DeviceStateError('blob', `not UTF-8 JSON (${(err as Error).message})`);
  }
  return read.obj(root, 'root');
}

/** Strict base64 (what Buffer.toString('base64') writes): Buffer.from alone skips any character it does not know. */
export function base64(x: unknown, where: string): Uint8Array {
  if (typeof x !== 'string' || x.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(x)) throw new DeviceStateError(where, 'not base64');
  return new Uint8Array(Buffer.from(x, 'base64'));
}
