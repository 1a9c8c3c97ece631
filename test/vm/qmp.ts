/**
 * A small QMP client (QEMU Machine Protocol, JSON over a unix socket) for
 * VM tests: capabilities negotiation, commands, events, and live migration
 * between two QEMU processes.
 */
import { createConnection, type Socket } from 'node:net';

export type QmpValue = null | boolean | number | string | QmpValue[] | { [k: string]: QmpValue };
export type QmpObject = { [k: string]: QmpValue };

export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve: (v: QmpValue) => void;
  reject: (e: Error) => void;
}

export class Qmp {
  private buf = '';
  private readonly pending: Pending[] = [];
  readonly events: QmpObject[] = [];
  private greeted: Promise<void>;

  private constructor(private readonly sock: Socket) {
    let onGreeting: () => void = () => undefined;
    this.greeted = new Promise((r) => (onGreeting = r));
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (line === '') continue;
        const msg = JSON.parse(line) as QmpObject;
        if ('QMP' in msg) onGreeting();
        else if ('event' in msg) this.events.push(msg);
        else {
          const p = this.pending.shift();
          if (p === undefined) continue;
          if ('error' in msg) {
            const e = msg.error as QmpObject;
            p.reject(new QmpError(p.command, String(e.class), String(e.desc)));
          } else p.resolve(msg.return ?? null);
        }
      }
    });
    sock.on('close', () => {
      for (const p of this.pending.splice(0)) p.reject(new Error(`QMP ${p.command}: connection closed`));
    });
  }

  /** Connects (retrying while QEMU creates the socket) and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 30_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const q = new Qmp(sock);
        await q.greeted;
        await q.execute('qmp_capabilities');
        return q;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`QMP at ${path}: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  execute(command: string, args?: QmpObject): Promise<QmpValue> {
    return new Promise((resolve, reject) => {
      this.pending.push({ command, resolve, reject });
      this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + '\n');
    });
  }

  async status(): Promise<string> {
    const r = (await this.execute('query-status')) as QmpObject;
    return String(r.status);
  }

  close(): void {
    this.sock.destroy();
  }
}

export interface MigrationResult {
  status: 'completed' | 'failed' | 'cancelled';
  /** QEMU's error description when it failed. */
  error: string | null;
  info: QmpObject;
}

/** Starts migrating the VM behind `source` to `uri` and waits until QEMU says it finished one way or the other. */
export async function migrate(source: Qmp, uri: string, timeoutMs = 120_000): Promise<MigrationResult> {
  await source.execute('migrate', { uri });
  return migrationEnd(source, timeoutMs);
}

/** Waits until the migration under way on `source` finished one way or the other. */
export async function migrationEnd(source: Qmp, timeoutMs = 120_000): Promise<MigrationResult> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = (await source.execute('query-migrate')) as QmpObject;
    const status = String(info.status);
    if (status === 'completed' || status === 'failed' || status === 'cancelled') {
      return { status, error: typeof info['error-desc'] === 'string' ? info['error-desc'] : null, info };
    }
    if (Date.now() > deadline) throw new Error(`migration still "${status}" after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
