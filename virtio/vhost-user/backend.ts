/**
 * The back-end half of vhost-user: a protocol state machine that turns
 * front-end requests into memory-table, ring and device operations.
 *
 * Error policy, in one place:
 * - framing errors (bad header, size, fd count) close the connection;
 * - an unknown or unsupported request gets an error reply when it asked for
 *   one (NEED_REPLY) and is logged otherwise;
 * - a request that fails validation is logged with its reason and answered
 *   with a failure status when a reply is expected; the connection stays;
 * - a failing request whose reply has no way to say "failed"
 *   (GET_VRING_BASE on a queue that does not exist) closes the connection,
 *   since any answer would be a lie and no answer would hang the front-end.
 */
import { readlinkSync } from 'node:fs';
import { Socket } from 'node:net';
import { native, type FdWatcher, POLL_READABLE } from '../sys/native.js';
import { DirtyLog } from '../memory/dirty-log.js';
import { GuestMemory, MemoryError, mapRegion, type MappedRegion } from '../memory/guest-memory.js';
import { QueueError, SplitVirtqueue } from '../queue/split-queue.js';
import { DeviceError, type DeviceContext, type VirtioDevice } from '../device.js';
import type { Logger } from '../log.js';
import { Connection, safeClose, type RawMessage } from './connection.js';
import { decodeRequest, encodeReply, ProtocolError, UnknownRequestError, type MemRegion, type Message, type Payload } from './codec.js';
import {
  FrontendReq,
  HDR_NEED_REPLY,
  ProtocolFeature,
  TransferDirection,
  MigrationPhase,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_VRING_F_LOG,
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_RING_INDIRECT_DESC,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
  bit,
  hasBit,
  requestName,
} from './protocol.js';

/** A request the back-end refuses; the message says why. */
export class RequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RequestError';
  }
}

/** Ends the connection: the request failed in a way its reply cannot express. */
class FatalRequestError extends RequestError {}

export interface BackendOptions {
  /** Memory slots offered through CONFIGURE_MEM_SLOTS. */
  maxMemSlots?: number;
  /** Protocol features to withhold (tests use it to play an older back-end). */
  withheldProtocolFeatures?: readonly ProtocolFeature[];
  /** Largest device state accepted on LOAD. */
  maxStateBytes?: number;
}

const VIRTIO_CONFIG_S_DRIVER_OK = 4;
const TRANSPORT_FEATURES =
  bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);

interface Vring {
  queue: SplitVirtqueue;
  kickFd: number | null;
  kickWatcher: FdWatcher | null;
  errFd: number | null;
  enabled: boolean;
  /** Between SET_VRING_KICK and GET_VRING_BASE. */
  started: boolean;
  kickScheduled: boolean;
}

interface StateTransfer {
  direction: TransferDirection;
  done: Promise<void>;
  error: Error | null;
}

export interface ConnectionSummary {
  reason: string;
  error?: Error;
}

export class VhostUserBackend {
  readonly memory: GuestMemory;
  private readonly vrings: Vring[];
  private readonly offeredProtocol: bigint;
  private readonly maxStateBytes: number;
  private ackedFeatures = 0n;
  private ackedProtocol = 0n;
  private status = 0;
  private logBase: DirtyLog | null = null;
  private logBaseRelease: (() => void) | null = null;
  private logFd: number | null = null;
  private transfer: StateTransfer | null = null;
  private conn: Connection | null = null;
  private attached = false;
  /** Requests served on the current connection, for the disconnect log line. */
  private requestCount = 0;

  constructor(
    readonly device: VirtioDevice,
    private readonly log: Logger,
    options: BackendOptions = {},
  ) {
    this.memory = new GuestMemory(options.maxMemSlots ?? 32);
    this.maxStateBytes = options.maxStateBytes ?? 64 << 20;
    this.vrings = Array.from({ length: device.numQueues }, (_, i) => this.newVring(i));
    let offered =
      bit(ProtocolFeature.MQ) |
      bit(ProtocolFeature.LOG_SHMFD) |
      bit(ProtocolFeature.REPLY_ACK) |
      bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
      bit(ProtocolFeature.RESET_DEVICE) |
      bit(ProtocolFeature.STATUS);
    if (device.configSize > 0) offered |= bit(ProtocolFeature.CONFIG);
    if (device.saveState && device.loadState) offered |= bit(ProtocolFeature.DEVICE_STATE);
    for (const f of options.withheldProtocolFeatures ?? []) offered &= ~bit(f);
    this.offeredProtocol = offered;
  }

