/**
 * The native addon against real system calls: sockets with fd passing,
 * memfd mappings as SharedArrayBuffers, eventfds and FdWatcher.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  POLL_DISCONNECT,
  POLL_READABLE,
  POLL_WRITABLE,
  isSysError,
  native,
  type FdWatcher,
} from '../../virtio/sys/native.js';

const ADDON_PATH = fileURLToPath(new URL('../../native/addon/build/Release/vrdma_native.node', import.meta.url));
const PAGE = 4096;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;

// Lets a test drop a reference and see what the collector does with it.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** fds opened by a test, closed afterwards whether it passed or not. */
let openFds: number[] = [];
function track<T extends number>(fd: T): T {
  openFds.push(fd);
  return fd;
}
function closeQuietly(fd: number): void {
  try {
    native.close(fd);
  } catch {
    // already closed by the test
  }
}
beforeEach(() => {
  openFds = [];
});
afterEach(() => {
  for (const fd of openFds) closeQuietly(fd);
});

function fdFlags(fd: number): number {
  const info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const match = /^flags:\s+([0-7]+)$/m.exec(info);
  if (!match?.[1]) throw new Error(`no flags in fdinfo of ${fd}`);
  return parseInt(match[1], 8);
}

function openFdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

function mapsMention(name: string): boolean {
  return readFileSync('/proc/self/maps', 'utf8').includes(`memfd:${name}`);
}

function socketPair(): [number, number] {
  const [a, b] = native.socketPair();
  return [track(a), track(b)];
}

function catchError(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected a throw');
}

function nextEvent(fd: number, events: number): { watcher: FdWatcher; fired: Promise<number> } {
  let watcher!: FdWatcher;
  const fired = new Promise<number>((resolve) => {
    watcher = new native.FdWatcher(fd, (got) => {
      watcher.stop();
      resolve(got);
    });
  });
  watcher.start(events);
  return { watcher, fired };
}

const tick = (ms = 0): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

