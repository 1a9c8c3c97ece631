/**
 * The soft-RoCE engine's UDP transport (RoCEv2 is UDP port 4791): one
 * socket, batched both ways through the native addon.
 *
 * - Receive: one recvmmsg per batch into preallocated fixed-size slots, and
 *   one handler call per batch. The handler works on the bytes in place;
 *   the slots are reused as soon as it returns. No copies, no per-datagram
 *   objects.
 * - Send: `queue()` copies a datagram into a preallocated send slot (or
 *   `reserve()` hands out the slot so the packet is built in place); the
 *   queued datagrams leave in one sendmmsg at the end of the current
 *   microtask, or as soon as the batch is full. A full socket buffer
 *   (EAGAIN) keeps them queued until the socket is writable again; when the
 *   send slots are all taken, further datagrams are dropped and counted
 *   (UDP semantics: the protocol above paces and retransmits).
 *
 * Socket settings (see native/addon/src/udp.cc): non-blocking, no
 * SO_REUSEADDR, 8 MiB buffers asked for, IPv4 always DF and never
 * connected (so IP ID 0, the values rxe's ICRC covers), IPv6-only sockets
 * that accept rxe's zero UDP checksum.
 */
import { POLL_READABLE, POLL_WRITABLE, isSysError, native, type FdWatcher } from '../../../virtio/sys/native.js';

export const ROCEV2_UDP_PORT = 4791;

/** Uint32 words per datagram record in the native metadata arrays. */
export const UDP_META_WORDS = 8;
/** Record word offsets. */
export const UDP_META_LENGTH = 0;
export const UDP_META_FLAGS = 1;
export const UDP_META_PORT = 2;
export const UDP_META_SCOPE = 3;
export const UDP_META_ADDR = 4;
/** Flag bits in a record's flags word. */
export const UDP_FLAG_TRUNCATED = 1;
export const UDP_FLAG_IPV6 = 2;
/** recvmmsg/sendmmsg handle at most this many datagrams per call (UIO_MAXIOV). */
export const UDP_MAX_BATCH = 1024;

/** Default slot: a 4096-byte MTU payload plus room for the RoCE headers. */
export const DEFAULT_SLOT_SIZE = 4096 + 64;
export const DEFAULT_SLOTS = 64;
/**
 * Default {@link UdpTransportOptions.recvLead}: RoCE puts 12 + 8k header
 * bytes before bulk payload (BTH; BTH+RETH; BTH+DETH), so slots starting 4
 * bytes past an 8-byte boundary put that payload on one. It matters because
 * V8's copies between a SharedArrayBuffer (guest memory) and another buffer
 * are about 4× slower for a 4 KiB payload when the two differ in alignment
 * modulo 8 (docs/benchmarks.md).
 */
export const DEFAULT_RECV_LEAD = 4;

/**
 * A peer address in the native record form, parsed once and reused for
 * every datagram to it. IPv4: words[0] is the address as a u32
 * (127.0.0.2 = 0x7f000002). IPv6: four big-endian words.
 */
export interface UdpPeer {
  readonly family: 4 | 6;
  readonly port: number;
  /** IPv6 scope (interface index); 0 for IPv4 and global addresses. */
  readonly scope: number;
  readonly words: readonly [number, number, number, number];
}

function fail(text: string): never {
  throw new TypeError(`not an IPv4 or IPv6 address: '${text}'`);
}

function parseIPv4(text: string): number | null {
  const parts = text.split('.');
  if (parts.length !== 4) return null;
  let value = 0;
  for (const part of parts) {
    if (!/^(0|[1-9][0-9]{0,2})$/.test(part)) return null;
    const n = Number(part);
    if (n > 255) return null;
    value = value * 256 + n;
  }
  return value;
}

