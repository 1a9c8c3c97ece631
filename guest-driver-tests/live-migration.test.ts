/**
 * Live migration with live RDMA connections, without a VM: device A
 * (soft-RoCE on 127.0.0.2) and device B (127.0.0.3) run RC traffic both
 * ways on several QPs, checked byte for byte; mid-traffic A moves into A' —
 * a fresh back-end started for an incoming migration on A's address (the
 * address belongs to the VM) — through the vhost-user DEVICE_STATE channel,
 * as QEMU moves it. Nothing may be lost, duplicated or corrupted, and every
 * work request completes exactly once, in order.
 *
 * The workload per QP pair and round r, A -> B: a SEND of a pattern of
 * (qp, r), an RDMA WRITE with immediate r into B's buffer, an RDMA READ of a
 * region B filled with a known pattern, and a FETCH_AND_ADD of 1 on a
 * counter at B, whose returned original must be r (a lost or repeated
 * atomic shows). B -> A: a SEND per round, so A's responder has state too.
 */
import { describe, expect, it } from 'vitest';
import { SendFlag, SendOp, WcOpcode, WcStatus } from '../backend/abi/constants.js';
import type { SoftRoceEngine } from '../backend/engines/soft-roce/soft-roce-engine.js';
import { DriverProtocolError, type RefDriver, type SavedDevice } from './driver/ref-driver.js';
import { frontendTo, randomRocePort, startDevice, type DeviceUnderTest } from './harness.js';
import { ALL_ACCESS, connectedPair, mrBuf, pattern, pollN, readU64le, withTeardown, type MrBuf, type ScenarioEnv, type Side, type Teardown } from './scenarios/common.js';

const A_ADDR = '127.0.0.2';
const B_ADDR = '127.0.0.3';
const QPS = 3;
const ROUNDS = 40;
/** The round after whose posting (before its completions) the VM is moved. */
const MOVE_AT = [12, 27];
const SEND_LEN = 3000; // three packets at MTU 1024: a message can be cut by the move
const WRITE_LEN = 2048;
const READ_LEN = 4096;
const SLOTS = 4;

type Move = (drv: RefDriver) => Promise<void>;
/** Called before each round is posted, with the QP pairs. */
type RoundHook = (round: number, pairs: readonly Pair[]) => Promise<void>;

interface Pair {
  link: { a: Side; b: Side };
  /** A's buffers: sends from, reads into, atomics' results, receives of B's sends. */
  aSrc: MrBuf;
  aRead: MrBuf;
  aAtomic: MrBuf;
  aRecv: MrBuf;
  /** B's buffers: receives, the WRITE target, the READ source, the atomic counter. */
  bRecv: MrBuf;
  bWrite: MrBuf;
  bRead: MrBuf;
  bCounter: MrBuf;
}

function msg(qp: number, round: number, len: number, kind: number): Uint8Array {
  return pattern(len, (qp * 1000 + round) * 8 + kind);
}

async function makePair(t: Teardown, env: ScenarioEnv, i: number): Promise<Pair> {
  const link = await connectedPair(t, env, { cap: { maxSendSge: 1, maxRecvSge: 1 } });
  const a = env.a as RefDriver;
  const b = env.b as RefDriver;
  return {
    link,
    aSrc: await mrBuf(t, a, link.a.pd, SLOTS * SEND_LEN + WRITE_LEN * SLOTS, ALL_ACCESS),
    aRead: await mrBuf(t, a, link.a.pd, SLOTS * READ_LEN, ALL_ACCESS),
    aAtomic: await mrBuf(t, a, link.a.pd, SLOTS * 8, ALL_ACCESS),
    aRecv: await mrBuf(t, a, link.a.pd, SLOTS * SEND_LEN, ALL_ACCESS),
    bRecv: await mrBuf(t, b, link.b.pd, SLOTS * SEND_LEN, ALL_ACCESS),
    bWrite: await mrBuf(t, b, link.b.pd, SLOTS * WRITE_LEN, ALL_ACCESS),
    bRead: await mrBuf(t, b, link.b.pd, READ_LEN, ALL_ACCESS, pattern(READ_LEN, 4242 + i)),
    bCounter: await mrBuf(t, b, link.b.pd, 8, ALL_ACCESS),
  };
}

