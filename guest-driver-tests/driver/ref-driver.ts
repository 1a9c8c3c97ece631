/**
 * The TypeScript reference driver for virtio-rdma (docs/virtio-rdma.md):
 * what a guest driver does, played over a vhost-user front-end with guest
 * RAM in a memfd. It implements the {@link Verbs} interface the conformance
 * scenarios use.
 *
 * Every ABI byte goes through the Struct codecs of backend/abi/structs.ts.
 * The device may run in this process (over a socketpair), so nothing here
 * blocks the event loop: every wait is an FdWatcher on a call eventfd or a
 * short timer.
 *
 * Besides doing its job the driver checks what it can see of the device's
 * side of the contract (used lengths, returned chains, slot numbers, granted
 * sizes) and records every deviation in {@link RefDriver.violations}; a
 * conformance run fails when that list is not empty.
 */
import {
  Cmd,
  CqNotify,
  QpState,
  QpType,
  RDMA_PAGE_SIZE,
  PAGE_LIST_ENTRIES,
  SendFlag,
  Status,
  VIRTIO_RDMA_ABI_VERSION,
  VIRTIO_RDMA_F_IB_GRH,
  WcOpcode,
  WcStatus,
  CONTROL_VQ,
  cqVq,
  numQueues,
  rqVq,
  sqVq,
} from '../../backend/abi/constants.js';
import type { Struct, StructShape, StructValue } from '../../backend/abi/struct.js';
import {
  AhAttr as AhAttrStruct,
  CreateAhReq,
  CreateAhResp,
  CreateCqReq,
  CreateCqResp,
  CreatePdResp,
  CreateQpReq,
  CreateQpResp,
  CtrlHeader,
  CtrlStatus,
  Cqe,
  DeviceConfig,
  Empty,
  GetDmaMrReq,
  HandleReq,
  ModifyQpReq,
  MrResp,
  QpAttrs,
  QueryDeviceResp,
  QueryGidReq,
  QueryGidResp,
  QueryPkeyReq,
  QueryPkeyResp,
  QueryPortReq,
  QueryPortResp,
  QueryQpResp,
  RecvWqe,
  RegMrReq,
  ReqNotifyCqReq,
  SendWqe,
  Sge as SgeStruct,
} from '../../backend/abi/structs.js';
import { DriverQueue, type BufferSegment } from '../../virtio/frontend/driver-queue.js';
import type { VhostUserFrontend } from '../../virtio/frontend/frontend.js';
import { GuestRam } from '../../virtio/frontend/guest-ram.js';
import { native } from '../../virtio/sys/native.js';
import { Socket } from 'node:net';

function readAllFromFd(fd: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const s = new Socket({ fd, readable: true, writable: false });
    const chunks: Uint8Array[] = [];
    s.on('data', (c: Uint8Array) => chunks.push(c));
    s.on('end', () => {
      s.destroy();
      const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.byteLength;
      }
      resolve(out);
    });
    s.on('error', reject);
  });
}

function writeAllToFd(fd: number, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = new Socket({ fd, readable: false, writable: true });
    s.on('error', reject);
    s.end(data, () => {
      s.destroy();
      resolve();
    });
  });
}
import { FrontendReq, VHOST_F_LOG_ALL, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit, hasBit } from '../../virtio/vhost-user/protocol.js';
import { GuestAllocator } from './allocator.js';
import { EventFdWaiter, sleep } from './event-wait.js';
import {
  PostError,
  VerbsError,
  zeroAhAttr,
  type Ah,
  type AhAttr,
  type AsyncEvent,
  type Buffer,
  type BufferOptions,
  type Cq,
  type DeviceAttr,
  type Gid,
  type Mr,
  type Pd,
  type PortAttr,
  type Qp,
  type QpAttr,
  type QpCap,
  type QpInitAttr,
  type QueryQpResult,
  type RecvWr,
  type RegMrOptions,
  type SendWr,
  type Sge,
  type Verbs,
  type Wc,
} from '../verbs.js';

export interface RefDriverOptions {
  name?: string;
  /** Guest RAM size (default 64 MiB) and its guest-physical base (default 4 GiB, so addresses need 64 bits). */
  ramBytes?: number;
  gpaBase?: number;
  controlQueueSize?: number;
  cqQueueSize?: number;
  sqQueueSize?: number;
  rqQueueSize?: number;
  /** Negotiate VIRTIO_F_RING_INDIRECT_DESC and put multi-segment chains in indirect tables. */
  indirect?: boolean;
  /** Split control requests/responses and WQEs (header | SGEs) over two descriptors each. */
  splitChains?: boolean;
  /** Buffers are virtually contiguous over shuffled guest pages (MR page lists are then really exercised). */
  scatterBuffers?: boolean;
  /** Overwrite a page list right after REG_MR returns (the device must have copied it). Default true. */
  scribblePageLists?: boolean;
  /** Throw on the first contract violation instead of recording it. */
  strict?: boolean;
  commandTimeoutMs?: number;
  /** Negotiate VIRTIO_RDMA_F_IB_GRH: UD receives then carry IB GRHs (docs/virtio-rdma.md §6). */
  ibGrh?: boolean;
}

/** The device did something the ABI does not allow, as far as the driver can see. */
export class DriverProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DriverProtocolError';
  }
}

const CQE_BUF = 64;
const CTRL_AREA = 8192;
const CTRL_REQ_MAX = 4096;
const VIRTIO_STATUS_ACK = 1;
const VIRTIO_STATUS_DRIVER = 2;
const VIRTIO_STATUS_DRIVER_OK = 4;
const VIRTIO_STATUS_FEATURES_OK = 8;
const PAGE = RDMA_PAGE_SIZE;

class RefBuffer implements Buffer {
  constructor(
    readonly addr: bigint,
    readonly length: number,
    /** Guest-physical address of every page the buffer touches, from the page holding `addr`. */
    readonly pages: number[],
    /** Allocator addresses to give back. */
    readonly allocations: number[],
    readonly dmaAddr: bigint | undefined,
  ) {}

  get pageOffset(): number {
    return Number(this.addr % BigInt(PAGE));
  }

  gpaAt(offset: number): number {
    const v = this.pageOffset + offset;
    return this.pages[Math.floor(v / PAGE)]! + (v % PAGE);
  }
}

interface CqImpl extends Cq {
  readonly slot: number;
  readonly vq: DriverQueue;
  readonly waiter: EventFdWaiter;
  /** CQE buffer addresses. */
  readonly buffers: number[];
  readonly area: number;
  /** Buffer behind each outstanding head. */
  readonly headBuffer: Map<number, number>;
  /** Used elements taken so far (free-running, for peeking at the used ring). */
  consumed: number;
  error: boolean;
  errorReported: boolean;
  alive: boolean;
}

interface WorkQueue {
  readonly vq: DriverQueue;
  readonly area: number;
  readonly entrySize: number;
  readonly free: number[];
  readonly headEntry: Map<number, number>;
  readonly maxWr: number;
}

interface QpImpl extends Qp {
  readonly slot: number;
  readonly sq: WorkQueue;
  readonly rq: WorkQueue;
  alive: boolean;
}

interface PdImpl extends Pd {
  alive: boolean;
}
interface MrImpl extends Mr {
  alive: boolean;
}
interface AhImpl extends Ah {
  alive: boolean;
}

type Config = StructValue<typeof DeviceConfig.fields>;

/** What a migration's source hands on: the device state and where each ring stopped. */
export interface SavedDevice {
  state: Uint8Array;
  bases: number[];
}

