/**
 * A version 2 state only loads into a back-end that can be the same device
 * for the VM: the same GID table (the RoCE address belongs to the VM), at
 * least the limits the guest was shown (exactly the slot counts), and the
 * engine that wrote the engine state. Anything else is refused with the
 * field and both sides' values, and the destination is left as it was.
 */
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import type { RdmaLimits } from '../limits.js';
import { FIXTURE_ADDRESS, fixturePath, type FixtureEngine } from './fixtures/live-state.js';
import { targetDevice, type TargetDevice } from './fixtures/target-device.js';
import { DeviceStateError } from './index.js';

let target: TargetDevice | null = null;
afterEach(() => {
  target?.close();
  target = null;
});

const V2_SOFT_ROCE = (): Uint8Array => new Uint8Array(readFileSync(fixturePath(2, 'soft-roce')));

/** What loading the soft-RoCE version 2 fixture into such a device says; the device must not have changed. */
function refusedBy(opts: { engine?: FixtureEngine; gids?: string[]; limits?: Partial<RdmaLimits> }): string {
  target = targetDevice({ engine: opts.engine ?? 'soft-roce', gids: opts.gids ?? [FIXTURE_ADDRESS], ...(opts.limits !== undefined ? { limits: opts.limits } : {}) });
  const before = target.snapshot();
  let caught: unknown = null;
  try {
    target.device.loadState(V2_SOFT_ROCE());
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(DeviceStateError);
  expect(target.snapshot()).toBe(before);
  return (caught as Error).message;
}

describe('a version 2 state and the back-end it is loaded into', () => {
  it('refuses another GID 0, naming both', () => {
    expect(refusedBy({ gids: ['127.0.0.9'] })).toBe("device state: gids: the source's GID 0 is ::ffff:127.0.0.2, this back-end's is ::ffff:127.0.0.9");
  });

  it('refuses a GID table with an entry more or less than the source had', () => {
    expect(refusedBy({ gids: [FIXTURE_ADDRESS, '127.0.0.3'] })).toBe("device state: gids: the source's GID 1 is not set, this back-end's is ::ffff:127.0.0.3");
    expect(refusedBy({ gids: [] })).toBe("device state: gids: the source's GID 0 is ::ffff:127.0.0.2, this back-end's is not set");
  });

  it('refuses smaller limits, naming the limit and both values', () => {
    expect(refusedBy({ limits: { maxQp: 8 } })).toBe('device state: limits.maxQp: the source offered 16, this back-end only 8');
    expect(refusedBy({ limits: { maxCqe: 100 } })).toBe('device state: limits.maxCqe: the source offered 4095, this back-end only 100');
    expect(refusedBy({ limits: { maxMrSize: 1n << 20n } })).toBe('device state: limits.maxMrSize: the source offered 1073741824, this back-end only 1048576');
    expect(refusedBy({ limits: { gidTblLen: 1 } })).toBe('device state: limits.gidTblLen: the source offered 4, this back-end only 1');
  });

  it('refuses other slot counts, larger or smaller: they fix the number of virtqueues', () => {
    expect(refusedBy({ limits: { numCqSlots: 8, maxCq: 8 } })).toBe('device state: limits.numCqSlots: the source had 16, this back-end has 8; they must be equal');
    expect(refusedBy({ limits: { numQpSlots: 32 } })).toBe('device state: limits.numQpSlots: the source had 16, this back-end has 32; they must be equal');
  });

  it('refuses a state from another engine, naming both', () => {
    expect(refusedBy({ engine: 'loopback' })).toBe('device state: engine.name: the source ran the "soft-roce" engine, this back-end runs "loopback"');
  });

  it('loads into a back-end that offers more than the source did', () => {
    target = targetDevice({ engine: 'soft-roce', gids: [FIXTURE_ADDRESS], limits: { maxPd: 128, maxMr: 1024, maxCqe: 8191, maxQpWr: 4096, maxSge: 32, maxAh: 256, gidTblLen: 8 } });
    target.device.loadState(V2_SOFT_ROCE());
    expect(target.device.resources!.qps.size).toBe(3);
  });
});
