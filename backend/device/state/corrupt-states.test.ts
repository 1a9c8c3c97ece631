/**
 * A corrupt state is refused with a DeviceError and changes nothing: cut
 * short at any length, followed by garbage, or with any one field of a real
 * saved version 2 state (the fixtures) replaced by a value of the wrong
 * type or out of its range — fields of the engine's state inside it too.
 * The device it is loaded into holds a valid state first, and must still
 * hold exactly that afterwards; a device that has not attached yet must
 * refuse the same blobs.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeviceError } from '../../../virtio/device.js';
import { FIXTURE_ADDRESS, FIXTURE_LOOPBACK_GID, fixturePath, type FixtureEngine } from './fixtures/live-state.js';
import { targetDevice, type TargetDevice } from './fixtures/target-device.js';

type Path = (string | number)[];
type JsonValue = null | boolean | number | string | JsonValue[] | { [k: string]: JsonValue };

const ENGINE_STATE = 'engine.state';

/** Every node of a JSON tree, depth first, with its path; the engine's state (base64 JSON) is walked into. */
function* nodes(x: JsonValue, path: Path = []): Generator<{ path: Path; value: JsonValue }> {
  yield { path, value: x };
  if (Array.isArray(x)) for (let i = 0; i < x.length; i++) yield* nodes(x[i]!, [...path, i]);
  else if (x !== null && typeof x === 'object') for (const [k, v] of Object.entries(x)) yield* nodes(v, [...path, k]);
}

function pathName(p: Path): string {
  return p.map((s, i) => (typeof s === 'number' ? `[${s}]` : i === 0 ? s : `.${s}`)).join('');
}

/** Values a node must not accept: other JSON types, and for numbers, values outside any integer range a field could have. */
function wrongValues(v: JsonValue): JsonValue[] {
  const containers: JsonValue[] = [7, '\u00a7'];
  if (v === null) return ['\u00a7', true, []];
  if (Array.isArray(v) || typeof v === 'object') return containers;
  if (typeof v === 'boolean') return [v ? 1 : 0, String(v), null];
  if (typeof v === 'number') return [String(v), null, true, -2, v + 0.5, 2 ** 53, Number.MAX_VALUE];
  return [7, null, '\u00a7', ''];
}

/**
 * Nodes that may take one of the wrong values above and still be right,
 * by path (indices replaced by [*]) and value, with the reason. Nothing
 * else is skipped: every other node refuses every value wrongValues gives
 * it (a wr_id, say, takes any u64, but none of those values is one).
 */
const timerLeft = (bad: JsonValue): string | null =>
  bad === null || (typeof bad === 'number' && bad >= 0 && bad <= 1e10)
    ? 'the time a timer had left: null when it is not running, else any number of milliseconds up to 1e10, fractions included (performance.now differences)'
    : null;
const ACCEPTS: Readonly<Record<string, (bad: JsonValue) => string | null>> = {
  [`${ENGINE_STATE}→qps[*].retryMs`]: timerLeft,
  [`${ENGINE_STATE}→qps[*].rnrWaitMs`]: timerLeft,
  [`${ENGINE_STATE}→qps[*].wait.remainingMs`]: timerLeft,
};

function decodeDoc(blob: Uint8Array): { doc: JsonValue; engine: JsonValue } {
  const doc = JSON.parse(new TextDecoder().decode(blob)) as { engine: { state: string } } & JsonValue;
  return { doc, engine: JSON.parse(Buffer.from(doc.engine.state, 'base64').toString('utf8')) as JsonValue };
}

function setAt(root: JsonValue, path: Path, value: JsonValue): JsonValue {
  if (path.length === 0) return value;
  const copy = structuredClone(root) as Record<string | number, JsonValue>;
  let at: Record<string | number, JsonValue> = copy;
  for (const k of path.slice(0, -1)) at = at[k] as Record<string | number, JsonValue>;
  at[path[path.length - 1]!] = value;
  return copy;
}

interface Mutation {
  where: string;
  bad: JsonValue;
  blob: Uint8Array;
}

/** Every single-node corruption of a saved document, the engine state's nodes included. */
function* mutations(blob: Uint8Array): Generator<Mutation> {
  const { doc, engine } = decodeDoc(blob);
  const encode = (d: JsonValue): Uint8Array => new TextEncoder().encode(JSON.stringify(d));
  for (const { path, value } of nodes(doc)) {
    for (const bad of wrongValues(value)) yield { where: pathName(path), bad, blob: encode(setAt(doc, path, bad)) };
  }
  for (const { path, value } of nodes(engine)) {
    for (const bad of wrongValues(value)) {
      const state = Buffer.from(JSON.stringify(setAt(engine, path, bad))).toString('base64');
      yield { where: `${ENGINE_STATE}→${pathName(path)}`, bad, blob: encode(setAt(doc, ['engine', 'state'], state)) };
    }
  }
}

const gidOf = (engine: FixtureEngine): string => (engine === 'soft-roce' ? FIXTURE_ADDRESS : FIXTURE_LOOPBACK_GID);

