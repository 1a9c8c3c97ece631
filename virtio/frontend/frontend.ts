/**
 * A vhost-user front-end: the part QEMU plays. Tests and benchmarks use it to
 * drive a back-end over a real unix socket, with guest RAM in a memfd and
 * real eventfds for kicks and interrupts.
 */
import { native } from '../sys/native.js';
import { Connection, type RawMessage } from '../vhost-user/connection.js';
import { decodeReply, encodeRequest, ProtocolError, type Payload, type PayloadKind, type MemRegion } from '../vhost-user/codec.js';
import { FrontendReq, ProtocolFeature, VHOST_USER_F_PROTOCOL_FEATURES, bit, hasBit, requestName } from '../vhost-user/protocol.js';
import type { DriverQueue } from './driver-queue.js';
import type { GuestRam } from './guest-ram.js';

interface Waiter {
  request: number;
  kind: PayloadKind;
  resolve: (p: Payload) => void;
  reject: (e: Error) => void;
}

export class FrontendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FrontendError';
  }
}

export class VhostUserFrontend {
  private readonly conn: Connection;
  private readonly waiters: Waiter[] = [];
  private closedReason: string | null = null;
  features = 0n;
  protocolFeatures = 0n;
  readonly closed: Promise<string>;

  private constructor(fd: number) {
    let onClosed: (reason: string) => void = () => undefined;
    this.closed = new Promise((resolve) => (onClosed = resolve));
    this.conn = new Connection(fd, {
      onMessage: (m) => this.onMessage(m),
      onClose: (reason) => {
        this.closedReason = reason;
        for (const w of this.waiters.splice(0)) w.reject(new FrontendError(`connection closed while waiting for ${requestName(w.request)}: ${reason}`));
        onClosed(reason);
      },
    });
  }

  static connect(path: string): VhostUserFrontend {
    return new VhostUserFrontend(native.unixConnect(path));
  }

  /** Wraps an already-connected socket (e.g. one end of a socketpair). */
  static fromFd(fd: number): VhostUserFrontend {
    return new VhostUserFrontend(fd);
  }

  get isClosed(): boolean {
    return this.closedReason !== null;
  }

  close(): void {
    this.conn.close('front-end closed');
  }

  private get replyAck(): boolean {
    return hasBit(this.protocolFeatures, ProtocolFeature.REPLY_ACK);
  }

  private onMessage(m: RawMessage): void {
    const w = this.waiters.shift();
    for (const fd of m.fds) native.close(fd);
    if (w === undefined) {
      this.conn.close(`unexpected message ${requestName(m.header.request)} from the back-end`, new ProtocolError('unexpected message'));
      return;
    }
    try {
      w.resolve(decodeReply(w.request, w.kind, m.header, m.payload));
    } catch (err) {
      w.reject(err as Error);
    }
  }

  /** Sends raw bytes (for hostile tests); nothing is awaited. */
  sendRaw(bytes: Uint8Array, fds: readonly number[] = []): void {
    this.conn.send(bytes, fds);
  }

  /** Sends a request and waits for a reply of `kind`. */
  request(req: FrontendReq, payload: Payload, kind: PayloadKind, fds: readonly number[] = [], needReply = false): Promise<Payload> {
    if (this.closedReason !== null) return Promise.reject(new FrontendError(`connection closed: ${this.closedReason}`));
    return new Promise((resolve, reject) => {
      this.waiters.push({ request: req, kind, resolve, reject });
      this.conn.send(encodeRequest(req, payload, needReply), fds);
    });
  }

  /** Sends a request without a reply body; with REPLY_ACK, waits for the status and throws on failure. */
  async send(req: FrontendReq, payload: Payload, fds: readonly number[] = []): Promise<void> {
    if (!this.replyAck) {
      this.conn.send(encodeRequest(req, payload, false), fds);
      return;
    }
    const status = await this.request(req, payload, 'u64', fds, true);
    if (status.kind === 'u64' && status.value !== 0n) throw new FrontendError(`${requestName(req)} failed with status ${status.value}`);
  }

  async u64Request(req: FrontendReq, fds: readonly number[] = []): Promise<bigint> {
    const p = await this.request(req, { kind: 'none' }, 'u64', fds);
    if (p.kind !== 'u64') throw new FrontendError(`${requestName(req)}: bad reply`);
    return p.value;
  }

  // ---------------------------------------------------------------------------
  // The usual start-up sequence, as QEMU does it.