  get offeredFeatures(): bigint {
    return this.device.features | TRANSPORT_FEATURES;
  }

  get offeredProtocolFeatures(): bigint {
    return this.offeredProtocol;
  }

  get connected(): boolean {
    return this.conn !== null;
  }

  /** Serves one front-end on `fd` until it goes away; resolves with why. */
  serve(fd: number): Promise<ConnectionSummary> {
    if (this.conn !== null) throw new Error('backend already serves a connection');
    this.requestCount = 0;
    return new Promise((resolve) => {
      this.conn = new Connection(fd, {
        onMessage: (raw) => this.onMessage(raw),
        onClose: (reason, error) => {
          this.disconnect(reason, error);
          resolve(error ? { reason, error } : { reason });
        },
      });
    });
  }

  /** Drops the current connection, if any. */
  close(reason = 'back-end shutting down'): void {
    this.conn?.close(reason);
  }

  // -------------------------------------------------------------------------
  // Dispatch

  private onMessage(raw: RawMessage): void {
    const conn = this.conn!;
    let msg: Message;
    try {
      msg = decodeRequest(raw.header, raw.payload, raw.fds);
    } catch (err) {
      for (const fd of raw.fds) safeClose(fd);
      if (err instanceof UnknownRequestError) {
        this.log.warn(`unknown request ${err.request} (${raw.header.size} bytes): ignored`);
        if (raw.header.flags & HDR_NEED_REPLY) this.replyU64(raw.header.request, 1n);
        return;
      }
      conn.close(`malformed message: ${(err as Error).message}`, err as Error);
      return;
    }
    this.requestCount++;
    let result: void | Promise<void>;
    try {
      result = this.dispatch(msg);
    } catch (err) {
      this.onRequestFailed(msg, err);
      return;
    }
    if (result instanceof Promise) {
      conn.pause();
      result.then(
        () => conn.resume(),
        (err: unknown) => {
          this.onRequestFailed(msg, err);
          conn.resume();
        },
      );
    }
  }

  private onRequestFailed(msg: Message, err: unknown): void {
    const name = requestName(msg.request);
    const known = err instanceof RequestError || err instanceof MemoryError || err instanceof QueueError || err instanceof DeviceError;
    if (err instanceof FatalRequestError) {
      this.conn?.close(`${name}: ${err.message}`, err);
      return;
    }
    if (!known) this.log.error(`${name}: internal error: ${(err as Error).stack ?? String(err)}`);
    else this.log.warn(`${name} refused: ${(err as Error).message}`);
    if (msg.flags & HDR_NEED_REPLY) this.replyU64(msg.request, 1n);
  }