describe.each(['soft-roce', 'loopback'] as const)('corrupt version 2 states saved with the %s engine', (engine) => {
  const good = new Uint8Array(readFileSync(fixturePath(2, engine)));
  let loaded: TargetDevice;
  let waiting: TargetDevice;
  let before: string;

  beforeAll(() => {
    loaded = targetDevice({ engine, gids: [gidOf(engine)] });
    loaded.device.loadState(good);
    before = loaded.snapshot();
    waiting = targetDevice({ engine, gids: [gidOf(engine)], attach: false });
  });
  afterAll(() => {
    loaded.close();
    waiting.close();
  });

  /** Why `blob` was wrongly handled, or null when both devices refused it with a DeviceError and the loaded one kept its state. */
  function problem(blob: Uint8Array): string | null {
    for (const [name, t] of [['attached', loaded], ['not attached', waiting]] as const) {
      try {
        t.device.loadState(blob);
        loaded.device.loadState(good); // so the next blob is judged against the same state
        return `accepted by the ${name} device`;
      } catch (err) {
        if (!(err instanceof DeviceError)) return `the ${name} device threw ${String(err)}, not a DeviceError`;
      }
    }
    return loaded.snapshot() === before ? null : 'refused, but the device changed';
  }

  it('the uncorrupted fixture loads (so the refusals below are about the corruption)', () => {
    const t = targetDevice({ engine, gids: [gidOf(engine)] });
    try {
      t.device.loadState(good);
      expect(t.snapshot()).toBe(before);
    } finally {
      t.close();
    }
  });

  it('is refused when its tables contradict each other, each well-formed on its own', () => {
    type Doc = { tables: { pds: number[]; cqs: { cqn: number; slot: number; cqe: number; backlog: unknown[] }[]; qps: { qpn: number; slot: number; pdn: number; sendCqn: number; recvOut: [number, string][] }[]; ahs: { ahn: number; pdn: number }[]; mrs: { mrs: { pdn: number }[] } } };
    const edits: [string, (d: Doc) => void, RegExp][] = [
      ['a PD twice', (d) => d.tables.pds.push(d.tables.pds[0]!), /tables\.pds: duplicate PD/],
      ['a CQ number twice', (d) => (d.tables.cqs[1]!.cqn = d.tables.cqs[0]!.cqn), /tables\.cqs: duplicate CQ/],
      ['a CQ slot twice', (d) => (d.tables.cqs[1]!.slot = d.tables.cqs[0]!.slot), /slot \d+ used twice/],
      [
        'a backlog longer than its CQ',
        (d) => {
          const cq = d.tables.cqs.find((c) => c.backlog.length > 0)!;
          cq.cqe = 1;
          cq.backlog.push(cq.backlog[0]);
        },
        /backlog of 2 exceeds its 1 entries/,
      ],
      ['a QPN twice', (d) => (d.tables.qps[1]!.qpn = d.tables.qps[0]!.qpn), /tables\.qps: duplicate QPN/],
      ['a QP slot twice', (d) => (d.tables.qps[1]!.slot = d.tables.qps[0]!.slot), /slot \d+ used twice/],
      ['a QP in a PD that does not exist', (d) => (d.tables.qps[0]!.pdn = 9), /PD 9 does not exist/],
      ['a QP on a CQ that does not exist', (d) => (d.tables.qps[0]!.sendCqn = 9), /names a CQ that does not exist/],
      [
        'a receive head twice',
        (d) => {
          const qp = d.tables.qps.find((q) => q.recvOut.length > 0)!;
          qp.recvOut.push(qp.recvOut[0]!);
        },
        /receive head \d+ twice/,
      ],
      ['an AH number twice', (d) => d.tables.ahs.push({ ...d.tables.ahs[0]! }), /tables\.ahs: duplicate AH/],
      ['an AH in a PD that does not exist', (d) => (d.tables.ahs[0]!.pdn = 9), /PD 9 does not exist/],
      ['an MR in a PD that does not exist', (d) => (d.tables.mrs.mrs[0]!.pdn = 9), /tables\.mrs: MR 1 is in PD 9, which does not exist/],
    ];
    const wrong: string[] = [];
    for (const [what, edit, reason] of edits) {
      const doc = JSON.parse(new TextDecoder().decode(good)) as Doc;
      edit(doc);
      const blob = new TextEncoder().encode(JSON.stringify(doc));
      const p = problem(blob);
      if (p !== null) wrong.push(`${what}: ${p}`);
      try {
        loaded.device.loadState(blob);
      } catch (err) {
        if (!reason.test((err as Error).message)) wrong.push(`${what}: refused for another reason: ${(err as Error).message}`);
      }
    }
    expect(wrong).toEqual([]);
  });

  it('is refused cut short at every length', () => {
    const wrong: string[] = [];
    for (let n = 0; n < good.byteLength; n++) {
      const p = problem(good.subarray(0, n));
      if (p !== null) wrong.push(`${n} bytes: ${p}`);
    }
    expect(wrong).toEqual([]);
  });

  it('is refused with anything but whitespace after it, or a byte that is not UTF-8', () => {
    const tails = ['x', '}', '{}', '[]', '\u0000', ',{"format":"vrdma-device-state"}', 'x'.repeat(1 << 20)];
    const wrong: string[] = [];
    for (const tail of tails) {
      const p = problem(Buffer.concat([good, Buffer.from(tail)]));
      if (p !== null) wrong.push(`+${JSON.stringify(tail.slice(0, 20))}: ${p}`);
    }
    const bad = good.slice();
    bad[bad.indexOf(0x22 /* " */) + 1] = 0xff;
    const p = problem(bad);
    if (p !== null) wrong.push(`0xff byte: ${p}`);
    expect(wrong).toEqual([]);
  });

  it('is refused with any one field, of the document or of the engine state in it, corrupted', () => {
    const wrong: string[] = [];
    const skipped: string[] = [];
    let tried = 0;
    for (const m of mutations(good)) {
      const why = ACCEPTS[m.where.replace(/\[\d+\]/g, '[*]')]?.(m.bad) ?? null;
      if (why !== null) {
        skipped.push(`${m.where} = ${JSON.stringify(m.bad)}: ${why}`);
        continue;
      }
      tried++;
      const p = problem(m.blob);
      if (p !== null) wrong.push(`${m.where} = ${JSON.stringify(m.bad)}: ${p}`);
    }
    expect(wrong).toEqual([]);
    expect(tried).toBeGreaterThan(1000);
  });
});
