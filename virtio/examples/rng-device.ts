/**
 * virtio-rng (device ID 4) on the vhost-user library: the smallest real
 * device a stock guest driver binds to. Each device-writable buffer the
 * driver posts is filled with bytes from the host's CSPRNG.
 */
import { randomFillSync } from 'node:crypto';
import type { DeviceContext, VirtioDevice } from '../device.js';
import { DeviceError } from '../device.js';
import { DescriptorChain } from '../queue/descriptor-chain.js';
import { VIRTIO_F_VERSION_1, bit } from '../vhost-user/protocol.js';
import type { SplitVirtqueue } from '../queue/split-queue.js';

/** Most bytes handed out per request; the Linux driver asks for far less. */
const MAX_REQUEST = 64 * 1024;

export class RngDevice implements VirtioDevice {
  readonly name = 'rng';
  readonly deviceId = 4;
  readonly numQueues = 1;
  readonly maxQueueSize = 1024;
  readonly features = bit(VIRTIO_F_VERSION_1);
  readonly configSize = 0;

  /** Bytes written into guest buffers since the device was created. */
  bytesServed = 0;
  requestsServed = 0;

  private ctx: DeviceContext | null = null;
  private queue: SplitVirtqueue | null = null;
  private readonly chain = new DescriptorChain();
  private readonly scratch = new Uint8Array(MAX_REQUEST);
  private readonly serveOne = (c: DescriptorChain): void => {
    const n = Math.min(c.writableBytes, MAX_REQUEST);
    randomFillSync(this.scratch, 0, n);
    const written = c.write(this.scratch, 0, 0, n);
    this.queue!.pushUsed(c.head, written);
    this.bytesServed += written;
    this.requestsServed++;
  };

  readConfig(): Uint8Array {
    throw new DeviceError('virtio-rng has no config space');
  }

  writeConfig(): void {
    throw new DeviceError('virtio-rng has no config space');
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  setAckedFeatures(): void {}

  handleQueue(index: number): void {
    this.queue = this.ctx!.queue(index);
    this.queue.drain(this.chain, this.serveOne);
  }

  reset(): void {
    this.ctx = null;
    this.queue = null;
  }
}
