/**
 * Typed boundary to the C++ addon in native/addon. Everything that needs a
 * system call (fd passing, mmap, eventfd, readiness) goes through here; the
 * rest of virtio/ is plain TypeScript.
 *
 * Every function throws a {@link SysError} on failure: `code` is the errno
 * name ("EBADF"), `errno` its number, `syscall` the call that failed.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Poll events understood by {@link FdWatcher.start}. */
export const POLL_READABLE = 1;
export const POLL_WRITABLE = 2;
/** Set in the callback's `events` when the peer hung up or the fd is in error. */
export const POLL_DISCONNECT = 4;

export interface RecvResult {
  /** Bytes read; 0 means the peer closed its end. */
  bytes: number;
  /** Descriptors that arrived with these bytes (already O_CLOEXEC). */
  fds: number[];
  /**
   * The kernel dropped descriptors because more arrived than `maxFds`
   * (MSG_CTRUNC). The fds that did arrive were closed by the addon.
   */
  truncated: boolean;
}

export interface FdWatcher {
  /** Begin (or change) watching; events is a mask of POLL_READABLE / POLL_WRITABLE. */
  start(events: number): void;
  stop(): void;
  /** Stop and release the libuv handle; the fd itself is not closed. */
  close(): void;
}

export interface FdWatcherConstructor {
  /** `callback(events)` runs on the Node event loop when the fd is ready. */
  new (fd: number, callback: (events: number) => void): FdWatcher;
}

export interface MappingStats {
  /** Live mappings made by {@link NativeAddon.mmap} and not yet unmapped. */
  mappings: number;
  /** Sum of their sizes in bytes. */
  bytes: number;
}

export interface NativeAddon {
  // Unix stream sockets (all returned fds are non-blocking and O_CLOEXEC).
  unixListen(path: string, backlog: number): number;
  /** Returns null when no connection is pending (EAGAIN). */
  unixAccept(listenFd: number): number | null;
  /** Connects (blocking until connected or refused), then sets O_NONBLOCK. */
  unixConnect(path: string): number;
  socketPair(): [number, number];
  /** Sends all of `data` in one sendmsg with `fds` attached; returns bytes sent (may be short). Throws EAGAIN when the socket is full. */
  sendMsg(fd: number, data: Uint8Array, fds: readonly number[]): number;
  /** Reads at most `length` bytes into `buf` at `offset`. Returns null on EAGAIN. */
  recvMsg(fd: number, buf: Uint8Array, offset: number, length: number, maxFds: number): RecvResult | null;
  close(fd: number): void;
  /** Blocks the calling thread until `fd` is readable or `timeoutMs` passes; true when readable. For tests and CLI tools only. */
  waitReadable(fd: number, timeoutMs: number): boolean;

  // Memory.
  memfdCreate(name: string, size: number): number;
  /** Size of the file behind `fd` (fstat st_size). */
  fdSize(fd: number): number;
  /** MAP_SHARED mapping of `size` bytes of `fd` at `offset`, as a SharedArrayBuffer. */
  mmap(fd: number, offset: number, size: number, writable: boolean): SharedArrayBuffer;
  /**
   * Drops the file mapping now (the fd's pages are released). The
   * SharedArrayBuffer stays valid but reads zeros from then on; its address
   * range is returned to the system when it is garbage collected.
   */
  munmap(buf: SharedArrayBuffer): void;
  mappingStats(): MappingStats;
  /** Copies `length` bytes between two buffers (either may be shared). */
  copy(dst: Uint8Array, dstOffset: number, src: Uint8Array, srcOffset: number, length: number): void;

  // eventfd.
  eventfd(initval: number): number;
  /** Returns the counter and resets it, or null when it is zero (EAGAIN). */
  eventfdRead(fd: number): bigint | null;
  eventfdWrite(fd: number, value: number): void;

  FdWatcher: FdWatcherConstructor;

  // UDP datagrams (the soft-RoCE engine's transport; see
  // backend/engines/soft-roce/udp-transport.ts for the record layout).
  /**
   * A non-blocking, O_CLOEXEC UDP socket bound to an IPv4 or IPv6 literal
   * (`fe80::1%eth0` takes a scope); port 0 picks one. SO_REUSEADDR off,
   * 8 MiB socket buffers asked for, IPv4 always DF (so IP ID 0, as rxe
   * sends), IPv6 only with zero-checksum receive allowed.
   */
  udpBind(address: string, port: number): number;
  /** Bound address and the socket buffer sizes the kernel actually gave (SO_RCVBUF/SO_SNDBUF). */
  udpInfo(fd: number): { family: 4 | 6; address: string; port: number; rcvbuf: number; sndbuf: number };
  /**
   * One recvmmsg: up to `maxPackets` (<= 1024) datagrams, datagram i into
   * `buf` at `i * slotSize`, its 8-word record into `meta` at `i * 8`
   * (full length, flags: 1 truncated / 2 IPv6, port, scope id, address
   * words). Returns the count; 0 when nothing is waiting (EAGAIN).
   */
  udpRecvBatch(fd: number, buf: Uint8Array, slotSize: number, maxPackets: number, meta: Uint32Array): number;
  /**
   * One sendmmsg of datagrams `first .. first + count - 1` (count <= 1024):
   * datagram i is `meta[i * 8]` bytes of `buf` at `offsets[i]`, to the
   * address in its record. Returns how many went (partial is normal; 0 on
   * EAGAIN). Throws when the first of them fails (e.g. EMSGSIZE).
   */
  udpSendBatch(fd: number, buf: Uint8Array, offsets: Uint32Array, meta: Uint32Array, first: number, count: number): number;
  /**
   * CRC-32 (IEEE, reflected) register after `buf[offset, offset + length)`,
   * from register `crc`, no inversions (carry-less multiply where the CPU
   * has it). Optional: an addon built before it existed lacks it.
   */
  crc32Update?(crc: number, buf: Uint8Array, offset: number, length: number): number;
}

/** An errno-carrying failure from the native layer. */
export class SysError extends Error {
  constructor(
    message: string,
    readonly code: string,
    readonly errno: number,
    readonly syscall: string,
  ) {
    super(message);
    this.name = 'SysError';
  }
}

/** Narrows an unknown caught value to a native error with the given errno name. */
export function isSysError(err: unknown, code?: string): err is SysError {
  if (typeof err !== 'object' || err === null) return false;
  const e = err as { code?: unknown; syscall?: unknown };
  return typeof e.code === 'string' && typeof e.syscall === 'string' && (code === undefined || e.code === code);
}

function findAddon(): string {
  // Works from the source tree (virtio/sys) and from the build (dist/virtio/sys).
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = join(dir, 'native', 'addon', 'build', 'Release', 'vrdma_native.node');
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  throw new Error('native addon not built: run `npm run setup` (or `npm run build:native`)');
}

const require = createRequire(import.meta.url);

export const native: NativeAddon = require(findAddon()) as NativeAddon;