function parseIPv6(text: string): [number, number, number, number] | null {
  let s = text;
  const lastColon = s.lastIndexOf(':');
  if (lastColon < 0) return null;
  const last = s.slice(lastColon + 1);
  if (last.includes('.')) {
    // Embedded IPv4 ("::ffff:1.2.3.4"): rewrite as two hex groups.
    const v4 = parseIPv4(last);
    if (v4 === null) return null;
    s = `${s.slice(0, lastColon + 1)}${(v4 >>> 16).toString(16)}:${(v4 & 0xffff).toString(16)}`;
  }
  const halves = s.split('::');
  if (halves.length > 2) return null;
  const head = halves[0] === '' ? [] : halves[0]!.split(':');
  let groups: string[];
  if (halves.length === 1) {
    if (head.length !== 8) return null;
    groups = head;
  } else {
    const rest = halves[1] === '' ? [] : halves[1]!.split(':');
    const missing = 8 - head.length - rest.length;
    if (missing < 1) return null;
    groups = [...head, ...new Array<string>(missing).fill('0'), ...rest];
  }
  const values: number[] = [];
  for (const g of groups) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return null;
    values.push(parseInt(g, 16));
  }
  const w = (i: number): number => ((values[2 * i]! << 16) | values[2 * i + 1]!) >>> 0;
  return [w(0), w(1), w(2), w(3)];
}

/** Parses an IPv4 or IPv6 literal (IPv6 may carry a numeric `%scope`). */
export function udpPeer(address: string, port: number): UdpPeer {
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`bad UDP port ${port}`);
  const v4 = parseIPv4(address);
  if (v4 !== null) return { family: 4, port, scope: 0, words: [v4, 0, 0, 0] };
  const percent = address.indexOf('%');
  let scope = 0;
  let host = address;
  if (percent >= 0) {
    const zone = address.slice(percent + 1);
    if (!/^[0-9]+$/.test(zone)) fail(address);
    scope = Number(zone);
    host = address.slice(0, percent);
  }
  const words = parseIPv6(host);
  if (words === null) fail(address);
  return { family: 6, port, scope, words };
}

/** The address of a peer as text (IPv6 in its full, uncompressed form). */
export function peerAddress(peer: UdpPeer): string {
  if (peer.family === 4) {
    const a = peer.words[0];
    return `${a >>> 24}.${(a >>> 16) & 0xff}.${(a >>> 8) & 0xff}.${a & 0xff}`;
  }
  const groups: string[] = [];
  for (const word of peer.words) groups.push((word >>> 16).toString(16), (word & 0xffff).toString(16));
  return groups.join(':') + (peer.scope !== 0 ? `%${peer.scope}` : '');
}

function writePeer(meta: Uint32Array, base: number, peer: UdpPeer, length: number): void {
  meta[base + UDP_META_LENGTH] = length;
  meta[base + UDP_META_FLAGS] = peer.family === 6 ? UDP_FLAG_IPV6 : 0;
  meta[base + UDP_META_PORT] = peer.port;
  meta[base + UDP_META_SCOPE] = peer.scope;
  meta[base + UDP_META_ADDR] = peer.words[0];
  meta[base + UDP_META_ADDR + 1] = peer.words[1];
  meta[base + UDP_META_ADDR + 2] = peer.words[2];
  meta[base + UDP_META_ADDR + 3] = peer.words[3];
}

/**
 * One received batch: datagram i is `length(i)` bytes of `buf` at
 * `offset(i)`. Valid only during the handler call: the next batch reuses
 * the same slots and records, and the object itself.
 */
export class UdpBatch {
  /** Datagrams in this batch, truncated ones included. */
  count = 0;

  constructor(
    readonly buf: Uint8Array,
    readonly meta: Uint32Array,
    readonly slotSize: number,
  ) {}

