/**
 * The back-end and the front-end in two processes, over a real unix socket,
 * with guest RAM in a memfd and real eventfds: every byte of every
 * descriptor is checked, then the device is reset and it all happens again.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestRam } from '../../virtio/frontend/guest-ram.js';
import { DriverQueue } from '../../virtio/frontend/driver-queue.js';
import { VhostUserFrontend } from '../../virtio/frontend/frontend.js';
import { native } from '../../virtio/sys/native.js';
import { VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit } from '../../virtio/vhost-user/protocol.js';
import { BackendProcess } from '../support/backend-process.js';

const DESCRIPTORS = 10_000;
const QUEUE_SIZE = 256;
const IN_FLIGHT = 64;
const MAX_LEN = 4096;

/** Small deterministic PRNG so a failure can be replayed. */
function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

interface Slot {
  src: number;
  dst: number;
}

/** Moves `count` chains through the queue, each a (readable, writable) pair, and checks every echoed byte. */
async function pump(ram: GuestRam, q: DriverQueue, slots: Slot[], count: number, seed: number): Promise<{ bytes: number; interrupts: number }> {
  const rand = xorshift(seed);
  const expected = new Map<number, { slot: Slot; len: number; seed: number }>();
  const freeSlots = [...slots];
  let submitted = 0;
  let completed = 0;
  let bytes = 0;
  let interrupts = 0;
  const fill = (b: Uint8Array, s: number): void => {
    const r = xorshift(s);
    for (let i = 0; i < b.length; i++) b[i] = r() & 0xff;
  };
  while (completed < count) {
    while (submitted < count && freeSlots.length > 0) {
      const slot = freeSlots.pop()!;
      const len = 1 + (rand() % MAX_LEN);
      const s = rand();
      fill(ram.bytes(slot.src, len), s);
      ram.bytes(slot.dst, MAX_LEN).fill(0);
      // Alternate one- and two-segment writable parts to cross segment edges.
      const split = submitted % 2 === 0 ? len : Math.max(1, len >> 1);
      const segs = [{ gpa: slot.src, len, writable: false }, { gpa: slot.dst, len: split, writable: true }];
      if (split < len) segs.push({ gpa: slot.dst + split, len: len - split, writable: true });
      const head = q.add(segs);
      if (head === null) {
        freeSlots.push(slot);
        break;
      }
      expected.set(head, { slot, len, seed: s });
      submitted++;
    }
    q.kick();
    if (native.waitReadable(q.callFd, 5000)) {
      if (q.takeInterrupt()) interrupts++;
    }
    for (let u = q.getUsed(); u !== null; u = q.getUsed()) {
      const e = expected.get(u.head);
      if (e === undefined) throw new Error(`head ${u.head} was not outstanding`);
      expected.delete(u.head);
      expect(u.len).toBe(e.len);
      const want = new Uint8Array(e.len);
      fill(want, e.seed);
      const got = ram.bytes(e.slot.dst, e.len);
      if (Buffer.compare(Buffer.from(got), Buffer.from(want)) !== 0) throw new Error(`descriptor ${completed}: echoed bytes differ`);
      bytes += e.len;
      completed++;
      freeSlots.push(e.slot);
    }
    // Let the event loop run the connection (nothing else needs it here, but keep it honest).
    if (completed % 1024 === 0) await new Promise((r) => setImmediate(r));
  }
  return { bytes, interrupts };
}

describe('echo device in a separate process', () => {
  let dir: string;
  let backend: BackendProcess;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vrdma-it-'));
    backend = new BackendProcess(['serve', '--device', 'echo', '--socket', join(dir, 'vu.sock'), '--log-level', 'info']);
    await backend.waitFor(/listening on/);
  });

  afterAll(async () => {
    await backend.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('moves 10,000 descriptors with every byte verified, resets, and does it again', async () => {
    const fe = VhostUserFrontend.connect(join(dir, 'vu.sock'));
    const ram = new GuestRam(0, 16 << 20);
    const features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VIRTIO_F_RING_INDIRECT_DESC);
    await fe.negotiate(features, (1n << 20n) - 1n);
    await fe.setMemTable([ram]);
    const slots: Slot[] = Array.from({ length: IN_FLIGHT }, () => ({ src: ram.alloc(MAX_LEN, 64), dst: ram.alloc(MAX_LEN, 64) }));

    for (const round of [1, 2]) {
      const q = new DriverQueue(ram, 0, QUEUE_SIZE, { eventIdx: true, indirect: round === 2 });
      await fe.startQueue(ram, q);
      await fe.setStatus(0xf);
      const { bytes, interrupts } = await pump(ram, q, slots, DESCRIPTORS, round * 7919);
      expect(bytes).toBeGreaterThan(DESCRIPTORS);
      expect(interrupts).toBeGreaterThan(0);
      const cfg = new DataView((await fe.getConfig(8, 8)).buffer);
      expect(cfg.getBigUint64(0, true)).toBe(BigInt(DESCRIPTORS));
      expect(await fe.getVringBase(0)).toBe(DESCRIPTORS & 0xffff);
      await fe.resetDevice();
      const after = new DataView((await fe.getConfig(8, 8)).buffer);
      expect(after.getBigUint64(0, true)).toBe(0n);
      q.release();
    }
    await backend.waitFor(/device reset \(RESET_DEVICE\)/);
    fe.close();
    ram.release();
    await backend.waitFor(/front-end disconnected/);
    await backend.waitFor(/guest memory mappings still held: 0 /);
  });
});
