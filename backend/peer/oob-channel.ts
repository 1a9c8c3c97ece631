/**
 * The TCP side channel the stock tools use to swap QP numbers and keys:
 * one connection, fixed-size messages. Every wait has a deadline, so a
 * silent or vanished peer ends in an OobError naming what was awaited,
 * never a hang.
 */
import net from 'node:net';

export class OobError extends Error {
  override readonly name = 'OobError';
}

export class OobChannel {
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private ended = false;
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  private constructor(private readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.buffered.push(chunk);
      this.bufferedBytes += chunk.length;
      this.notify();
    });
    socket.on('end', () => {
      this.ended = true;
      this.notify();
    });
    socket.on('error', (err) => {
      this.failure = err;
      this.notify();
    });
    socket.on('close', () => {
      this.ended = true;
      this.notify();
    });
  }

  get remoteAddress(): string {
    return this.socket.remoteAddress ?? '?';
  }

  /** Connects to a server, retrying refused connections until the deadline (the server may start later). */
  static async connect(host: string, port: number, timeoutMs: number): Promise<OobChannel> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect({ host, port });
          const t = setTimeout(() => {
            s.destroy();
            reject(new OobError(`connect to ${host}:${port} timed out`));
          }, Math.max(1, deadline - Date.now()));
          s.once('connect', () => {
            clearTimeout(t);
            s.removeAllListeners('error');
            resolve(s);
          });
          s.once('error', (e) => {
            clearTimeout(t);
            reject(e);
          });
        });
        return new OobChannel(socket);
      } catch (e) {
        const code = (e as { code?: unknown }).code;
        if ((code === 'ECONNREFUSED' || code === 'ECONNRESET') && Date.now() + 100 < deadline) {
          await new Promise((r) => setTimeout(r, 100));
          continue;
        }
        if (e instanceof OobError) throw e;
        throw new OobError(`cannot connect to ${host}:${port}: ${String((e as Error).message)}`);
      }
    }
  }

  /** Listens on `port` (all addresses, or `bindAddress`), takes one connection, stops listening. */
  static accept(port: number, timeoutMs: number, bindAddress?: string, onListening?: () => void): Promise<OobChannel> {
    return new Promise<OobChannel>((resolve, reject) => {
      const server = net.createServer({ noDelay: true });
      const t = setTimeout(() => {
        server.close();
        reject(new OobError(`no client connected to TCP port ${port} within ${timeoutMs} ms`));
      }, timeoutMs);
      server.once('connection', (s) => {
        clearTimeout(t);
        server.close();
        resolve(new OobChannel(s));
      });
      server.once('error', (e) => {
        clearTimeout(t);
        server.close();
        reject(new OobError(`cannot listen on TCP port ${port}: ${e.message}`));
      });
      server.listen({ port, host: bindAddress, exclusive: true }, () => onListening?.());
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Exactly `n` bytes, or an OobError when the peer closes or the deadline passes first. */
  async read(n: number, timeoutMs: number, what: string): Promise<Uint8Array> {
    const deadline = Date.now() + timeoutMs;
    while (this.bufferedBytes < n) {
      if (this.failure) throw new OobError(`reading ${what}: ${this.failure.message}`);
      if (this.ended) throw new OobError(`peer closed the connection while ${n} bytes of ${what} were awaited (${this.bufferedBytes} arrived)`);
      const left = deadline - Date.now();
      if (left <= 0) throw new OobError(`timed out after ${timeoutMs} ms waiting for ${what} (${this.bufferedBytes}/${n} bytes)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    const all = Buffer.concat(this.buffered, this.bufferedBytes);
    const out = new Uint8Array(all.subarray(0, n));
    const rest = all.subarray(n);
    this.buffered = rest.length > 0 ? [rest] : [];
    this.bufferedBytes = rest.length;
    return out;
  }

  /** One write() of the whole message, as the tools expect it in one read(). */
  write(bytes: Uint8Array): void {
    if (this.failure) throw new OobError(`writing: ${this.failure.message}`);
    this.socket.write(bytes);
  }

  /** Waits until what was written has been handed to the kernel, then closes. */
  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      if (this.socket.destroyed) return resolve();
      const t = setTimeout(() => {
        this.socket.destroy();
        resolve();
      }, 2000);
      this.socket.end(() => {
        clearTimeout(t);
        resolve();
      });
    });
    this.socket.destroy();
  }

  /**
   * One symmetric exchange step: the client writes first then reads, the
   * server reads then writes, `mine.length` bytes each way.
   */
  async exchange(isClient: boolean, mine: Uint8Array, timeoutMs: number, what: string): Promise<Uint8Array> {
    if (isClient) {
      this.write(mine);
      return this.read(mine.length, timeoutMs, what);
    }
    const theirs = await this.read(mine.length, timeoutMs, what);
    this.write(mine);
    return theirs;
  }
}
