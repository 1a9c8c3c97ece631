/**
 * Guest RAM as the vhost-user memory table describes it: a small set of
 * regions, each a mapping of a front-end fd. Every access goes through a
 * bounds-checked lookup; an address range that is not wholly inside one
 * region is refused, never clamped.
 */
import { native } from '../sys/native.js';
import type { MemRegion } from '../vhost-user/codec.js';
import type { DirtyLog } from './dirty-log.js';

export class MemoryError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MemoryError';
  }
}

const PAGE_SIZE = 4096;

/** One mapped region. Views cover the whole mapping; offsets are relative to its start. */
export class MappedRegion {
  readonly u8: Uint8Array;
  readonly u16: Uint16Array;
  readonly u32: Uint32Array;
  readonly dv: DataView;

  constructor(
    readonly gpa: number,
    readonly size: number,
    readonly uva: number,
    readonly mmapOffset: number,
    readonly buffer: SharedArrayBuffer,
    /** Called once when the region leaves the table (unmaps a native mapping). */
    private readonly onRelease: (() => void) | null,
  ) {
    this.u8 = new Uint8Array(buffer, 0, size);
    this.u16 = new Uint16Array(buffer, 0, Math.floor(size / 2));
    this.u32 = new Uint32Array(buffer, 0, Math.floor(size / 4));
    this.dv = new DataView(buffer, 0, size);
  }

  get end(): number {
    return this.gpa + this.size;
  }

  release(): void {
    this.onRelease?.();
  }

  describe(): string {
    return `gpa 0x${this.gpa.toString(16)}+0x${this.size.toString(16)} uva 0x${this.uva.toString(16)} offset 0x${this.mmapOffset.toString(16)}`;
  }
}

function rangesOverlap(a: number, alen: number, b: number, blen: number): boolean {
  return a < b + blen && b < a + alen;
}

/** Checks a region's numbers before anything is mapped. */
function validateRegion(r: MemRegion): void {
  const what = `region gpa 0x${r.guestPhysAddr.toString(16)}`;
  if (r.size === 0) throw new MemoryError(`${what}: size is 0`);
  if (r.guestPhysAddr + r.size > Number.MAX_SAFE_INTEGER) throw new MemoryError(`${what}: end overflows`);
  if (r.userAddr + r.size > Number.MAX_SAFE_INTEGER) throw new MemoryError(`${what}: user address end overflows`);
  if (r.mmapOffset % PAGE_SIZE !== 0) throw new MemoryError(`${what}: mmap offset 0x${r.mmapOffset.toString(16)} is not page aligned`);
}

/** Maps one memory-table entry from its fd; the fd is not consumed. */
export function mapRegion(r: MemRegion, fd: number): MappedRegion {
  validateRegion(r);
  const fileSize = native.fdSize(fd);
  if (r.mmapOffset + r.size > fileSize) {
    // Mapping past EOF would SIGBUS on first touch: refuse it here.
    throw new MemoryError(
      `region gpa 0x${r.guestPhysAddr.toString(16)}: offset 0x${r.mmapOffset.toString(16)} + size 0x${r.size.toString(16)} is past the end of its fd (0x${fileSize.toString(16)})`,
    );
  }
  const buffer = native.mmap(fd, r.mmapOffset, r.size, true);
  let released = false;
  return new MappedRegion(r.guestPhysAddr, r.size, r.userAddr, r.mmapOffset, buffer, () => {
    if (released) return;
    released = true;
    native.munmap(buffer);
  });
}

export class GuestMemory {
  private regions: MappedRegion[] = [];
  private lastHit = 0;
  /** Set while the front-end logs dirty pages (migration). */
  log: DirtyLog | null = null;
  /** Bumped on every table change so cached translations can notice. */
  generation = 0;

  constructor(readonly maxRegions: number) {}

  get regionCount(): number {
    return this.regions.length;
  }

  get all(): readonly MappedRegion[] {
    return this.regions;
  }

  /** One past the highest guest-physical address. */
  get topGpa(): number {
    let top = 0;
    for (const r of this.regions) top = Math.max(top, r.end);
    return top;
  }

