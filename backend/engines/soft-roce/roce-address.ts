/**
 * The device's RoCE address as something a back-end holds and gives up
 * (ARCHITECTURE.md decision 11): the UDP endpoint of the VM's GID, bound
 * only while the VM runs on this back-end. A migration source gives it up
 * once its state is saved; the destination takes it when the VM starts
 * there, and a source whose migration failed takes it back when the VM
 * resumes. On one machine both back-ends use the same 127.0.0.x address in
 * turn; across machines the operator's hooks move the IP itself.
 *
 * While the address is not held, sends are dropped (counted): UDP
 * semantics, and the engine does not send while it is suspended anyway.
 */
import { isSysError } from '../../../virtio/sys/native.js';
import { UdpTransport, udpPeer, type UdpBatchHandler, type UdpErrorHandler, type UdpPeer } from './udp-transport.js';

/**
 * Commands around taking and giving up the address (`--on-address-acquire`
 * / `--on-address-release`): e.g. add the IP to an interface and announce
 * it, or remove it. A hook that fails is logged; the address is still
 * taken or given up.
 */
export interface AddressHooks {
  beforeAcquire?(): Promise<void>;
  afterRelease?(): Promise<void>;
}

export interface RoceAddressOptions {
  /** IPv4 or IPv6 literal: the VM's GID as an IP address. */
  address: string;
  /** UDP port; 0 picks one at the first bind and keeps it for every later one. */
  port: number;
  hooks?: AddressHooks;
  /** Where failures the address survives are reported (hooks, a busy address, socket errors). */
  warn?: (line: string) => void;
}

/** How long acquire() waits between binds while another process still holds the address. */
const BUSY_RETRY_MS = 10;
/** How often a busy address is reported while acquire() keeps trying. */
const BUSY_REPORT_MS = 5000;

export class RoceAddress {
  /** The endpoint the engine sends from, known before the first bind (port 0 resolved by it). */
  local: UdpPeer;
  /** Datagrams dropped because the address was not held. */
  droppedWhileReleased = 0;
  /** Times the address was taken and given up, for logs and tests. */
  acquisitions = 0;
  releases = 0;
  private transport: UdpTransport | null = null;
  private batchHandler: UdpBatchHandler | null = null;
  private errorHandler: UdpErrorHandler | null = null;
  private pending: Promise<void> | null = null;
  /** Bumped by release() and close(): an acquire() that started before gives up. */
  private generation = 0;
  private closed = false;

  constructor(private readonly options: RoceAddressOptions) {
    this.local = udpPeer(options.address, options.port);
  }

  get held(): boolean {
    return this.transport !== null;
  }

  /** True once close() ran: nothing is sent or received again. */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Binds now, without hooks; throws the bind's error (EADDRINUSE, EADDRNOTAVAIL). */
  bindNow(): void {
    if (this.closed) throw new Error('RoceAddress is closed');
    if (this.transport !== null) return;
    const t = new UdpTransport({ address: this.options.address, port: this.local.port });
    this.local = t.local;
    if (this.errorHandler !== null) t.onError(this.errorHandler);
    if (this.batchHandler !== null) t.onBatch(this.batchHandler);
    this.transport = t;
    this.acquisitions++;
  }

  /**
   * Takes the address: runs the acquire hook, then binds, retrying while
   * another process (the other back-end of a migration) still holds it.
   * Resolves once held; resolves without it when release() or close() came
   * first. Concurrent calls share one attempt.
   */
  acquire(): Promise<void> {
    if (this.transport !== null || this.closed) return Promise.resolve();
    if (this.pending !== null) return this.pending;
    const generation = this.generation;
    const attempt = (async () => {
      await this.runHook('acquire', this.options.hooks?.beforeAcquire);
      let reported = 0;
      const started = Date.now();
      while (generation === this.generation && this.transport === null) {
        try {
          this.bindNow();
        } catch (err) {
          if (!isSysError(err) || err.code !== 'EADDRINUSE') throw err;
          const waited = Date.now() - started;
          if (waited >= reported) {
            if (reported > 0) this.options.warn?.(`RoCE address ${this.describe()} still in use after ${Math.round(waited / 1000)} s; retrying`);
            reported += BUSY_REPORT_MS;
          }
          await new Promise((r) => setTimeout(r, BUSY_RETRY_MS));
        }
      }
    })();
    this.pending = attempt.finally(() => {
      this.pending = null;
    });
    return this.pending;
  }

  /** Gives the address up (closing the socket, dropping what is queued), then runs the release hook. */
  release(): void {
    this.generation++;
    const t = this.transport;
    if (t === null) return;
    this.transport = null;
    t.close();
    this.releases++;
    void this.runHook('release', this.options.hooks?.afterRelease);
  }

  /** Releases for good (no release hook: the back-end is going away, not handing over). */
  close(): void {
    this.generation++;
    this.closed = true;
    this.transport?.close();
    this.transport = null;
  }

  onBatch(handler: UdpBatchHandler): void {
    this.batchHandler = handler;
    this.transport?.onBatch(handler);
  }

  onError(handler: UdpErrorHandler): void {
    this.errorHandler = handler;
    this.transport?.onError(handler);
  }

  /** Queues a datagram; false when it was dropped (address not held, or no send slot). */
  queue(dst: UdpPeer, bytes: Uint8Array): boolean {
    const t = this.transport;
    if (t === null) {
      this.droppedWhileReleased++;
      return false;
    }
    return t.queue(dst, bytes);
  }

  flush(): number {
    return this.transport?.flush() ?? 0;
  }

  describe(): string {
    const l = this.local;
    return l.family === 4 ? `${this.options.address}:${l.port}` : `[${this.options.address}]:${l.port}`;
  }

  private async runHook(what: string, hook: (() => Promise<void>) | undefined): Promise<void> {
    if (hook === undefined) return;
    try {
      await hook();
    } catch (err) {
      this.options.warn?.(`address ${what} hook for ${this.describe()} failed: ${(err as Error).message}`);
    }
  }
}