  offset(i: number): number {
    return i * this.slotSize;
  }
  /** Bytes of datagram i in its slot. */
  length(i: number): number {
    return this.meta[i * UDP_META_WORDS + UDP_META_LENGTH]!;
  }
  /**
   * The datagram was longer than a slot and was cut at the slot's end:
   * drop it. (`length(i)` is then its full length on the wire.)
   */
  truncated(i: number): boolean {
    return (this.meta[i * UDP_META_WORDS + UDP_META_FLAGS]! & UDP_FLAG_TRUNCATED) !== 0;
  }
  sourceFamily(i: number): 4 | 6 {
    return (this.meta[i * UDP_META_WORDS + UDP_META_FLAGS]! & UDP_FLAG_IPV6) !== 0 ? 6 : 4;
  }
  sourcePort(i: number): number {
    return this.meta[i * UDP_META_WORDS + UDP_META_PORT]!;
  }
  /** Source IPv4 address as a u32 (meaningless for IPv6 sources). */
  sourceIPv4(i: number): number {
    return this.meta[i * UDP_META_WORDS + UDP_META_ADDR]!;
  }
  /** Whether datagram i came from `peer` (address and port), without allocating. */
  isFrom(i: number, peer: UdpPeer): boolean {
    const m = this.meta;
    const b = i * UDP_META_WORDS;
    if (this.sourceFamily(i) !== peer.family || m[b + UDP_META_PORT] !== peer.port) return false;
    for (let w = 0; w < 4; w++) if (m[b + UDP_META_ADDR + w] !== peer.words[w]) return false;
    return true;
  }
  /** Source of datagram i as a new object (allocates: for replies and logs, not per packet). */
  source(i: number): UdpPeer {
    const m = this.meta;
    const b = i * UDP_META_WORDS;
    return {
      family: this.sourceFamily(i),
      port: m[b + UDP_META_PORT]!,
      scope: m[b + UDP_META_SCOPE]!,
      words: [m[b + UDP_META_ADDR]!, m[b + UDP_META_ADDR + 1]!, m[b + UDP_META_ADDR + 2]!, m[b + UDP_META_ADDR + 3]!],
    };
  }
}

export interface UdpTransportOptions {
  /** IPv4 or IPv6 literal to bind. */
  address: string;
  /** 0 picks a free port; RoCEv2 peers use {@link ROCEV2_UDP_PORT}. */
  port: number;
  /** Receive slots, i.e. the largest batch (default 64, at most 1024). */
  recvSlots?: number;
  /** Bytes per receive slot; longer datagrams are reported truncated (default 4160). */
  recvSlotSize?: number;
  /** Send slots, i.e. datagrams that can be queued (default 64, at most 1024). */
  sendSlots?: number;
  /** Largest datagram that can be queued (default 4160). */
  sendSlotSize?: number;
  /** recvmmsg calls per readiness callback before yielding to the event loop (default 16). */
  batchesPerWakeup?: number;
  /** Every receive slot starts this many bytes (0..7) past an 8-byte boundary (default {@link DEFAULT_RECV_LEAD} when recvSlotSize is a multiple of 8, else 0). */
  recvLead?: number;
}

export interface UdpTransportStats {
  /** Datagrams received (truncated ones included) and the batches they came in. */
  received: number;
  batches: number;
  /** Received datagrams that were longer than a slot. */
  truncated: number;
  /** Datagrams handed to the kernel, and the sendmmsg calls that did it. */
  sent: number;
  sendCalls: number;
  /** Datagrams not queued because every send slot was taken. */
  sendDropped: number;
  /** Datagrams the kernel refused (EMSGSIZE, ENETUNREACH...); each is dropped and reported. */
  sendErrors: number;
}

export type UdpBatchHandler = (batch: UdpBatch) => void;
export type UdpErrorHandler = (err: Error) => void;

function checkCount(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1 || value > UDP_MAX_BATCH) {
    throw new RangeError(`${name} must be an integer in 1..${UDP_MAX_BATCH}`);
  }
  return value;
}

function checkSize(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1 || value > 65536) throw new RangeError(`${name} must be an integer in 1..65536`);
  return value;
}

export class UdpTransport {
  readonly fd: number;
  /** What the socket is bound to (port 0 resolved) and the buffer sizes the kernel gave. */
  readonly local: UdpPeer;
  readonly rcvbuf: number;
  readonly sndbuf: number;
  readonly stats: UdpTransportStats = { received: 0, batches: 0, truncated: 0, sent: 0, sendCalls: 0, sendDropped: 0, sendErrors: 0 };

  /** The send slots: `reserve()` returns an offset into this buffer. */
  readonly sendBuffer: Uint8Array;

  private readonly recvBuffer: Uint8Array;
  private readonly recvMeta: Uint32Array;
  private readonly recvSlots: number;
  private readonly batch: UdpBatch;
  private readonly batchesPerWakeup: number;

  private readonly sendSlots: number;
  private readonly sendSlotSize: number;
  private readonly sendOffsets: Uint32Array;
  private readonly sendMeta: Uint32Array;
  /** Queued datagrams are slots [head, tail). */
  private head = 0;
  private tail = 0;
  private flushScheduled = false;
  private waitingWritable = false;

