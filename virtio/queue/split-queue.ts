/**
 * The device side of a split virtqueue (virtio 1.x §2.7): pops descriptor
 * chains from the available ring, returns them through the used ring, and
 * decides when the driver needs an interrupt (EVENT_IDX or NO_INTERRUPT).
 *
 * Every index and address the guest wrote is checked before use. A
 * malformed chain is returned to the driver with length 0 and skipped; a
 * ring whose own indices are impossible (available index running more than
 * a queue's worth ahead, a head past the table) stops the queue until the
 * front-end sets it up again.
 */
import { native } from '../sys/native.js';
import type { GuestMemory, MappedRegion } from '../memory/guest-memory.js';
import { DescriptorChain } from './descriptor-chain.js';

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const VIRTQ_USED_F_NO_NOTIFY = 1;
export const MAX_QUEUE_SIZE = 32768;
const DESC_SIZE = 16;

export class QueueError extends Error {
  constructor(
    readonly queue: number,
    message: string,
  ) {
    super(`vq ${queue}: ${message}`);
    this.name = 'QueueError';
  }
}

/** Ring addresses as the front-end gave them (SET_VRING_ADDR): user addresses, plus the used ring's log address. */
export interface RingAddresses {
  descUva: number;
  availUva: number;
  usedUva: number;
  logGpa: number;
  /** VHOST_VRING_F_LOG: used-ring writes go into the dirty log. */
  logUsed: boolean;
}

export interface QueueStats {
  chains: number;
  malformed: number;
  notifications: number;
}

export type MalformedHandler = (queue: SplitVirtqueue, head: number, reason: string) => void;

export class SplitVirtqueue {
  size = 0;
  addresses: RingAddresses | null = null;
  eventIdx = false;
  indirect = false;
  /** Next available-ring index to read (free-running u16). */
  lastAvail = 0;
  /** Next used-ring index to write (free-running u16). */
  usedIdx = 0;
  /** Used index when the driver was last considered for an interrupt. */
  private signalledUsed = 0;
  callFd: number | null = null;
  /** Why the queue stopped serving, when the guest broke the ring. */
  broken: string | null = null;
  readonly stats: QueueStats = { chains: 0, malformed: 0, notifications: 0 };
  onMalformed: MalformedHandler | null = null;

  private resolvedGeneration = -1;
  private desc: MappedRegion | null = null;
  private descOff = 0;
  private avail: MappedRegion | null = null;
  private availOff = 0;
  private used: MappedRegion | null = null;
  private usedOff = 0;
  private usedGpa = 0;

  constructor(
    readonly index: number,
    private readonly memory: GuestMemory,
  ) {}

  /** Sets the ring size; split rings need a power of two up to 32768. */
  setSize(num: number, maxSize: number): void {
    if (num === 0 || num > maxSize || num > MAX_QUEUE_SIZE || (num & (num - 1)) !== 0) {
      throw new QueueError(this.index, `queue size ${num} must be a power of two in 1..${Math.min(maxSize, MAX_QUEUE_SIZE)}`);
    }
    this.size = num;
    this.invalidate();
  }

  setAddresses(addresses: RingAddresses): void {
    this.addresses = addresses;
    this.invalidate();
  }

  /** Sets where processing resumes (SET_VRING_BASE). */
  setBase(base: number): void {
    if (base > 0xffff) throw new QueueError(this.index, `vring base ${base} does not fit 16 bits`);
    this.lastAvail = base;
    this.invalidate();
  }

  /** Forgets cached ring translations; they are redone on next use. */
  invalidate(): void {
    this.resolvedGeneration = -1;
  }