export class RefDriver implements Verbs {
  readonly name: string;
  readonly violations: string[] = [];
  /** The GRH layout UD receives get on this device (VIRTIO_RDMA_F_IB_GRH negotiated or not). */
  grhLayout: 'rocev2' | 'ib' = 'rocev2';
  config!: Config;
  private readonly ram: GuestRam;
  private allocator!: GuestAllocator;
  private readonly opts: Required<Omit<RefDriverOptions, 'name'>>;
  private ctrl!: DriverQueue;
  private ctrlWaiter!: EventFdWaiter;
  private ctrlArea = 0;
  private ctrlChain: Promise<unknown> = Promise.resolve();
  private broken: string | null = null;
  private cqQueues: DriverQueue[] = [];
  private sqQueues: DriverQueue[] = [];
  private rqQueues: DriverQueue[] = [];
  private readonly cqBySlot = new Map<number, CqImpl>();
  private readonly qpBySlot = new Map<number, QpImpl>();
  private readonly cqWaiters = new Map<number, EventFdWaiter>();
  private readonly buffers = new Set<RefBuffer>();
  private readonly asyncEvents: AsyncEvent[] = [];
  private nextVa = 0x5a5a_0000_0000n;
  private rngState = 0x9e3779b9;
  private closed = false;

  private constructor(
    public fe: VhostUserFrontend,
    options: RefDriverOptions,
  ) {
    this.name = options.name ?? 'ref-driver';
    this.opts = {
      ramBytes: options.ramBytes ?? 64 << 20,
      gpaBase: options.gpaBase ?? 0x1_0000_0000,
      controlQueueSize: options.controlQueueSize ?? 64,
      cqQueueSize: options.cqQueueSize ?? 256,
      sqQueueSize: options.sqQueueSize ?? 256,
      rqQueueSize: options.rqQueueSize ?? 256,
      indirect: options.indirect ?? false,
      splitChains: options.splitChains ?? false,
      scatterBuffers: options.scatterBuffers ?? false,
      scribblePageLists: options.scribblePageLists ?? true,
      strict: options.strict ?? false,
      commandTimeoutMs: options.commandTimeoutMs ?? 10_000,
      ibGrh: options.ibGrh ?? false,
    };
    // Keep the first page of guest memory unused so no buffer sits at address 0 of the region.
    this.ram = new GuestRam(this.opts.gpaBase, this.opts.ramBytes, PAGE);
  }

  /** Negotiates, maps guest memory, reads the config, starts every virtqueue and sets DRIVER_OK. */
  static async open(fe: VhostUserFrontend, options: RefDriverOptions = {}): Promise<RefDriver> {
    const d = new RefDriver(fe, options);
    try {
      await d.init();
    } catch (err) {
      d.releaseLocal();
      throw err;
    }
    return d;
  }