  private readonly watcher: FdWatcher;
  private watching = 0;
  private batchHandler: UdpBatchHandler | null = null;
  private errorHandler: UdpErrorHandler | null = null;
  private closed = false;

  constructor(options: UdpTransportOptions) {
    this.recvSlots = checkCount('recvSlots', options.recvSlots ?? DEFAULT_SLOTS);
    const recvSlotSize = checkSize('recvSlotSize', options.recvSlotSize ?? DEFAULT_SLOT_SIZE);
    this.sendSlots = checkCount('sendSlots', options.sendSlots ?? DEFAULT_SLOTS);
    this.sendSlotSize = checkSize('sendSlotSize', options.sendSlotSize ?? DEFAULT_SLOT_SIZE);
    this.batchesPerWakeup = options.batchesPerWakeup ?? 16;

    // Slots of a size that is not a multiple of 8 cannot all share one alignment: no lead by default.
    const lead = options.recvLead ?? (recvSlotSize % 8 === 0 ? DEFAULT_RECV_LEAD : 0);
    if (!Number.isInteger(lead) || lead < 0 || lead > 7) throw new RangeError('recvLead must be an integer in 0..7');
    if (lead !== 0 && recvSlotSize % 8 !== 0) throw new RangeError('recvSlotSize must be a multiple of 8 when recvLead is not 0');
    // A view `lead` bytes into a fresh (8-byte aligned) buffer: slot i starts at lead + i * slotSize.
    this.recvBuffer = new Uint8Array(this.recvSlots * recvSlotSize + lead).subarray(lead);
    this.recvMeta = new Uint32Array(this.recvSlots * UDP_META_WORDS);
    this.batch = new UdpBatch(this.recvBuffer, this.recvMeta, recvSlotSize);
    this.sendBuffer = new Uint8Array(this.sendSlots * this.sendSlotSize);
    this.sendMeta = new Uint32Array(this.sendSlots * UDP_META_WORDS);
    this.sendOffsets = new Uint32Array(this.sendSlots);
    for (let i = 0; i < this.sendSlots; i++) this.sendOffsets[i] = i * this.sendSlotSize;

    this.fd = native.udpBind(options.address, options.port);
    try {
      const info = native.udpInfo(this.fd);
      this.local = udpPeer(info.address, info.port);
      this.rcvbuf = info.rcvbuf;
      this.sndbuf = info.sndbuf;
      this.watcher = new native.FdWatcher(this.fd, (events) => this.onReady(events));
    } catch (err) {
      native.close(this.fd);
      throw err;
    }
  }

  /** Sets the one handler of received batches and starts receiving. */
  onBatch(handler: UdpBatchHandler): void {
    this.ensureOpen();
    this.batchHandler = handler;
    this.updateWatcher();
  }

  /** Receives send and receive failures the transport survived (the datagram involved is dropped). */
  onError(handler: UdpErrorHandler): void {
    this.errorHandler = handler;
  }

  /** Datagrams queued and not yet handed to the kernel. */
  get pending(): number {
    return this.tail - this.head;
  }

  /**
   * Takes a send slot for a `length`-byte datagram to `dst` and returns its
   * offset in {@link sendBuffer}, where the caller writes the datagram
   * before the current microtask ends. -1 when every slot is taken (the
   * datagram is counted as dropped).
   */
  reserve(dst: UdpPeer, length: number): number {
    this.ensureOpen();
    if (length > this.sendSlotSize) throw new RangeError(`datagram of ${length} bytes exceeds the ${this.sendSlotSize}-byte send slot`);
    // Not flushed here even when this fills the batch: the caller has not
    // written it yet. The next reserve()/queue() or the microtask sends it.
    return this.reserveSlot(dst, length);
  }

  /** Copies `bytes` into a send slot for `dst`; false when it had to be dropped. */
  queue(dst: UdpPeer, bytes: Uint8Array): boolean {
    this.ensureOpen();
    if (bytes.length > this.sendSlotSize) throw new RangeError(`datagram of ${bytes.length} bytes exceeds the ${this.sendSlotSize}-byte send slot`);
    const at = this.reserveSlot(dst, bytes.length);
    if (at < 0) return false;
    this.sendBuffer.set(bytes, at);
    this.maybeFlushFull();
    return true;
  }

