/**
 * A host-side RDMA device without a VM: an engine (soft-RoCE) driven
 * directly, with "guest memory" that is a local memfd region and the
 * device's own MR table and MemoryAccess, so remote keys, bounds and rights
 * are checked exactly as for a guest. It stands where the device model
 * stands (EngineHost): work requests get tokens, completions land in one
 * completion queue that callers poll or await.
 *
 * Why not the full RdmaDevice through the reference driver: the peer tool
 * needs QPs and memory, not virtqueues; going through the engine keeps the
 * tool small and its failures about the wire, which is what it tests.
 */
import { native } from '../../virtio/sys/native.js';
import { GuestMemory, MappedRegion } from '../../virtio/memory/guest-memory.js';
import type { Logger } from '../../virtio/log.js';
import { Access, QpState, QpType, type SendOp, WcStatus } from '../abi/constants.js';
import { GuestMemoryAccess } from '../device/memory-access.js';
import { MrTable } from '../device/mr-table.js';
import { resetQpAttributes, type AddressVector, type Completion, type Engine, type EngineHost, type GrhLayout, type MemoryAccess, type QpAttributes, type Sge } from '../engine/engine.js';

const PAGE = 4096;
/** Where the local region sits in the device's "guest-physical" space (and so the MR addresses peers see). */
const REGION_GPA = 0x1000_0000;
const PD = 1;
/** QP attribute mask bits are not interpreted by the soft-RoCE engine; the device model validated them. */
const MASK_ALL = 0xffff_ffff;

export class PeerError extends Error {
  override readonly name = 'PeerError';
}

export interface PeerMr {
  /** Address peers and SGEs use (also the offset base of `bytes`). */
  addr: bigint;
  length: number;
  lkey: number;
  rkey: number;
  /** The MR's bytes, for filling and checking payloads. */
  bytes: Uint8Array;
  sge(offset: number, length: number): Sge;
}

export interface PeerCompletion extends Completion {
  qpn: number;
  wrId: bigint;
  /** True for receive completions. */
  recv: boolean;
}

export interface PeerSend {
  wrId: bigint;
  opcode: SendOp;
  flags: number;
  sges: Sge[];
  imm?: number;
  remoteAddr?: bigint;
  rkey?: number;
  ud?: { av: AddressVector; remoteQpn: number; remoteQkey: number };
}

export class PeerDevice implements EngineHost {
  readonly memory: MemoryAccess;
  private readonly fd: number;
  private readonly buffer: SharedArrayBuffer;
  private readonly u8: Uint8Array;
  private readonly mrs: MrTable;
  private allocated = 0;
  private nextToken = 1;
  private readonly wrIds = new Map<number, bigint>();
  private readonly attrs = new Map<number, QpAttributes>();
  private readonly cq: PeerCompletion[] = [];
  private waiter: (() => void) | null = null;
  /** QPs the engine moved to ERR, with the reason. */
  readonly failures: { qpn: number; reason: string }[] = [];
  private closed = false;

  constructor(
    private readonly engine: Engine,
    private readonly gids: readonly Uint8Array[],
    readonly log: Logger,
    memoryBytes = 16 << 20,
  ) {
    const size = Math.ceil(memoryBytes / PAGE) * PAGE;
    this.fd = native.memfdCreate('vrdma-peer', size);
    this.buffer = native.mmap(this.fd, 0, size, true);
    this.u8 = new Uint8Array(this.buffer);
    const mem = new GuestMemory(1);
    // The user address is never dereferenced: only the vhost-user ring code uses it.
    mem.replace([new MappedRegion(REGION_GPA, size, REGION_GPA, 0, this.buffer, null)]);
    this.mrs = new MrTable(64, mem, BigInt(size));
    this.memory = new GuestMemoryAccess(this.mrs, mem);
    engine.attach(this);
  }

  private alloc(bytes: number): number {
    const at = this.allocated;
    const n = Math.ceil(bytes / PAGE) * PAGE;
    if (at + n > this.u8.length) throw new PeerError(`peer memory exhausted: ${bytes} bytes wanted, ${this.u8.length - at} left`);
    this.allocated += n;
    return at;
  }