  private async init(): Promise<void> {
    const fe = this.fe;
    const want =
      bit(VIRTIO_F_VERSION_1) |
      bit(VIRTIO_F_RING_EVENT_IDX) |
      (this.opts.indirect ? bit(VIRTIO_F_RING_INDIRECT_DESC) : 0n) |
      (this.opts.ibGrh ? bit(VIRTIO_RDMA_F_IB_GRH) : 0n);
    await fe.negotiate(want, (1n << 20n) - 1n);
    if (this.opts.ibGrh && !hasBit(fe.features, VIRTIO_RDMA_F_IB_GRH)) this.violation('device does not offer VIRTIO_RDMA_F_IB_GRH (§1 says it does)');
    this.grhLayout = hasBit(fe.features, VIRTIO_RDMA_F_IB_GRH) ? 'ib' : 'rocev2';
    if (!hasBit(fe.features, VIRTIO_F_VERSION_1)) throw new DriverProtocolError('device does not offer VIRTIO_F_VERSION_1');
    const eventIdx = hasBit(fe.features, VIRTIO_F_RING_EVENT_IDX);
    if (!eventIdx) this.violation('device does not offer VIRTIO_F_RING_EVENT_IDX (§1 says it does)');
    const indirect = this.opts.indirect && hasBit(fe.features, VIRTIO_F_RING_INDIRECT_DESC);
    await fe.setStatus(VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    await fe.setMemTable([this.ram]);

    const cfgBytes = await fe.getConfig(0, DeviceConfig.size);
    this.config = DeviceConfig.decodeBytes(cfgBytes);
    const c = this.config;
    if (c.abi_version !== VIRTIO_RDMA_ABI_VERSION) throw new DriverProtocolError(`config abi_version ${c.abi_version}, this driver speaks ${VIRTIO_RDMA_ABI_VERSION}`);
    if (c.num_cq_slots < 1 || c.num_qp_slots < 1) throw new DriverProtocolError(`config has ${c.num_cq_slots} CQ slots and ${c.num_qp_slots} QP slots`);
    if (c.max_cq > c.num_cq_slots) this.violation(`config max_cq ${c.max_cq} > num_cq_slots ${c.num_cq_slots} (§2: max_cq ≤ C)`);
    if (c.max_qp > c.num_qp_slots) this.violation(`config max_qp ${c.max_qp} > num_qp_slots ${c.num_qp_slots} (§2: max_qp ≤ Q)`);
    if (c.phys_port_cnt !== 1) this.violation(`config phys_port_cnt ${c.phys_port_cnt}, §2 says 1`);
    if (c.reserved.some((b) => b !== 0) || c.reserved0 !== 0 || c.reserved1 !== 0) this.violation('config reserved bytes are not zero');
    const total = numQueues(c.num_cq_slots, c.num_qp_slots);
    const queueNum = await fe.getQueueNum();
    if (queueNum !== total) this.violation(`GET_QUEUE_NUM says ${queueNum} queues; 1 + C + 2Q = ${total}`);

    const qopts = { eventIdx, indirect, maxIndirect: 4 };
    this.ctrl = new DriverQueue(this.ram, CONTROL_VQ, this.opts.controlQueueSize, qopts);
    for (let s = 0; s < c.num_cq_slots; s++) this.cqQueues.push(new DriverQueue(this.ram, cqVq(s), this.opts.cqQueueSize, qopts));
    for (let s = 0; s < c.num_qp_slots; s++) {
      this.sqQueues.push(new DriverQueue(this.ram, sqVq(c.num_cq_slots, s), this.opts.sqQueueSize, qopts));
      this.rqQueues.push(new DriverQueue(this.ram, rqVq(c.num_cq_slots, s), this.opts.rqQueueSize, qopts));
    }
    for (const q of this.allQueues()) await fe.startQueue(this.ram, q);
    this.ctrlWaiter = new EventFdWaiter(this.ctrl.callFd);
    this.ctrlArea = this.ram.alloc(CTRL_AREA, PAGE);
    // Everything after the rings belongs to the driver's own allocator.
    const start = this.ram.alloc(0, PAGE);
    const end = this.ram.gpa + this.ram.size;
    this.allocator = new GuestAllocator(start, end - start);
    await fe.setStatus(VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
  }

  private allQueues(): DriverQueue[] {
    return [this.ctrl, ...this.cqQueues, ...this.sqQueues.flatMap((q, i) => [q, this.rqQueues[i]!])];
  }

  /** Records (or, when strict, throws) a deviation from the ABI. */
  violation(msg: string): void {
    this.violations.push(msg);
    if (this.opts.strict) throw new DriverProtocolError(msg);
  }

  /** Guest memory in use by the driver's allocator (buffers, WQE areas, CQE buffers). */
  get memoryStats(): { bytes: number; allocations: number; buffers: number } {
    return { bytes: this.allocator.used, allocations: this.allocator.liveCount, buffers: this.buffers.size };
  }

  /** Descriptors the device holds, per virtqueue index (only non-zero ones). */
  outstandingDescriptors(): Map<number, number> {
    const m = new Map<number, number>();
    for (const q of this.allQueues()) if (q.outstanding > 0) m.set(q.index, q.outstanding);
    return m;
  }

  /**
   * Live-migrates the device under this driver, as QEMU does in the stopped
   * phase: every ring is stopped on the current back-end (GET_VRING_BASE),
   * its state moves out through SET_DEVICE_STATE_FD and into `dest`, and
   * `dest` gets the same guest memory and rings, resuming at the same
   * bases. Returns the state's size in bytes.
   */
  async migrateTo(dest: VhostUserFrontend): Promise<number> {
    const saved = await this.stopAndSave();
    await this.loadAndRun(dest, saved);
    return saved.state.byteLength;
  }

  /** A migration's source side, as QEMU does it once the VM is stopped: every ring stopped, then the device state saved. */
  async stopAndSave(): Promise<SavedDevice> {
    const queues = this.allQueues();
    const bases: number[] = [];
    for (const q of queues) bases.push(await this.fe.getVringBase(q.index));
    const [mine, theirs] = native.socketPair();
    const saveReply = await this.fe.setDeviceStateFd(0, theirs);
    native.close(theirs);
    if ((saveReply & 0xffn) !== 0n) throw new DriverProtocolError(`SET_DEVICE_STATE_FD (save) failed: 0x${saveReply.toString(16)}`);
    const state = await readAllFromFd(mine);
    if ((await this.fe.checkDeviceState()) !== 0n) throw new DriverProtocolError('CHECK_DEVICE_STATE failed on the source');
    return { state, bases };
  }

  /**
   * The destination side: the state loaded, the rings started at the bases
   * they stopped at, DRIVER_OK; this driver then runs there. Throws when the
   * destination refuses the state (this driver stays on the source).
   */
  async loadAndRun(dest: VhostUserFrontend, saved: SavedDevice): Promise<void> {
    const queues = this.allQueues();
    await dest.negotiate(this.fe.features, this.fe.protocolFeatures);
    await dest.setStatus(VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    await dest.setMemTable([this.ram]);
    const [mine2, theirs2] = native.socketPair();
    const loadReply = await dest.setDeviceStateFd(1, theirs2);
    native.close(theirs2);
    if ((loadReply & 0xffn) !== 0n) throw new DriverProtocolError(`SET_DEVICE_STATE_FD (load) failed: 0x${loadReply.toString(16)}`);
    await writeAllToFd(mine2, saved.state);
    if ((await dest.checkDeviceState()) !== 0n) throw new DriverProtocolError('CHECK_DEVICE_STATE failed on the destination');
    for (let i = 0; i < queues.length; i++) await dest.startQueue(this.ram, queues[i]!, { base: saved.bases[i]! });
    await dest.setStatus(VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
    this.fe.close();
    this.fe = dest;
  }

  /**
   * Turns on dirty logging as QEMU does when a migration starts: a shared
   * log covering guest RAM (SET_LOG_BASE), then VHOST_F_LOG_ALL. Returns
   * whether a guest-physical page was marked, and the log's release.
   */
  async startDirtyLog(): Promise<{ isDirty(gpa: number): boolean; release(): void }> {
    const size = Math.ceil((this.ram.gpa + this.ram.size) / PAGE / 8);
    const fd = native.memfdCreate('vrdma-dirty-log', size);
    const log = native.mmap(fd, 0, size, true);
    const bitmap = new Uint8Array(log);
    try {
      const reply = await this.fe.request(FrontendReq.SET_LOG_BASE, { kind: 'log', size, offset: 0 }, 'u64', [fd]);
      if (reply.kind !== 'u64' || reply.value !== 0n) throw new DriverProtocolError('SET_LOG_BASE refused');
    } finally {
      native.close(fd);
    }
    await this.fe.setFeatures(this.fe.features | (1n << BigInt(VHOST_F_LOG_ALL)));
    return {
      isDirty: (gpa) => (bitmap[Math.floor(gpa / PAGE / 8)]! & (1 << (Math.floor(gpa / PAGE) % 8))) !== 0,
      release: () => native.munmap(log),
    };
  }

  /** The guest-physical pages a buffer lies on, and a copy of one page: what a dirty-log check compares. */
  pagesOf(buf: Buffer): readonly number[] {
    return this.buffer(buf).pages;
  }

  pageCopy(gpa: number): Uint8Array {
    return this.ram.bytes(gpa - (gpa % PAGE), PAGE).slice();
  }

  /** A failed migration: QEMU resumes the VM on the source, whose rings start again where they stopped. */
  async resumeHere(saved: SavedDevice): Promise<void> {
    const queues = this.allQueues();
    for (let i = 0; i < queues.length; i++) await this.fe.startQueue(this.ram, queues[i]!, { base: saved.bases[i]! });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.fe.close();
    await Promise.race([this.fe.closed, sleep(1000)]);
    this.releaseLocal();
  }

  private releaseLocal(): void {
    this.ctrlWaiter?.close();
    for (const w of this.cqWaiters.values()) w.close();
    this.cqWaiters.clear();
    for (const q of this.allQueues().filter((q) => q !== undefined)) q.release();
    this.cqQueues = [];
    this.sqQueues = [];
    this.rqQueues = [];
    this.ram.release();
  }

  // -------------------------------------------------------------------------
  // Control queue

  /**
   * Sends raw bytes as a control command (request = header + body) with a
   * writable part of `writableLen` bytes; resolves with the used length and
   * the writable bytes. One command is in flight at a time.
   */
  rawCommand(request: Uint8Array, writableLen: number): Promise<{ usedLen: number; response: Uint8Array }> {
    const run = async (): Promise<{ usedLen: number; response: Uint8Array }> => {
      if (this.closed) throw new Error(`${this.name}: closed`);
      if (this.broken !== null) throw new DriverProtocolError(`control queue unusable: ${this.broken}`);
      if (request.length > CTRL_REQ_MAX || writableLen > CTRL_AREA - CTRL_REQ_MAX) throw new RangeError('control command too large');
      const reqGpa = this.ctrlArea;
      const respGpa = this.ctrlArea + CTRL_REQ_MAX;
      this.ram.bytes(reqGpa, request.length).set(request);
      this.ram.bytes(respGpa, writableLen).fill(0);
      const segs: BufferSegment[] = [];
      const split = (gpa: number, len: number, writable: boolean): void => {
        if (len === 0) return;
        if (this.opts.splitChains && len > 8) {
          segs.push({ gpa, len: 8, writable }, { gpa: gpa + 8, len: len - 8, writable });
        } else segs.push({ gpa, len, writable });
      };
      split(reqGpa, request.length, false);
      split(respGpa, writableLen, true);
      this.ctrlWaiter.take();
      const head = this.ctrl.add(segs);
      if (head === null) throw new DriverProtocolError('control queue has no free descriptors (a command was never returned)');
      this.ctrl.kick();
      const deadline = Date.now() + this.opts.commandTimeoutMs;
      for (;;) {
        const u = this.ctrl.getUsed();
        if (u !== null) {
          if (u.head !== head) {
            this.broken = `device returned control head ${u.head}, expected ${head}`;
            throw new DriverProtocolError(this.broken);
          }
          return { usedLen: u.len, response: this.ram.bytes(respGpa, writableLen).slice() };
        }
        const left = deadline - Date.now();
        if (left <= 0) {
          this.broken = `control command ${new DataView(request.buffer, request.byteOffset).getUint32(0, true)} not completed in ${this.opts.commandTimeoutMs} ms`;
          throw new DriverProtocolError(this.broken);
        }
        await this.ctrlWaiter.wait(Math.min(left, 20));
      }
    };
    const p = this.ctrlChain.then(run, run);
    this.ctrlChain = p.catch(() => undefined);
    return p;
  }

  /** One control command through the Struct codecs; throws VerbsError on a failure status. */
  async command<Q extends StructShape, P extends StructShape>(cmd: Cmd, reqStruct: Struct<Q>, req: StructValue<Q>, respStruct: Struct<P>): Promise<StructValue<P>> {
    const request = new Uint8Array(CtrlHeader.size + reqStruct.size);
    const dv = new DataView(request.buffer);
    CtrlHeader.encode({ cmd, reserved: 0 }, dv, 0);
    reqStruct.encode(req, dv, CtrlHeader.size);
    const { usedLen, response } = await this.rawCommand(request, CtrlStatus.size + respStruct.size);
    const name = Cmd[cmd] ?? `command ${cmd}`;
    if (usedLen < CtrlStatus.size) {
      this.violation(`${name}: used length ${usedLen}, below the 8-byte status`);
      throw new DriverProtocolError(`${name}: no status returned`);
    }
    const rdv = new DataView(response.buffer);
    const status = CtrlStatus.decode(rdv, 0).status as Status;
    if (status !== Status.OK) {
      if (usedLen !== CtrlStatus.size) this.violation(`${name}: failed with ${Status[status] ?? status} but used length is ${usedLen}, §4 says 8`);
      if (Status[status] === undefined) this.violation(`${name}: status ${status} is not one of §4's`);
      throw new VerbsError(name, status);
    }
    if (usedLen !== CtrlStatus.size + respStruct.size) this.violation(`${name}: succeeded with used length ${usedLen}, §4 says ${CtrlStatus.size + respStruct.size}`);
    return respStruct.decode(rdv, CtrlStatus.size);
  }

  private handleReq(handle: number): StructValue<typeof HandleReq.fields> {
    return { handle, reserved: 0 };
  }

  // -------------------------------------------------------------------------
  // Queries

  async queryDevice(): Promise<DeviceAttr> {
    const r = await this.command(Cmd.QUERY_DEVICE, Empty, Empty.zero(), QueryDeviceResp);
    const c = this.config;
    return {
      fwVer: r.fw_ver,
      nodeGuid: r.node_guid,
      sysImageGuid: r.sys_image_guid,
      maxMrSize: r.max_mr_size,
      pageSizeCap: r.page_size_cap,
      deviceCapFlags: r.device_cap_flags,
      vendorId: r.vendor_id,
      vendorPartId: r.vendor_part_id,
      hwVer: r.hw_ver,
      maxQp: r.max_qp,
      maxQpWr: r.max_qp_wr,
      maxSendSge: r.max_send_sge,
      maxRecvSge: r.max_recv_sge,
      maxSgeRd: r.max_sge_rd,
      maxCq: r.max_cq,
      maxCqe: r.max_cqe,
      maxMr: r.max_mr,
      maxPd: r.max_pd,
      maxQpRdAtom: r.max_qp_rd_atom,
      maxQpInitRdAtom: r.max_qp_init_rd_atom,
      maxAh: r.max_ah,
      maxInlineData: r.max_inline_data,
      maxPkeys: r.max_pkeys,
      atomicCap: r.atomic_cap,
      localCaAckDelay: r.local_ca_ack_delay,
      virtio: {
        numCqSlots: c.num_cq_slots,
        numQpSlots: c.num_qp_slots,
        cqQueueSize: this.opts.cqQueueSize,
        sqQueueSize: this.opts.sqQueueSize,
        rqQueueSize: this.opts.rqQueueSize,
      },
    };
  }

  async queryPort(portNum: number): Promise<PortAttr> {
    const r = await this.command(Cmd.QUERY_PORT, QueryPortReq, { port: portNum, reserved: 0 }, QueryPortResp);
    return {
      state: r.state,
      maxMtu: r.max_mtu,
      activeMtu: r.active_mtu,
      physState: r.phys_state,
      gidTblLen: r.gid_tbl_len,
      portCapFlags: r.port_cap_flags,
      maxMsgSz: r.max_msg_sz,
      pkeyTblLen: r.pkey_tbl_len,
      activeSpeed: r.active_speed,
      activeWidth: r.active_width,
      linkLayer: r.link_layer,
    };
  }

  async queryGid(portNum: number, index: number): Promise<Gid> {
    const r = await this.command(Cmd.QUERY_GID, QueryGidReq, { port: portNum, index }, QueryGidResp);
    return { raw: r.gid, type: r.gid_type };
  }

  async queryPkey(portNum: number, index: number): Promise<number> {
    const r = await this.command(Cmd.QUERY_PKEY, QueryPkeyReq, { port: portNum, index }, QueryPkeyResp);
    return r.pkey;
  }

  // -------------------------------------------------------------------------
  // PD, MR, AH

  async allocPd(): Promise<Pd> {
    const r = await this.command(Cmd.CREATE_PD, Empty, Empty.zero(), CreatePdResp);
    if (r.pdn === 0) this.violation('CREATE_PD returned handle 0');
    const pd: PdImpl = { handle: r.pdn, alive: true };
    return pd;
  }

  async deallocPd(pd: Pd): Promise<void> {
    await this.command(Cmd.DESTROY_PD, HandleReq, this.handleReq(pd.handle), Empty);
    (pd as PdImpl).alive = false;
  }

  async regMr(pd: Pd, buf: Buffer, access: number, opts: RegMrOptions = {}): Promise<Mr> {
    const b = this.buffer(buf);
    const offset = opts.offset ?? 0;
    const length = opts.length ?? b.length - offset;
    if (offset < 0 || length < 0 || offset + length > b.length) throw new RangeError(`MR range ${offset}+${length} is outside the ${b.length}-byte buffer`);
    const startVa = b.pageOffset + offset;
    const iova = opts.iova ?? b.addr + BigInt(offset);
    if (Number(iova % BigInt(PAGE)) !== startVa % PAGE) throw new RangeError('iova must keep the page offset of the buffer');
    const npages = Math.ceil(((startVa % PAGE) + length) / PAGE);
    const first = Math.floor(startVa / PAGE);
    const pages = b.pages.slice(first, first + npages);
    const list = this.buildPageList(pages);
    try {
      const r = await this.command(
        Cmd.REG_MR,
        RegMrReq,
        { pdn: pd.handle, access, iova, length: BigInt(length), page_list: BigInt(list.root), npages, reserved: 0 },
        MrResp,
      );
      this.checkMrResp('REG_MR', r);
      if (this.opts.scribblePageLists) for (const a of list.allocations) this.ram.bytes(a.gpa, a.len).fill(0xff);
      const mr: MrImpl = { handle: r.mrn, pd, lkey: r.lkey, rkey: r.rkey, addr: iova, length, access, alive: true };
      return mr;
    } finally {
      for (const a of list.allocations) this.allocator.release(a.gpa);
    }
  }

  /** Builds a one- or two-level page list (§4 REG_MR) in guest memory. */
  private buildPageList(pages: number[]): { root: number; allocations: Array<{ gpa: number; len: number }> } {
    const allocations: Array<{ gpa: number; len: number }> = [];
    const put = (entries: number[], align: number): number => {
      const len = Math.max(8, entries.length * 8);
      const gpa = this.allocator.alloc(len, align);
      allocations.push({ gpa, len });
      // A page list is a plain array of le64 guest-physical addresses (§4); no struct involved.
      const dv = this.ram.dv;
      entries.forEach((p, i) => dv.setBigUint64(gpa - this.ram.gpa + 8 * i, BigInt(p), true));
      return gpa;
    };
    if (pages.length <= PAGE_LIST_ENTRIES) return { root: put(pages, 8), allocations };
    const level2: number[] = [];
    for (let i = 0; i < pages.length; i += PAGE_LIST_ENTRIES) level2.push(put(pages.slice(i, i + PAGE_LIST_ENTRIES), PAGE));
    return { root: put(level2, 8), allocations };
  }

  private checkMrResp(name: string, r: StructValue<typeof MrResp.fields>): void {
    if (r.mrn === 0) this.violation(`${name} returned handle 0`);
    if (r.lkey !== r.rkey) this.violation(`${name}: lkey 0x${r.lkey.toString(16)} != rkey 0x${r.rkey.toString(16)} (§4: lkey = rkey)`);
    if (r.lkey >>> 8 !== r.mrn) this.violation(`${name}: lkey 0x${r.lkey.toString(16)} is not (mrn ${r.mrn} << 8) | key`);
  }

  async getDmaMr(pd: Pd, access: number): Promise<Mr> {
    const r = await this.command(Cmd.GET_DMA_MR, GetDmaMrReq, { pdn: pd.handle, access }, MrResp);
    this.checkMrResp('GET_DMA_MR', r);
    const mr: MrImpl = { handle: r.mrn, pd, lkey: r.lkey, rkey: r.rkey, addr: BigInt(this.ram.gpa), length: this.ram.size, access, alive: true };
    return mr;
  }

  async deregMr(mr: Mr): Promise<void> {
    await this.command(Cmd.DEREG_MR, HandleReq, this.handleReq(mr.handle), Empty);
    (mr as MrImpl).alive = false;
  }

  async createAh(pd: Pd, attr: AhAttr): Promise<Ah> {
    const r = await this.command(Cmd.CREATE_AH, CreateAhReq, { pdn: pd.handle, reserved: 0, ah: encodeAh(attr) }, CreateAhResp);
    if (r.ahn === 0) this.violation('CREATE_AH returned handle 0');
    const ah: AhImpl = { handle: r.ahn, pd, alive: true };
    return ah;
  }

  async destroyAh(ah: Ah): Promise<void> {
    await this.command(Cmd.DESTROY_AH, HandleReq, this.handleReq(ah.handle), Empty);
    (ah as AhImpl).alive = false;
  }

  // -------------------------------------------------------------------------
  // CQ

  async createCq(cqe: number): Promise<Cq> {
    const r = await this.command(Cmd.CREATE_CQ, CreateCqReq, { cqe, reserved: 0 }, CreateCqResp);
    if (r.cqn === 0) this.violation('CREATE_CQ returned handle 0');
    if (r.cqe !== cqe) this.violation(`CREATE_CQ granted ${r.cqe} CQEs for ${cqe} (§4: the request's value)`);
    const vq = this.cqQueues[r.slot];
    if (vq === undefined) {
      this.violation(`CREATE_CQ returned slot ${r.slot} of ${this.cqQueues.length}`);
      throw new DriverProtocolError(`CREATE_CQ: no CQ slot ${r.slot}`);
    }
    if (this.cqBySlot.has(r.slot)) this.violation(`CREATE_CQ returned slot ${r.slot}, which CQ ${this.cqBySlot.get(r.slot)!.handle} still holds`);
    const granted = r.cqe;
    this.drainStale(vq, `CQ slot ${r.slot}`);
    if (vq.free < granted + 1) throw new DriverProtocolError(`CQ slot ${r.slot}: ${vq.free} free descriptors for ${granted + 1} buffers`);
    const area = this.allocator.alloc((granted + 1) * CQE_BUF, 64);
    const buffers = Array.from({ length: granted + 1 }, (_, i) => area + i * CQE_BUF);
    let waiter = this.cqWaiters.get(r.slot);
    if (waiter === undefined) {
      waiter = new EventFdWaiter(vq.callFd);
      this.cqWaiters.set(r.slot, waiter);
    }
    // An interrupt left over from the slot's previous CQ is not this CQ's.
    waiter.take();
    const cq: CqImpl = {
      handle: r.cqn,
      cqe: granted,
      slot: r.slot,
      vq,
      waiter,
      buffers,
      area,
      headBuffer: new Map(),
      consumed: 0,
      error: false,
      errorReported: false,
      alive: true,
    };
    for (const b of buffers) this.postCqBuffer(cq, b);
    vq.kick();
    this.cqBySlot.set(r.slot, cq);
    return cq;
  }

  private postCqBuffer(cq: CqImpl, gpa: number): void {
    this.ram.bytes(gpa, CQE_BUF).fill(0);
    const head = cq.vq.add([{ gpa, len: Cqe.size, writable: true }]);
    if (head === null) throw new DriverProtocolError(`CQ ${cq.handle}: no descriptor to post a CQE buffer`);
    cq.headBuffer.set(head, gpa);
  }

  /** Takes used elements left on a queue before a new object uses its slot. */
  private drainStale(vq: DriverQueue, what: string): void {
    for (let u = vq.getUsed(); u !== null; u = vq.getUsed()) this.violation(`${what}: device returned head ${u.head} (len ${u.len}) while no object used the slot`);
  }

  private cq(cq: Cq): CqImpl {
    const c = cq as CqImpl;
    if (!c.alive || this.cqBySlot.get(c.slot) !== c) throw new Error(`CQ ${cq.handle} is not a live CQ of ${this.name}`);
    return c;
  }

  private isLiveCq(cq: Cq): cq is CqImpl {
    const c = cq as Partial<CqImpl>;
    return c.alive === true && c.slot !== undefined && this.cqBySlot.get(c.slot) === cq;
  }

  private isLiveQp(qp: Qp): qp is QpImpl {
    const q = qp as Partial<QpImpl>;
    return q.alive === true && q.slot !== undefined && this.qpBySlot.get(q.slot) === qp;
  }

  /** DESTROY_CQ; sent for any handle (a dead one must get ENOENT), bookkeeping only for live CQs. */
  async destroyCq(cq: Cq): Promise<void> {
    await this.command(Cmd.DESTROY_CQ, HandleReq, this.handleReq(cq.handle), Empty);
    if (!this.isLiveCq(cq)) return;
    const c = cq;
    c.alive = false;
    this.cqBySlot.delete(c.slot);
    for (let u = c.vq.getUsed(); u !== null; u = c.vq.getUsed()) {
      c.headBuffer.delete(u.head);
      if (u.len !== 0 && u.len !== Cqe.size) this.violation(`DESTROY_CQ ${c.handle}: buffer returned with used length ${u.len}`);
    }
    if (c.vq.outstanding !== 0) {
      this.violation(`DESTROY_CQ ${c.handle}: device kept ${c.vq.outstanding} CQ buffers (§4: returned with used length 0)`);
      return; // the device may still write there: keep the memory
    }
    this.allocator.release(c.area);
  }

  async reqNotifyCq(cq: Cq, solicitedOnly: boolean): Promise<void> {
    await this.command(Cmd.REQ_NOTIFY_CQ, ReqNotifyCqReq, { cqn: cq.handle, flags: solicitedOnly ? CqNotify.SOLICITED : CqNotify.NEXT_COMPLETION }, Empty);
  }

  /** REQ_NOTIFY_CQ with any flags value (for tests of the flag check). */
  async reqNotifyCqRaw(cq: Cq, flags: number): Promise<void> {
    await this.command(Cmd.REQ_NOTIFY_CQ, ReqNotifyCqReq, { cqn: cq.handle, flags }, Empty);
  }

  async waitCqEvent(cq: Cq, timeoutMs: number): Promise<boolean> {
    const c = this.cq(cq);
    return c.waiter.wait(timeoutMs);
  }

  async pollCq(cq: Cq, max: number): Promise<Wc[]> {
    const c = this.cq(cq);
    const out: Wc[] = [];
    let reposted = false;
    while (out.length < max) {
      const u = c.vq.getUsed();
      if (u === null) break;
      c.consumed = (c.consumed + 1) & 0xffff;
      const gpa = c.headBuffer.get(u.head);
      c.headBuffer.delete(u.head);
      if (gpa === undefined) throw new DriverProtocolError(`CQ ${c.handle}: head ${u.head} has no buffer`);
      reposted = true;
      if (u.len !== Cqe.size) {
        this.violation(`CQ ${c.handle}: CQE buffer returned with used length ${u.len}, §7 says 48`);
        this.postCqBuffer(c, gpa);
        continue;
      }
      const e = Cqe.decode(this.ram.dv, gpa - this.ram.gpa);
      this.postCqBuffer(c, gpa);
      if (e.opcode === WcOpcode.CQ_ERROR) {
        if (e.status !== WcStatus.GENERAL_ERR) this.violation(`CQ ${c.handle}: CQ error event with status ${e.status}, §7 says GENERAL_ERR (21)`);
        c.error = true;
        if (!c.errorReported) {
          c.errorReported = true;
          this.asyncEvents.push({ type: 'CQ_ERR', cq: c, qpNum: e.qp_num, status: e.status });
        }
        continue;
      }
      if (c.error) this.violation(`CQ ${c.handle}: completion (wr_id ${e.wr_id}) after the CQ error event (§7: dropped)`);
      out.push({
        wrId: e.wr_id,
        status: e.status,
        opcode: e.opcode,
        vendorErr: e.vendor_err,
        byteLen: e.byte_len,
        immData: e.imm_data,
        qpNum: e.qp_num,
        srcQp: e.src_qp,
        wcFlags: e.wc_flags,
        pkeyIndex: e.pkey_index,
        sl: e.sl,
        portNum: e.port_num,
      });
    }
    if (reposted) c.vq.kick();
    return out;
  }

  /** Looks at used elements not taken yet for CQ error events, without consuming anything. */
  private peekCqErrors(): void {
    for (const c of this.cqBySlot.values()) {
      if (c.errorReported) continue;
      const usedOff = c.vq.usedGpa - this.ram.gpa;
      const idx = Atomics.load(this.ram.u16, (usedOff + 2) >> 1);
      for (let i = c.consumed; i !== idx; i = (i + 1) & 0xffff) {
        const e = usedOff + 4 + 8 * (i % c.vq.size);
        const head = this.ram.dv.getUint32(e, true);
        const len = this.ram.dv.getUint32(e + 4, true);
        const gpa = c.headBuffer.get(head);
        if (gpa === undefined || len !== Cqe.size) continue;
        const cqe = Cqe.decode(this.ram.dv, gpa - this.ram.gpa);
        if (cqe.opcode === WcOpcode.CQ_ERROR) {
          c.errorReported = true;
          this.asyncEvents.push({ type: 'CQ_ERR', cq: c, qpNum: cqe.qp_num, status: cqe.status });
          break;
        }
      }
    }
  }

  async getAsyncEvent(timeoutMs: number): Promise<AsyncEvent | null> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      this.peekCqErrors();
      const e = this.asyncEvents.shift();
      if (e !== undefined) return e;
      if (Date.now() >= deadline) return null;
      await sleep(Math.min(5, Math.max(1, deadline - Date.now())));
    }
  }

  // -------------------------------------------------------------------------
  // QP

  async createQp(pd: Pd, init: QpInitAttr): Promise<Qp> {
    const cap = init.cap;
    const r = await this.command(
      Cmd.CREATE_QP,
      CreateQpReq,
      {
        pdn: pd.handle,
        qp_type: init.qpType,
        sq_sig_all: init.sqSigAll ? 1 : 0,
        reserved0: 0,
        send_cqn: init.sendCq.handle,
        recv_cqn: init.recvCq.handle,
        max_send_wr: cap.maxSendWr,
        max_recv_wr: cap.maxRecvWr,
        max_send_sge: cap.maxSendSge,
        max_recv_sge: cap.maxRecvSge,
        max_inline_data: cap.maxInlineData,
        reserved1: 0,
      },
      CreateQpResp,
    );
    if (r.qpn === 0 || r.qpn > 0xffffff) this.violation(`CREATE_QP returned QPN 0x${r.qpn.toString(16)} (§3: 24 bits, non-zero)`);
    const granted: QpCap = {
      maxSendWr: r.max_send_wr,
      maxRecvWr: r.max_recv_wr,
      maxSendSge: r.max_send_sge,
      maxRecvSge: r.max_recv_sge,
      maxInlineData: r.max_inline_data,
    };
    for (const k of Object.keys(granted) as (keyof QpCap)[]) {
      if (granted[k] < cap[k]) this.violation(`CREATE_QP granted ${k} ${granted[k]} below the requested ${cap[k]}`);
    }
    const sqVq = this.sqQueues[r.slot];
    const rqVq = this.rqQueues[r.slot];
    if (sqVq === undefined || rqVq === undefined) {
      this.violation(`CREATE_QP returned slot ${r.slot} of ${this.sqQueues.length}`);
      throw new DriverProtocolError(`CREATE_QP: no QP slot ${r.slot}`);
    }
    if (this.qpBySlot.has(r.slot)) this.violation(`CREATE_QP returned slot ${r.slot}, which QP 0x${this.qpBySlot.get(r.slot)!.qpNum.toString(16)} still holds`);
    if (granted.maxSendWr > sqVq.size || granted.maxRecvWr > rqVq.size) this.violation(`CREATE_QP granted ${granted.maxSendWr}/${granted.maxRecvWr} WRs, over the ring sizes ${sqVq.size}/${rqVq.size}`);
    this.drainStale(sqVq, `SQ of QP slot ${r.slot}`);
    this.drainStale(rqVq, `RQ of QP slot ${r.slot}`);
    const sendEntry = roundUp(SendWqe.size + Math.max(SgeStruct.size * granted.maxSendSge, granted.maxInlineData), 64);
    const recvEntry = roundUp(RecvWqe.size + SgeStruct.size * granted.maxRecvSge, 16);
    const qp: QpImpl = {
      qpNum: r.qpn,
      qpType: init.qpType,
      pd,
      sendCq: init.sendCq,
      recvCq: init.recvCq,
      cap: granted,
      slot: r.slot,
      sq: this.workQueue(sqVq, granted.maxSendWr, sendEntry),
      rq: this.workQueue(rqVq, granted.maxRecvWr, recvEntry),
      alive: true,
    };
    this.qpBySlot.set(r.slot, qp);
    return qp;
  }

  private workQueue(vq: DriverQueue, maxWr: number, entrySize: number): WorkQueue {
    const n = Math.max(maxWr, 1);
    const area = this.allocator.alloc(n * entrySize, 64);
    return { vq, area, entrySize, maxWr, free: Array.from({ length: n }, (_, i) => area + (n - 1 - i) * entrySize), headEntry: new Map() };
  }

  private qp(qp: Qp): QpImpl {
    const q = qp as QpImpl;
    if (!q.alive || this.qpBySlot.get(q.slot) !== q) throw new Error(`QP 0x${qp.qpNum.toString(16)} is not a live QP of ${this.name}`);
    return q;
  }

  /** Takes back the WQE chains the device returned (used length 0). */
  private reclaim(qp: QpImpl, wq: WorkQueue, which: string): void {
    for (let u = wq.vq.getUsed(); u !== null; u = wq.vq.getUsed()) {
      const entry = wq.headEntry.get(u.head);
      wq.headEntry.delete(u.head);
      if (entry === undefined) throw new DriverProtocolError(`QP 0x${qp.qpNum.toString(16)} ${which}: head ${u.head} has no WQE`);
      if (u.len !== 0) this.violation(`QP 0x${qp.qpNum.toString(16)} ${which}: WQE chain returned with used length ${u.len}, §5/§6 say 0`);
      wq.free.push(entry);
    }
  }

  /** WQE chains the device still holds for a QP. */
  outstandingWqes(qp: Qp): { send: number; recv: number } {
    const q = qp as QpImpl;
    if (q.alive) {
      this.reclaim(q, q.sq, 'SQ');
      this.reclaim(q, q.rq, 'RQ');
    }
    return { send: q.sq.headEntry.size, recv: q.rq.headEntry.size };
  }

  async modifyQp(qp: Qp, attr: Partial<QpAttr>, attrMask: number): Promise<void> {
    await this.command(Cmd.MODIFY_QP, ModifyQpReq, { qpn: qp.qpNum, attr_mask: attrMask, attr: QpAttrs.encodeBytes(encodeQpAttr(attr)) }, Empty);
    if (!this.isLiveQp(qp)) return;
    const q = qp;
    if ((attrMask & 1) !== 0 && attr.qpState === QpState.RESET) {
      this.reclaim(q, q.sq, 'SQ');
      this.reclaim(q, q.rq, 'RQ');
      const left = q.sq.headEntry.size + q.rq.headEntry.size;
      if (left !== 0) this.violation(`MODIFY_QP 0x${q.qpNum.toString(16)} to RESET: device kept ${left} WQE chains (§8: returned with used length 0)`);
    }
  }

  async queryQp(qp: Qp): Promise<QueryQpResult> {
    const r = await this.command(Cmd.QUERY_QP, HandleReq, this.handleReq(qp.qpNum), QueryQpResp);
    return {
      attr: decodeQpAttr(QpAttrs.decodeBytes(r.attr)),
      qpType: r.qp_type,
      sqSigAll: r.sq_sig_all !== 0,
      cap: {
        maxSendWr: r.max_send_wr,
        maxRecvWr: r.max_recv_wr,
        maxSendSge: r.max_send_sge,
        maxRecvSge: r.max_recv_sge,
        maxInlineData: r.max_inline_data,
      },
    };
  }

  /** DESTROY_QP; sent for any QPN (a dead one must get ENOENT), bookkeeping only for live QPs. */
  async destroyQp(qp: Qp): Promise<void> {
    await this.command(Cmd.DESTROY_QP, HandleReq, this.handleReq(qp.qpNum), Empty);
    if (!this.isLiveQp(qp)) return;
    const q = qp;
    q.alive = false;
    this.qpBySlot.delete(q.slot);
    this.reclaim(q, q.sq, 'SQ');
    this.reclaim(q, q.rq, 'RQ');
    const left = { send: q.sq.headEntry.size, recv: q.rq.headEntry.size };
    if (left.send + left.recv !== 0) {
      this.violation(`DESTROY_QP 0x${q.qpNum.toString(16)}: device kept ${left.send} send and ${left.recv} receive WQE chains (§4: returned with used length 0)`);
      return; // keep the WQE memory: the device may still read it
    }
    this.allocator.release(q.sq.area);
    this.allocator.release(q.rq.area);
  }

  // -------------------------------------------------------------------------
  // Posting

  async postSend(qp: Qp, wrs: SendWr[]): Promise<void> {
    const q = this.qp(qp);
    this.reclaim(q, q.sq, 'SQ');
    const dv = this.ram.dv;
    let posted = 0;
    try {
      wrs.forEach((wr, i) => {
        const flags = wr.sendFlags ?? 0;
        const inline = (flags & SendFlag.INLINE) !== 0;
        let data: Uint8Array | null = null;
        if (inline) {
          data = this.gather(wr.sgList);
          if (data === null) throw new PostError('postSend', Status.EFAULT, i, 'inline data outside every buffer');
          if (data.length > q.cap.maxInlineData) throw new PostError('postSend', Status.EINVAL, i, `${data.length} inline bytes over max_inline_data ${q.cap.maxInlineData}`);
        } else if (wr.sgList.length > q.cap.maxSendSge) {
          throw new PostError('postSend', Status.EINVAL, i, `${wr.sgList.length} SGEs over max_send_sge ${q.cap.maxSendSge}`);
        }
        if (q.qpType === QpType.UD && wr.ud === undefined) throw new PostError('postSend', Status.EINVAL, i, 'UD send without ud');
        if (q.sq.headEntry.size >= q.sq.maxWr || q.sq.free.length === 0) throw new PostError('postSend', Status.ENOMEM, i, `send queue full (${q.sq.maxWr})`);
        const entry = q.sq.free.pop()!;
        const base = entry - this.ram.gpa;
        const atomic = wr.atomic;
        SendWqe.encode(
          {
            wr_id: wr.wrId,
            opcode: wr.opcode,
            send_flags: flags,
            num_sge: inline ? 0 : wr.sgList.length,
            imm_data: wr.immData ?? 0,
            remote_addr: atomic?.remoteAddr ?? wr.rdma?.remoteAddr ?? 0n,
            compare_add: atomic?.compareAdd ?? 0n,
            swap: atomic?.swap ?? 0n,
            rkey: atomic?.rkey ?? wr.rdma?.rkey ?? 0,
            ahn: wr.ud?.ah.handle ?? 0,
            remote_qpn: wr.ud?.remoteQpn ?? 0,
            remote_qkey: wr.ud?.remoteQkey ?? 0,
            inline_len: data?.length ?? 0,
            reserved: 0,
          },
          dv,
          base,
        );
        let len = SendWqe.size;
        if (data !== null) {
          this.ram.u8.set(data, base + len);
          len += data.length;
        } else {
          for (const s of wr.sgList) {
            SgeStruct.encode({ addr: s.addr, length: s.length, lkey: s.lkey }, dv, base + len);
            len += SgeStruct.size;
          }
        }
        const head = q.sq.vq.add(this.wqeSegments(entry, len, SendWqe.size));
        if (head === null) {
          q.sq.free.push(entry);
          throw new PostError('postSend', Status.ENOMEM, i, 'no free descriptors on the SQ');
        }
        q.sq.headEntry.set(head, entry);
        posted++;
      });
    } finally {
      if (posted > 0) q.sq.vq.kick();
    }
  }

  async postRecv(qp: Qp, wrs: RecvWr[]): Promise<void> {
    const q = this.qp(qp);
    this.reclaim(q, q.rq, 'RQ');
    const dv = this.ram.dv;
    let posted = 0;
    try {
      wrs.forEach((wr, i) => {
        if (wr.sgList.length > q.cap.maxRecvSge) throw new PostError('postRecv', Status.EINVAL, i, `${wr.sgList.length} SGEs over max_recv_sge ${q.cap.maxRecvSge}`);
        if (q.rq.headEntry.size >= q.rq.maxWr || q.rq.free.length === 0) throw new PostError('postRecv', Status.ENOMEM, i, `receive queue full (${q.rq.maxWr})`);
        const entry = q.rq.free.pop()!;
        const base = entry - this.ram.gpa;
        RecvWqe.encode({ wr_id: wr.wrId, num_sge: wr.sgList.length, reserved0: 0, reserved1: 0 }, dv, base);
        let len = RecvWqe.size;
        for (const s of wr.sgList) {
          SgeStruct.encode({ addr: s.addr, length: s.length, lkey: s.lkey }, dv, base + len);
          len += SgeStruct.size;
        }
        const head = q.rq.vq.add(this.wqeSegments(entry, len, RecvWqe.size));
        if (head === null) {
          q.rq.free.push(entry);
          throw new PostError('postRecv', Status.ENOMEM, i, 'no free descriptors on the RQ');
        }
        q.rq.headEntry.set(head, entry);
        posted++;
      });
    } finally {
      if (posted > 0) q.rq.vq.kick();
    }
  }

  private wqeSegments(gpa: number, len: number, headerLen: number): BufferSegment[] {
    if (this.opts.splitChains && len > headerLen) {
      return [
        { gpa, len: headerLen, writable: false },
        { gpa: gpa + headerLen, len: len - headerLen, writable: false },
      ];
    }
    return [{ gpa, len, writable: false }];
  }

  /** Reads the bytes SGEs name (inline sends), through the buffers' address maps. */
  private gather(sges: readonly Sge[]): Uint8Array | null {
    const total = sges.reduce((n, s) => n + s.length, 0);
    const out = new Uint8Array(total);
    let at = 0;
    for (const s of sges) {
      const hit = this.findBuffer(s.addr, s.length);
      if (hit === null) return null;
      out.set(this.readFrom(hit.buf, hit.offset, s.length), at);
      at += s.length;
    }
    return out;
  }

  private findBuffer(addr: bigint, len: number): { buf: RefBuffer; offset: number } | null {
    for (const b of this.buffers) {
      if (addr >= b.addr && addr + BigInt(len) <= b.addr + BigInt(b.length)) return { buf: b, offset: Number(addr - b.addr) };
    }
    return null;
  }

  // -------------------------------------------------------------------------
  // Buffers

  async allocBuffer(length: number, opts: BufferOptions = {}): Promise<Buffer> {
    const align = opts.align ?? 64;
    if (!Number.isInteger(length) || length < 0) throw new RangeError(`bad buffer length ${length}`);
    let b: RefBuffer;
    if (this.opts.scatterBuffers && opts.contiguous !== true) {
      // Virtually contiguous, physically shuffled pages, starting at a page offset that respects `align`.
      const offset = align >= PAGE ? 0 : (this.random() % (PAGE / align)) * align;
      const n = Math.max(1, Math.ceil((offset + length) / PAGE));
      const pages = Array.from({ length: n }, () => this.allocator.alloc(PAGE, PAGE));
      const allocations = [...pages];
      for (let i = n - 1; i > 0; i--) {
        const j = this.random() % (i + 1);
        [pages[i], pages[j]] = [pages[j]!, pages[i]!];
      }
      const va = this.nextVa + BigInt(offset);
      this.nextVa += BigInt((n + 1) * PAGE);
      b = new RefBuffer(va, length, pages, allocations, undefined);
    } else {
      const gpa = this.allocator.alloc(Math.max(length, 1), align);
      const first = Math.floor(gpa / PAGE) * PAGE;
      const n = Math.max(1, Math.ceil((gpa - first + length) / PAGE));
      const pages = Array.from({ length: n }, (_, i) => first + i * PAGE);
      b = new RefBuffer(BigInt(gpa), length, pages, [gpa], BigInt(gpa));
    }
    this.buffers.add(b);
    return b;
  }

  async freeBuffer(buf: Buffer): Promise<void> {
    const b = this.buffer(buf);
    this.buffers.delete(b);
    for (const a of b.allocations) this.allocator.release(a);
  }

  async writeBuffer(buf: Buffer, offset: number, data: Uint8Array): Promise<void> {
    const b = this.buffer(buf);
    if (offset < 0 || offset + data.length > b.length) throw new RangeError(`write ${offset}+${data.length} outside the ${b.length}-byte buffer`);
    let done = 0;
    while (done < data.length) {
      const gpa = b.gpaAt(offset + done);
      const n = Math.min(data.length - done, PAGE - (gpa % PAGE));
      this.ram.bytes(gpa, n).set(data.subarray(done, done + n));
      done += n;
    }
  }

  async readBuffer(buf: Buffer, offset: number, length: number): Promise<Uint8Array> {
    const b = this.buffer(buf);
    if (offset < 0 || length < 0 || offset + length > b.length) throw new RangeError(`read ${offset}+${length} outside the ${b.length}-byte buffer`);
    return this.readFrom(b, offset, length);
  }

  private readFrom(b: RefBuffer, offset: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const gpa = b.gpaAt(offset + done);
      const n = Math.min(length - done, PAGE - (gpa % PAGE));
      out.set(this.ram.bytes(gpa, n), done);
      done += n;
    }
    return out;
  }

  private buffer(buf: Buffer): RefBuffer {
    if (!(buf instanceof RefBuffer) || !this.buffers.has(buf)) throw new Error(`not a live buffer of ${this.name}`);
    return buf;
  }

  private random(): number {
    let x = this.rngState;
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    this.rngState = x;
    return x;
  }
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function encodeAh(a: AhAttr): Uint8Array {
  return AhAttrStruct.encodeBytes({
    dgid: a.grh.dgid,
    flow_label: a.grh.flowLabel,
    sgid_index: a.grh.sgidIndex,
    hop_limit: a.grh.hopLimit,
    traffic_class: a.grh.trafficClass,
    sl: a.sl,
    port_num: a.portNum,
    static_rate: a.staticRate,
    reserved: 0,
  });
}

function decodeAh(bytes: Uint8Array): AhAttr {
  const a = AhAttrStruct.decodeBytes(bytes);
  return {
    grh: { dgid: a.dgid, flowLabel: a.flow_label, sgidIndex: a.sgid_index, hopLimit: a.hop_limit, trafficClass: a.traffic_class },
    sl: a.sl,
    staticRate: a.static_rate,
    portNum: a.port_num,
  };
}

function encodeQpAttr(a: Partial<QpAttr>): StructValue<typeof QpAttrs.fields> {
  return {
    qp_state: a.qpState ?? 0,
    cur_qp_state: a.curQpState ?? 0,
    path_mtu: a.pathMtu ?? 0,
    timeout: a.timeout ?? 0,
    retry_cnt: a.retryCnt ?? 0,
    rnr_retry: a.rnrRetry ?? 0,
    min_rnr_timer: a.minRnrTimer ?? 0,
    max_rd_atomic: a.maxRdAtomic ?? 0,
    max_dest_rd_atomic: a.maxDestRdAtomic ?? 0,
    sq_draining: a.sqDraining ?? 0,
    pkey_index: a.pkeyIndex ?? 0,
    qp_access_flags: a.qpAccessFlags ?? 0,
    qkey: a.qkey ?? 0,
    rq_psn: a.rqPsn ?? 0,
    sq_psn: a.sqPsn ?? 0,
    dest_qp_num: a.destQpNum ?? 0,
    port_num: a.portNum ?? 0,
    reserved0: 0,
    reserved1: 0,
    ah: encodeAh(a.ahAttr ?? zeroAhAttr()),
  };
}

function decodeQpAttr(v: StructValue<typeof QpAttrs.fields>): QpAttr {
  return {
    qpState: v.qp_state,
    curQpState: v.cur_qp_state,
    pathMtu: v.path_mtu,
    timeout: v.timeout,
    retryCnt: v.retry_cnt,
    rnrRetry: v.rnr_retry,
    minRnrTimer: v.min_rnr_timer,
    maxRdAtomic: v.max_rd_atomic,
    maxDestRdAtomic: v.max_dest_rd_atomic,
    sqDraining: v.sq_draining,
    pkeyIndex: v.pkey_index,
    qpAccessFlags: v.qp_access_flags,
    qkey: v.qkey,
    rqPsn: v.rq_psn,
    sqPsn: v.sq_psn,
    destQpNum: v.dest_qp_num,
    portNum: v.port_num,
    ahAttr: decodeAh(v.ah),
  };
}