  /** Hands queued datagrams to the kernel now; returns how many went. */
  flush(): number {
    let total = 0;
    while (!this.closed && this.head < this.tail) {
      const count = Math.min(this.tail - this.head, UDP_MAX_BATCH);
      let sent: number;
      try {
        sent = native.udpSendBatch(this.fd, this.sendBuffer, this.sendOffsets, this.sendMeta, this.head, count);
      } catch (err) {
        // The first datagram of the batch was refused: drop it, go on.
        if (!isSysError(err)) throw err;
        this.stats.sendErrors++;
        this.head++;
        this.errorHandler?.(err);
        continue;
      }
      this.stats.sendCalls++;
      if (sent === 0) break; // socket buffer full: wait for POLL_WRITABLE
      this.stats.sent += sent;
      this.head += sent;
      total += sent;
    }
    if (this.head === this.tail) this.head = this.tail = 0;
    const wantWritable = this.pending > 0 && !this.closed;
    if (wantWritable !== this.waitingWritable) {
      this.waitingWritable = wantWritable;
      this.updateWatcher();
    }
    return total;
  }

  /** Stops the watcher and closes the socket; queued datagrams are dropped. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.head = this.tail = 0;
    this.watcher.close();
    native.close(this.fd);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private readonly scheduledFlush = (): void => {
    this.flushScheduled = false;
    if (!this.closed) this.flush();
  };

  // reserve() without the flush of a just-filled batch, so queue() can copy
  // the bytes in before they go.
  private reserveSlot(dst: UdpPeer, length: number): number {
    if (this.tail === this.sendSlots) {
      this.flush();
      if (this.tail === this.sendSlots) this.compact();
      if (this.tail === this.sendSlots) {
        this.stats.sendDropped++;
        return -1;
      }
    }
    const slot = this.tail++;
    writePeer(this.sendMeta, slot * UDP_META_WORDS, dst, length);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(this.scheduledFlush);
    }
    return slot * this.sendSlotSize;
  }

  private maybeFlushFull(): void {
    if (this.tail === this.sendSlots) this.flush();
  }

  /** Moves the queued slots [head, tail) down to 0 to make room at the end. */
  private compact(): void {
    if (this.head === 0) return;
    const n = this.tail - this.head;
    this.sendBuffer.copyWithin(0, this.head * this.sendSlotSize, this.tail * this.sendSlotSize);
    this.sendMeta.copyWithin(0, this.head * UDP_META_WORDS, this.tail * UDP_META_WORDS);
    this.head = 0;
    this.tail = n;
  }

  private ensureOpen(): void {
    if (this.closed) throw new Error('UdpTransport is closed');
  }

  private updateWatcher(): void {
    if (this.closed) return;
    const events = (this.batchHandler !== null ? POLL_READABLE : 0) | (this.waitingWritable ? POLL_WRITABLE : 0);
    if (events === this.watching) return;
    this.watching = events;
    if (events === 0) this.watcher.stop();
    else this.watcher.start(events);
  }

  private onReady(events: number): void {
    if (this.closed) return;
    if ((events & POLL_WRITABLE) !== 0) this.flush();
    // Readable, or an error/hang-up report: a receive collects either.
    if ((events & ~POLL_WRITABLE) !== 0 && this.batchHandler !== null) this.receive();
  }

  private receive(): void {
    for (let round = 0; round < this.batchesPerWakeup && !this.closed; round++) {
      let n: number;
      try {
        n = native.udpRecvBatch(this.fd, this.recvBuffer, this.batch.slotSize, this.recvSlots, this.recvMeta);
      } catch (err) {
        if (!isSysError(err)) throw err;
        this.errorHandler?.(err);
        continue;
      }
      if (n === 0) return;
      this.stats.received += n;
      this.stats.batches++;
      for (let i = 0; i < n; i++) if (this.batch.truncated(i)) this.stats.truncated++;
      this.batch.count = n;
      const handler = this.batchHandler;
      if (handler === null) return;
      handler(this.batch);
      if (n < this.recvSlots) return;
    }
  }
}
