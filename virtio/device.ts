/**
 * What a virtio device implements to be served over vhost-user. The
 * protocol handler owns the socket, memory table and rings; the device sees
 * only queues, guest memory and its own config/state.
 */
import type { GuestMemory } from './memory/guest-memory.js';
import type { SplitVirtqueue } from './queue/split-queue.js';
import type { Logger } from './log.js';

/** A failure the device reports for a request (bad config access, bad state blob...). */
export class DeviceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DeviceError';
  }
}

/** What the handler gives a device when the driver starts using it. */
export interface DeviceContext {
  readonly memory: GuestMemory;
  readonly log: Logger;
  /** Queue `index`; the device must check {@link DeviceContext.isRunning} before touching it outside handleQueue. */
  queue(index: number): SplitVirtqueue;
  /** True when the ring is set up, enabled, and not stopped by GET_VRING_BASE. */
  isRunning(index: number): boolean;
  /** Interrupts the driver for queue `index` if it asked for it. */
  notify(index: number): void;
}

export interface VirtioDevice {
  /** Short name for logs ("rng", "rdma"). */
  readonly name: string;
  /** Virtio device ID (4 = entropy, 42 = RDMA). */
  readonly deviceId: number;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  /** Device feature bits, VIRTIO_F_VERSION_1 included; ring and vhost bits are added by the handler. */
  readonly features: bigint;
  /** Bytes of config space (0 = none; at most 256). */
  readonly configSize: number;

  readConfig(offset: number, size: number): Uint8Array;
  /** `fromMigration` is the vhost-user flag 1: a restore, allowed to write read-only fields. */
  writeConfig(offset: number, data: Uint8Array, fromMigration: boolean): void;

  /** Called once per connection before any queue work. */
  attach(ctx: DeviceContext): void;
  /** The features the driver accepted. */
  setAckedFeatures(features: bigint): void;
  /** The driver's status byte changed (SET_STATUS). */
  setStatus?(status: number): void;
  /** The driver kicked queue `index` (it is running). */
  handleQueue(index: number): void;
  /**
   * True when the device alone decides when queue `index` interrupts the
   * driver (through DeviceContext.notify); the handler then does not
   * interrupt after handleQueue. An RDMA CQ interrupts only when armed.
   */
  notifiesItself?(index: number): boolean;
  /** Queue `index` stopped (GET_VRING_BASE) or was disabled. */
  queueStopped?(index: number): void;
  /** Back to the state of a newly created device: driver reset or front-end gone. */
  reset(): void;

  /** Present when the device can migrate its state (VHOST_USER_PROTOCOL_F_DEVICE_STATE). */
  saveState?(): Uint8Array;
  loadState?(state: Uint8Array): void;
}
