/**
 * States saved by the back-end that wrote device-state version 1 (the
 * fixtures, made by fixtures/make-fixtures.ts before version 2 existed)
 * still load into this back-end's device, with every object under the
 * number, key and slot it had: a VM saved by the old back-end migrates to
 * this one.
 */
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { CqNotify, QpType } from '../../abi/constants.js';
import { Cqe } from '../../abi/structs.js';
import { FIXTURE_ADDRESS, FIXTURE_LOOPBACK_GID, fixturePath, type FixtureEngine } from './fixtures/live-state.js';
import { targetDevice, type TargetDevice } from './fixtures/target-device.js';

interface V1Fixture {
  format: string;
  version: number;
  pds: number[];
  mrs: { keys: string; mrs: { mrn: number; pdn: number; key: number; iova: string; length: string }[] };
  cqs: { cqn: number; slot: number; cqe: number; armed: number; backlog: [string, boolean][] }[];
  qps: { qpn: number; slot: number; type: number; pdn: number; sendCqn: number; recvCqn: number; sendOut: [number, string, boolean][]; recvOut: [number, string][]; attrs: { state: number; sqPsn: number; rqPsn: number; destQpn: number } }[];
  ahs: { ahn: number; pdn: number; av: { dgid: string } }[];
  deferred: { vq: number; head: number; len: number }[];
  engine: string;
}

let target: TargetDevice | null = null;
afterEach(() => {
  target?.close();
  target = null;
});

function load(engine: FixtureEngine): { blob: Uint8Array; fx: V1Fixture; t: TargetDevice } {
  const blob = new Uint8Array(readFileSync(fixturePath(1, engine)));
  const fx = JSON.parse(new TextDecoder().decode(blob)) as V1Fixture;
  target = targetDevice({ engine, gids: [engine === 'soft-roce' ? FIXTURE_ADDRESS : FIXTURE_LOOPBACK_GID] });
  return { blob, fx, t: target };
}

describe.each(['soft-roce', 'loopback'] as const)('a version 1 state saved with the %s engine', (engine) => {
  it('is what the generator meant to save: RC pair, UD QP, AH, armed CQs, a backlog CQE, a deferred return, a reused MR key', () => {
    const { fx } = load(engine);
    expect([fx.format, fx.version]).toEqual(['vrdma-device-state', 1]);
    expect(fx.qps.map((q) => q.type).sort()).toEqual([QpType.RC, QpType.RC, QpType.UD]);
    expect(fx.qps.every((q) => q.attrs.state === 3)).toBe(true); // RTS
    expect(fx.qps.some((q) => q.sendOut.length > 0)).toBe(true);
    expect(fx.qps.filter((q) => q.recvOut.length > 0)).toHaveLength(2);
    expect(fx.cqs.map((c) => c.armed)).toEqual(expect.arrayContaining([CqNotify.NEXT_COMPLETION, CqNotify.SOLICITED]));
    expect(fx.cqs.map((c) => c.backlog.length).reduce((a, b) => a + b)).toBe(1);
    expect(fx.mrs.mrs.map((m) => m.key)).toContain(2);
    expect(fx.mrs.mrs.some((m) => m.length === (1n << 64n).toString())).toBe(true); // a DMA MR
    expect(fx.ahs).toHaveLength(1);
    expect(fx.deferred).toHaveLength(1);
  });

  it('loads, and every PD, MR, CQ, QP, AH and deferred return is there under its saved number, key and slot', () => {
    const { blob, fx, t } = load(engine);
    const engineLoad = vi.spyOn(t.engine, 'loadState');
    t.device.loadState(blob);
    const r = t.device.resources!;

    expect([...r.pds.values()].map((p) => p.pdn)).toEqual(fx.pds);
    expect(r.mrs.all().map((m) => [m.mrn, m.pdn, m.lkey, m.rkey, m.iova.toString(), m.length.toString()])).toEqual(
      fx.mrs.mrs.map((m) => [m.mrn, m.pdn, ((m.mrn << 8) | m.key) >>> 0, ((m.mrn << 8) | m.key) >>> 0, m.iova, m.length]),
    );
    for (const c of fx.cqs) {
      const cq = r.cqs.get(c.cqn)!;
      expect({ slot: cq.slot, cqe: cq.cqe, armed: cq.armed }, `CQ ${c.cqn}`).toEqual({ slot: c.slot, cqe: c.cqe, armed: c.armed });
      expect(r.cqBySlot(c.slot)).toBe(cq);
      expect(cq.backlog.map((b) => [Buffer.from(Cqe.encodeBytes(b.cqe)).toString('hex'), b.wake])).toEqual(c.backlog);
    }
    for (const q of fx.qps) {
      const qp = r.qps.get(q.qpn)!;
      expect(qp, `QP ${q.qpn}`).toBeDefined();
      expect(r.qpBySlot(q.slot)).toBe(qp);
      expect({ type: qp.type, pdn: qp.pdn, sendCqn: qp.sendCqn, recvCqn: qp.recvCqn }).toEqual({ type: q.type, pdn: q.pdn, sendCqn: q.sendCqn, recvCqn: q.recvCqn });
      expect([qp.attrs.state, qp.attrs.sqPsn, qp.attrs.rqPsn, qp.attrs.destQpn]).toEqual([q.attrs.state, q.attrs.sqPsn, q.attrs.rqPsn, q.attrs.destQpn]);
      expect([...qp.sendOut].map(([h, o]) => [h, o.wrId.toString(), o.signaled])).toEqual(q.sendOut);
      expect([...qp.recvOut].map(([h, w]) => [h, w.toString()])).toEqual(q.recvOut);
    }
    expect([...r.ahs.values()].map((a) => [a.ahn, a.pdn, Buffer.from(a.av.dgid).toString('hex')])).toEqual(fx.ahs.map((a) => [a.ahn, a.pdn, a.av.dgid]));
    expect(r.deferred).toEqual(fx.deferred);
    // The engine got its own state, byte for byte, and holds the same QPs.
    expect(engineLoad).toHaveBeenLastCalledWith(new Uint8Array(Buffer.from(fx.engine, 'base64')));
    const engineQpns = (JSON.parse(new TextDecoder().decode(t.engine.saveState())) as { qps: { qpn: number }[] }).qps.map((q) => q.qpn);
    expect(engineQpns).toEqual(fx.qps.map((q) => q.qpn));
    expect(t.logLines.some((l) => /device state restored: 3 QPs, 6 CQs, 4 MRs/.test(l))).toBe(true);
  });
});
