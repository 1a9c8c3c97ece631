/**
 * A test device with verifiable output: every chain's device-readable bytes
 * are copied into its device-writable part. Tests and benchmarks use it to
 * check every byte that crosses a queue. It has a small config space and
 * migratable state so those protocol paths are exercised too.
 *
 * Config (16 bytes, little-endian): u64 magic "VRDMAECH", u64 chains served.
 * State: the same counter, versioned.
 */
import type { DeviceContext, VirtioDevice } from '../device.js';
import { DeviceError } from '../device.js';
import { DescriptorChain } from '../queue/descriptor-chain.js';
import { VIRTIO_F_VERSION_1, bit } from '../vhost-user/protocol.js';
import type { SplitVirtqueue } from '../queue/split-queue.js';

export const ECHO_DEVICE_ID = 0xfffe;
export const ECHO_MAGIC = 0x4843454d44525256n; // "VRDMAECH" little-endian
const STATE_VERSION = 1;
const MAX_CHAIN_BYTES = 1 << 20;

export class EchoDevice implements VirtioDevice {
  readonly name = 'echo';
  readonly deviceId = ECHO_DEVICE_ID;
  readonly maxQueueSize = 1024;
  readonly features = bit(VIRTIO_F_VERSION_1);
  readonly configSize = 16;

  chainsServed = 0n;
  bytesEchoed = 0;

  private ctx: DeviceContext | null = null;
  private queue: SplitVirtqueue | null = null;
  private readonly chain = new DescriptorChain();
  private readonly scratch = new Uint8Array(MAX_CHAIN_BYTES);
  private readonly echoOne = (c: DescriptorChain): void => {
    const n = Math.min(c.readableBytes, c.writableBytes, MAX_CHAIN_BYTES);
    c.read(this.scratch, 0, 0, n);
    const written = c.write(this.scratch, 0, 0, n);
    this.queue!.pushUsed(c.head, written);
    this.bytesEchoed += written;
    this.chainsServed++;
  };

  constructor(readonly numQueues = 1) {}

  readConfig(offset: number, size: number): Uint8Array {
    const cfg = new Uint8Array(this.configSize);
    const dv = new DataView(cfg.buffer);
    dv.setBigUint64(0, ECHO_MAGIC, true);
    dv.setBigUint64(8, this.chainsServed, true);
    return cfg.slice(offset, offset + size);
  }

  writeConfig(): void {
    throw new DeviceError('echo config space is read-only');
  }

  attach(ctx: DeviceContext): void {
    this.ctx = ctx;
  }

  setAckedFeatures(): void {}

  handleQueue(index: number): void {
    this.queue = this.ctx!.queue(index);
    this.queue.drain(this.chain, this.echoOne);
  }

  /** A reset device starts counting from zero again. */
  reset(): void {
    this.ctx = null;
    this.queue = null;
    this.chainsServed = 0n;
    this.bytesEchoed = 0;
  }

  saveState(): Uint8Array {
    const out = new Uint8Array(12);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, STATE_VERSION, true);
    dv.setBigUint64(4, this.chainsServed, true);
    return out;
  }

  loadState(state: Uint8Array): void {
    if (state.byteLength !== 12) throw new DeviceError(`echo state is ${state.byteLength} bytes, expected 12`);
    const dv = new DataView(state.buffer, state.byteOffset, state.byteLength);
    const version = dv.getUint32(0, true);
    if (version !== STATE_VERSION) throw new DeviceError(`echo state version ${version} is not ${STATE_VERSION}`);
    this.chainsServed = dv.getBigUint64(4, true);
  }
}