  /** Registers `length` bytes of fresh local memory as one MR with `access`. */
  registerMr(length: number, access: number): PeerMr {
    if (!Number.isInteger(length) || length <= 0) throw new PeerError(`MR length ${length}`);
    const off = this.alloc(length);
    const npages = Math.ceil(length / PAGE);
    const listOff = this.alloc(npages * 8);
    const dv = new DataView(this.buffer, listOff, npages * 8);
    for (let i = 0; i < npages; i++) dv.setBigUint64(i * 8, BigInt(REGION_GPA + off + i * PAGE), true);
    const addr = BigInt(REGION_GPA + off);
    const mr = this.mrs.register(PD, access | Access.LOCAL_WRITE, addr, BigInt(length), BigInt(REGION_GPA + listOff), npages);
    return {
      addr,
      length,
      lkey: mr.lkey,
      rkey: mr.rkey,
      bytes: this.u8.subarray(off, off + length),
      sge: (offset, len) => ({ addr: addr + BigInt(offset), length: len, lkey: mr.lkey }),
    };
  }

  /** A view of local memory at a device address, inside or outside any MR (tests, diagnostics). */
  peek(addr: bigint, length: number): Uint8Array {
    const off = Number(addr) - REGION_GPA;
    if (!Number.isInteger(length) || length < 0 || off < 0 || off + length > this.u8.length) throw new PeerError(`0x${addr.toString(16)}+${length} is outside peer memory`);
    return this.u8.subarray(off, off + length);
  }

  createQp(type: QpType, maxSendWr: number, maxRecvWr: number): number {
    const qpn = this.engine.createQp({ type, pdn: PD, maxSendWr, maxRecvWr }, null, () => false);
    if (qpn === null) throw new PeerError(`the ${this.engine.name} engine refused a ${QpType[type]} QP`);
    this.attrs.set(qpn, resetQpAttributes());
    return qpn;
  }

  /** Moves a QP to `changes.state` with the other attributes merged over its current ones. */
  modifyQp(qpn: number, changes: Partial<QpAttributes> & { state: QpState }): void {
    const cur = this.attrs.get(qpn);
    if (cur === undefined) throw new PeerError(`no QP ${qpn}`);
    const next: QpAttributes = { ...cur, ...changes };
    this.attrs.set(qpn, next);
    this.engine.modifyQp(qpn, next, MASK_ALL);
  }

  postRecv(qpn: number, wrId: bigint, sges: Sge[]): void {
    const token = this.nextToken++;
    this.wrIds.set(token, wrId);
    let length = 0;
    for (const s of sges) length += s.length;
    this.engine.postRecv(qpn, { wrId, sges, length }, token);
  }

  postSend(qpn: number, wr: PeerSend): void {
    const token = this.nextToken++;
    this.wrIds.set(token, wr.wrId);
    let length = 0;
    for (const s of wr.sges) length += s.length;
    this.engine.postSend(
      qpn,
      {
        wrId: wr.wrId,
        opcode: wr.opcode,
        flags: wr.flags,
        sges: wr.sges,
        inline: null,
        length,
        imm: wr.imm ?? 0,
        remoteAddr: wr.remoteAddr ?? 0n,
        rkey: wr.rkey ?? 0,
        compareAdd: 0n,
        swap: 0n,
        ud: wr.ud ?? null,
      },
      token,
    );
  }

  /** The oldest completion, if any. */
  poll(): PeerCompletion | undefined {
    return this.cq.shift();
  }

  /** The oldest completion, waiting up to `timeoutMs`; a PeerError names what was awaited on timeout or QP failure. */
  async next(timeoutMs: number, what: string): Promise<PeerCompletion> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const c = this.cq.shift();
      if (c !== undefined) return c;
      if (this.failures.length > 0) {
        const f = this.failures[0]!;
        throw new PeerError(`qpn 0x${f.qpn.toString(16)} failed while waiting for ${what}: ${f.reason}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new PeerError(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  private push(qpn: number, token: number, c: Completion, recv: boolean): void {
    const wrId = this.wrIds.get(token) ?? -1n;
    this.wrIds.delete(token);
    this.cq.push({ ...c, qpn, wrId, recv });
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  sendDone(qpn: number, token: number, completion: Completion): void {
    // Every WR completes here, signalled or not: the runners sign every WR they count.
    this.push(qpn, token, completion, false);
  }

  recvDone(qpn: number, token: number, completion: Completion): void {
    this.push(qpn, token, completion, true);
  }

  qpFailed(qpn: number, reason: string): void {
    this.log.warn(`qpn 0x${qpn.toString(16)}: failed: ${reason}`);
    this.failures.push({ qpn, reason });
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  gid(index: number): Uint8Array | null {
    return this.gids[index] ?? null;
  }

  /** The stock tools on the other end run on RoCEv2 GIDs: their layout. */
  readonly grhLayout: GrhLayout = 'rocev2';

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.engine.close();
    native.munmap(this.buffer);
    native.close(this.fd);
  }
}

export function statusName(s: WcStatus): string {
  return WcStatus[s] ?? `status ${s}`;
}

export { QpState, QpType };
