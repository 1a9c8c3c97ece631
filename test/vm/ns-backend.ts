/**
 * Runs the `vrdma` CLI (a `serve` back-end, or a `perf`/`pingpong` peer)
 * inside a {@link NetNs}, so it can bind the namespace's bridge or tap
 * address, and collects its output. `ip netns exec` execs, so the child's
 * pid is node's and a signal reaches the CLI itself (a back-end closes its
 * pcap on SIGTERM).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { CLI } from '../support/backend-process.js';
import type { NetNs } from './netns.js';

export class NsVrdma {
  readonly child: ChildProcess;
  private log = '';
  private readonly exited: Promise<number | null>;

  constructor(ns: NetNs, args: readonly string[]) {
    const [cmd, ...argv] = ns.exec([process.execPath, CLI, ...args]);
    this.child = spawn(cmd!, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Buffer) => (this.log += d.toString()));
    this.child.stderr!.on('data', (d: Buffer) => (this.log += d.toString()));
    this.exited = new Promise((resolve) => {
      this.child.on('close', (code) => resolve(code)); // 'close': the pipes have delivered everything
      this.child.on('error', (e) => {
        this.log += `spawn failed: ${e.message}\n`;
        resolve(null);
      });
    });
  }

  /** Everything the process printed so far. */
  get output(): string {
    return this.log;
  }

  /** Resolves with the exit code (null when killed by a signal). */
  exit(): Promise<number | null> {
    return this.exited;
  }

  /** Resolves with the first output line matching `re`. */
  async waitFor(re: RegExp, timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.log.split('\n').find((l) => re.test(l));
      if (line !== undefined) return line;
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`vrdma exited (${this.child.exitCode ?? this.child.signalCode}) before ${re}:\n${this.log}`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${re} in vrdma output:\n${this.log}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** SIGTERM, SIGKILL after 5 s; resolves with the exit code. */
  async stop(): Promise<number | null> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }
}
