/**
 * A device with live resources and traffic in flight is saved, loaded into a
 * fresh device (through the vhost-user DEVICE_STATE channel, rings stopped
 * and restarted at the same bases, the same guest memory), and continued.
 * The run must be indistinguishable from one that never moved: the same
 * completion stream, the same bytes in memory, the same interrupts.
 */
import { describe, expect, it } from 'vitest';
import { native } from '../virtio/sys/native.js';
import { SendFlag, SendOp } from '../backend/abi/constants.js';
import { frontendTo, startDevice } from './harness.js';
import type { RefDriver } from './driver/ref-driver.js';
import { ALL_ACCESS, connectedPair, describeWc, mrBuf, pattern, pollN, withTeardown, type ScenarioEnv } from './scenarios/common.js';

interface Trace {
  cqes: string[];
  memory: string;
  interruptAfterMove: boolean;
}

/** Moves the driver's device into `dest`'s back-end. */
type Mover = (drv: RefDriver) => Promise<void>;

/**
 * The workload: an RC pair on one loopback device. Before the move it leaves
 * work in flight — sends stuck waiting for receives (RNR), an armed CQ, an
 * unpolled completion — and after the move it lets that work finish.
 */
async function workload(drv: RefDriver, move: Mover | null): Promise<Trace> {
  const env: ScenarioEnv = { a: drv, b: drv, fresh: true, timeoutMs: 5000 };
  const cqes: string[] = [];
  let memory = '';
  let interruptAfterMove = false;
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env, { minRnrTimer: 1, rnrRetry: 7 });
    const src = await mrBuf(t, drv, a.pd, 8192, ALL_ACCESS, pattern(8192, 7));
    const dst = await mrBuf(t, drv, b.pd, 8192, ALL_ACCESS, 0);
    const sge = (m: typeof src, off: number, len: number) => [{ addr: m.buf.addr + BigInt(off), length: len, lkey: m.mr.lkey }];

    // Two receives, then four sends: two land, two wait on RNR.
    await drv.postRecv(b.qp, [0, 1].map((i) => ({ wrId: BigInt(100 + i), sgList: sge(dst, i * 1024, 1024) })));
    await drv.postSend(
      a.qp,
      [0, 1, 2, 3].map((i) => ({ wrId: BigInt(i), opcode: SendOp.SEND_WITH_IMM, immData: 0x1000 + i, sendFlags: SendFlag.SIGNALED, sgList: sge(src, i * 512, 512) })),
    );
    // An RDMA write that completes, and one completion left unpolled in the CQ.
    await drv.postSend(a.qp, [{ wrId: 10n, opcode: SendOp.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: sge(src, 4096, 2048), rdma: { remoteAddr: dst.buf.addr + 4096n, rkey: dst.mr.rkey } }]);
    for (const w of await pollN(env, drv, b.rcq, 2, 'receives before the move')) cqes.push(describeWc(w));
    await drv.reqNotifyCq(b.rcq, false);

    if (move !== null) await move(drv);

    // The two sends waiting on RNR complete once receives arrive, on whichever device we are now.
    await drv.postRecv(b.qp, [2, 3].map((i) => ({ wrId: BigInt(100 + i), sgList: sge(dst, i * 1024, 1024) })));
    interruptAfterMove = await drv.waitCqEvent(b.rcq, 5000);
    for (const w of await pollN(env, drv, b.rcq, 2, 'receives after the move')) cqes.push(describeWc(w));
    for (const w of await pollN(env, drv, a.scq, 5, 'sends')) cqes.push(describeWc(w));
    // A read and an atomic after the move, against memory written before it.
    const scratch = await mrBuf(t, drv, a.pd, 4096, ALL_ACCESS, 0);
    await drv.postSend(a.qp, [
      { wrId: 20n, opcode: SendOp.RDMA_READ, sendFlags: SendFlag.SIGNALED, sgList: sge(scratch, 0, 2048), rdma: { remoteAddr: dst.buf.addr + 4096n, rkey: dst.mr.rkey } },
      { wrId: 21n, opcode: SendOp.ATOMIC_FETCH_AND_ADD, sendFlags: SendFlag.SIGNALED, sgList: sge(scratch, 2048, 8), atomic: { remoteAddr: dst.buf.addr, compareAdd: 5n, swap: 0n, rkey: dst.mr.rkey } },
    ]);
    for (const w of await pollN(env, drv, a.scq, 2, 'read and atomic')) cqes.push(describeWc(w));
    const bytes = [await drv.readBuffer(dst.buf, 0, 8192), await drv.readBuffer(scratch.buf, 0, 4096)];
    memory = Buffer.concat(bytes.map((x) => Buffer.from(x))).toString('base64');
  });
  return { cqes, memory, interruptAfterMove };
}

describe('device state save/load with traffic in flight', () => {
  it('a device moved mid-traffic into a fresh device behaves exactly like one that stayed', async () => {
    const stay = await startDevice();
    let reference: Trace;
    try {
      reference = await workload(await stay.open(), null);
    } finally {
      await stay.stop();
    }
    expect(reference.cqes).toHaveLength(11);
    expect(reference.cqes.every((c) => c.includes('SUCCESS'))).toBe(true);
    expect(reference.interruptAfterMove).toBe(true);

    const source = await startDevice();
    const dest = await startDevice();
    let stateBytes = 0;
    try {
      const drv = await source.open();
      const moved = await workload(drv, async (d) => {
        stateBytes = await d.migrateTo(frontendTo(dest));
      });
      expect(stateBytes).toBeGreaterThan(0);
      expect(moved.cqes).toEqual(reference.cqes);
      expect(moved.memory).toEqual(reference.memory);
      expect(moved.interruptAfterMove).toBe(true);
      expect(dest.logLines().some((l) => /device state restored: 2 QPs/.test(l))).toBe(true);
      await drv.close();
    } finally {
      await source.stop();
      await dest.stop();
    }
  });

  it('refuses a corrupt state blob at CHECK_DEVICE_STATE and keeps serving', async () => {
    const dev = await startDevice();
    try {
      const fe = frontendTo(dev);
      await fe.negotiate((1n << 32n) | (1n << 29n), (1n << 20n) - 1n);
      for (const blob of ['not json', '{"format":"vrdma-device-state","version":99}', '{"format":"vrdma-device-state","version":1,"slots":{"cq":1,"qp":1}}']) {
        const [mine, theirs] = native.socketPair();
        expect((await fe.setDeviceStateFd(1, theirs)) & 0xffn).toBe(0n);
        native.close(theirs);
        await writeAndClose(mine, new TextEncoder().encode(blob));
        expect(await fe.checkDeviceState()).toBe(1n);
      }
      expect(await fe.getQueueNum()).toBeGreaterThan(0);
      expect(dev.logLines().some((l) => /device state: version/.test(l))).toBe(true);
      fe.close();
    } finally {
      await dev.stop();
    }
  });
});


async function writeAndClose(fd: number, data: Uint8Array): Promise<void> {
  const { Socket } = await import('node:net');
  await new Promise<void>((resolve) => {
    const s = new Socket({ fd, readable: false, writable: true });
    s.end(data, () => {
      s.destroy();
      resolve();
    });
  });
}