  /**
   * Translates the ring addresses through the memory table and checks size
   * and alignment. Returns null when usable, or the reason it is not.
   */
  resolve(): string | null {
    if (this.resolvedGeneration === this.memory.generation && this.desc !== null) return null;
    const a = this.addresses;
    if (this.size === 0) return 'queue size not set';
    if (a === null) return 'ring addresses not set';
    const ev = this.eventIdx ? 2 : 0;
    const descLen = DESC_SIZE * this.size;
    const availLen = 4 + 2 * this.size + ev;
    const usedLen = 4 + 8 * this.size + ev;
    const descGpa = this.memory.uvaToGpa(a.descUva, descLen);
    const availGpa = this.memory.uvaToGpa(a.availUva, availLen);
    const usedGpa = this.memory.uvaToGpa(a.usedUva, usedLen);
    if (descGpa < 0) return `descriptor table at uva 0x${a.descUva.toString(16)} (+${descLen}) is not in guest memory`;
    if (availGpa < 0) return `available ring at uva 0x${a.availUva.toString(16)} (+${availLen}) is not in guest memory`;
    if (usedGpa < 0) return `used ring at uva 0x${a.usedUva.toString(16)} (+${usedLen}) is not in guest memory`;
    const di = this.memory.find(descGpa, descLen);
    const ai = this.memory.find(availGpa, availLen);
    const ui = this.memory.find(usedGpa, usedLen);
    this.desc = this.memory.region(di);
    this.descOff = descGpa - this.desc.gpa;
    this.avail = this.memory.region(ai);
    this.availOff = availGpa - this.avail.gpa;
    this.used = this.memory.region(ui);
    this.usedOff = usedGpa - this.used.gpa;
    this.usedGpa = usedGpa;
    if (this.descOff % 16 !== 0) return 'descriptor table is not 16-byte aligned';
    if (this.availOff % 2 !== 0) return 'available ring is not 2-byte aligned';
    if (this.usedOff % 4 !== 0) return 'used ring is not 4-byte aligned';
    this.resolvedGeneration = this.memory.generation;
    // The used index lives in guest memory; continue from what the driver last saw.
    this.usedIdx = Atomics.load(this.used.u16, (this.usedOff + 2) >> 1);
    this.signalledUsed = this.usedIdx;
    return null;
  }

  get isResolved(): boolean {
    return this.resolvedGeneration === this.memory.generation && this.desc !== null;
  }

  /** Marks the queue unusable until it is configured again. */
  fail(reason: string): void {
    this.broken = reason;
  }

  /** Buffers the driver has made available and we have not popped. */
  pending(): number {
    if (!this.isResolved) return 0;
    const availIdx = Atomics.load(this.avail!.u16, (this.availOff + 2) >> 1);
    return (availIdx - this.lastAvail) & 0xffff;
  }

  /**
   * Pops the next valid chain into `chain`. Malformed chains met on the way
   * are returned to the driver with length 0. Returns false when the ring is
   * empty or unusable.
   */
  popInto(chain: DescriptorChain): boolean {
    if (this.broken !== null) return false;
    if (!this.isResolved) {
      const why = this.resolve();
      if (why !== null) return false;
    }
    const avail = this.avail!;
    for (;;) {
      const availIdx = Atomics.load(avail.u16, (this.availOff + 2) >> 1);
      const pending = (availIdx - this.lastAvail) & 0xffff;
      if (pending === 0) return false;
      if (pending > this.size) {
        this.fail(`available index ${availIdx} is ${pending} entries ahead of ${this.lastAvail}, more than the queue size ${this.size}`);
        return false;
      }
      const slot = this.lastAvail & (this.size - 1);
      const head = avail.dv.getUint16(this.availOff + 4 + 2 * slot, true);
      if (head >= this.size) {
        this.fail(`available ring slot ${slot} names descriptor ${head}, past the table of ${this.size}`);
        return false;
      }
      this.lastAvail = (this.lastAvail + 1) & 0xffff;
      const fault = this.walk(head, chain);
      if (fault === null) {
        this.stats.chains++;
        return true;
      }
      this.stats.malformed++;
      this.onMalformed?.(this, head, fault);
      this.pushUsed(head, 0);
    }
  }