describe('unix sockets', () => {
  it('passes three fds and the bytes in one message over a socket pair', () => {
    const [a, b] = socketPair();
    const sizes = [PAGE, 2 * PAGE, 3 * PAGE];
    const sent = sizes.map((size, i) => track(native.memfdCreate(`pass-${i}`, size)));

    expect(native.sendMsg(a, new TextEncoder().encode('hello'), sent)).toBe(5);

    const buf = new Uint8Array(64);
    const got = native.recvMsg(b, buf, 0, buf.length, 8);
    expect(got).not.toBeNull();
    expect(got!.bytes).toBe(5);
    expect(got!.truncated).toBe(false);
    expect(new TextDecoder().decode(buf.subarray(0, 5))).toBe('hello');
    expect(got!.fds).toHaveLength(3);
    got!.fds.forEach((fd, i) => {
      track(fd);
      expect(sent).not.toContain(fd);
      expect(native.fdSize(fd)).toBe(sizes[i]);
      expect(fdFlags(fd) & O_CLOEXEC).toBe(O_CLOEXEC);
    });
  });

  it('returns non-blocking close-on-exec fds from socketPair', () => {
    for (const fd of socketPair()) {
      expect(fdFlags(fd) & (O_NONBLOCK | O_CLOEXEC)).toBe(O_NONBLOCK | O_CLOEXEC);
    }
  });

  it('listens, accepts and connects over a path in a temp dir', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-native-'));
    try {
      const path = join(dir, 'vhost.sock');
      const listener = track(native.unixListen(path, 4));
      expect(native.unixAccept(listener)).toBeNull();

      const client = track(native.unixConnect(path));
      expect(native.waitReadable(listener, 1000)).toBe(true);
      const server = track(native.unixAccept(listener)!);
      expect(server).toBeTypeOf('number');
      for (const fd of [listener, client, server]) {
        expect(fdFlags(fd) & (O_NONBLOCK | O_CLOEXEC)).toBe(O_NONBLOCK | O_CLOEXEC);
      }

      native.sendMsg(client, Uint8Array.of(1, 2, 3), []);
      const buf = new Uint8Array(8);
      expect(native.recvMsg(server, buf, 0, 8, 0)).toEqual({ bytes: 3, fds: [], truncated: false });
      expect([...buf.subarray(0, 3)]).toEqual([1, 2, 3]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses to listen on an existing socket file with EADDRINUSE and leaves the file alone', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-native-'));
    try {
      const path = join(dir, 'stale.sock');
      native.close(native.unixListen(path, 1));
      const err = catchError(() => native.unixListen(path, 1));
      expect(isSysError(err, 'EADDRINUSE')).toBe(true);
      expect((err as Error).message).toContain(path);

      // The stale file is still there, and nobody is listening on it.
      expect(isSysError(catchError(() => native.unixConnect(path)), 'ECONNREFUSED')).toBe(true);
      expect(isSysError(catchError(() => native.unixConnect(join(dir, 'missing.sock'))), 'ENOENT')).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses a socket path longer than sun_path with ENAMETOOLONG', () => {
    const err = catchError(() => native.unixListen(`/tmp/${'x'.repeat(200)}`, 1));
    expect(isSysError(err, 'ENAMETOOLONG')).toBe(true);
  });

  it('reports truncation and closes the fds that arrived when more fds arrive than maxFds', () => {
    const [a, b] = socketPair();
    const sent = [0, 1, 2].map(() => track(native.eventfd(0)));
    const buf = new Uint8Array(16);

    for (const maxFds of [0, 1, 2]) {
      native.sendMsg(a, Uint8Array.of(maxFds), sent);
      const before = openFdCount();
      const got = native.recvMsg(b, buf, 0, 1, maxFds);
      expect(got).toEqual({ bytes: 1, fds: [], truncated: true });
      expect(buf[0]).toBe(maxFds);
      expect(openFdCount()).toBe(before);
    }
  });

  it('returns null when nothing is pending and 0 bytes once the peer has closed', () => {
    const [a, b] = socketPair();
    const buf = new Uint8Array(8);
    expect(native.recvMsg(b, buf, 0, 8, 4)).toBeNull();
    native.close(a);
    expect(native.recvMsg(b, buf, 0, 8, 4)).toEqual({ bytes: 0, fds: [], truncated: false });
  });

  it('receives at an offset into a shared buffer and checks the range', () => {
    const [a, b] = socketPair();
    const buf = new Uint8Array(new SharedArrayBuffer(16));
    native.sendMsg(a, Uint8Array.of(7, 8, 9), []);
    expect(native.recvMsg(b, buf, 10, 6, 0)?.bytes).toBe(3);
    expect([...buf.subarray(10, 13)]).toEqual([7, 8, 9]);

    expect(() => native.recvMsg(b, buf, 10, 7, 0)).toThrow(RangeError);
    expect(() => native.recvMsg(b, buf, 17, 0, 0)).toThrow(RangeError);
    expect(() => native.recvMsg(b, buf, 0, 0, 0)).toThrow(RangeError);
    expect(() => native.recvMsg(b, buf, -1, 1, 0)).toThrow(RangeError);
    expect(() => native.recvMsg(b, buf, 0, 1, 254)).toThrow(RangeError);
  });

  it('throws EAGAIN from sendMsg once the socket is full', () => {
    const [a] = socketPair();
    const chunk = new Uint8Array(64 * 1024);
    let err: unknown;
    for (let i = 0; i < 10_000 && err === undefined; i++) {
      try {
        native.sendMsg(a, chunk, []);
      } catch (e) {
        err = e;
      }
    }
    expect(isSysError(err, 'EAGAIN')).toBe(true);
    expect((err as { syscall: string }).syscall).toBe('sendmsg');
  });

  it('refuses more than 32 fds, and fds without a byte to carry them', () => {
    const [a] = socketPair();
    expect(() => native.sendMsg(a, Uint8Array.of(1), new Array<number>(33).fill(a))).toThrow(RangeError);
    expect(() => native.sendMsg(a, new Uint8Array(0), [a])).toThrow(RangeError);
    expect(() => native.sendMsg(a, Uint8Array.of(1), ['x' as unknown as number])).toThrow(TypeError);
  });

  it('waitReadable times out on a quiet fd and reports readiness', () => {
    const [a, b] = socketPair();
    const start = Date.now();
    expect(native.waitReadable(b, 30)).toBe(false);
    expect(Date.now() - start).toBeGreaterThanOrEqual(25);
    native.sendMsg(a, Uint8Array.of(1), []);
    expect(native.waitReadable(b, 1000)).toBe(true);
  });
});

