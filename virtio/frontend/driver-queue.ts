/**
 * The driver side of a split virtqueue, living in {@link GuestRam}: what a
 * guest driver does to offer buffers and collect them back. Used by tests,
 * benchmarks and the reference RDMA driver; it trusts nothing the device
 * writes into the used ring.
 */
import { native } from '../sys/native.js';
import type { GuestRam } from './guest-ram.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../queue/split-queue.js';

export interface BufferSegment {
  gpa: number;
  len: number;
  writable: boolean;
}

export interface UsedElement {
  head: number;
  len: number;
}

export interface DriverQueueOptions {
  eventIdx?: boolean;
  /** Put chains of more than one segment in an indirect table. */
  indirect?: boolean;
  /** Largest indirect table (segments per chain) when `indirect` is on. */
  maxIndirect?: number;
}

const DESC = 16;

export class DriverQueue {
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly kickFd: number;
  readonly callFd: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  private readonly indirectGpa: number;
  private readonly maxIndirect: number;
  private freeHead = 0;
  private numFree: number;
  /** Next available index to publish / last we told the device about. */
  private availIdx = 0;
  private kickedAvail = 0;
  private lastUsed = 0;
  /** Descriptors in each outstanding chain (by head), so they can be freed. */
  private readonly chainLength: Uint16Array;
  /** Sum of writable bytes per outstanding head: the most the device may claim. */
  private readonly writableBytes: Float64Array;

  constructor(
    private readonly ram: GuestRam,
    readonly index: number,
    readonly size: number,
    opts: DriverQueueOptions = {},
  ) {
    this.eventIdx = opts.eventIdx ?? false;
    this.indirect = opts.indirect ?? false;
    this.maxIndirect = opts.maxIndirect ?? 16;
    this.descGpa = ram.alloc(DESC * size, 16);
    this.availGpa = ram.alloc(6 + 2 * size, 2);
    this.usedGpa = ram.alloc(6 + 8 * size, 4096);
    this.indirectGpa = this.indirect ? ram.alloc(DESC * this.maxIndirect * size, 16) : 0;
    ram.bytes(this.descGpa, DESC * size).fill(0);
    ram.bytes(this.availGpa, 6 + 2 * size).fill(0);
    ram.bytes(this.usedGpa, 6 + 8 * size).fill(0);
    for (let i = 0; i < size; i++) this.writeDesc(i, 0, 0, VIRTQ_DESC_F_NEXT, (i + 1) % size);
    this.numFree = size;
    this.chainLength = new Uint16Array(size);
    this.writableBytes = new Float64Array(size);
    this.kickFd = native.eventfd(0);
    this.callFd = native.eventfd(0);
  }

  get free(): number {
    return this.numFree;
  }

  /** Descriptors the device still holds. */
  get outstanding(): number {
    return this.size - this.numFree;
  }

  /** Raw descriptor write, exposed so tests can build hostile chains. */
  writeDesc(i: number, addr: number, len: number, flags: number, next: number): void {
    const o = this.descGpa - this.ram.gpa + i * DESC;
    const dv = this.ram.dv;
    dv.setBigUint64(o, BigInt(addr), true);
    dv.setUint32(o + 8, len, true);
    dv.setUint16(o + 12, flags, true);
    dv.setUint16(o + 14, next, true);
  }

  /** Raw available-ring entry write (not published); for hostile tests. */
  writeAvail(slot: number, head: number): void {
    this.ram.dv.setUint16(this.availGpa - this.ram.gpa + 4 + 2 * (slot % this.size), head, true);
  }

  /** Raw available index store; for hostile tests. */
  setAvailIdx(idx: number): void {
    Atomics.store(this.ram.u16, (this.availGpa - this.ram.gpa + 2) >> 1, idx & 0xffff);
  }