  /** Follows one chain from `head`, translating every segment. Returns the fault, or null. */
  private walk(head: number, chain: DescriptorChain): string | null {
    const mem = this.memory;
    chain.reset(mem, head);
    let table = this.desc!;
    let tableOff = this.descOff;
    let tableSize = this.size;
    let idx = head;
    let budget = this.size;
    let inIndirect = false;
    let seenWritable = false;
    for (;;) {
      if (budget-- === 0) return `chain from head ${head} is longer than ${inIndirect ? 'its indirect table' : 'the queue'} (a loop?)`;
      const d = tableOff + idx * DESC_SIZE;
      const dv = table.dv;
      const lo = dv.getUint32(d, true);
      const hi = dv.getUint32(d + 4, true);
      const len = dv.getUint32(d + 8, true);
      const flags = dv.getUint16(d + 12, true);
      const next = dv.getUint16(d + 14, true);
      if (hi >= 0x200000) return `descriptor ${idx}: address beyond 2^53`;
      const addr = hi * 0x1_0000_0000 + lo;
      if (flags & VIRTQ_DESC_F_INDIRECT) {
        if (!this.indirect) return `descriptor ${idx}: indirect table but VIRTIO_F_RING_INDIRECT_DESC was not negotiated`;
        if (inIndirect) return `descriptor ${idx}: indirect table inside an indirect table`;
        if (flags & VIRTQ_DESC_F_NEXT) return `descriptor ${idx}: indirect table with NEXT set`;
        if (len === 0 || len % DESC_SIZE !== 0) return `descriptor ${idx}: indirect table length ${len} is not a non-zero multiple of 16`;
        const entries = len / DESC_SIZE;
        if (entries > this.size) return `descriptor ${idx}: indirect table of ${entries} entries exceeds the queue size ${this.size}`;
        const ri = mem.find(addr, len);
        if (ri < 0) return `descriptor ${idx}: indirect table 0x${addr.toString(16)}+${len} is outside guest memory`;
        table = mem.region(ri);
        tableOff = addr - table.gpa;
        tableSize = entries;
        idx = 0;
        budget = entries;
        inIndirect = true;
        continue;
      }
      if (len > 0) {
        const ri = mem.find(addr, len);
        if (ri < 0) return `descriptor ${idx}: buffer 0x${addr.toString(16)}+${len} is outside guest memory`;
        const writable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
        if (!writable && seenWritable) return `descriptor ${idx}: device-readable buffer after a device-writable one`;
        seenWritable ||= writable;
        chain.push(ri, addr - mem.region(ri).gpa, addr, len, writable);
      }
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return null;
      if (next >= tableSize) return `descriptor ${idx}: next ${next} is past the table of ${tableSize}`;
      idx = next;
    }
  }

  /** Returns a chain to the driver with `len` bytes written, and publishes the used index. */
  pushUsed(head: number, len: number): void {
    const used = this.used!;
    const slot = this.usedIdx & (this.size - 1);
    const e = this.usedOff + 4 + 8 * slot;
    used.dv.setUint32(e, head, true);
    used.dv.setUint32(e + 4, len, true);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    // Sequentially consistent: the element is visible before the index.
    Atomics.store(used.u16, (this.usedOff + 2) >> 1, this.usedIdx);
    const log = this.memory.log;
    if (log !== null) {
      const a = this.addresses!;
      const base = a.logUsed ? a.logGpa : this.usedGpa;
      log.mark(base + 4 + 8 * slot, 8);
      log.mark(base + 2, 2);
    }
  }

  /**
   * Tells the driver where we are (EVENT_IDX avail_event) so that it kicks
   * for the next buffer. Returns true when buffers arrived meanwhile and the
   * caller should keep popping.
   */
  enableNotification(): boolean {
    if (!this.isResolved || this.broken !== null) return false;
    if (this.eventIdx) {
      const off = this.usedOff + 4 + 8 * this.size;
      Atomics.store(this.used!.u16, off >> 1, this.lastAvail);
      const log = this.memory.log;
      if (log !== null) log.mark((this.addresses!.logUsed ? this.addresses!.logGpa : this.usedGpa) + 4 + 8 * this.size, 2);
    }
    return this.pending() !== 0;
  }

  /** Interrupts the driver if it asked for it since the last call. Returns true when it did. */
  notify(): boolean {
    if (this.callFd === null || !this.isResolved) return false;
    const newIdx = this.usedIdx;
    const old = this.signalledUsed;
    if (newIdx === old) return false;
    this.signalledUsed = newIdx;
    let need: boolean;
    if (this.eventIdx) {
      const usedEvent = Atomics.load(this.avail!.u16, (this.availOff + 4 + 2 * this.size) >> 1);
      need = ((newIdx - usedEvent - 1) & 0xffff) < ((newIdx - old) & 0xffff);
    } else {
      need = (Atomics.load(this.avail!.u16, this.availOff >> 1) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (!need) return false;
    native.eventfdWrite(this.callFd, 1);
    this.stats.notifications++;
    return true;
  }

  /** The usual device loop: pop until empty, re-arm, and pop again if the driver raced us. */
  drain(chain: DescriptorChain, handle: (chain: DescriptorChain) => void): void {
    do {
      while (this.popInto(chain)) handle(chain);
    } while (this.enableNotification());
  }
}