const sge = (m: MrBuf, off: number, len: number) => [{ addr: m.buf.addr + BigInt(off), length: len, lkey: m.mr.lkey }];

/**
 * Runs the workload; `move` is called after MOVE_AT rounds were posted and
 * before their completions are polled, so work is in flight in both
 * directions when the device stops.
 */
async function workload(a: RefDriver, b: RefDriver, move: Move, beforeRound?: RoundHook): Promise<void> {
  const env: ScenarioEnv = { a, b, fresh: true, timeoutMs: 15_000 };
  await withTeardown(async (t) => {
    const pairs: Pair[] = [];
    for (let i = 0; i < QPS; i++) pairs.push(await makePair(t, env, i));
    for (let r = 0; r < ROUNDS; r++) {
      await beforeRound?.(r, pairs);
      const slot = r % SLOTS;
      for (let i = 0; i < QPS; i++) {
        const p = pairs[i]!;
        await b.postRecv(p.link.b.qp, [
          { wrId: BigInt(r * 2), sgList: sge(p.bRecv, slot * SEND_LEN, SEND_LEN) },
          { wrId: BigInt(r * 2 + 1), sgList: [] }, // for the WRITE with immediate
        ]);
        await a.postRecv(p.link.a.qp, [{ wrId: BigInt(r), sgList: sge(p.aRecv, slot * SEND_LEN, SEND_LEN) }]);
        await a.writeBuffer(p.aSrc.buf, slot * SEND_LEN, msg(i, r, SEND_LEN, 0));
        await a.writeBuffer(p.aSrc.buf, SLOTS * SEND_LEN + slot * WRITE_LEN, msg(i, r, WRITE_LEN, 1));
        await a.postSend(p.link.a.qp, [
          { wrId: BigInt(r * 4), opcode: SendOp.SEND, sendFlags: SendFlag.SIGNALED, sgList: sge(p.aSrc, slot * SEND_LEN, SEND_LEN) },
          {
            wrId: BigInt(r * 4 + 1),
            opcode: SendOp.RDMA_WRITE_WITH_IMM,
            immData: r,
            sendFlags: SendFlag.SIGNALED,
            sgList: sge(p.aSrc, SLOTS * SEND_LEN + slot * WRITE_LEN, WRITE_LEN),
            rdma: { remoteAddr: p.bWrite.buf.addr + BigInt(slot * WRITE_LEN), rkey: p.bWrite.mr.rkey },
          },
          { wrId: BigInt(r * 4 + 2), opcode: SendOp.RDMA_READ, sendFlags: SendFlag.SIGNALED, sgList: sge(p.aRead, slot * READ_LEN, READ_LEN), rdma: { remoteAddr: p.bRead.buf.addr, rkey: p.bRead.mr.rkey } },
          {
            wrId: BigInt(r * 4 + 3),
            opcode: SendOp.ATOMIC_FETCH_AND_ADD,
            sendFlags: SendFlag.SIGNALED,
            sgList: sge(p.aAtomic, slot * 8, 8),
            atomic: { remoteAddr: p.bCounter.buf.addr, compareAdd: 1n, swap: 0n, rkey: p.bCounter.mr.rkey },
          },
        ]);
        await b.postSend(p.link.b.qp, [{ wrId: BigInt(r), opcode: SendOp.SEND, sendFlags: SendFlag.SIGNALED, sgList: sge(p.bRead, 0, SEND_LEN) }]);
      }
      if (MOVE_AT.includes(r)) await move(a);
      for (let i = 0; i < QPS; i++) {
        const p = pairs[i]!;
        const what = `qp pair ${i} round ${r}`;
        const aSends = await pollN(env, a, p.link.a.scq, 4, `${what}: A's sends`);
        expect(aSends.map((w) => [w.wrId, w.status]), what).toEqual([0, 1, 2, 3].map((k) => [BigInt(r * 4 + k), WcStatus.SUCCESS]));
        expect(await a.readBuffer(p.aRead.buf, slot * READ_LEN, READ_LEN), `${what}: READ data`).toEqual(pattern(READ_LEN, 4242 + i));
        expect(readU64le(await a.readBuffer(p.aAtomic.buf, slot * 8, 8)), `${what}: FETCH_AND_ADD original`).toBe(BigInt(r));
        const bRecvs = await pollN(env, b, p.link.b.rcq, 2, `${what}: B's receives`);
        expect(bRecvs.map((w) => [w.wrId, w.status, w.opcode]), what).toEqual([
          [BigInt(r * 2), WcStatus.SUCCESS, WcOpcode.RECV],
          [BigInt(r * 2 + 1), WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM],
        ]);
        expect(bRecvs[0]!.byteLen).toBe(SEND_LEN);
        expect(bRecvs[1]!.immData, `${what}: immediate`).toBe(r);
        expect(await b.readBuffer(p.bRecv.buf, slot * SEND_LEN, SEND_LEN), `${what}: SEND data at B`).toEqual(msg(i, r, SEND_LEN, 0));
        expect(await b.readBuffer(p.bWrite.buf, slot * WRITE_LEN, WRITE_LEN), `${what}: WRITE data at B`).toEqual(msg(i, r, WRITE_LEN, 1));
        const bSends = await pollN(env, b, p.link.b.scq, 1, `${what}: B's send`);
        expect(bSends.map((w) => [w.wrId, w.status])).toEqual([[BigInt(r), WcStatus.SUCCESS]]);
        const aRecvs = await pollN(env, a, p.link.a.rcq, 1, `${what}: A's receive`);
        expect(aRecvs.map((w) => [w.wrId, w.status, w.byteLen])).toEqual([[BigInt(r), WcStatus.SUCCESS, SEND_LEN]]);
        expect(await a.readBuffer(p.aRecv.buf, slot * SEND_LEN, SEND_LEN), `${what}: SEND data at A`).toEqual(pattern(READ_LEN, 4242 + i).subarray(0, SEND_LEN));
      }
    }
    // Nothing extra arrived: every completion came exactly once.
    for (const p of pairs) for (const cq of [p.link.a.scq, p.link.a.rcq]) expect(await a.pollCq(cq, 16)).toEqual([]);
    for (const p of pairs) for (const cq of [p.link.b.scq, p.link.b.rcq]) expect(await b.pollCq(cq, 16)).toEqual([]);
    expect(readU64le(await b.readBuffer(pairs[0]!.bCounter.buf, 0, 8))).toBe(BigInt(ROUNDS));
  });
}


