/**
 * The version field decides which parser reads a state: a state from a
 * newer back-end is refused naming both versions (not half-read), an
 * unknown format or a version that never existed is refused, and a
 * document is only read by the parser its version names.
 */
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { DeviceError } from '../../../virtio/device.js';
import { FIXTURE_ADDRESS, fixturePath } from './fixtures/live-state.js';
import { targetDevice, type TargetDevice } from './fixtures/target-device.js';
import { DeviceStateError, NEWEST_VERSION } from './index.js';

let target: TargetDevice | null = null;
afterEach(() => {
  target?.close();
  target = null;
});

function fixture(version: number): Record<string, unknown> {
  return JSON.parse(readFileSync(fixturePath(version, 'soft-roce'), 'utf8')) as Record<string, unknown>;
}

const blob = (doc: unknown): Uint8Array => new TextEncoder().encode(JSON.stringify(doc));

/** Loads `doc` into a device holding the version 2 fixture; returns the refusal, after checking nothing changed. */
function refusal(doc: unknown): DeviceStateError {
  target = targetDevice({ engine: 'soft-roce', gids: [FIXTURE_ADDRESS] });
  target.device.loadState(new Uint8Array(readFileSync(fixturePath(2, 'soft-roce'))));
  const before = target.snapshot();
  let caught: unknown = null;
  try {
    target.device.loadState(blob(doc));
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(DeviceStateError);
  expect(target.snapshot()).toBe(before);
  return caught as DeviceStateError;
}

describe('device state versions', () => {
  it('this back-end writes and reads up to version 2', () => {
    expect(NEWEST_VERSION).toBe(2);
  });

  it('refuses a state newer than it knows, naming both versions', () => {
    const e = refusal({ ...fixture(2), version: 3 });
    expect(e.message).toBe("device state: version: 3 is newer than this back-end's newest, 2");
    expect(e).toBeInstanceOf(DeviceError);
    expect(e.where).toBe('version');
    expect(refusal({ ...fixture(2), version: 1000 }).message).toMatch(/1000 is newer than this back-end's newest, 2/);
  });

  it('refuses versions that never existed and version fields that are not numbers', () => {
    for (const version of [0, -1, 1.5, '2', null, true, {}]) {
      expect(refusal({ ...fixture(2), version }).where, JSON.stringify(version)).toBe('version');
    }
    const { version: _dropped, ...noVersion } = fixture(2);
    expect(refusal(noVersion).message).toBe('device state: version: missing is not a version number');
  });

  it('refuses another format, whatever its version says', () => {
    for (const format of ['vrdma-soft-roce-engine', 'vrdma-device-state ', '', 7, null]) {
      expect(refusal({ ...fixture(2), format }).message).toBe('device state: format: is not vrdma-device-state');
    }
    const { format: _dropped, ...noFormat } = fixture(2);
    expect(refusal(noFormat).where).toBe('format');
  });

  it('reads a document only with the parser its version names', () => {
    // A version 2 document that says 1: version 1 keeps its tables at the top level.
    expect(refusal({ ...fixture(2), version: 1 }).where).toBe('slots');
    // A version 1 document that says 2: version 2 needs the source's limits, GIDs and engine name.
    expect(refusal({ ...fixture(1), version: 2 }).where).toBe('limits');
  });

  it('loads both versions it knows into the same device', () => {
    for (const version of [1, 2]) {
      target = targetDevice({ engine: 'soft-roce', gids: [FIXTURE_ADDRESS] });
      target.device.loadState(blob(fixture(version)));
      expect(target.device.resources!.qps.size, `version ${version}`).toBe(3);
      target.close();
      target = null;
    }
  });
});