describe('memory', () => {
  // Each test unmaps what it maps, so stray collections cannot move the stats.
  it('creates a memfd of the requested size', () => {
    const fd = track(native.memfdCreate('size', 3 * PAGE + 5));
    expect(native.fdSize(fd)).toBe(3 * PAGE + 5);
    expect(fdFlags(fd) & O_CLOEXEC).toBe(O_CLOEXEC);
  });

  it('shares a memfd between two mappings, including Atomics', () => {
    const fd = track(native.memfdCreate('shared', 2 * PAGE));
    const one = native.mmap(fd, 0, 2 * PAGE, true);
    const two = native.mmap(fd, PAGE, PAGE, true);
    try {
      expect(one).toBeInstanceOf(SharedArrayBuffer);
      expect(two.byteLength).toBe(PAGE);

      new Uint8Array(one)[PAGE + 3] = 0xab;
      expect(new Uint8Array(two)[3]).toBe(0xab);

      const words = new Int32Array(two);
      Atomics.store(new Int32Array(one), PAGE / 4 + 8, 1234);
      expect(Atomics.load(words, 8)).toBe(1234);
      expect(Atomics.add(words, 8, 1)).toBe(1234);
      expect(new Int32Array(one)[PAGE / 4 + 8]).toBe(1235);
    } finally {
      native.munmap(one);
      native.munmap(two);
    }
  });

  it('sees writes made through a writable mapping in a read-only one', () => {
    const fd = track(native.memfdCreate('readonly', PAGE));
    const writer = native.mmap(fd, 0, PAGE, true);
    const reader = native.mmap(fd, 0, PAGE, false);
    try {
      new Uint8Array(writer).set([5, 6, 7], 100);
      expect([...new Uint8Array(reader, 100, 3)]).toEqual([5, 6, 7]);
    } finally {
      native.munmap(writer);
      native.munmap(reader);
    }
  });

  it('refuses a mapping past the end of the file, of 0 bytes, or at an unaligned offset', () => {
    const fd = track(native.memfdCreate('bounds', 2 * PAGE));
    const before = native.mappingStats();

    const pastEof = catchError(() => native.mmap(fd, PAGE, PAGE + 1, true));
    expect(isSysError(pastEof, 'ERANGE')).toBe(true);
    expect((pastEof as Error).message).toMatch(/past the end/);
    expect(isSysError(catchError(() => native.mmap(fd, 3 * PAGE, PAGE, true)), 'ERANGE')).toBe(true);
    expect(isSysError(catchError(() => native.mmap(fd, 0, 0, true)), 'EINVAL')).toBe(true);
    expect(isSysError(catchError(() => native.mmap(fd, 100, PAGE, true)), 'EINVAL')).toBe(true);
    expect(() => native.mmap(fd, 0, -1, true)).toThrow(RangeError);
    expect(() => native.mmap(fd, 0, PAGE, 1 as unknown as boolean)).toThrow(TypeError);

    expect(native.mappingStats()).toEqual(before);
  });

  it('munmap releases the file pages, and the stale buffer then reads zeros', () => {
    const name = `release-${process.pid}`;
    const fd = track(native.memfdCreate(name, 4 * PAGE));
    const before = native.mappingStats();
    const sab = native.mmap(fd, 0, 4 * PAGE, true);
    expect(native.mappingStats()).toEqual({ mappings: before.mappings + 1, bytes: before.bytes + 4 * PAGE });
    expect(mapsMention(name)).toBe(true);

    const bytes = new Uint8Array(sab);
    bytes.fill(0x5a);
    native.munmap(sab);

    expect(native.mappingStats()).toEqual(before);
    expect(mapsMention(name)).toBe(false);
    expect(sab.byteLength).toBe(4 * PAGE);
    expect(bytes.every((b) => b === 0)).toBe(true);
    expect(Atomics.load(new Int32Array(sab), 7)).toBe(0);

    // The data went to the file, not away with the mapping.
    const again = native.mmap(fd, 0, PAGE, false);
    expect(new Uint8Array(again)[PAGE - 1]).toBe(0x5a);
    native.munmap(again);
  });

  it('refuses a second munmap and a buffer it did not map', () => {
    const fd = track(native.memfdCreate('twice', PAGE));
    const sab = native.mmap(fd, 0, PAGE, true);
    native.munmap(sab);

    const twice = catchError(() => native.munmap(sab));
    expect(isSysError(twice, 'EINVAL')).toBe(true);
    expect((twice as Error).message).toMatch(/already unmapped/);

    const foreign = catchError(() => native.munmap(new SharedArrayBuffer(PAGE)));
    expect(isSysError(foreign, 'EINVAL')).toBe(true);
    expect((foreign as Error).message).toMatch(/did not create/);

    expect(() => native.munmap(new ArrayBuffer(8) as unknown as SharedArrayBuffer)).toThrow(TypeError);
  });

  it('releases a mapping whose buffer is garbage collected without munmap', async () => {
    const name = `collected-${process.pid}`;
    const fd = track(native.memfdCreate(name, PAGE));
    const before = native.mappingStats();
    (() => {
      new Uint8Array(native.mmap(fd, 0, PAGE, true))[0] = 1;
    })();
    expect(native.mappingStats().mappings).toBe(before.mappings + 1);

    // V8 frees backing stores after a full GC, possibly on another thread.
    for (let i = 0; i < 100 && native.mappingStats().mappings !== before.mappings; i++) {
      gc();
      await tick(10);
    }
    expect(native.mappingStats()).toEqual(before);
    expect(mapsMention(name)).toBe(false);
  });

  it('also releases a munmapped buffer when it is collected', async () => {
    const fd = track(native.memfdCreate('collected-after-munmap', PAGE));
    (() => {
      native.munmap(native.mmap(fd, 0, PAGE, true));
    })();
    for (let i = 0; i < 5; i++) {
      gc();
      await tick(10);
    }
    // Nothing observable beyond "no crash": the deleter found the entry dead.
    expect(native.mappingStats().mappings).toBeGreaterThanOrEqual(0);
  });

  it('copies between plain and shared buffers, overlapping ranges included', () => {
    const plain = Uint8Array.from({ length: 16 }, (_, i) => i);
    const shared = new Uint8Array(new SharedArrayBuffer(16));
    native.copy(shared, 4, plain, 0, 8);
    expect([...shared.subarray(4, 12)]).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);

    native.copy(plain, 2, plain, 0, 8);
    expect([...plain.subarray(0, 10)]).toEqual([0, 1, 0, 1, 2, 3, 4, 5, 6, 7]);

    const view = new Uint8Array(plain.buffer, 8, 4);
    native.copy(view, 0, shared, 4, 4);
    expect([...plain.subarray(8, 12)]).toEqual([0, 1, 2, 3]);

    native.copy(shared, 16, plain, 16, 0);
    expect(() => native.copy(shared, 10, plain, 0, 7)).toThrow(RangeError);
    expect(() => native.copy(shared, 0, plain, 10, 7)).toThrow(RangeError);
    expect(() => native.copy(shared, 0.5, plain, 0, 1)).toThrow(RangeError);
    expect(() => native.copy([] as unknown as Uint8Array, 0, plain, 0, 1)).toThrow(TypeError);
  });

  it('copies into a mapped buffer', () => {
    const fd = track(native.memfdCreate('copy', PAGE));
    const sab = native.mmap(fd, 0, PAGE, true);
    try {
      native.copy(new Uint8Array(sab), PAGE - 2, Uint8Array.of(9, 9), 0, 2);
      expect([...new Uint8Array(sab, PAGE - 3)]).toEqual([0, 9, 9]);
    } finally {
      native.munmap(sab);
    }
  });
});

