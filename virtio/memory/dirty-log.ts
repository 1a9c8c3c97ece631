/**
 * The vhost-user dirty log: one bit per 4 KiB guest page, set by the back-end
 * for every guest-memory write while the front-end migrates. The front-end
 * reads the bitmap concurrently, so bits are set with Atomics.or.
 */
import { VHOST_LOG_PAGE } from '../vhost-user/protocol.js';

export class DirtyLog {
  private readonly bitmap: Uint8Array;
  /** Marks that fell outside the log; the front-end sized it too small. */
  droppedMarks = 0;

  constructor(
    readonly buffer: SharedArrayBuffer,
    readonly size: number,
  ) {
    this.bitmap = new Uint8Array(buffer, 0, size);
  }

  /** Bytes of log needed to cover guest-physical addresses below `topGpa`. */
  static bytesFor(topGpa: number): number {
    return Math.ceil(Math.ceil(topGpa / VHOST_LOG_PAGE) / 8);
  }

  /** Guest-physical addresses below this are covered. */
  get coveredBytes(): number {
    return this.size * 8 * VHOST_LOG_PAGE;
  }

  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    const first = Math.floor(gpa / VHOST_LOG_PAGE);
    const last = Math.floor((gpa + len - 1) / VHOST_LOG_PAGE);
    if (Math.floor(last / 8) >= this.size) {
      this.droppedMarks++;
      return;
    }
    for (let page = first; page <= last; page++) {
      Atomics.or(this.bitmap, Math.floor(page / 8), 1 << page % 8);
    }
  }

  isDirty(gpa: number): boolean {
    const page = Math.floor(gpa / VHOST_LOG_PAGE);
    const byte = Math.floor(page / 8);
    return byte < this.size && (this.bitmap[byte]! & (1 << page % 8)) !== 0;
  }
}
