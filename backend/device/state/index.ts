/**
 * Device state as plain, versioned data (JSON in UTF-8), in the manner of
 * virtiofsd's device_state: one schema and one parser per version (v1.ts,
 * v2.ts), all parsing into the same checked image, and one apply. Saving
 * always writes the newest version; loading reads `version` and hands the
 * document to that version's parser, so a state saved by an older
 * back-end still loads, and one from a newer back-end is refused by name
 * rather than misread.
 *
 * Loading checks everything before anything changes: the document
 * completely (every field, and every cross-reference between tables), then
 * the engine's part, which the engine checks as it loads it and leaves its
 * state alone when it refuses. Only then are the device's tables replaced.
 * A corrupt or hostile blob is therefore reported (CHECK_DEVICE_STATE
 * fails) and changes nothing. See docs/virtio-rdma.md §10 for the schema.
 */
import type { Resources } from '../resources.js';
import { DeviceStateError, FORMAT, decodeRoot, type DeviceStateHost, type DeviceStateImage } from './common.js';
import { V1, applyImage, parseV1 } from './v1.js';
import { V2, parseV2, saveV2 } from './v2.js';

export { DeviceStateError, FORMAT, type DeviceStateHost, type DeviceStateImage } from './common.js';
export type { V1Document, V1Tables } from './v1.js';
export type { V2Document } from './v2.js';

/** The version saveDeviceState writes, and the newest one loadDeviceState reads. */
export const NEWEST_VERSION = V2;

const PARSERS: ReadonlyMap<number, (root: Record<string, unknown>, host: DeviceStateHost) => DeviceStateImage> = new Map([
  [V1, parseV1],
  [V2, parseV2],
]);

export function saveDeviceState(res: Resources, host: DeviceStateHost): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(saveV2(res, host)));
}

/** Checks `blob` completely against `host`, changing nothing (the engine is not asked). */
function parseDeviceState(blob: Uint8Array, host: DeviceStateHost): DeviceStateImage {
  const root = decodeRoot(blob);
  if (root.format !== FORMAT) throw new DeviceStateError('format', `is not ${FORMAT}`);
  const v = root.version;
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new DeviceStateError('version', `${v === undefined ? 'missing' : JSON.stringify(v).slice(0, 40)} is not a version number`);
  if (v > NEWEST_VERSION) throw new DeviceStateError('version', `${v} is newer than this back-end's newest, ${NEWEST_VERSION}`);
  const parse = PARSERS.get(v);
  if (parse === undefined) throw new DeviceStateError('version', `${v} is not a version this back-end knows (1..${NEWEST_VERSION})`);
  return parse(root, host);
}

/**
 * Checks `blob`; when `res` is given, replaces its tables and the engine's
 * state with it. With `res` null (no guest memory yet) it only checks, and
 * the engine keeps the state it was given: the engine cannot check its
 * part without loading it, and it is loaded again when the state is
 * applied.
 */
export function loadDeviceState(blob: Uint8Array, res: Resources | null, host: DeviceStateHost): void {
  const image = parseDeviceState(blob, host);
  // Throws, changing nothing, when the engine refuses its part; after this nothing can refuse.
  host.engine.loadState(image.engine);
  if (res !== null) applyImage(image, res, host.engine);
}
