import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestRam } from '../frontend/guest-ram.js';
import { DriverQueue, type BufferSegment } from '../frontend/driver-queue.js';
import { GuestMemory, MappedRegion } from '../memory/guest-memory.js';
import { DirtyLog } from '../memory/dirty-log.js';
import { native } from '../sys/native.js';
import { DescriptorChain } from './descriptor-chain.js';
import { SplitVirtqueue, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from './split-queue.js';

const RAM_GPA = 0x10_0000;
const RAM_SIZE = 4 << 20;
const QSIZE = 8;

interface Rig {
  ram: GuestRam;
  memory: GuestMemory;
  driver: DriverQueue;
  queue: SplitVirtqueue;
  chain: DescriptorChain;
  faults: string[];
}

function rig(opts: { eventIdx?: boolean; indirect?: boolean; size?: number } = {}): Rig {
  const ram = new GuestRam(RAM_GPA, RAM_SIZE);
  const memory = new GuestMemory(8);
  // The device's view of the same memfd pages, as the back-end would map them.
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  const size = opts.size ?? QSIZE;
  const driver = new DriverQueue(ram, 0, size, opts);
  const queue = new SplitVirtqueue(0, memory);
  queue.eventIdx = opts.eventIdx ?? false;
  queue.indirect = opts.indirect ?? false;
  queue.setSize(size, 1024);
  queue.setAddresses({ descUva: ram.uva(driver.descGpa), availUva: ram.uva(driver.availGpa), usedUva: ram.uva(driver.usedGpa), logGpa: driver.usedGpa, logUsed: false });
  queue.callFd = driver.callFd;
  const faults: string[] = [];
  queue.onMalformed = (_q, _head, reason) => faults.push(reason);
  expect(queue.resolve()).toBeNull();
  return { ram, memory, driver, queue, chain: new DescriptorChain(2), faults };
}

let r: Rig;
afterEach(() => {
  r?.driver.release();
  r?.ram.release();
});

function buf(len: number, fill?: number): BufferSegment & { bytes: Uint8Array } {
  const gpa = r.ram.alloc(len, 8);
  const bytes = r.ram.bytes(gpa, len);
  if (fill !== undefined) for (let i = 0; i < len; i++) bytes[i] = (fill + i) & 0xff;
  return { gpa, len, writable: false, bytes };
}

describe('split virtqueue', () => {
  beforeEach(() => {
    r = rig();
  });

  it('pops a chain with readable segments first, then writable, and returns it through the used ring', () => {
    const a = buf(100, 1);
    const b = buf(50, 7);
    const out = buf(200);
    r.driver.add([a, b, { ...out, writable: true }]);
    r.driver.kick();
    expect(r.queue.popInto(r.chain)).toBe(true);
    expect(r.chain.count).toBe(3);
    expect(r.chain.readableCount).toBe(2);
    expect(r.chain.readableBytes).toBe(150);
    expect(r.chain.writableBytes).toBe(200);
    const tmp = new Uint8Array(150);
    expect(r.chain.read(tmp, 0, 0, 150)).toBe(150);
    expect(Array.from(tmp.subarray(98, 102))).toEqual([99, 100, 7, 8]);
    expect(r.chain.write(tmp, 0, 10, 150)).toBe(150);
    expect(r.queue.popInto(r.chain)).toBe(false);
    r.queue.pushUsed(r.chain.head, 160);
    expect(r.queue.notify()).toBe(true);
    expect(r.driver.takeInterrupt()).toBe(true);
    expect(r.driver.getUsed()).toEqual({ head: 0, len: 160 });
    expect(Array.from(out.bytes.subarray(10, 12))).toEqual([1, 2]);
  });

  it('reads and writes across segment boundaries at any offset', () => {
    const parts = [buf(3, 0), buf(5, 3), buf(7, 8)];
    const outs = [buf(4), buf(4), buf(10)];
    r.driver.add([...parts, ...outs.map((o) => ({ ...o, writable: true }))]);
    r.driver.kick();
    expect(r.queue.popInto(r.chain)).toBe(true);
    const all = new Uint8Array(15);
    r.chain.read(all, 0, 0, 15);
    expect(Array.from(all)).toEqual(Array.from({ length: 15 }, (_, i) => i));
    const mid = new Uint8Array(6);
    expect(r.chain.read(mid, 0, 2, 6)).toBe(6);
    expect(Array.from(mid)).toEqual([2, 3, 4, 5, 6, 7]);
    expect(r.chain.read(mid, 0, 13, 6)).toBe(2);
    expect(r.chain.write(all, 0, 3, 15)).toBe(15);
    expect(Array.from(outs[0]!.bytes.subarray(3))).toEqual([0]);
    expect(Array.from(outs[1]!.bytes)).toEqual([1, 2, 3, 4]);
    expect(Array.from(outs[2]!.bytes)).toEqual([5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
    expect(r.chain.write(all, 0, 17, 15)).toBe(1);
  });

  it('returns a descriptor loop to the driver unused instead of hanging', () => {
    const a = buf(16);
    r.driver.writeDesc(0, a.gpa, 16, VIRTQ_DESC_F_NEXT, 1);
    r.driver.writeDesc(1, a.gpa, 16, VIRTQ_DESC_F_NEXT, 0);
    r.driver.writeAvail(0, 0);
    r.driver.setAvailIdx(1);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.faults[0]).toMatch(/longer than the queue/);
    expect(r.queue.stats.malformed).toBe(1);
    expect(r.queue.usedIdx).toBe(1);
    expect(r.queue.broken).toBeNull();
  });

  it('returns chains whose buffers lie outside guest memory, and keeps serving good ones', () => {
    const good = buf(32, 1);
    const cases: Array<[number, number]> = [
      [0, 16], // below the region
      [RAM_GPA + RAM_SIZE - 8, 16], // runs past the end
      [RAM_GPA + RAM_SIZE, 1], // just past the end
      [0xffff_ffff_f000, 0x2000], // far away
    ];
    cases.forEach(([addr, len], i) => {
      r.driver.writeDesc(i, addr, len, 0, 0);
      r.driver.writeAvail(i, i);
    });
    r.driver.writeDesc(4, good.gpa, 32, 0, 0);
    r.driver.writeAvail(4, 4);
    r.driver.setAvailIdx(5);
    expect(r.queue.popInto(r.chain)).toBe(true);
    expect(r.chain.head).toBe(4);
    expect(r.faults).toHaveLength(4);
    for (const f of r.faults) expect(f).toMatch(/outside guest memory/);
  });

  it('rejects an address whose upper bits put it beyond 2^53', () => {
    r.driver.writeDesc(0, 0, 16, 0, 0);
    // Write the high word by hand: BigInt path caps at 2^64.
    const o = r.driver.descGpa - r.ram.gpa;
    r.ram.dv.setUint32(o + 4, 0xffff_ffff, true);
    r.driver.writeAvail(0, 0);
    r.driver.setAvailIdx(1);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.faults[0]).toMatch(/beyond 2\^53/);
  });

  it('rejects a next index past the table', () => {
    const a = buf(16);
    r.driver.writeDesc(0, a.gpa, 16, VIRTQ_DESC_F_NEXT, QSIZE);
    r.driver.writeAvail(0, 0);
    r.driver.setAvailIdx(1);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.faults[0]).toMatch(/next 8 is past the table/);
  });

  it('rejects a device-readable buffer after a device-writable one', () => {
    const a = buf(16);
    r.driver.writeDesc(0, a.gpa, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1);
    r.driver.writeDesc(1, a.gpa, 16, 0, 0);
    r.driver.writeAvail(0, 0);
    r.driver.setAvailIdx(1);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.faults[0]).toMatch(/readable buffer after a device-writable/);
  });

  it('stops the queue when the available index runs more than a queue ahead', () => {
    r.driver.setAvailIdx(QSIZE + 1);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.queue.broken).toMatch(/more than the queue size/);
    expect(r.queue.popInto(r.chain)).toBe(false);
  });

  it('stops the queue when the available ring names a head past the table', () => {
    r.driver.writeAvail(0, 0xffff);
    r.driver.setAvailIdx(1);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.queue.broken).toMatch(/names descriptor 65535/);
  });

  it('wraps the 16-bit ring indices', () => {
    const a = buf(8, 0);
    const out = buf(8);
    for (let i = 0; i < 70_000; i++) {
      r.driver.add([a, { ...out, writable: true }]);
      r.driver.publish();
      expect(r.queue.popInto(r.chain)).toBe(true);
      r.queue.pushUsed(r.chain.head, 8);
      expect(r.driver.getUsed()?.len).toBe(8);
    }
    expect(r.queue.lastAvail).toBe(70_000 & 0xffff);
  });

  it('refuses queue sizes that are zero, too big, or not a power of two', () => {
    expect(() => r.queue.setSize(0, 1024)).toThrow(/power of two/);
    expect(() => r.queue.setSize(12, 1024)).toThrow(/power of two/);
    expect(() => r.queue.setSize(2048, 1024)).toThrow(/power of two/);
  });

  it('refuses rings that are not inside guest memory', () => {
    r.queue.setAddresses({ descUva: 0x1000, availUva: r.ram.uva(r.driver.availGpa), usedUva: r.ram.uva(r.driver.usedGpa), logGpa: 0, logUsed: false });
    expect(r.queue.resolve()).toMatch(/descriptor table/);
    r.queue.setAddresses({ descUva: r.ram.uva(r.driver.descGpa), availUva: r.ram.uva(r.driver.availGpa), usedUva: r.ram.userAddr + RAM_SIZE - 16, logGpa: 0, logUsed: false });
    expect(r.queue.resolve()).toMatch(/used ring/);
  });

  it('suppresses interrupts while the driver sets NO_INTERRUPT', () => {
    const out = buf(8);
    r.driver.setNoInterrupt(true);
    r.driver.add([{ ...out, writable: true }]);
    r.driver.kick();
    r.queue.popInto(r.chain);
    r.queue.pushUsed(r.chain.head, 0);
    expect(r.queue.notify()).toBe(false);
    expect(r.driver.takeInterrupt()).toBe(false);
  });
});