  private dispatch(msg: Message): void | Promise<void> {
    const p = msg.payload;
    this.log.debug(`<- ${requestName(msg.request)}${describePayload(p)}${msg.fds.length ? ` fds=${msg.fds.length}` : ''}`);
    switch (msg.request as FrontendReq) {
      case FrontendReq.GET_FEATURES:
        return this.replyU64(msg.request, this.offeredFeatures);
      case FrontendReq.SET_FEATURES:
        return this.ack(msg, () => this.setFeatures(u64(p)));
      case FrontendReq.SET_OWNER:
        return this.ack(msg, () => undefined);
      case FrontendReq.RESET_OWNER:
        return this.ack(msg, () => this.resetDevice('RESET_OWNER'));
      case FrontendReq.GET_PROTOCOL_FEATURES:
        return this.replyU64(msg.request, this.offeredProtocol);
      case FrontendReq.SET_PROTOCOL_FEATURES:
        return this.ack(msg, () => this.setProtocolFeatures(u64(p)));
      case FrontendReq.GET_QUEUE_NUM:
        return this.replyU64(msg.request, BigInt(this.device.numQueues));
      case FrontendReq.SET_MEM_TABLE:
        return this.ack(msg, () => this.setMemTable(msg));
      case FrontendReq.GET_MAX_MEM_SLOTS:
        this.requireProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, msg);
        return this.replyU64(msg.request, BigInt(this.memory.maxRegions));
      case FrontendReq.ADD_MEM_REG:
        return this.ack(msg, () => this.addMemReg(msg));
      case FrontendReq.REM_MEM_REG:
        return this.ack(msg, () => this.remMemReg(msg));
      case FrontendReq.SET_LOG_BASE:
        return this.setLogBase(msg);
      case FrontendReq.SET_LOG_FD:
        return this.ack(msg, () => {
          if (this.logFd !== null) safeClose(this.logFd);
          this.logFd = msg.fds[0]!;
        });
      case FrontendReq.SET_VRING_NUM:
        return this.ack(msg, () => {
          const s = vringState(p);
          this.vring(s.index).queue.setSize(s.num, this.device.maxQueueSize);
        });
      case FrontendReq.SET_VRING_ADDR:
        return this.ack(msg, () => this.setVringAddr(p));
      case FrontendReq.SET_VRING_BASE:
        return this.ack(msg, () => {
          const s = vringState(p);
          this.vring(s.index).queue.setBase(s.num);
        });
      case FrontendReq.GET_VRING_BASE:
        return this.getVringBase(msg);
      case FrontendReq.SET_VRING_KICK:
        return this.ack(msg, () => this.setVringKick(msg));
      case FrontendReq.SET_VRING_CALL:
        return this.ack(msg, () => this.setVringCall(msg));
      case FrontendReq.SET_VRING_ERR:
        return this.ack(msg, () => this.setVringErr(msg));
      case FrontendReq.SET_VRING_ENABLE:
        return this.ack(msg, () => this.setVringEnable(p));
      case FrontendReq.GET_CONFIG:
        return this.getConfig(msg);
      case FrontendReq.SET_CONFIG:
        return this.ack(msg, () => {
          this.requireProtocol(ProtocolFeature.CONFIG, msg);
          if (p.kind !== 'config') throw new RequestError('bad payload');
          this.checkConfigRange(p.offset, p.size);
          this.device.writeConfig(p.offset, p.data, (p.flags & 1) !== 0);
        });
      case FrontendReq.RESET_DEVICE:
        return this.ack(msg, () => {
          this.requireProtocol(ProtocolFeature.RESET_DEVICE, msg);
          this.resetDevice('RESET_DEVICE');
        });
      case FrontendReq.SET_STATUS:
        return this.ack(msg, () => this.setStatus(msg));
      case FrontendReq.GET_STATUS:
        this.requireProtocol(ProtocolFeature.STATUS, msg);
        return this.replyU64(msg.request, BigInt(this.status));
      case FrontendReq.SET_DEVICE_STATE_FD:
        return this.setDeviceStateFd(msg);
      case FrontendReq.CHECK_DEVICE_STATE:
        return this.checkDeviceState(msg);
      default:
        return this.unsupported(msg);
    }
  }

  /** Known request this back-end does not implement (or did not offer). */
  private unsupported(msg: Message): void {
    for (const fd of msg.fds) safeClose(fd);
    this.log.warn(`${requestName(msg.request)} is not supported by this back-end: ignored`);
    if (msg.flags & HDR_NEED_REPLY) this.replyU64(msg.request, 1n);
  }

  /** Runs a request without a reply body; answers with a status when NEED_REPLY is set. */
  private ack(msg: Message, fn: () => void): void {
    fn();
    if (msg.flags & HDR_NEED_REPLY) this.replyU64(msg.request, 0n);
  }

  private reply(request: number, payload: Payload): void {
    this.conn?.send(encodeReply(request, payload));
  }

  private replyU64(request: number, value: bigint): void {
    this.reply(request, { kind: 'u64', value });
  }

  private requireProtocol(f: ProtocolFeature, msg: Message): void {
    if (!hasBit(this.ackedProtocol, f)) {
      throw new RequestError(`${requestName(msg.request)} needs protocol feature ${ProtocolFeature[f]}, which was not negotiated`);
    }
  }

  private vring(index: number): Vring {
    const v = this.vrings[index];
    if (v === undefined) throw new RequestError(`queue ${index} does not exist (device has ${this.vrings.length})`);
    return v;
  }

  // -------------------------------------------------------------------------
  // Features and status

  private setFeatures(features: bigint): void {
    const extra = features & ~this.offeredFeatures;
    if (extra !== 0n) throw new RequestError(`features 0x${extra.toString(16)} were not offered`);
    this.ackedFeatures = features;
    const eventIdx = hasBit(features, VIRTIO_F_RING_EVENT_IDX);
    const indirect = hasBit(features, VIRTIO_F_RING_INDIRECT_DESC);
    for (const v of this.vrings) {
      v.queue.eventIdx = eventIdx;
      v.queue.indirect = indirect;
      v.queue.invalidate();
      // Without protocol features a ring is enabled as soon as it starts.
      if (!hasBit(features, VHOST_USER_F_PROTOCOL_FEATURES) && v.started) v.enabled = true;
    }
    this.updateLogging();
    this.device.setAckedFeatures(features & ~(bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL)));
    this.log.info(`features acked 0x${features.toString(16)}${hasBit(features, VHOST_F_LOG_ALL) ? ' (dirty logging on)' : ''}`);
  }

  private setProtocolFeatures(features: bigint): void {
    const extra = features & ~this.offeredProtocol;
    if (extra !== 0n) throw new RequestError(`protocol features 0x${extra.toString(16)} were not offered`);
    this.ackedProtocol = features;
    this.log.info(`protocol features acked 0x${features.toString(16)}`);
  }

  private setStatus(msg: Message): void {
    this.requireProtocol(ProtocolFeature.STATUS, msg);
    const value = u64(msg.payload);
    if (value > 0xffn) throw new RequestError(`status 0x${value.toString(16)} does not fit 8 bits`);
    const prev = this.status;
    this.status = Number(value);
    if (this.status & VIRTIO_CONFIG_S_DRIVER_OK && !(prev & VIRTIO_CONFIG_S_DRIVER_OK)) this.log.info('status DRIVER_OK: the guest driver is running');
    else this.log.info(`status 0x${this.status.toString(16)}`);
    this.device.setStatus?.(this.status);
  }

  private resetDevice(why: string): void {
    for (let i = 0; i < this.vrings.length; i++) this.stopVring(i);
    this.vrings.splice(0, this.vrings.length, ...this.vrings.map((_, i) => this.newVring(i)));
    this.ackedFeatures = 0n;
    this.status = 0;
    this.device.reset();
    // The device forgot its context; give it again when a ring next runs.
    this.attached = false;
    this.log.info(`device reset (${why})`);
  }

  // -------------------------------------------------------------------------
  // Memory

  private mapAll(msg: Message, regions: readonly MemRegion[]): MappedRegion[] {
    const mapped: MappedRegion[] = [];
    try {
      regions.forEach((r, i) => mapped.push(mapRegion(r, msg.fds[i]!)));
    } catch (err) {
      for (const m of mapped) m.release();
      throw err instanceof MemoryError ? err : new MemoryError((err as Error).message);
    } finally {
      for (const fd of msg.fds) safeClose(fd);
    }
    return mapped;
  }

  private setMemTable(msg: Message): void {
    if (msg.payload.kind !== 'memTable') throw new RequestError('bad payload');
    const mapped = this.mapAll(msg, msg.payload.regions);
    this.memory.replace(mapped);
    this.afterMemoryChange();
    for (const r of this.memory.all) this.log.info(`memory region ${r.describe()}`);
  }

  private addMemReg(msg: Message): void {
    this.requireProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, msg);
    if (msg.payload.kind !== 'memRegion') throw new RequestError('bad payload');
    const [mapped] = this.mapAll(msg, [msg.payload.region]);
    this.memory.add(mapped!);
    this.afterMemoryChange();
    this.log.info(`memory region added ${mapped!.describe()}`);
  }

  private remMemReg(msg: Message): void {
    for (const fd of msg.fds) safeClose(fd);
    this.requireProtocol(ProtocolFeature.CONFIGURE_MEM_SLOTS, msg);
    if (msg.payload.kind !== 'memRegion') throw new RequestError('bad payload');
    this.memory.remove(msg.payload.region);
    this.afterMemoryChange();
    this.log.info(`memory region removed at gpa 0x${msg.payload.region.guestPhysAddr.toString(16)}`);
  }

  private afterMemoryChange(): void {
    for (const v of this.vrings) v.queue.invalidate();
    if (this.logBase !== null && this.logBase.coveredBytes < this.memory.topGpa) {
      this.log.warn(`dirty log covers 0x${this.logBase.coveredBytes.toString(16)} but memory now reaches 0x${this.memory.topGpa.toString(16)}`);
    }
  }

  private setLogBase(msg: Message): void {
    if (msg.payload.kind !== 'log') throw new RequestError('bad payload');
    const { size, offset } = msg.payload;
    const fd = msg.fds[0];
    let status = 0n;
    try {
      if (!hasBit(this.ackedProtocol, ProtocolFeature.LOG_SHMFD) || fd === undefined) {
        throw new RequestError('only the shared-memory log (LOG_SHMFD with an fd) is supported');
      }
      const need = DirtyLog.bytesFor(this.memory.topGpa);
      if (size < need) throw new RequestError(`log of ${size} bytes cannot cover guest memory up to 0x${this.memory.topGpa.toString(16)} (needs ${need})`);
      if (offset % 4096 !== 0) throw new RequestError(`log offset 0x${offset.toString(16)} is not page aligned`);
      if (offset + size > native.fdSize(fd)) throw new RequestError(`log offset+size is past the end of its fd`);
      const buffer = native.mmap(fd, offset, size, true);
      this.releaseLog();
      this.logBase = new DirtyLog(buffer, size);
      this.logBaseRelease = () => native.munmap(buffer);
      this.updateLogging();
      this.log.info(`dirty log set: ${size} bytes`);
    } catch (err) {
      status = 1n;
      this.log.warn(`SET_LOG_BASE refused: ${(err as Error).message}`);
    } finally {
      if (fd !== undefined) safeClose(fd);
    }
    // QEMU waits for this reply whenever LOG_SHMFD is negotiated.
    this.replyU64(msg.request, status);
  }

  private updateLogging(): void {
    this.memory.log = hasBit(this.ackedFeatures, VHOST_F_LOG_ALL) ? this.logBase : null;
  }

  private releaseLog(): void {
    this.memory.log = null;
    this.logBase = null;
    this.logBaseRelease?.();
    this.logBaseRelease = null;
  }

  // -------------------------------------------------------------------------
  // Rings

  private newVring(index: number): Vring {
    const queue = new SplitVirtqueue(index, this.memory);
    queue.eventIdx = hasBit(this.ackedFeatures, VIRTIO_F_RING_EVENT_IDX);
    queue.indirect = hasBit(this.ackedFeatures, VIRTIO_F_RING_INDIRECT_DESC);
    queue.onMalformed = (q, head, reason) => this.log.warn(`vq ${q.index}: chain ${head} returned unused: ${reason}`);
    return { queue, kickFd: null, kickWatcher: null, errFd: null, enabled: false, started: false, kickScheduled: false };
  }

  private setVringAddr(p: Payload): void {
    if (p.kind !== 'vringAddr') throw new RequestError('bad payload');
    const v = this.vring(p.index);
    if (p.flags & ~VHOST_VRING_F_LOG) throw new RequestError(`unknown vring address flags 0x${p.flags.toString(16)}`);
    v.queue.setAddresses({ descUva: p.desc, availUva: p.avail, usedUva: p.used, logGpa: p.log, logUsed: (p.flags & VHOST_VRING_F_LOG) !== 0 });
    if (this.memory.regionCount > 0) {
      const why = v.queue.resolve();
      if (why !== null) throw new RequestError(`vq ${p.index}: ${why}`);
    }
  }

  /** The vring a KICK/CALL/ERR message names (low byte of its u64). */
  private vringFdTarget(msg: Message): Vring {
    const value = u64(msg.payload);
    if ((value & ~(VRING_IDX_MASK | VRING_NOFD_MASK)) !== 0n) {
      for (const fd of msg.fds) safeClose(fd);
      throw new RequestError(`unknown bits in 0x${value.toString(16)}`);
    }
    const index = Number(value & VRING_IDX_MASK);
    if (index >= this.vrings.length) {
      for (const fd of msg.fds) safeClose(fd);
    }
    return this.vring(index);
  }

  private setVringKick(msg: Message): void {
    const v = this.vringFdTarget(msg);
    const i = v.queue.index;
    const fd = msg.fds[0];
    if (fd === undefined) {
      this.releaseKick(v);
      this.log.warn(`vq ${i}: kick without an fd (polling) is not supported; the ring will not run`);
      return;
    }
    // Watch the new fd before letting go of the old one: a refusal changes nothing.
    let watcher: FdWatcher | null = null;
    try {
      watcher = new native.FdWatcher(fd, () => this.onKick(v));
      watcher.start(POLL_READABLE);
    } catch (err) {
      watcher?.close();
      safeClose(fd);
      const code = (err as { code?: unknown }).code;
      // epoll refuses regular files (a memfd is one) with EPERM.
      if (code === 'EPERM') throw new RequestError(`vq ${i}: kick fd is not pollable (a regular file?): EPERM`);
      throw new RequestError(`vq ${i}: kick fd cannot be polled: ${typeof code === 'string' ? code : (err as Error).message}`);
    }
    this.releaseKick(v);
    v.kickFd = fd;
    v.kickWatcher = watcher;
    v.started = true;
    v.queue.broken = null;
    if (!hasBit(this.ackedFeatures, VHOST_USER_F_PROTOCOL_FEATURES)) v.enabled = true;
    this.log.info(`vq ${i}: started (size ${v.queue.size}, ${v.enabled ? 'enabled' : 'waiting for enable'})`);
    this.scheduleKick(v);
  }

  private setVringCall(msg: Message): void {
    const v = this.vringFdTarget(msg);
    const fd = msg.fds[0] ?? null;
    const why = fd === null ? null : notAnEventfd(fd);
    if (why !== null) {
      safeClose(fd!);
      throw new RequestError(`vq ${v.queue.index}: call fd ${why}`);
    }
    if (v.queue.callFd !== null) safeClose(v.queue.callFd);
    v.queue.callFd = fd;
  }

  private setVringErr(msg: Message): void {
    const v = this.vringFdTarget(msg);
    const fd = msg.fds[0] ?? null;
    const why = fd === null ? null : notAnEventfd(fd);
    if (why !== null) {
      safeClose(fd!);
      throw new RequestError(`vq ${v.queue.index}: error fd ${why}`);
    }
    if (v.errFd !== null) safeClose(v.errFd);
    v.errFd = fd;
  }

  private setVringEnable(p: Payload): void {
    const s = vringState(p);
    const v = this.vring(s.index);
    if (s.num > 1) throw new RequestError(`vq ${s.index}: enable value ${s.num} is not 0 or 1`);
    v.enabled = s.num === 1;
    this.log.debug(`vq ${s.index}: ${v.enabled ? 'enabled' : 'disabled'}`);
    if (v.enabled) this.scheduleKick(v);
    else this.device.queueStopped?.(s.index);
  }

  private getVringBase(msg: Message): void {
    const s = vringState(msg.payload);
    const v = this.vrings[s.index];
    if (v === undefined) throw new FatalRequestError(`queue ${s.index} does not exist (device has ${this.vrings.length})`);
    const base = v.queue.lastAvail;
    this.stopVring(s.index);
    this.log.info(`vq ${s.index}: stopped at avail index ${base}`);
    this.reply(msg.request, { kind: 'vringState', index: s.index, num: base });
  }

  /** GET_VRING_BASE semantics: no more processing, forget kick and call. */
  private stopVring(index: number): void {
    const v = this.vrings[index]!;
    const wasRunning = v.started;
    this.releaseKick(v);
    if (v.queue.callFd !== null) safeClose(v.queue.callFd);
    v.queue.callFd = null;
    if (v.errFd !== null) safeClose(v.errFd);
    v.errFd = null;
    v.started = false;
    v.enabled = false;
    if (wasRunning) this.device.queueStopped?.(index);
  }

  private releaseKick(v: Vring): void {
    v.kickWatcher?.close();
    v.kickWatcher = null;
    if (v.kickFd !== null) safeClose(v.kickFd);
    v.kickFd = null;
  }

  private isRunning(v: Vring): boolean {
    return v.started && v.enabled && v.queue.broken === null && this.memory.regionCount > 0;
  }

  private scheduleKick(v: Vring): void {
    if (v.kickScheduled) return;
    v.kickScheduled = true;
    setImmediate(() => {
      v.kickScheduled = false;
      if (this.vrings[v.queue.index] === v) this.runQueue(v);
    });
  }

  private onKick(v: Vring): void {
    if (v.kickFd === null) return;
    try {
      native.eventfdRead(v.kickFd);
    } catch (err) {
      this.log.warn(`vq ${v.queue.index}: kick fd read failed: ${(err as Error).message}`);
      this.releaseKick(v);
      return;
    }
    this.runQueue(v);
  }

  private runQueue(v: Vring): void {
    if (!this.isRunning(v)) return;
    const q = v.queue;
    if (!q.isResolved) {
      const why = q.resolve();
      if (why !== null) {
        q.fail(why);
        this.log.warn(`vq ${q.index}: cannot run: ${why}`);
        return;
      }
    }
    this.ensureAttached();
    try {
      this.device.handleQueue(q.index);
    } catch (err) {
      this.log.error(`vq ${q.index}: device ${this.device.name} failed: ${(err as Error).stack ?? String(err)}`);
    }
    if (q.broken !== null) this.log.warn(`vq ${q.index}: stopped: ${q.broken}`);
    if (!this.device.notifiesItself?.(q.index)) q.notify();
  }

  private ensureAttached(): void {
    if (this.attached) return;
    this.attached = true;
    const ctx: DeviceContext = {
      memory: this.memory,
      log: this.log.child(this.device.name),
      queue: (i) => this.vring(i).queue,
      isRunning: (i) => {
        const v = this.vrings[i];
        // Resolved again on demand: SET_FEATURES (LOG_ALL when a migration starts) and memory changes
        // invalidate every ring, and a CQ ring the driver does not kick must still take completions.
        return v !== undefined && this.isRunning(v) && (v.queue.isResolved || v.queue.resolve() === null);
      },
      notify: (i) => {
        const v = this.vrings[i];
        if (v !== undefined && this.isRunning(v)) v.queue.notify();
      },
    };
    this.device.attach(ctx);
  }

  // -------------------------------------------------------------------------
  // Config

  private checkConfigRange(offset: number, size: number): void {
    if (offset > this.device.configSize || size > this.device.configSize - offset) {
      throw new RequestError(`config range ${offset}+${size} exceeds the ${this.device.configSize}-byte config space`);
    }
  }

  private getConfig(msg: Message): void {
    const p = msg.payload;
    if (p.kind !== 'config') throw new RequestError('bad payload');
    let data: Uint8Array;
    try {
      this.requireProtocol(ProtocolFeature.CONFIG, msg);
      this.checkConfigRange(p.offset, p.size);
      data = this.device.readConfig(p.offset, p.size);
      if (data.byteLength !== p.size) throw new DeviceError(`device returned ${data.byteLength} config bytes for ${p.size}`);
    } catch (err) {
      this.log.warn(`GET_CONFIG refused: ${(err as Error).message}`);
      // An empty payload is the protocol's way of saying the read failed.
      this.reply(msg.request, { kind: 'bytes', data: new Uint8Array(0) });
      return;
    }
    this.reply(msg.request, { kind: 'config', offset: p.offset, size: p.size, flags: p.flags, data });
  }

  // -------------------------------------------------------------------------
  // Device state (migration)

  private setDeviceStateFd(msg: Message): void {
    const p = msg.payload;
    const fd = msg.fds[0]!;
    const NO_FD = 0x100n;
    try {
      this.requireProtocol(ProtocolFeature.DEVICE_STATE, msg);
      if (p.kind !== 'deviceStateFd') throw new RequestError('bad payload');
      if (p.phase !== MigrationPhase.STOPPED) throw new RequestError(`migration phase ${p.phase} is not supported (only STOPPED)`);
      if (p.direction !== TransferDirection.SAVE && p.direction !== TransferDirection.LOAD) throw new RequestError(`transfer direction ${p.direction} is unknown`);
      if (this.vrings.some((v) => v.started)) throw new RequestError('device state can only move while every ring is stopped');
      if (this.transfer !== null) this.log.warn('a previous state transfer was never checked; replacing it');
      this.transfer = p.direction === TransferDirection.SAVE ? this.startSave(fd) : this.startLoad(fd);
      this.log.info(`device state transfer started: ${p.direction === TransferDirection.SAVE ? 'save' : 'load'}`);
      this.replyU64(msg.request, NO_FD);
    } catch (err) {
      safeClose(fd);
      this.log.warn(`SET_DEVICE_STATE_FD refused: ${(err as Error).message}`);
      this.replyU64(msg.request, NO_FD | 1n);
    }
  }

  private startSave(fd: number): StateTransfer {
    const state = this.device.saveState!();
    const transfer: StateTransfer = { direction: TransferDirection.SAVE, error: null, done: Promise.resolve() };
    const sock = new Socket({ fd, readable: false, writable: true });
    transfer.done = new Promise<void>((resolve) => {
      sock.on('error', (err) => {
        transfer.error = err;
        sock.destroy();
        resolve();
      });
      sock.end(state, () => {
        sock.destroy();
        this.log.info(`device state saved: ${state.byteLength} bytes`);
        resolve();
      });
    });
    return transfer;
  }

  private startLoad(fd: number): StateTransfer {
    const transfer: StateTransfer = { direction: TransferDirection.LOAD, error: null, done: Promise.resolve() };
    const sock = new Socket({ fd, readable: true, writable: false });
    const chunks: Buffer[] = [];
    let total = 0;
    transfer.done = new Promise<void>((resolve) => {
      sock.on('data', (chunk: Buffer) => {
        total += chunk.byteLength;
        if (total > this.maxStateBytes) {
          transfer.error = new RequestError(`device state exceeds ${this.maxStateBytes} bytes`);
          sock.destroy();
          resolve();
          return;
        }
        chunks.push(chunk);
      });
      sock.on('error', (err) => {
        transfer.error = err;
        resolve();
      });
      sock.on('end', () => {
        sock.destroy();
        try {
          this.device.loadState!(new Uint8Array(Buffer.concat(chunks)));
          this.log.info(`device state loaded: ${total} bytes`);
        } catch (err) {
          transfer.error = err as Error;
        }
        resolve();
      });
    });
    return transfer;
  }

  private async checkDeviceState(msg: Message): Promise<void> {
    const t = this.transfer;
    this.transfer = null;
    if (t === null) {
      this.log.warn('CHECK_DEVICE_STATE without a transfer');
      this.replyU64(msg.request, 1n);
      return;
    }
    await t.done;
    if (t.error !== null) this.log.warn(`device state ${t.direction === TransferDirection.SAVE ? 'save' : 'load'} failed: ${t.error.message}`);
    this.replyU64(msg.request, t.error === null ? 0n : 1n);
  }

  // -------------------------------------------------------------------------
  // Connection end

  private disconnect(reason: string, error?: Error): void {
    const regions = this.memory.regionCount;
    const bytes = this.memory.all.reduce((n, r) => n + r.size, 0);
    for (let i = 0; i < this.vrings.length; i++) this.stopVring(i);
    this.vrings.splice(0, this.vrings.length, ...this.vrings.map((_, i) => this.newVring(i)));
    this.memory.clear();
    this.releaseLog();
    if (this.logFd !== null) safeClose(this.logFd);
    this.logFd = null;
    this.transfer = null;
    this.ackedFeatures = 0n;
    this.ackedProtocol = 0n;
    this.status = 0;
    this.device.reset();
    this.attached = false;
    this.conn = null;
    const line = `front-end disconnected after ${this.requestCount} requests: ${reason}; unmapped ${regions} memory regions (${(bytes / 1048576).toFixed(1)} MiB)`;
    if (error) this.log.warn(line);
    else this.log.info(line);
  }
}