  /** Adds one chain; returns its head, or null when there are not enough free descriptors. Call {@link publish} to expose it. */
  add(segments: readonly BufferSegment[]): number | null {
    const useIndirect = this.indirect && segments.length > 1;
    if (useIndirect && segments.length > this.maxIndirect) throw new RangeError(`${segments.length} segments exceed the indirect table of ${this.maxIndirect}`);
    const needed = useIndirect ? 1 : segments.length;
    if (needed === 0 || needed > this.numFree) return null;
    const head = this.freeHead;
    let writable = 0;
    for (const s of segments) if (s.writable) writable += s.len;
    if (useIndirect) {
      const table = this.indirectGpa + head * this.maxIndirect * DESC;
      const base = table - this.ram.gpa;
      const dv = this.ram.dv;
      segments.forEach((s, i) => {
        const o = base + i * DESC;
        dv.setBigUint64(o, BigInt(s.gpa), true);
        dv.setUint32(o + 8, s.len, true);
        dv.setUint16(o + 12, (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < segments.length ? VIRTQ_DESC_F_NEXT : 0), true);
        dv.setUint16(o + 14, i + 1, true);
      });
      const next = this.nextOf(head);
      this.writeDesc(head, table, segments.length * DESC, VIRTQ_DESC_F_INDIRECT, 0);
      this.freeHead = next;
    } else {
      let idx = head;
      for (let i = 0; i < segments.length; i++) {
        const s = segments[i]!;
        const next = this.nextOf(idx);
        const last = i + 1 === segments.length;
        this.writeDesc(idx, s.gpa, s.len, (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT), last ? 0 : next);
        if (last) this.freeHead = next;
        idx = next;
      }
    }
    this.numFree -= needed;
    this.chainLength[head] = needed;
    this.writableBytes[head] = writable;
    this.writeAvail(this.availIdx, head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    return head;
  }

  /** Makes added chains visible to the device. */
  publish(): void {
    this.setAvailIdx(this.availIdx);
  }

  /** Publishes and kicks the device unless it asked not to be (EVENT_IDX / NO_NOTIFY). Returns true when it kicked. */
  kick(): boolean {
    this.publish();
    const old = this.kickedAvail;
    const now = this.availIdx;
    this.kickedAvail = now;
    if (old === now) return false;
    const usedOff = this.usedGpa - this.ram.gpa;
    let need: boolean;
    if (this.eventIdx) {
      const availEvent = Atomics.load(this.ram.u16, (usedOff + 4 + 8 * this.size) >> 1);
      need = ((now - availEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    } else {
      need = (Atomics.load(this.ram.u16, usedOff >> 1) & 1) === 0;
    }
    if (need) native.eventfdWrite(this.kickFd, 1);
    return need;
  }

  /** Takes the next used element, checking what the device wrote; null when none. */
  getUsed(): UsedElement | null {
    const usedOff = this.usedGpa - this.ram.gpa;
    const idx = Atomics.load(this.ram.u16, (usedOff + 2) >> 1);
    if (idx === this.lastUsed) return null;
    if (((idx - this.lastUsed) & 0xffff) > this.size) throw new Error(`vq ${this.index}: device used index ${idx} ran ahead of ${this.lastUsed}`);
    const e = usedOff + 4 + 8 * (this.lastUsed % this.size);
    const head = this.ram.dv.getUint32(e, true);
    const len = this.ram.dv.getUint32(e + 4, true);
    if (head >= this.size || this.chainLength[head] === 0) throw new Error(`vq ${this.index}: device returned descriptor ${head}, which is not outstanding`);
    if (len > this.writableBytes[head]!) throw new Error(`vq ${this.index}: device claims ${len} bytes written into ${this.writableBytes[head]} writable`);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    this.freeChain(head);
    if (this.eventIdx) {
      // Ask for an interrupt for the next used element.
      Atomics.store(this.ram.u16, (this.availGpa - this.ram.gpa + 4 + 2 * this.size) >> 1, this.lastUsed);
    }
    return { head, len };
  }

  /** Consumes a pending interrupt; true when the device signalled. */
  takeInterrupt(): boolean {
    return native.eventfdRead(this.callFd) !== null;
  }

  /** Sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT (without EVENT_IDX). */
  setNoInterrupt(on: boolean): void {
    Atomics.store(this.ram.u16, (this.availGpa - this.ram.gpa) >> 1, on ? 1 : 0);
  }

  release(): void {
    native.close(this.kickFd);
    native.close(this.callFd);
  }

  private nextOf(i: number): number {
    return this.ram.dv.getUint16(this.descGpa - this.ram.gpa + i * DESC + 14, true);
  }

  private freeChain(head: number): void {
    const n = this.chainLength[head]!;
    // Walk to the chain's last descriptor and link the free list behind it.
    let last = head;
    for (let i = 1; i < n; i++) last = this.nextOf(last);
    this.writeDesc(last, 0, 0, VIRTQ_DESC_F_NEXT, this.freeHead);
    this.freeHead = head;
    this.numFree += n;
    this.chainLength[head] = 0;
    this.writableBytes[head] = 0;
  }
}
