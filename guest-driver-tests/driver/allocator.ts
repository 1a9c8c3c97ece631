/**
 * A first-fit allocator with coalescing over a range of guest-physical
 * addresses. GuestRam only bumps; the reference driver needs to free WQE
 * areas, page lists and buffers so that long scenarios (limits reached,
 * freed, reached again) do not run guest memory out.
 */
export class GuestAllocator {
  /** Free ranges [start, end), sorted by start, never adjacent. */
  private free: Array<{ start: number; end: number }>;
  private readonly live = new Map<number, { start: number; end: number }>();
  private inUse = 0;

  constructor(
    readonly base: number,
    readonly size: number,
  ) {
    this.free = [{ start: base, end: base + size }];
  }

  /** Bytes currently allocated (including alignment slack). */
  get used(): number {
    return this.inUse;
  }

  get liveCount(): number {
    return this.live.size;
  }

  /** Returns the address of `size` bytes aligned to `align` (a power of two). */
  alloc(size: number, align = 64): number {
    if (!Number.isInteger(size) || size < 0) throw new RangeError(`bad allocation size ${size}`);
    const len = Math.max(size, 1);
    for (let i = 0; i < this.free.length; i++) {
      const r = this.free[i]!;
      const at = Math.ceil(r.start / align) * align;
      if (at + len > r.end) continue;
      // Split: [r.start, at) stays free, [at + len, r.end) stays free.
      const pieces: Array<{ start: number; end: number }> = [];
      if (at > r.start) pieces.push({ start: r.start, end: at });
      if (at + len < r.end) pieces.push({ start: at + len, end: r.end });
      this.free.splice(i, 1, ...pieces);
      this.live.set(at, { start: at, end: at + len });
      this.inUse += len;
      return at;
    }
    throw new RangeError(`guest memory exhausted: no ${size} bytes aligned to ${align} (${this.inUse} of ${this.size} in use)`);
  }

  release(addr: number): void {
    const r = this.live.get(addr);
    if (r === undefined) throw new Error(`0x${addr.toString(16)} is not an allocation`);
    this.live.delete(addr);
    this.inUse -= r.end - r.start;
    let i = 0;
    while (i < this.free.length && this.free[i]!.start < r.start) i++;
    this.free.splice(i, 0, { ...r });
    // Coalesce with the neighbours.
    const prev = this.free[i - 1];
    const cur = this.free[i]!;
    const next = this.free[i + 1];
    if (next !== undefined && cur.end === next.start) {
      cur.end = next.end;
      this.free.splice(i + 1, 1);
    }
    if (prev !== undefined && prev.end === cur.start) {
      prev.end = cur.end;
      this.free.splice(i, 1);
    }
  }
}