describe('eventfd', () => {
  it('adds writes to the counter, and a read returns and resets it', () => {
    const fd = track(native.eventfd(3));
    expect(native.eventfdRead(fd)).toBe(3n);
    expect(native.eventfdRead(fd)).toBeNull();
    native.eventfdWrite(fd, 2);
    native.eventfdWrite(fd, 5);
    expect(native.eventfdRead(fd)).toBe(7n);
    native.eventfdWrite(fd, Number.MAX_SAFE_INTEGER);
    expect(native.eventfdRead(fd)).toBe(BigInt(Number.MAX_SAFE_INTEGER));
    expect(fdFlags(fd) & (O_NONBLOCK | O_CLOEXEC)).toBe(O_NONBLOCK | O_CLOEXEC);
  });

  it('rejects values that are not counters', () => {
    const fd = track(native.eventfd(0));
    expect(() => native.eventfdWrite(fd, -1)).toThrow(RangeError);
    expect(() => native.eventfdWrite(fd, 1.5)).toThrow(RangeError);
    expect(() => native.eventfd(-1)).toThrow(RangeError);
  });
});

describe('FdWatcher', () => {
  it('fires readable when an eventfd is written', async () => {
    const fd = track(native.eventfd(0));
    const { watcher, fired } = nextEvent(fd, POLL_READABLE);
    native.eventfdWrite(fd, 1);
    expect((await fired) & POLL_READABLE).toBe(POLL_READABLE);
    watcher.close();
  });

  it('fires writable at once on a socket with room', async () => {
    const [a] = socketPair();
    const { watcher, fired } = nextEvent(a, POLL_WRITABLE);
    expect((await fired) & POLL_WRITABLE).toBe(POLL_WRITABLE);
    watcher.close();
  });

  it('reports the peer hanging up', async () => {
    const [a, b] = socketPair();
    const { watcher, fired } = nextEvent(b, POLL_READABLE);
    native.close(a);
    const events = await fired;
    // Hang-ups are always watched, so they arrive as POLL_DISCONNECT, along
    // with readable: the read that follows sees end of stream.
    expect(events & POLL_DISCONNECT).toBe(POLL_DISCONNECT);
    expect(native.recvMsg(b, new Uint8Array(4), 0, 4, 0)?.bytes).toBe(0);
    watcher.close();
  });

  it('stops firing after stop() and fires again after start()', async () => {
    const fd = track(native.eventfd(1));
    let count = 0;
    const watcher = new native.FdWatcher(fd, () => {
      count++;
      watcher.stop();
    });
    watcher.start(POLL_READABLE);
    await tick(20);
    expect(count).toBe(1);
    await tick(20);
    expect(count).toBe(1);
    watcher.start(POLL_READABLE);
    await tick(20);
    expect(count).toBe(2);
    watcher.close();
  });

  it('can be closed from inside its callback, and closed twice', async () => {
    const fd = track(native.eventfd(1));
    let count = 0;
    const watcher = new native.FdWatcher(fd, () => {
      count++;
      watcher.close();
      watcher.close();
    });
    watcher.start(POLL_READABLE);
    await tick(30);
    expect(count).toBe(1);
    watcher.close();
    watcher.stop();
    expect(isSysError(catchError(() => watcher.start(POLL_READABLE)), 'EBADF')).toBe(true);
  });

  it('keeps firing while started even when JS drops every reference', async () => {
    const fd = track(native.eventfd(0));
    const seen: number[] = [];
    (() => {
      // Only the callback (held by the watcher itself) refers to the watcher.
      const watcher = new native.FdWatcher(fd, (events) => {
        seen.push(events);
        watcher.close();
      });
      watcher.start(POLL_READABLE);
    })();
    gc();
    await tick(10);
    native.eventfdWrite(fd, 1);
    await tick(30);
    expect(seen).toEqual([POLL_READABLE]);
  });

  it('survives collection of watchers that were never closed', async () => {
    const fd = track(native.eventfd(0));
    let collected = 0;
    const finalizers = new FinalizationRegistry(() => collected++);
    for (let i = 0; i < 50; i++) {
      const watcher = new native.FdWatcher(fd, () => undefined);
      finalizers.register(watcher, i);
      if (i % 2 === 0) {
        watcher.start(POLL_READABLE);
        watcher.stop();
      }
    }
    for (let i = 0; i < 20 && collected < 50; i++) {
      gc();
      await tick(5);
    }
    expect(collected).toBeGreaterThan(0);
    // The fd is free for a new watcher, and the loop still works.
    const { watcher, fired } = nextEvent(fd, POLL_READABLE);
    native.eventfdWrite(fd, 1);
    expect((await fired) & POLL_READABLE).toBe(POLL_READABLE);
    watcher.close();
  });

  it('refuses a second started watcher on the same fd, a bad fd, and bad arguments', () => {
    const fd = track(native.eventfd(0));
    const first = new native.FdWatcher(fd, () => undefined);
    const second = new native.FdWatcher(fd, () => undefined);
    try {
      first.start(POLL_READABLE);
      expect(isSysError(catchError(() => second.start(POLL_READABLE)), 'EEXIST')).toBe(true);
      expect(() => first.start(0)).toThrow(RangeError);
      expect(() => first.start(8)).toThrow(RangeError);
    } finally {
      first.close();
      second.close();
    }
    expect(isSysError(catchError(() => new native.FdWatcher(-1, () => undefined)), 'EBADF')).toBe(true);
    expect(() => new native.FdWatcher(fd, 'nope' as unknown as () => void)).toThrow(TypeError);
    const start = native.FdWatcher.prototype.start as (this: unknown, events: number) => void;
    expect(() => start.call({}, POLL_READABLE)).toThrow(TypeError);
  });

  it('lets a worker exit with watchers still open, and the process exit once they are closed', () => {
    // The main thread loads the addon only after the worker has gone (and
    // Node has dlclose()d it), so nothing keeps the library loaded for it.
    const script = `
      const { Worker } = require('node:worker_threads');
      const worker = new Worker(\`
        const addon = require(${JSON.stringify(ADDON_PATH)});
        new addon.FdWatcher(addon.eventfd(0), () => {}).start(1);
        new addon.FdWatcher(addon.eventfd(0), () => {});
        setTimeout(() => process.exit(0), 20);
      \`, { eval: true });
      worker.on('exit', (code) => {
        console.log('worker exited', code);
        const addon = require(${JSON.stringify(ADDON_PATH)});
        const w = new addon.FdWatcher(addon.eventfd(0), () => {});
        w.start(1);
        w.close();
      });
    `;
    const child = spawnSync(process.execPath, ['-e', script], { timeout: 20_000, encoding: 'utf8' });
    expect(child.stderr).toBe('');
    expect(child.signal).toBeNull();
    expect(child.status).toBe(0);
    expect(child.stdout.trim()).toBe('worker exited 0');
  });

  it('keeps a mapping made in a worker usable after the worker exits, until it is collected', () => {
    const script = `
      const { Worker } = require('node:worker_threads');
      const worker = new Worker(\`
        const { parentPort } = require('node:worker_threads');
        const addon = require(${JSON.stringify(ADDON_PATH)});
        const sab = addon.mmap(addon.memfdCreate('from-worker', 4096), 0, 4096, true);
        new Uint8Array(sab)[10] = 42;
        parentPort.postMessage(sab);
      \`, { eval: true });
      let sab;
      worker.on('message', (m) => { sab = m; });
      worker.on('exit', async () => {
        console.log(new Uint8Array(sab)[10]);
        sab = undefined;
        for (let i = 0; i < 20; i++) {
          gc();
          await new Promise((resolve) => setTimeout(resolve, 5));
        }
        console.log('done');
      });
    `;
    const child = spawnSync(process.execPath, ['--expose-gc', '-e', script], { timeout: 20_000, encoding: 'utf8' });
    expect(child.stderr).toBe('');
    expect(child.signal).toBeNull();
    expect(child.status).toBe(0);
    expect(child.stdout.trim().split('\n')).toEqual(['42', 'done']);
  });

  it('keeps the process alive while started', () => {
    const script = `
      const addon = require(${JSON.stringify(ADDON_PATH)});
      const fd = addon.eventfd(0);
      new addon.FdWatcher(fd, () => process.exit(3)).start(1);
      setTimeout(() => addon.eventfdWrite(fd, 1), 50);
    `;
    const child = spawnSync(process.execPath, ['-e', script], { timeout: 20_000 });
    expect(child.status).toBe(3);
  });
});

