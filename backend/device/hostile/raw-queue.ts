/**
 * A driver-side split virtqueue for hostile tests. Unlike the front-end's
 * DriverQueue it lets a test write any descriptor (loops, addresses outside
 * guest memory, writable-before-readable), publish a head that is already
 * outstanding, and it tolerates the device returning such a head twice.
 * It still checks everything the device writes into the used ring: a head
 * that is not outstanding, or a used length above the chain's writable
 * bytes, is a device bug and throws.
 */
import { native } from '../../../virtio/sys/native.js';
import type { GuestRam } from '../../../virtio/frontend/guest-ram.js';
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../../virtio/queue/split-queue.js';

export interface Segment {
  gpa: number;
  len: number;
  writable: boolean;
}

/** One raw descriptor; `next` is an index into the same spec list (or `nextAbs`, an absolute descriptor index). */
export interface RawDesc {
  addr: bigint | number;
  len: number;
  flags: number;
  next?: number;
  nextAbs?: number;
}

export interface Used<T> {
  head: number;
  len: number;
  tag: T;
}

interface Outstanding<T> {
  descs: number[];
  writable: number;
  /** Times the head is published and not yet returned. */
  refs: number;
  tag: T;
}

const DESC = 16;

export class RawQueue<T = unknown> {
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly kickFd: number;
  readonly callFd: number;
  private readonly free: number[] = [];
  private readonly out = new Map<number, Outstanding<T>>();
  private availIdx = 0;
  private lastUsed = 0;
  private published = 0;
  /** Used elements returned so far. */
  returned = 0;

  constructor(
    private readonly ram: GuestRam,
    readonly index: number,
    readonly size: number,
  ) {
    this.descGpa = ram.alloc(DESC * size, 16);
    this.availGpa = ram.alloc(6 + 2 * size, 2);
    this.usedGpa = ram.alloc(6 + 8 * size, 4096);
    ram.bytes(this.descGpa, DESC * size).fill(0);
    ram.bytes(this.availGpa, 6 + 2 * size).fill(0);
    ram.bytes(this.usedGpa, 6 + 8 * size).fill(0);
    for (let i = size - 1; i >= 0; i--) this.free.push(i);
    this.kickFd = native.eventfd(0);
    this.callFd = native.eventfd(0);
  }

  /** Free descriptors. */
  get freeDescs(): number {
    return this.free.length;
  }

  /** Heads published and not yet returned (counting a doubly published head twice). */
  get inFlight(): number {
    let n = 0;
    for (const o of this.out.values()) n += o.refs;
    return n;
  }

  /** Posts the device has not returned yet, counting used elements not taken yet as returned. */
  get deviceHolds(): number {
    const unread = (this.deviceUsedIdx() - this.lastUsed) & 0xffff;
    return this.published - this.returned - unread;
  }

  /** Chains added (published or not) that the device has not returned. */
  get outstandingChains(): number {
    return this.out.size;
  }

  tagOf(head: number): T | undefined {
    return this.out.get(head)?.tag;
  }

  writeDesc(i: number, addr: bigint | number, len: number, flags: number, next: number): void {
    const o = this.descGpa - this.ram.gpa + i * DESC;
    const dv = this.ram.dv;
    dv.setBigUint64(o, BigInt.asUintN(64, BigInt(addr)), true);
    dv.setUint32(o + 8, len >>> 0, true);
    dv.setUint16(o + 12, flags, true);
    dv.setUint16(o + 14, next, true);
  }

  /** Adds a well-formed chain (readable segments first); returns the head or null when descriptors run out. */
  add(segments: readonly Segment[], tag: T): number | null {
    const specs: RawDesc[] = segments.map((s, i) => ({
      addr: s.gpa,
      len: s.len,
      flags: (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < segments.length ? VIRTQ_DESC_F_NEXT : 0),
      next: i + 1,
    }));
    return this.addRaw(specs, tag);
  }

  /** Adds a chain of arbitrary descriptors; returns the head or null when descriptors run out. */
  addRaw(specs: readonly RawDesc[], tag: T): number | null {
    if (specs.length === 0 || specs.length > this.free.length) return null;
    const descs = specs.map(() => this.free.pop()!);
    let writable = 0;
    specs.forEach((s, i) => {
      const next = s.nextAbs ?? (s.next !== undefined && s.next < descs.length ? descs[s.next]! : 0);
      this.writeDesc(descs[i]!, s.addr, s.len, s.flags, next);
      if (s.flags & VIRTQ_DESC_F_WRITE) writable += s.len >>> 0;
    });
    const head = descs[0]!;
    this.out.set(head, { descs, writable, refs: 1, tag });
    this.putAvail(head);
    return head;
  }

  /** Puts an outstanding head into the available ring again (a hostile repost). */
  repost(head: number): void {
    const o = this.out.get(head);
    if (o === undefined) throw new Error(`head ${head} is not outstanding`);
    o.refs++;
    this.putAvail(head);
  }

  private putAvail(head: number): void {
    this.ram.dv.setUint16(this.availGpa - this.ram.gpa + 4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.published++;
  }

  publish(): void {
    Atomics.store(this.ram.u16, (this.availGpa - this.ram.gpa + 2) >> 1, this.availIdx);
  }

  /** Publishes and kicks (always: a spurious kick is harmless and this queue does not use EVENT_IDX). */
  kick(): void {
    this.publish();
    native.eventfdWrite(this.kickFd, 1);
  }

  /** The device's used index as it is in guest memory. */
  deviceUsedIdx(): number {
    return Atomics.load(this.ram.u16, (this.usedGpa - this.ram.gpa + 2) >> 1);
  }

  /** Takes the next used element, checking it; null when there is none. */
  takeUsed(): Used<T> | null {
    const usedOff = this.usedGpa - this.ram.gpa;
    const idx = Atomics.load(this.ram.u16, (usedOff + 2) >> 1);
    if (idx === this.lastUsed) return null;
    if (((idx - this.lastUsed) & 0xffff) > this.size) throw new Error(`vq ${this.index}: device used index ${idx} ran ahead of ${this.lastUsed}`);
    const e = usedOff + 4 + 8 * (this.lastUsed % this.size);
    const head = this.ram.dv.getUint32(e, true);
    const len = this.ram.dv.getUint32(e + 4, true);
    const o = this.out.get(head);
    if (o === undefined || o.refs === 0) throw new Error(`vq ${this.index}: device returned descriptor ${head}, which is not outstanding`);
    if (len > o.writable) throw new Error(`vq ${this.index}: device claims ${len} bytes written into ${o.writable} writable (head ${head})`);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    this.returned++;
    o.refs--;
    if (o.refs === 0) {
      this.out.delete(head);
      for (const d of o.descs) this.free.push(d);
    }
    return { head, len, tag: o.tag };
  }

  /** Consumes a pending interrupt; true when the device signalled. */
  takeInterrupt(): boolean {
    return native.eventfdRead(this.callFd) !== null;
  }

  release(): void {
    native.close(this.kickFd);
    native.close(this.callFd);
  }
}