/**
 * Why `fd` cannot take eventfd writes (8-byte counter adds), or null. A call
 * or error fd that is not an eventfd would be written as if it were one: a
 * regular file would grow, a full blocking pipe would block the loop.
 */
function notAnEventfd(fd: number): string | null {
  let target: string;
  try {
    target = readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return null; // No /proc to ask: take the front-end's word for it.
  }
  if (target === 'anon_inode:[eventfd]') return null;
  if (target.startsWith('/')) return `is not an eventfd (a regular file? ${target})`;
  return `is not an eventfd (${target})`;
}

function u64(p: Payload): bigint {
  if (p.kind !== 'u64') throw new RequestError('bad payload');
  return p.value;
}

function vringState(p: Payload): { index: number; num: number } {
  if (p.kind !== 'vringState') throw new RequestError('bad payload');
  return p;
}

function describePayload(p: Payload): string {
  switch (p.kind) {
    case 'none':
      return '';
    case 'u64':
      return ` 0x${p.value.toString(16)}`;
    case 'vringState':
      return ` vq ${p.index} num ${p.num}`;
    case 'vringAddr':
      return ` vq ${p.index} flags ${p.flags}`;
    case 'memTable':
      return ` ${p.regions.length} regions`;
    case 'config':
      return ` offset ${p.offset} size ${p.size}`;
    default:
      return ` (${p.kind})`;
  }
}

export { ProtocolError };