  /** GET_FEATURES, protocol features, SET_OWNER. Acks `want` (masked by what is offered) plus PROTOCOL_FEATURES. */
  async negotiate(want: bigint, wantProtocol: bigint): Promise<void> {
    await this.send(FrontendReq.SET_OWNER, { kind: 'none' });
    const offered = await this.u64Request(FrontendReq.GET_FEATURES);
    if (hasBit(offered, VHOST_USER_F_PROTOCOL_FEATURES)) {
      const offeredProtocol = await this.u64Request(FrontendReq.GET_PROTOCOL_FEATURES);
      this.protocolFeatures = offeredProtocol & wantProtocol;
      await this.send(FrontendReq.SET_PROTOCOL_FEATURES, { kind: 'u64', value: this.protocolFeatures });
    }
    this.features = (offered & want) | (offered & bit(VHOST_USER_F_PROTOCOL_FEATURES));
    await this.send(FrontendReq.SET_FEATURES, { kind: 'u64', value: this.features });
  }

  async setFeatures(features: bigint): Promise<void> {
    this.features = features;
    await this.send(FrontendReq.SET_FEATURES, { kind: 'u64', value: features });
  }

  async setMemTable(rams: readonly GuestRam[]): Promise<void> {
    await this.send(FrontendReq.SET_MEM_TABLE, { kind: 'memTable', regions: rams.map((r) => r.region()) }, rams.map((r) => r.fd));
  }

  async addMemReg(region: MemRegion, fd: number): Promise<void> {
    await this.send(FrontendReq.ADD_MEM_REG, { kind: 'memRegion', region }, [fd]);
  }

  /** SET_VRING_NUM/BASE/ADDR/KICK/CALL, then enable. */
  async startQueue(ram: GuestRam, q: DriverQueue, opts: { logGpa?: number; log?: boolean; base?: number } = {}): Promise<void> {
    const index = q.index;
    await this.send(FrontendReq.SET_VRING_NUM, { kind: 'vringState', index, num: q.size });
    await this.send(FrontendReq.SET_VRING_BASE, { kind: 'vringState', index, num: opts.base ?? 0 });
    await this.send(FrontendReq.SET_VRING_ADDR, {
      kind: 'vringAddr',
      index,
      flags: opts.log ? 1 : 0,
      desc: ram.uva(q.descGpa),
      used: ram.uva(q.usedGpa),
      avail: ram.uva(q.availGpa),
      log: opts.logGpa ?? q.usedGpa,
    });
    await this.send(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: BigInt(index) }, [q.kickFd]);
    await this.send(FrontendReq.SET_VRING_CALL, { kind: 'u64', value: BigInt(index) }, [q.callFd]);
    if (hasBit(this.features, VHOST_USER_F_PROTOCOL_FEATURES)) {
      await this.send(FrontendReq.SET_VRING_ENABLE, { kind: 'vringState', index, num: 1 });
    }
  }

  /** Stops a ring; returns where the back-end stopped. */
  async getVringBase(index: number): Promise<number> {
    const p = await this.request(FrontendReq.GET_VRING_BASE, { kind: 'vringState', index, num: 0 }, 'vringState');
    if (p.kind !== 'vringState') throw new FrontendError('GET_VRING_BASE: bad reply');
    return p.num;
  }

  async getConfig(offset: number, size: number): Promise<Uint8Array> {
    const p = await this.request(FrontendReq.GET_CONFIG, { kind: 'config', offset, size, flags: 0, data: new Uint8Array(size) }, 'config');
    if (p.kind === 'bytes') throw new FrontendError(`GET_CONFIG ${offset}+${size} failed`);
    if (p.kind !== 'config' || p.data.byteLength !== size) throw new FrontendError('GET_CONFIG: bad reply');
    return p.data;
  }

  async getQueueNum(): Promise<number> {
    return Number(await this.u64Request(FrontendReq.GET_QUEUE_NUM));
  }

  async resetDevice(): Promise<void> {
    await this.send(FrontendReq.RESET_DEVICE, { kind: 'none' });
  }

  async setStatus(status: number): Promise<void> {
    await this.send(FrontendReq.SET_STATUS, { kind: 'u64', value: BigInt(status) });
  }

  async getStatus(): Promise<number> {
    return Number(await this.u64Request(FrontendReq.GET_STATUS));
  }

  /** SET_DEVICE_STATE_FD; returns the back-end's u64 answer. */
  async setDeviceStateFd(direction: number, fd: number): Promise<bigint> {
    const p = await this.request(FrontendReq.SET_DEVICE_STATE_FD, { kind: 'deviceStateFd', direction, phase: 0 }, 'u64', [fd]);
    if (p.kind !== 'u64') throw new FrontendError('SET_DEVICE_STATE_FD: bad reply');
    return p.value;
  }

  async checkDeviceState(): Promise<bigint> {
    return this.u64Request(FrontendReq.CHECK_DEVICE_STATE);
  }
}