  /** Replaces the whole table. Takes ownership of `regions` even when it throws. */
  replace(regions: MappedRegion[]): void {
    try {
      GuestMemory.checkDisjoint(regions);
      if (regions.length > this.maxRegions) throw new MemoryError(`${regions.length} regions, at most ${this.maxRegions}`);
    } catch (err) {
      for (const r of regions) r.release();
      throw err;
    }
    const old = this.regions;
    this.regions = [...regions].sort((a, b) => a.gpa - b.gpa);
    this.lastHit = 0;
    this.generation++;
    for (const r of old) r.release();
  }

  /** Adds one region. Takes ownership of `region` even when it throws. */
  add(region: MappedRegion): void {
    try {
      if (this.regions.length >= this.maxRegions) throw new MemoryError(`memory table full (${this.maxRegions} regions)`);
      GuestMemory.checkDisjoint([...this.regions, region]);
    } catch (err) {
      region.release();
      throw err;
    }
    this.regions = [...this.regions, region].sort((a, b) => a.gpa - b.gpa);
    this.lastHit = 0;
    this.generation++;
  }

  /** Removes the region matching all three numbers (REM_MEM_REG semantics). */
  remove(r: MemRegion): void {
    const i = this.regions.findIndex((m) => m.gpa === r.guestPhysAddr && m.size === r.size && m.uva === r.userAddr);
    if (i < 0) throw new MemoryError(`no region at gpa 0x${r.guestPhysAddr.toString(16)} size 0x${r.size.toString(16)} uva 0x${r.userAddr.toString(16)}`);
    const [gone] = this.regions.splice(i, 1);
    this.regions = [...this.regions];
    this.lastHit = 0;
    this.generation++;
    gone!.release();
  }

  clear(): void {
    const old = this.regions;
    this.regions = [];
    this.lastHit = 0;
    this.generation++;
    for (const r of old) r.release();
  }

  /** Index of the region holding all of [gpa, gpa+len), or -1. */
  find(gpa: number, len: number): number {
    const regions = this.regions;
    const hit = regions[this.lastHit];
    if (hit !== undefined && gpa >= hit.gpa && len <= hit.end - gpa && gpa < hit.end) return this.lastHit;
    for (let i = 0; i < regions.length; i++) {
      const r = regions[i]!;
      if (gpa >= r.gpa && gpa < r.end && len <= r.end - gpa) {
        this.lastHit = i;
        return i;
      }
    }
    return -1;
  }

  region(index: number): MappedRegion {
    const r = this.regions[index];
    if (r === undefined) throw new MemoryError(`no region ${index}`);
    return r;
  }

  /** Front-end user address (SET_VRING_ADDR) to guest-physical, or -1 when [uva, uva+len) is not inside one region. */
  uvaToGpa(uva: number, len: number): number {
    for (const r of this.regions) {
      if (uva >= r.uva && uva < r.uva + r.size && len <= r.uva + r.size - uva) return r.gpa + (uva - r.uva);
    }
    return -1;
  }

  /** Copies guest memory out; false (nothing copied) when the range is not mapped. */
  read(gpa: number, dst: Uint8Array, dstOffset: number, len: number): boolean {
    const i = this.find(gpa, len);
    if (i < 0) return false;
    const r = this.regions[i]!;
    const off = gpa - r.gpa;
    dst.set(r.u8.subarray(off, off + len), dstOffset);
    return true;
  }

  /** Copies into guest memory and marks the pages dirty; false (nothing written) when the range is not mapped. */
  write(gpa: number, src: Uint8Array, srcOffset: number, len: number): boolean {
    const i = this.find(gpa, len);
    if (i < 0) return false;
    const r = this.regions[i]!;
    r.u8.set(src.subarray(srcOffset, srcOffset + len), gpa - r.gpa);
    this.log?.mark(gpa, len);
    return true;
  }

  private static checkDisjoint(regions: readonly MappedRegion[]): void {
    for (let i = 0; i < regions.length; i++) {
      for (let j = i + 1; j < regions.length; j++) {
        const a = regions[i]!;
        const b = regions[j]!;
        if (rangesOverlap(a.gpa, a.size, b.gpa, b.size)) throw new MemoryError(`regions overlap in guest-physical space: ${a.describe()} and ${b.describe()}`);
        if (rangesOverlap(a.uva, a.size, b.uva, b.size)) throw new MemoryError(`regions overlap in user address space: ${a.describe()} and ${b.describe()}`);
      }
    }
  }
}
