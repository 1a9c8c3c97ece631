/**
 * Asynchronous waits on an eventfd (a virtqueue's call fd). The device may
 * run in this very process, on this event loop, so the driver never blocks:
 * it watches the fd with a libuv poll handle and resolves when it is
 * readable (consuming the counter), or when the timeout passes.
 */
import { native, POLL_READABLE, type FdWatcher } from '../../virtio/sys/native.js';

export class EventFdWaiter {
  private watcher: FdWatcher | null = null;
  private pending: ((fired: boolean) => void) | null = null;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;

  constructor(readonly fd: number) {}

  /** Consumes a pending signal without waiting; true when there was one. */
  take(): boolean {
    return native.eventfdRead(this.fd) !== null;
  }

  /** Waits up to `timeoutMs` for the fd to be signalled; consumes the signal. */
  wait(timeoutMs: number): Promise<boolean> {
    if (this.closed) return Promise.reject(new Error(`eventfd ${this.fd}: waiter closed`));
    if (this.pending !== null) return Promise.reject(new Error(`eventfd ${this.fd}: already waited on`));
    if (this.take()) return Promise.resolve(true);
    if (timeoutMs <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      this.pending = resolve;
      if (this.watcher === null) this.watcher = new native.FdWatcher(this.fd, () => this.onReadable());
      this.watcher.start(POLL_READABLE);
      this.timer = setTimeout(() => this.finish(false), timeoutMs);
    });
  }

  private onReadable(): void {
    if (this.pending === null) {
      this.watcher?.stop();
      return;
    }
    // Level-triggered: reading resets the counter so the watcher stops firing.
    if (this.take()) this.finish(true);
  }

  private finish(fired: boolean): void {
    const p = this.pending;
    this.pending = null;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.watcher?.stop();
    p?.(fired);
  }

  close(): void {
    if (this.closed) return;
    this.finish(false);
    this.closed = true;
    this.watcher?.close();
    this.watcher = null;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