describe('split virtqueue with indirect descriptors', () => {
  beforeEach(() => {
    r = rig({ indirect: true });
  });

  it('follows an indirect table', () => {
    const a = buf(10, 5);
    const out = buf(10);
    r.driver.add([a, buf(6, 50), { ...out, writable: true }]);
    r.driver.kick();
    expect(r.queue.popInto(r.chain)).toBe(true);
    expect(r.chain.count).toBe(3);
    expect(r.chain.readableBytes).toBe(16);
    expect(r.chain.writableBytes).toBe(10);
  });

  it('rejects nested tables, tables with NEXT, bad table lengths, and loops inside a table', () => {
    const t = buf(64);
    const a = buf(16);
    const dv = r.ram.dv;
    const entry = (i: number, addr: number, len: number, flags: number, next: number) => {
      const o = t.gpa - r.ram.gpa + i * 16;
      dv.setBigUint64(o, BigInt(addr), true);
      dv.setUint32(o + 8, len, true);
      dv.setUint16(o + 12, flags, true);
      dv.setUint16(o + 14, next, true);
    };
    entry(0, t.gpa, 32, VIRTQ_DESC_F_INDIRECT, 0);
    r.driver.writeDesc(0, t.gpa, 16, VIRTQ_DESC_F_INDIRECT, 0); // nested
    r.driver.writeDesc(1, t.gpa, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 2); // NEXT with INDIRECT
    r.driver.writeDesc(2, t.gpa, 20, VIRTQ_DESC_F_INDIRECT, 0); // not a multiple of 16
    r.driver.writeDesc(3, t.gpa + 32, 32, VIRTQ_DESC_F_INDIRECT, 0); // loop inside
    entry(2, a.gpa, 16, VIRTQ_DESC_F_NEXT, 1);
    entry(3, a.gpa, 16, VIRTQ_DESC_F_NEXT, 0);
    r.driver.writeDesc(4, t.gpa, 16 * 1024, VIRTQ_DESC_F_INDIRECT, 0); // more entries than the queue
    for (let i = 0; i < 5; i++) r.driver.writeAvail(i, i);
    r.driver.setAvailIdx(5);
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.faults).toHaveLength(5);
    expect(r.faults[0]).toMatch(/inside an indirect table/);
    expect(r.faults[1]).toMatch(/with NEXT set/);
    expect(r.faults[2]).toMatch(/not a non-zero multiple of 16/);
    expect(r.faults[3]).toMatch(/longer than its indirect table/);
    expect(r.faults[4]).toMatch(/exceeds the queue size/);
  });

  it('refuses indirect tables when the feature was not negotiated', () => {
    r.queue.indirect = false;
    r.driver.add([buf(8), buf(8)]);
    r.driver.kick();
    expect(r.queue.popInto(r.chain)).toBe(false);
    expect(r.faults[0]).toMatch(/not negotiated/);
  });
});

