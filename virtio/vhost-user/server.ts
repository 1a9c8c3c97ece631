/**
 * Listens on a unix socket path and serves one front-end at a time with a
 * {@link VhostUserBackend}. When the front-end goes away (QEMU quit or was
 * killed) the back-end releases everything it held and serves the next.
 *
 * A front-end that connects while another is being served is never
 * refused: it is held, unserved, and served as soon as the current session
 * has been torn down. This is what makes a reconnect safe — a QEMU that
 * hangs up and connects again at once (or a new QEMU started right after
 * the last one exited) often arrives in the same poll as the old
 * connection's EOF, and sometimes before it. A genuinely concurrent second
 * front-end (the first is alive) waits the same way, as it would with
 * rust-vmm's vhost-user-backend or libvhost-user, which accept the next
 * connection only when the current one ends: its QEMU blocks in its first
 * request until the first QEMU goes, and a warning is logged if it is still
 * waiting after {@link VhostUserServer.holdWarnMs}. At most one connection
 * is held; while one is, the listener is not polled, so further ones wait
 * in the kernel's listen backlog (their connect blocks) rather than being
 * refused or costing fds here.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { native, POLL_READABLE, type FdWatcher } from '../sys/native.js';
import type { Logger } from '../log.js';
import type { VhostUserBackend, ConnectionSummary } from './backend.js';
import { safeClose } from './connection.js';

interface HeldConnection {
  fd: number;
  since: number;
  warnTimer: NodeJS.Timeout;
}

export class VhostUserServer {
  private listenFd: number | null = null;
  private watcher: FdWatcher | null = null;
  private closed = false;
  /** A front-end that connected while another was being served. */
  private held: HeldConnection | null = null;
  /** Connections served so far (ended ones). */
  readonly history: ConnectionSummary[] = [];
  onConnectionEnd: ((summary: ConnectionSummary) => void) | null = null;
  /** How long a held front-end waits before that is logged as a warning (a reconnect is served well within it). */
  holdWarnMs = 1000;

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
    if (this.held !== null) {
      clearTimeout(this.held.warnTimer);
      safeClose(this.held.fd);
      this.held = null;
    }
    this.backend.close();
    try {
      unlinkSync(this.path);
    } catch {
      // Already gone.
    }
  }

  private acceptPending(): void {
    while (this.held === null && !this.closed) {
      const fd = native.unixAccept(this.listenFd!);
      if (fd === null) return;
      if (this.backend.connected) this.hold(fd);
      else this.serve(fd, 'front-end connected');
    }
  }

  private hold(fd: number): void {
    this.log.debug('a front-end connected while another is being served: holding it until that one disconnects');
    const warnTimer = setTimeout(() => {
      this.log.warn(
        `a second front-end is waiting: only one is served at a time, and it will be served when the current one disconnects`,
      );
    }, this.holdWarnMs);
    warnTimer.unref();
    this.held = { fd, since: Date.now(), warnTimer };
    // Until it is served, newer connections stay in the listen backlog.
    this.watcher!.stop();
  }

  private serve(fd: number, line: string): void {
    this.log.info(line);
    void this.backend.serve(fd).then((summary) => {
      try {
        this.history.push(summary);
        this.onConnectionEnd?.(summary);
      } finally {
        this.serveHeld();
      }
    });
  }

  /** After a session has been torn down: the held front-end's turn, then the listener's. */
  private serveHeld(): void {
    const h = this.held;
    if (h === null || this.closed) return;
    this.held = null;
    clearTimeout(h.warnTimer);
    this.serve(h.fd, `front-end connected (it waited ${Date.now() - h.since} ms for the previous one to disconnect)`);
    this.watcher!.start(POLL_READABLE);
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