function engineOf(dev: DeviceUnderTest): SoftRoceEngine {
  return (dev as DeviceUnderTest & { engine: SoftRoceEngine }).engine;
}

describe('live migration of a soft-RoCE device with RC traffic in flight both ways', () => {
  it('moves A to A\' and on to A\'\' on the same address: nothing lost, duplicated or corrupted, every WR completes once', async () => {
    const port = randomRocePort();
    const a = await startDevice({ softRoce: { address: A_ADDR, port } });
    const b = await startDevice({ softRoce: { address: B_ADDR, port } });
    const hops: DeviceUnderTest[] = [a];
    try {
      const drvA = await a.open();
      const drvB = await b.open();
      // Dirty logging from a few rounds before the first move, as QEMU's RAM copy runs: every page of A's
      // that the back-end wrote (received SENDs, READ data, atomic results) must be marked when the VM stops.
      const LOG_FROM = MOVE_AT[0]! - 4;
      let log: { isDirty(gpa: number): boolean; release(): void } | null = null;
      let watched: { gpa: number; before: Uint8Array }[] = [];
      const beforeRound: RoundHook = async (r, pairs) => {
        if (r !== LOG_FROM) return;
        log = await drvA.startDirtyLog();
        const pages = pairs.flatMap((p) => [p.aRecv, p.aRead, p.aAtomic].flatMap((m) => drvA.pagesOf(m.buf)));
        watched = [...new Set(pages)].map((gpa) => ({ gpa, before: drvA.pageCopy(gpa) }));
      };
      let checkedPages = 0;
      await workload(drvA, drvB, async (drv) => {
        const from = hops[hops.length - 1]!;
        // Started while the source still holds the address: it must not take it before the VM runs there.
        const to = await startDevice({ softRoce: { address: A_ADDR, port, incoming: true } });
        hops.push(to);
        expect(engineOf(to).link.held).toBe(false);
        const saved = await drv.stopAndSave();
        expect(engineOf(from).link.held, 'the source gives the address up once its state is saved').toBe(false);
        if (log !== null && checkedPages === 0) {
          const l: { isDirty(gpa: number): boolean } = log;
          const changed = watched.filter((w) => !Buffer.from(drv.pageCopy(w.gpa)).equals(Buffer.from(w.before)));
          expect(changed.length, 'the back-end wrote A\'s buffers while the log was on').toBeGreaterThan(0);
          expect(changed.filter((w) => !l.isDirty(w.gpa)).map((w) => `0x${w.gpa.toString(16)}`), 'pages written but not in the dirty log').toEqual([]);
          checkedPages = changed.length;
        }
        await drv.loadAndRun(frontendTo(to), saved);
        await waitFor(() => engineOf(to).link.held, 'the destination takes the address');
      }, beforeRound);
      expect(checkedPages).toBeGreaterThan(0);
      (log as { release(): void } | null)?.release();
      const dest = engineOf(hops[hops.length - 1]!);
      // The moves were felt: B met the blackout (RNR NAKs or drops) and the destinations resent.
      const blackout = hops.slice(0, -1).reduce((n, h) => n + engineOf(h).stats.blackoutRnrNaks + engineOf(h).stats.blackoutDropped, 0);
      expect(blackout + engineOf(b).stats.retransmits).toBeGreaterThan(0);
      expect(dest.stats.internalErrors + engineOf(b).stats.internalErrors).toBe(0);
      expect(hops[1]!.logLines().some((l) => /device state restored: \d+ QPs/.test(l))).toBe(true);
      await drvA.close();
      await drvB.close();
    } finally {
      for (const h of hops) await h.stop();
      await b.stop();
    }
  });

  it('a destination that refuses the state leaves the source running: it takes its address back and its traffic resumes', async () => {
    const port = randomRocePort();
    const a = await startDevice({ softRoce: { address: A_ADDR, port } });
    const b = await startDevice({ softRoce: { address: B_ADDR, port } });
    const dests: DeviceUnderTest[] = [];
    try {
      const drvA = await a.open();
      const drvB = await b.open();
      let refusals = 0;
      await workload(drvA, drvB, async (drv) => {
        const to = await startDevice({ softRoce: { address: A_ADDR, port, incoming: true } });
        dests.push(to);
        const saved = await drv.stopAndSave();
        expect(engineOf(a).link.held).toBe(false);
        // Cut short on the way: the destination refuses it at CHECK_DEVICE_STATE.
        const corrupt: SavedDevice = { state: saved.state.subarray(0, saved.state.byteLength - 7), bases: saved.bases };
        await expect(drv.loadAndRun(frontendTo(to), corrupt)).rejects.toThrow(DriverProtocolError);
        refusals++;
        expect(engineOf(to).link.held, 'a refused destination never takes the address').toBe(false);
        await drv.resumeHere(saved);
        await waitFor(() => engineOf(a).link.held, 'the source takes its address back');
      });
      expect(refusals).toBe(MOVE_AT.length);
      expect(dests[0]!.logLines().some((l) => /device state/.test(l) && /refused|failed/.test(l))).toBe(true);
      await drvA.close();
      await drvB.close();
    } finally {
      for (const d of dests) await d.stop();
      await a.stop();
      await b.stop();
    }
  });
});

async function waitFor(cond: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
