/**
 * One vhost-user socket: frames messages (12-byte header, then payload) and
 * keeps the fds that came with each message. Used by both the back-end and
 * the test front-end.
 *
 * Reading is done in two steps per message (exactly the header, then exactly
 * the payload) so a read never swallows the next message's bytes or fds.
 * Anything malformed at this level (bad version, oversized payload, too many
 * fds, EOF mid-message) closes the connection with the reason.
 */
import { native, POLL_DISCONNECT, POLL_READABLE, POLL_WRITABLE, isSysError, type FdWatcher } from '../sys/native.js';
import { decodeHeader, ProtocolError, type Header } from './codec.js';
import { HEADER_SIZE, MAX_ATTACHED_FDS, MAX_PAYLOAD_SIZE } from './protocol.js';

export interface RawMessage {
  header: Header;
  payload: Uint8Array;
  fds: number[];
}

export interface ConnectionEvents {
  onMessage(msg: RawMessage): void;
  /** Called once. `error` is set when the connection ended because of bad input or a failed syscall. */
  onClose(reason: string, error?: Error): void;
}

interface PendingSend {
  data: Uint8Array;
  fds: readonly number[];
}

export class Connection {
  private readonly watcher: FdWatcher;
  private readonly headerBuf = new Uint8Array(HEADER_SIZE);
  private readonly payloadBuf = new Uint8Array(MAX_PAYLOAD_SIZE);
  private header: Header | null = null;
  private filled = 0;
  private fds: number[] = [];
  private readonly sendQueue: PendingSend[] = [];
  private paused = false;
  private closed = false;

  constructor(
    readonly fd: number,
    private readonly events: ConnectionEvents,
  ) {
    this.watcher = new native.FdWatcher(fd, (ev) => this.onReady(ev));
    this.watcher.start(POLL_READABLE);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Stops delivering messages until {@link resume}; used while a request is
   * being served asynchronously so that requests stay strictly ordered.
   */
  pause(): void {
    this.paused = true;
    this.updateWatch();
  }

  resume(): void {
    if (this.closed) return;
    this.paused = false;
    this.updateWatch();
    // Data may already be waiting; the watcher reports it on the next loop turn.
  }

  /** Queues one message; the fds are sent with its first byte and stay owned by the caller. */
  send(data: Uint8Array, fds: readonly number[] = []): void {
    if (this.closed) throw new ProtocolError('send on a closed connection');
    this.sendQueue.push({ data, fds });
    this.flush();
  }

  close(reason: string, error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    for (const fd of this.fds) safeClose(fd);
    this.fds = [];
    safeClose(this.fd);
    this.events.onClose(reason, error);
  }

  private updateWatch(): void {
    if (this.closed) return;
    const mask = (this.paused ? 0 : POLL_READABLE) | (this.sendQueue.length > 0 ? POLL_WRITABLE : 0);
    if (mask === 0) this.watcher.stop();
    else this.watcher.start(mask);
  }

  private onReady(events: number): void {
    if (this.closed) return;
    if (events & POLL_WRITABLE) this.flush();
    if (!this.closed && !this.paused && events & (POLL_READABLE | POLL_DISCONNECT)) this.readAvailable();
  }

  private flush(): void {
    while (this.sendQueue.length > 0 && !this.closed) {
      const item = this.sendQueue[0]!;
      let sent: number;
      try {
        sent = native.sendMsg(this.fd, item.data, item.fds);
      } catch (err) {
        if (isSysError(err, 'EAGAIN')) break;
        this.close('send failed', err instanceof Error ? err : new Error(String(err)));
        return;
      }
      if (sent >= item.data.byteLength) {
        this.sendQueue.shift();
      } else {
        // fds went with the first byte; the rest goes without them.
        this.sendQueue[0] = { data: item.data.subarray(sent), fds: [] };
      }
    }
    this.updateWatch();
  }

  private readAvailable(): void {
    // Bounded so one busy peer cannot starve the event loop.
    for (let i = 0; i < 64 && !this.closed && !this.paused; i++) {
      const want = this.header === null ? HEADER_SIZE - this.filled : this.header.size - this.filled;
      const buf = this.header === null ? this.headerBuf : this.payloadBuf;
      let res;
      try {
        res = native.recvMsg(this.fd, buf, this.filled, want, MAX_ATTACHED_FDS);
      } catch (err) {
        this.close('receive failed', err instanceof Error ? err : new Error(String(err)));
        return;
      }
      if (res === null) return;
      this.fds.push(...res.fds);
      if (res.truncated || this.fds.length > MAX_ATTACHED_FDS) {
        this.fail(`more than ${MAX_ATTACHED_FDS} fds attached to one message`);
        return;
      }
      if (res.bytes === 0) {
        if (this.header === null && this.filled === 0 && this.fds.length === 0) this.close('peer closed the connection');
        else this.fail(`peer closed the connection mid-message (${this.filled} of ${want + this.filled} bytes)`);
        return;
      }
      this.filled += res.bytes;
      if (res.bytes < want) continue;
      if (this.header === null) {
        try {
          this.header = decodeHeader(this.headerBuf);
        } catch (err) {
          this.fail(err instanceof Error ? err.message : String(err));
          return;
        }
        this.filled = 0;
        if (this.header.size > 0) continue;
      }
      const msg: RawMessage = { header: this.header, payload: this.payloadBuf.slice(0, this.header.size), fds: this.fds };
      this.header = null;
      this.filled = 0;
      this.fds = [];
      this.events.onMessage(msg);
    }
  }

  private fail(reason: string): void {
    this.close(reason, new ProtocolError(reason));
  }
}

export function safeClose(fd: number): void {
  try {
    native.close(fd);
  } catch {
    // Already closed or never valid: nothing more to release.
  }
}
