/**
 * A device saved in the newest format (version 2) and loaded into a fresh
 * device of the same kind comes back whole: every table entry under its
 * number, key and slot, CQ arming, CQEs waiting in a backlog, outstanding
 * send and receive WQE heads, deferred returns, and the engine's own state
 * byte for byte. Saved again, it gives the same document.
 */
import { readFileSync } from 'node:fs';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { CqNotify } from '../../abi/constants.js';
import { gidFromAddress } from '../../gid.js';
import { FIXTURE_ADDRESS, FIXTURE_LOOPBACK_GID, fixturePath, makeLiveState, type FixtureEngine, type LiveState } from './fixtures/live-state.js';
import { targetDevice, type TargetDevice } from './fixtures/target-device.js';
import { NEWEST_VERSION, type V2Document } from './index.js';

const gidOf = (engine: FixtureEngine): string => (engine === 'soft-roce' ? FIXTURE_ADDRESS : FIXTURE_LOOPBACK_GID);

function decode(blob: Uint8Array): V2Document {
  return JSON.parse(new TextDecoder().decode(blob)) as V2Document;
}

/** The document without what legitimately moves between two saves: the time engine timers have left. */
function timeless(doc: V2Document): unknown {
  const engine = JSON.parse(Buffer.from(doc.engine.state, 'base64').toString('utf8'), (k, v: unknown) => (/Ms$/.test(k) && typeof v === 'number' ? 'timer' : v)) as unknown;
  return { ...doc, engine: { name: doc.engine.name, state: engine } };
}

let target: TargetDevice | null = null;
afterEach(() => {
  target?.close();
  target = null;
});

describe.each(['soft-roce', 'loopback'] as const)('a version 2 state of a live %s device', (engine) => {
  let live: LiveState;
  beforeAll(async () => {
    live = await makeLiveState(engine);
  });

  it('is version 2 and names the GIDs, limits and engine it came from', () => {
    const doc = decode(live.blob);
    expect([doc.format, doc.version, NEWEST_VERSION]).toEqual(['vrdma-device-state', 2, 2]);
    expect(doc.gids).toEqual([Buffer.from(gidFromAddress(gidOf(engine))).toString('hex')]);
    expect(doc.limits.numQpSlots).toBe(16);
    expect(doc.limits.maxMrSize).toBe((1n << 30n).toString());
    expect(doc.engine.name).toBe(engine);
  });

  it('loads into a fresh device with every table, arming, backlog, WQE head and the engine state as the source had them', () => {
    const doc = decode(live.blob);
    target = targetDevice({ engine, gids: [gidOf(engine)] });
    const engineLoad = vi.spyOn(target.engine, 'loadState');
    target.device.loadState(live.blob);
    // Everything at once: the source's tables and engine state when it saved (engine timers aside).
    expect(target.snapshot()).toEqual(live.snapshot);

    // And the parts the brief of a migration is about, spelled out.
    const r = target.device.resources!;
    expect([...r.qps.keys()]).toEqual(doc.tables.qps.map((q) => q.qpn));
    const savedMrs = (doc.tables.mrs as unknown as { mrs: { mrn: number; key: number }[] }).mrs;
    expect(r.mrs.all().map((m) => m.lkey)).toEqual(savedMrs.map((m) => (m.mrn << 8) | m.key));
    expect([...r.cqs.values()].map((c) => c.armed)).toEqual(expect.arrayContaining([CqNotify.NEXT_COMPLETION, CqNotify.SOLICITED]));
    const backlog = [...r.cqs.values()].flatMap((c) => c.backlog);
    expect(backlog).toHaveLength(1);
    expect(backlog[0]!.cqe.wr_id).toBe(101n);
    const heads = [...r.qps.values()].map((q) => [[...q.sendOut.keys()], [...q.recvOut.entries()]]);
    expect(heads).toEqual(doc.tables.qps.map((q) => [q.sendOut.map((s) => s[0]), q.recvOut.map(([h, w]) => [h, BigInt(w)])]));
    expect(r.deferred).toEqual(doc.tables.deferred);
    expect(engineLoad).toHaveBeenLastCalledWith(new Uint8Array(Buffer.from(doc.engine.state, 'base64')));
  });

  it('saved again from the device it was loaded into, is the same document', () => {
    target = targetDevice({ engine, gids: [gidOf(engine)] });
    target.device.loadState(live.blob);
    expect(timeless(decode(target.device.saveState()))).toEqual(timeless(decode(live.blob)));
  });

  it('loads into a device that has not attached yet (checked at once, applied when memory arrives)', () => {
    target = targetDevice({ engine, gids: [gidOf(engine)], attach: false });
    target.device.loadState(live.blob);
    expect(target.device.resources).toBeNull();
    target.attach();
    expect(target.snapshot()).toEqual(live.snapshot);
  });
});

describe.each(['soft-roce', 'loopback'] as const)('the version 2 fixture saved with the %s engine', (engine) => {
  it('loads, with its three QPs, six CQs and four MRs', () => {
    target = targetDevice({ engine, gids: [gidOf(engine)] });
    target.device.loadState(new Uint8Array(readFileSync(fixturePath(2, engine))));
    expect(target.logLines.some((l) => /device state restored: 3 QPs, 6 CQs, 4 MRs/.test(l))).toBe(true);
  });
});
