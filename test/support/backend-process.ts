/**
 * Runs `vrdma serve` as a separate process, the way a user would, and
 * collects its log. Tests wait on log lines to follow what the back-end did.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ABOVE = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
/** The repository root, also when this file runs compiled (dist/test/support/, as benchmarks do). */
export const PROJECT_ROOT = existsSync(join(ABOVE, 'package.json')) ? ABOVE : join(ABOVE, '..');
export const CLI = join(PROJECT_ROOT, 'dist', 'backend', 'cli.js');

export class BackendProcess {
  readonly child: ChildProcess;
  private log = '';
  private readonly exited: Promise<number | null>;

  constructor(args: readonly string[]) {
    this.child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Buffer) => (this.log += d.toString()));
    this.child.stderr!.on('data', (d: Buffer) => (this.log += d.toString()));
    // 'close', not 'exit': only then have both pipes delivered everything the process wrote.
    this.exited = new Promise((resolve) => this.child.on('close', (code) => resolve(code)));
  }

  /** Everything the process printed so far. */
  get output(): string {
    return this.log;
  }

  /** Resolves with the first log line matching `re`, at or after character `from`. */
  async waitFor(re: RegExp, timeoutMs = 10_000, from = 0): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.log
        .slice(from)
        .split('\n')
        .find((l) => re.test(l));
      if (line !== undefined) return line;
      if (this.child.exitCode !== null) throw new Error(`back-end exited (${this.child.exitCode}) before ${re}:\n${this.log}`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${re} in back-end log:\n${this.log}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async stop(): Promise<number | null> {
    if (this.child.exitCode === null) this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }
}
