/**
 * Guest RAM for the test front-end: a memfd mapped into this process, handed
 * to the back-end as a memory-table region, with a bump allocator for ring
 * and buffer space. It plays the role of QEMU's memory-backend-memfd.
 */
import { native } from '../sys/native.js';
import type { MemRegion } from '../vhost-user/codec.js';

/** Where the front-end pretends guest RAM lives in its own address space. */
const FAKE_USER_BASE = 0x7f00_0000_0000;

export class GuestRam {
  readonly fd: number;
  readonly buffer: SharedArrayBuffer;
  readonly u8: Uint8Array;
  readonly dv: DataView;
  readonly u16: Uint16Array;
  private next: number;

  /**
   * @param gpa guest-physical base of the region
   * @param size bytes (a multiple of 4096)
   * @param reserved bytes at the start the allocator leaves alone
   */
  constructor(
    readonly gpa: number,
    readonly size: number,
    reserved = 0,
  ) {
    this.fd = native.memfdCreate('vrdma-guest-ram', size);
    this.buffer = native.mmap(this.fd, 0, size, true);
    this.u8 = new Uint8Array(this.buffer);
    this.dv = new DataView(this.buffer);
    this.u16 = new Uint16Array(this.buffer);
    this.next = reserved;
  }

  get userAddr(): number {
    return FAKE_USER_BASE + this.gpa;
  }

  region(): MemRegion {
    return { guestPhysAddr: this.gpa, size: this.size, userAddr: this.userAddr, mmapOffset: 0 };
  }

  /** Guest-physical address to user address, as the front-end reports ring addresses. */
  uva(gpa: number): number {
    return this.userAddr + (gpa - this.gpa);
  }

  /** Allocates `size` bytes aligned to `align`; returns the guest-physical address. */
  alloc(size: number, align = 64): number {
    const start = Math.ceil(this.next / align) * align;
    if (start + size > this.size) throw new RangeError(`guest RAM exhausted: need ${size} bytes at ${start} of ${this.size}`);
    this.next = start + size;
    return this.gpa + start;
  }

  /** View of guest memory at `gpa` (no copy). */
  bytes(gpa: number, len: number): Uint8Array {
    const off = gpa - this.gpa;
    if (off < 0 || len < 0 || off + len > this.size) throw new RangeError(`0x${gpa.toString(16)}+${len} is outside guest RAM`);
    return this.u8.subarray(off, off + len);
  }

  release(): void {
    native.munmap(this.buffer);
    native.close(this.fd);
  }
}
