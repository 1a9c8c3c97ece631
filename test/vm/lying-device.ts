/**
 * A virtio-rdma device that lies to the guest driver, for testing the
 * driver's distrust of its device. It wraps a real RdmaDevice and rewrites
 * what the driver reads from it: config space, control answers (status,
 * response bytes, used length, or no answer at all) and CQEs. Everything
 * else is the real device, so the driver meets a lie in the middle of
 * otherwise correct behaviour, as it would with a buggy or hostile device.
 *
 * The lies work at the queue boundary: the wrapper hands the device queue
 * views whose popInto/pushUsed it watches, and rewrites the chain's
 * writable bytes just before the used element is published.
 */
import { CtrlHeader, Cqe } from '../../backend/abi/structs.js';
import type { RdmaDevice } from '../../backend/device/rdma-device.js';
import type { DeviceContext, VirtioDevice } from '../../virtio/device.js';
import type { DescriptorChain } from '../../virtio/queue/descriptor-chain.js';
import type { SplitVirtqueue } from '../../virtio/queue/split-queue.js';

export interface Lie {
  /** Device feature bits to hide (an older device that does not offer them). */
  hideFeatures?: bigint;
  /** Rewrites the whole config space (QEMU re-reads it on every guest access). */
  config?(bytes: Uint8Array): void;
  /**
   * Rewrites the answer to control command `cmd`: `answer` holds the status
   * and response as the device wrote them (`used` bytes). Returns the used
   * length to publish, or null to never answer.
   */
  answer?(cmd: number, answer: Uint8Array, used: number): number | null;
  /** Rewrites a CQE (`cqe`, Cqe.size bytes); returns the used length to publish. */
  cqe?(cqe: Uint8Array): number;
}

/** How often each kind of lie was told, for the test to check the lie happened. */
export interface LieCounts {
  config: number;
  answers: number;
  withheld: number;
  cqes: number;
}

const CONTROL_VQ = 0;

export class LyingRdmaDevice implements VirtioDevice {
  readonly name: string;
  readonly deviceId: number;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly features: bigint;
  readonly configSize: number;
  readonly counts: LieCounts = { config: 0, answers: 0, withheld: 0, cqes: 0 };
  /** The wrapped device, seen through the interface the handler uses. */
  private readonly inner: VirtioDevice;
  private readonly cqSlots: number;

  constructor(
    rdma: RdmaDevice,
    private readonly lie: Lie,
  ) {
    this.inner = rdma;
    this.cqSlots = rdma.limits.numCqSlots;
    this.name = `lying-${rdma.name}`;
    this.deviceId = rdma.deviceId;
    this.numQueues = rdma.numQueues;
    this.maxQueueSize = rdma.maxQueueSize;
    this.features = rdma.features & ~(lie.hideFeatures ?? 0n);
    this.configSize = rdma.configSize;
  }

  readConfig(offset: number, size: number): Uint8Array {
    if (this.lie.config === undefined) return this.inner.readConfig(offset, size);
    const all = this.inner.readConfig(0, this.configSize).slice();
    this.lie.config(all);
    this.counts.config++;
    return all.slice(offset, offset + size);
  }

  writeConfig(offset: number, data: Uint8Array, fromMigration: boolean): void {
    this.inner.writeConfig(offset, data, fromMigration);
  }

  attach(ctx: DeviceContext): void {
    const views = new Map<SplitVirtqueue, SplitVirtqueue>();
    const cqSlots = this.cqSlots;
    const view = (index: number, q: SplitVirtqueue): SplitVirtqueue => {
      if (index === CONTROL_VQ && this.lie.answer !== undefined) return this.watch(q, this.controlHook());
      if (index >= 1 && index <= cqSlots && this.lie.cqe !== undefined) return this.watch(q, this.cqeHook());
      return q;
    };
    this.inner.attach({
      memory: ctx.memory,
      log: ctx.log,
      isRunning: (i) => ctx.isRunning(i),
      notify: (i) => ctx.notify(i),
      queue: (i) => {
        const q = ctx.queue(i);
        let v = views.get(q);
        if (v === undefined) views.set(q, (v = view(i, q)));
        return v;
      },
    });
  }

  setAckedFeatures(features: bigint): void {
    this.inner.setAckedFeatures(features);
  }

  setStatus(status: number): void {
    this.inner.setStatus?.(status);
  }

  handleQueue(index: number): void {
    this.inner.handleQueue(index);
  }

  notifiesItself(index: number): boolean {
    return this.inner.notifiesItself?.(index) ?? false;
  }

  queueStopped(index: number): void {
    this.inner.queueStopped?.(index);
  }

  reset(): void {
    this.inner.reset();
  }

  /**
   * A view of `q` that remembers the last chain popped and lets `rewrite`
   * change that chain's answer when it is pushed: the device writes into the
   * chain, then pushes it, always in that order and without another pop of
   * the same queue in between.
   */
  private watch(q: SplitVirtqueue, rewrite: (chain: DescriptorChain, used: number) => number | null): SplitVirtqueue {
    let last: DescriptorChain | null = null;
    return new Proxy(q, {
      get(target, prop, receiver) {
        if (prop === 'popInto') {
          return (chain: DescriptorChain): boolean => {
            const got = target.popInto(chain);
            last = got ? chain : null;
            return got;
          };
        }
        if (prop === 'pushUsed') {
          return (head: number, len: number): void => {
            const chain = last;
            last = null;
            const used = chain !== null && chain.head === head ? rewrite(chain, len) : len;
            if (used !== null) target.pushUsed(head, used);
          };
        }
        const v: unknown = Reflect.get(target, prop, receiver);
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
  }

  private controlHook(): (chain: DescriptorChain, used: number) => number | null {
    const header = new Uint8Array(CtrlHeader.size);
    return (chain, used) => {
      if (chain.read(header, 0, 0, header.length) < header.length) return used;
      const cmd = CtrlHeader.decodeBytes(header).cmd;
      const answer = readWritable(chain, used);
      const out = this.lie.answer!(cmd, answer, used);
      if (out === null) {
        this.counts.withheld++;
        return null;
      }
      if (out !== used || !sameBytes(answer, readWritable(chain, used))) this.counts.answers++;
      chain.write(answer, 0, 0, answer.length);
      return out;
    };
  }

  private cqeHook(): (chain: DescriptorChain, used: number) => number | null {
    return (chain, used) => {
      if (used !== Cqe.size) return used; // a buffer handed back unused
      const cqe = readWritable(chain, used);
      const out = this.lie.cqe!(cqe);
      chain.write(cqe, 0, 0, cqe.length);
      this.counts.cqes++;
      return out;
    };
  }
}

/** The first `len` bytes of a chain's device-writable part, as they are now. */
function readWritable(chain: DescriptorChain, len: number): Uint8Array {
  const out = new Uint8Array(len);
  const mem = chain.memory!;
  let done = 0;
  for (let i = chain.readableCount; i < chain.count && done < len; i++) {
    const n = Math.min(chain.length[i]!, len - done);
    const off = chain.offset[i]!;
    out.set(mem.region(chain.regionIndex[i]!).u8.subarray(off, off + n), done);
    done += n;
  }
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