describe('errors', () => {
  it('carry code, errno and syscall', () => {
    const err = catchError(() => native.close(-1)) as Error & { code: string; errno: number; syscall: string };
    expect(err).toBeInstanceOf(Error);
    expect(err.code).toBe('EBADF');
    expect(err.errno).toBe(9);
    expect(err.syscall).toBe('close');
    expect(err.message).toMatch(/close.*Bad file descriptor/);
    expect(isSysError(err, 'EBADF')).toBe(true);
  });

  it('report EBADF for an fd that is already closed', () => {
    const fd = native.eventfd(0);
    native.close(fd);
    expect(isSysError(catchError(() => native.close(fd)), 'EBADF')).toBe(true);
    expect(isSysError(catchError(() => native.fdSize(fd)), 'EBADF')).toBe(true);
    expect(isSysError(catchError(() => native.eventfdRead(fd)), 'EBADF')).toBe(true);
  });

  it('throw TypeError for arguments of the wrong type', () => {
    const call = native as unknown as Record<string, (...args: unknown[]) => unknown>;
    expect(() => call.close!('3')).toThrow(TypeError);
    expect(() => call.close!()).toThrow(TypeError);
    expect(() => call.unixListen!(42, 1)).toThrow(TypeError);
    expect(() => call.memfdCreate!('a\0b', 1)).toThrow(TypeError);
    expect(() => call.recvMsg!(0, new ArrayBuffer(4), 0, 4, 0)).toThrow(TypeError);
    expect(() => call.FdWatcher!(0, () => undefined)).toThrow(TypeError);
  });
});
