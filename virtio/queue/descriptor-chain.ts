/**
 * A popped descriptor chain as a list of already-translated segments:
 * device-readable ones first, then device-writable ones. One chain object is
 * meant to be reused for every pop on a queue, so the hot path allocates
 * nothing per descriptor.
 */
import type { GuestMemory } from '../memory/guest-memory.js';

export class DescriptorChain {
  /** Head descriptor index: what goes back into the used ring. */
  head = 0;
  /** Segments in the chain. */
  count = 0;
  /** Segments [0, readableCount) are device-readable, the rest device-writable. */
  readableCount = 0;
  readableBytes = 0;
  writableBytes = 0;

  regionIndex: Int32Array;
  /** Offset inside the region. */
  offset: Float64Array;
  gpa: Float64Array;
  length: Uint32Array;

  memory: GuestMemory | null = null;

  constructor(capacity = 16) {
    this.regionIndex = new Int32Array(capacity);
    this.offset = new Float64Array(capacity);
    this.gpa = new Float64Array(capacity);
    this.length = new Uint32Array(capacity);
  }

  get writableCount(): number {
    return this.count - this.readableCount;
  }

  reset(memory: GuestMemory, head: number): void {
    this.memory = memory;
    this.head = head;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
  }

  /** Appends a translated segment; grows the arrays when needed (amortised, bounded by the queue size). */
  push(regionIndex: number, offset: number, gpa: number, length: number, writable: boolean): void {
    if (this.count === this.length.length) this.grow();
    const i = this.count++;
    this.regionIndex[i] = regionIndex;
    this.offset[i] = offset;
    this.gpa[i] = gpa;
    this.length[i] = length;
    if (writable) this.writableBytes += length;
    else {
      this.readableCount++;
      this.readableBytes += length;
    }
  }

  /**
   * Copies up to `len` device-readable bytes, starting `from` bytes into the
   * readable part, to `dst`. Returns the bytes copied.
   */
  read(dst: Uint8Array, dstOffset: number, from: number, len: number): number {
    const mem = this.memory!;
    let skip = from;
    let done = 0;
    for (let i = 0; i < this.readableCount && done < len; i++) {
      const segLen = this.length[i]!;
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      const n = Math.min(segLen - skip, len - done);
      const r = mem.region(this.regionIndex[i]!);
      const off = this.offset[i]! + skip;
      dst.set(r.u8.subarray(off, off + n), dstOffset + done);
      done += n;
      skip = 0;
    }
    return done;
  }

  /**
   * Copies `len` bytes of `src` into the device-writable part, starting `at`
   * bytes into it, marking dirty pages. Returns the bytes written (short when
   * the writable part is smaller).
   */
  write(src: Uint8Array, srcOffset: number, at: number, len: number): number {
    const mem = this.memory!;
    let skip = at;
    let done = 0;
    for (let i = this.readableCount; i < this.count && done < len; i++) {
      const segLen = this.length[i]!;
      if (skip >= segLen) {
        skip -= segLen;
        continue;
      }
      const n = Math.min(segLen - skip, len - done);
      const r = mem.region(this.regionIndex[i]!);
      const off = this.offset[i]! + skip;
      r.u8.set(src.subarray(srcOffset + done, srcOffset + done + n), off);
      mem.log?.mark(this.gpa[i]! + skip, n);
      done += n;
      skip = 0;
    }
    return done;
  }

  private grow(): void {
    const cap = this.length.length * 2;
    const regionIndex = new Int32Array(cap);
    regionIndex.set(this.regionIndex);
    const offset = new Float64Array(cap);
    offset.set(this.offset);
    const gpa = new Float64Array(cap);
    gpa.set(this.gpa);
    const length = new Uint32Array(cap);
    length.set(this.length);
    this.regionIndex = regionIndex;
    this.offset = offset;
    this.gpa = gpa;
    this.length = length;
  }
}