describe('split virtqueue with EVENT_IDX', () => {
  beforeEach(() => {
    r = rig({ eventIdx: true });
  });

  it('interrupts only when the used index crosses the driver-chosen used_event', () => {
    const out = buf(8);
    for (let i = 0; i < 3; i++) r.driver.add([{ ...out, writable: true }]);
    r.driver.kick();
    // Driver asks to be told after the third element: used_event = 2.
    const availOff = r.driver.availGpa - r.ram.gpa;
    Atomics.store(r.ram.u16, (availOff + 4 + 2 * QSIZE) >> 1, 2);
    r.queue.popInto(r.chain);
    r.queue.pushUsed(r.chain.head, 0);
    expect(r.queue.notify()).toBe(false);
    r.queue.popInto(r.chain);
    r.queue.pushUsed(r.chain.head, 0);
    expect(r.queue.notify()).toBe(false);
    r.queue.popInto(r.chain);
    r.queue.pushUsed(r.chain.head, 0);
    expect(r.queue.notify()).toBe(true);
  });

  it('publishes avail_event so the driver kicks only for new work', () => {
    const out = buf(8);
    r.driver.add([{ ...out, writable: true }]);
    expect(r.driver.kick()).toBe(true);
    r.queue.drain(r.chain, (c) => r.queue.pushUsed(c.head, 0));
    const usedOff = r.driver.usedGpa - r.ram.gpa;
    expect(Atomics.load(r.ram.u16, (usedOff + 4 + 8 * QSIZE) >> 1)).toBe(1);
    r.driver.getUsed();
    r.driver.add([{ ...out, writable: true }]);
    expect(r.driver.kick()).toBe(true);
    r.driver.add([{ ...out, writable: true }]);
    // The device has not caught up with the first: no second kick is needed.
    expect(r.driver.kick()).toBe(false);
  });
});

describe('dirty logging', () => {
  beforeEach(() => {
    r = rig();
  });

  it('marks the pages of written buffers and of the used ring', () => {
    const logBytes = DirtyLog.bytesFor(r.memory.topGpa);
    const logFd = native.memfdCreate('log', 4096);
    const log = new DirtyLog(native.mmap(logFd, 0, 4096, true), logBytes);
    r.memory.log = log;
    const out = buf(8192 + 64);
    const a = buf(8, 1);
    r.driver.add([a, { ...out, writable: true }]);
    r.driver.kick();
    r.queue.popInto(r.chain);
    const data = new Uint8Array(8200);
    r.chain.write(data, 0, 0, 8200);
    r.queue.pushUsed(r.chain.head, 8200);
    expect(log.isDirty(out.gpa)).toBe(true);
    expect(log.isDirty(out.gpa + 8199)).toBe(true);
    expect(log.isDirty(r.driver.usedGpa)).toBe(true);
    expect(log.isDirty(a.gpa + 8192 * 4)).toBe(false);
    // A mark past the end of the log is dropped and counted, never written.
    log.mark(log.coveredBytes + 4096, 1);
    expect(log.droppedMarks).toBe(1);
    native.close(logFd);
  });
});
