/**
 * Listens on a unix socket path and serves one front-end at a time with a
 * {@link VhostUserBackend}. When the front-end goes away (QEMU quit or was
 * killed) the back-end releases everything it held and waits for the next.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { native, POLL_READABLE, type FdWatcher } from '../sys/native.js';
import type { Logger } from '../log.js';
import type { VhostUserBackend, ConnectionSummary } from './backend.js';
import { safeClose } from './connection.js';

export class VhostUserServer {
  private listenFd: number | null = null;
  private watcher: FdWatcher | null = null;
  private closed = false;
  /** Connections served so far (ended ones). */
  readonly history: ConnectionSummary[] = [];
  onConnectionEnd: ((summary: ConnectionSummary) => void) | null = null;

  constructor(
    readonly path: string,
    private readonly backend: VhostUserBackend,
    private readonly log: Logger,
  ) {}

  listen(): void {
    removeStaleSocket(this.path);
    this.listenFd = native.unixListen(this.path, 1);
    this.watcher = new native.FdWatcher(this.listenFd, () => this.acceptPending());
    this.watcher.start(POLL_READABLE);
    this.log.info(`listening on ${this.path}`);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.close();
    if (this.listenFd !== null) safeClose(this.listenFd);
    this.backend.close();
    try {
      unlinkSync(this.path);
    } catch {
      // Already gone.
    }
  }

  private acceptPending(): void {
    for (;;) {
      const fd = native.unixAccept(this.listenFd!);
      if (fd === null) return;
      if (this.backend.connected) {
        this.log.warn('refusing a second front-end while one is connected');
        safeClose(fd);
        continue;
      }
      this.log.info('front-end connected');
      void this.backend.serve(fd).then((summary) => {
        this.history.push(summary);
        this.onConnectionEnd?.(summary);
      });
    }
  }
}

/** A leftover socket file from an earlier run would make bind fail; anything else at the path is left alone. */
function removeStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // Nothing there.
  }
}
