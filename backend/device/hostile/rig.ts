/**
 * A raw test rig for hostile-input tests: an in-process VhostUserBackend
 * serving an RdmaDevice (loopback engine) over a socketpair, a front-end,
 * guest RAM and one RawQueue per virtqueue. It speaks the ABI with bytes
 * built by backend/abi (the only encoders), so a test can build a valid
 * message and then corrupt any field, split it anywhere, or give it any
 * writable size.
 *
 * Nothing here blocks the event loop: every wait polls with setImmediate
 * up to a deadline, since the device runs in this same process.
 */
import {
  Access,
  Cmd,
  QpAttr,
  QpState,
  QpType,
  RDMA_PAGE_SIZE,
  PAGE_LIST_ENTRIES,
  Status,
  WcFlag,
  WcOpcode,
  WcStatus,
  cqVq,
  rqVq,
  sqVq,
} from '../../abi/constants.js';
import {
  AhAttr,
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
  GetDmaMrReq,
  HandleReq,
  ModifyQpReq,
  MrResp,
  QpAttrs,
  QueryDeviceResp,
  QueryGidResp,
  QueryPkeyResp,
  QueryPortResp,
  QueryQpResp,
  RecvWqe,
  RegMrReq,
  ReqNotifyCqReq,
  SendWqe,
  Sge,
} from '../../abi/structs.js';
import type { Struct, StructShape, StructValue } from '../../abi/struct.js';
import { gidFromAddress } from '../../gid.js';
import { LoopbackEngine } from '../../engines/loopback/loopback-engine.js';
import { RdmaDevice } from '../rdma-device.js';
import type { RdmaLimits } from '../limits.js';
import { GuestRam } from '../../../virtio/frontend/guest-ram.js';
import { VhostUserFrontend } from '../../../virtio/frontend/frontend.js';
import { Logger, type LogLevel } from '../../../virtio/log.js';
import { native } from '../../../virtio/sys/native.js';
import { VhostUserBackend, type ConnectionSummary } from '../../../virtio/vhost-user/backend.js';
import { FrontendReq, VIRTIO_F_VERSION_1, bit } from '../../../virtio/vhost-user/protocol.js';
import { RawQueue, type RawDesc, type Segment } from './raw-queue.js';

export type SendWqeValue = StructValue<(typeof SendWqe)['fields']>;
export type CqeValue = StructValue<(typeof Cqe)['fields']>;
export type QpAttrsValue = StructValue<(typeof QpAttrs)['fields']>;
export type AhAttrValue = StructValue<(typeof AhAttr)['fields']>;

/** Small limits so every table can be filled in a test. */
export const SMALL_LIMITS: Partial<RdmaLimits> = {
  numCqSlots: 8,
  numQpSlots: 6,
  maxPd: 6,
  maxMr: 12,
  maxCq: 8,
  maxQp: 6,
  maxAh: 6,
  maxCqe: 100,
  maxQpWr: 32,
  maxSge: 4,
  maxInlineData: 64,
  maxQpRdAtom: 4,
  maxMrSize: 1n << 30n,
  gidTblLen: 4,
};

export const LOCAL_GID = gidFromAddress('127.0.0.1');

/** Response size of every command (docs/virtio-rdma.md §4). */
export const RESP_SIZE: Record<Cmd, number> = {
  [Cmd.QUERY_DEVICE]: QueryDeviceResp.size,
  [Cmd.QUERY_PORT]: QueryPortResp.size,
  [Cmd.QUERY_GID]: QueryGidResp.size,
  [Cmd.QUERY_PKEY]: QueryPkeyResp.size,
  [Cmd.CREATE_PD]: CreatePdResp.size,
  [Cmd.DESTROY_PD]: 0,
  [Cmd.CREATE_CQ]: CreateCqResp.size,
  [Cmd.DESTROY_CQ]: 0,
  [Cmd.REQ_NOTIFY_CQ]: 0,
  [Cmd.REG_MR]: MrResp.size,
  [Cmd.GET_DMA_MR]: MrResp.size,
  [Cmd.DEREG_MR]: 0,
  [Cmd.CREATE_QP]: CreateQpResp.size,
  [Cmd.MODIFY_QP]: 0,
  [Cmd.QUERY_QP]: QueryQpResp.size,
  [Cmd.DESTROY_QP]: 0,
  [Cmd.CREATE_AH]: CreateAhResp.size,
  [Cmd.DESTROY_AH]: 0,
};

/** Request size of every command (docs/virtio-rdma.md §4). */
export const REQ_SIZE: Record<Cmd, number> = {
  [Cmd.QUERY_DEVICE]: 0,
  [Cmd.QUERY_PORT]: 8,
  [Cmd.QUERY_GID]: 8,
  [Cmd.QUERY_PKEY]: 8,
  [Cmd.CREATE_PD]: 0,
  [Cmd.DESTROY_PD]: HandleReq.size,
  [Cmd.CREATE_CQ]: CreateCqReq.size,
  [Cmd.DESTROY_CQ]: HandleReq.size,
  [Cmd.REQ_NOTIFY_CQ]: ReqNotifyCqReq.size,
  [Cmd.REG_MR]: RegMrReq.size,
  [Cmd.GET_DMA_MR]: GetDmaMrReq.size,
  [Cmd.DEREG_MR]: HandleReq.size,
  [Cmd.CREATE_QP]: CreateQpReq.size,
  [Cmd.MODIFY_QP]: ModifyQpReq.size,
  [Cmd.QUERY_QP]: HandleReq.size,
  [Cmd.DESTROY_QP]: HandleReq.size,
  [Cmd.CREATE_AH]: CreateAhReq.size,
  [Cmd.DESTROY_AH]: HandleReq.size,
};

export const ALL_CMDS: Cmd[] = Object.keys(RESP_SIZE).map(Number) as Cmd[];
export const DOCUMENTED_STATUSES = new Set<number>([0, 2, 7, 12, 14, 16, 22, 28, 95]);
export const WC_STATUSES = new Set<number>(Object.values(WcStatus).filter((v): v is number => typeof v === 'number'));
export const WC_OPCODES = new Set<number>(Object.values(WcOpcode).filter((v): v is number => typeof v === 'number'));

// ---------------------------------------------------------------------------
// Encoding helpers (all bytes come from the ABI structs)

export function enc<S extends StructShape>(s: Struct<S>, v: Partial<StructValue<S>>): Uint8Array {
  return s.encodeBytes({ ...s.zero(), ...v });
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  const n = parts.reduce((a, p) => a + p.byteLength, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}

/** A control request: header then body. */
export function msg(cmd: number, body: Uint8Array = new Uint8Array(0), hdrReserved = 0): Uint8Array {
  return concat(CtrlHeader.encodeBytes({ cmd: cmd >>> 0, reserved: hdrReserved >>> 0 }), body);
}

export function handleBody(handle: number): Uint8Array {
  return enc(HandleReq, { handle: handle >>> 0 });
}

export interface SgeSpec {
  addr: bigint | number;
  length: number;
  lkey: number;
}

export function sgeBytes(s: SgeSpec): Uint8Array {
  return enc(Sge, { addr: BigInt.asUintN(64, BigInt(s.addr)), length: s.length >>> 0, lkey: s.lkey >>> 0 });
}

/** A send WQE: header, then SGEs (num_sge defaults to their count) or inline data (inline_len defaults to its length). */
export function sendWqe(f: Partial<SendWqeValue>, sges: readonly SgeSpec[] = [], inline: Uint8Array | null = null): Uint8Array {
  const hdr = enc(SendWqe, { num_sge: inline === null ? sges.length : 0, inline_len: inline?.byteLength ?? 0, ...f });
  return concat(hdr, ...sges.map(sgeBytes), ...(inline ? [inline] : []));
}

export function recvWqe(wrId: bigint, sges: readonly SgeSpec[] = [], numSge = sges.length): Uint8Array {
  return concat(enc(RecvWqe, { wr_id: wrId, num_sge: numSge }), ...sges.map(sgeBytes));
}

export function ahBytes(v: Partial<AhAttrValue> = {}): Uint8Array {
  return enc(AhAttr, { dgid: LOCAL_GID, sgid_index: 0, port_num: 1, hop_limit: 64, ...v });
}

export function modifyBody(qpn: number, mask: number, attr: Partial<QpAttrsValue> = {}, ah: Partial<AhAttrValue> | null = null): Uint8Array {
  const a = enc(QpAttrs, { ...attr, ah: ah === null ? new Uint8Array(AhAttr.size) : ahBytes(ah) });
  return enc(ModifyQpReq, { qpn: qpn >>> 0, attr_mask: mask >>> 0, attr: a });
}

/** Deterministic PRNG (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Checks a CQE's shape against docs §7; returns what is wrong, or null. */
export function cqeProblem(c: CqeValue): string | null {
  if (!WC_STATUSES.has(c.status)) return `status ${c.status} is not an ib_wc_status the device uses`;
  if (!WC_OPCODES.has(c.opcode)) return `opcode ${c.opcode} unknown`;
  if (c.wc_flags & ~(WcFlag.GRH | WcFlag.WITH_IMM | WcFlag.WITH_INVALIDATE)) return `wc_flags 0x${c.wc_flags.toString(16)}`;
  if (c.reserved0 !== 0 || c.reserved1 !== 0n) return 'reserved fields not zero';
  if (c.qp_num > 0xffffff) return `qp_num 0x${c.qp_num.toString(16)} exceeds 24 bits`;
  if (c.opcode === WcOpcode.CQ_ERROR && c.status !== WcStatus.GENERAL_ERR) return 'CQ error event without GENERAL_ERR';
  return null;
}

// ---------------------------------------------------------------------------
// Logs

export class LogCapture {
  readonly counts: Record<string, number> = { ERROR: 0, WARN: 0, INFO: 0, DEBUG: 0, TRACE: 0 };
  readonly errors: string[] = [];
  private readonly recent: string[] = [];
  readonly all: string[] | null;

  constructor(keepAll: boolean) {
    this.all = keepAll ? [] : null;
  }

  readonly sink = (line: string): void => {
    const level = line.split(' ', 2)[1] ?? '';
    this.counts[level] = (this.counts[level] ?? 0) + 1;
    if (level === 'ERROR') this.errors.push(line);
    this.all?.push(line);
    this.recent.push(line);
    if (this.recent.length > 400) this.recent.splice(0, 200);
  };

  tail(n = 30): string {
    return this.recent.slice(-n).join('\n');
  }

  has(re: RegExp): boolean {
    return (this.all ?? this.recent).some((l) => re.test(l));
  }
}

// ---------------------------------------------------------------------------
// Slots of guest memory for buffers that come and go

export class SlotArena {
  readonly base: number;
  private readonly free: number[] = [];

  constructor(
    ram: GuestRam,
    readonly count: number,
    readonly slotBytes: number,
  ) {
    this.base = ram.alloc(count * slotBytes, 4096);
    for (let i = count - 1; i >= 0; i--) this.free.push(i);
  }

  get available(): number {
    return this.free.length;
  }

  take(): number | null {
    return this.free.pop() ?? null;
  }

  give(i: number): void {
    this.free.push(i);
  }

  gpa(i: number): number {
    return this.base + i * this.slotBytes;
  }
}

/** Splits `len` bytes into segments of the given sizes (the last takes the rest). */
function splitSizes(len: number, split: readonly number[] | undefined): number[] {
  if (split === undefined || split.length === 0) return [len];
  const out: number[] = [];
  let left = len;
  for (const s of split) {
    const n = Math.min(s, left);
    out.push(n);
    left -= n;
  }
  if (left > 0) out.push(left);
  return out;
}

// ---------------------------------------------------------------------------
// The rig

export interface RigOptions {
  limits?: Partial<RdmaLimits>;
  /** Guest RAM size (default 32 MiB). */
  ramBytes?: number;
  /** Guest-physical base of RAM (default 1 MiB, so that GPA 0 is outside guest memory). */
  ramGpa?: number;
  ctrlSize?: number;
  cqSize?: number;
  sqSize?: number;
  rqSize?: number;
  /** Per-virtqueue size overrides. */
  sizes?: Record<number, number>;
  /** Virtqueues left unstarted (protocol-order tests). */
  notStarted?: number[];
  logLevel?: LogLevel;
  keepLogs?: boolean;
  /** Bytes per SQ/RQ arena slot. */
  wqeSlotBytes?: number;
  /** Control arena slots (a batch is at most this many commands). */
  ctrlSlots?: number;
  /** CQ slots the rig does not keep stocked: the test posts their buffers (postCqBuffer). */
  manualCqSlots?: number[];
}

interface CtrlTag {
  i: number;
  slot: number;
  readGpa: number;
  writeGpa: number;
  writable: number;
}

export interface CtrlItem {
  req: Uint8Array;
  /** Readable segment sizes (the last takes the rest). */
  split?: number[];
  /** Writable bytes (default 8 + 256). */
  writable?: number;
  writableSplit?: number[];
}

export interface CtrlResult {
  used: number;
  /** Status from the writable part, or null when the used length is under 8. */
  status: number | null;
  /** Response bytes after the status (used - 8). */
  resp: Uint8Array;
}

export interface CallResult<V> {
  status: number;
  used: number;
  resp: V | null;
}

export interface CqInfo {
  cqn: number;
  slot: number;
  cqe: number;
}

export interface QpInfo {
  qpn: number;
  slot: number;
  pdn: number;
  type: QpType;
  sendCq: CqInfo;
  recvCq: CqInfo;
  caps: StructValue<(typeof CreateQpResp)['fields']>;
}

export interface MrInfo {
  mrn: number;
  lkey: number;
  rkey: number;
  pdn: number;
  access: number;
  /** Guest-physical start of the backing (page-aligned). */
  gpa: number;
  iova: bigint;
  length: number;
}

export interface QpCreateOpts {
  pdn: number;
  type?: QpType;
  sendCq: CqInfo;
  recvCq?: CqInfo;
  maxSendWr?: number;
  maxRecvWr?: number;
  maxSendSge?: number;
  maxRecvSge?: number;
  maxInline?: number;
  sqSigAll?: boolean;
}

export interface Pair {
  pdn: number;
  a: QpInfo;
  b: QpInfo;
  mrA: MrInfo;
  mrB: MrInfo;
}

export interface PairOpts {
  type?: QpType;
  /** MR access on both sides (default everything). */
  access?: number;
  /** QP access flags (default every remote right). */
  qpAccess?: number;
  mrBytes?: number;
  pdn?: number;
  rnrRetry?: number;
  minRnrTimer?: number;
  sqSigAll?: boolean;
  maxInline?: number;
}

export type Counts = Record<'pds' | 'cqs' | 'qps' | 'mrs' | 'ahs' | 'cqSlots' | 'qpSlots' | 'deferred' | 'sendOut' | 'recvOut', number>;

export class Rig {
  readonly device: RdmaDevice;
  readonly engine: LoopbackEngine;
  readonly backend: VhostUserBackend;
  readonly fe: VhostUserFrontend;
  readonly ram: GuestRam;
  readonly log: LogCapture;
  readonly ctrlQ: RawQueue<CtrlTag>;
  readonly cqQ: RawQueue<number>[] = [];
  readonly sqQ: RawQueue<number>[] = [];
  readonly rqQ: RawQueue<number>[] = [];
  /** CQEs read from each CQ slot's ring and not taken yet. */
  readonly cqes: CqeValue[][] = [];
  /** CQ buffers the device returned with length 0, per slot. */
  readonly cqUnused: number[] = [];
  private readonly ctrlArena: SlotArena;
  private readonly cqArenas: SlotArena[] = [];
  private readonly wqArenas = new Map<number, SlotArena>();
  private readonly started = new Set<number>();
  private ended: Promise<ConnectionSummary>;
  private stopped = false;

  private constructor(readonly opts: RigOptions) {
    this.log = new LogCapture(opts.keepLogs ?? false);
    const logger = new Logger(opts.logLevel ?? 'info', '', this.log.sink);
    this.engine = new LoopbackEngine();
    this.device = new RdmaDevice({ engine: this.engine, log: logger.child('rdma'), gids: [LOCAL_GID], limits: { ...SMALL_LIMITS, ...opts.limits } });
    this.backend = new VhostUserBackend(this.device, logger.child('vhost-user'));
    const [a, b] = native.socketPair();
    this.ended = this.backend.serve(a);
    this.fe = VhostUserFrontend.fromFd(b);
    this.ram = new GuestRam(opts.ramGpa ?? 0x10_0000, opts.ramBytes ?? 32 << 20);
    const l = this.device.limits;
    const size = (vq: number, dflt: number): number => opts.sizes?.[vq] ?? dflt;
    this.ctrlQ = new RawQueue(this.ram, 0, size(0, opts.ctrlSize ?? 256));
    this.ctrlArena = new SlotArena(this.ram, opts.ctrlSlots ?? 256, 8192);
    for (let s = 0; s < l.numCqSlots; s++) {
      const q = new RawQueue<number>(this.ram, cqVq(s), size(cqVq(s), opts.cqSize ?? 64));
      this.cqQ.push(q);
      this.cqArenas.push(new SlotArena(this.ram, q.size, 64));
      this.cqes.push([]);
      this.cqUnused.push(0);
    }
    const slotBytes = opts.wqeSlotBytes ?? 1024;
    for (let s = 0; s < l.numQpSlots; s++) {
      const sq = new RawQueue<number>(this.ram, sqVq(l.numCqSlots, s), size(sqVq(l.numCqSlots, s), opts.sqSize ?? 64));
      const rq = new RawQueue<number>(this.ram, rqVq(l.numCqSlots, s), size(rqVq(l.numCqSlots, s), opts.rqSize ?? 64));
      this.sqQ.push(sq);
      this.rqQ.push(rq);
      this.wqArenas.set(sq.index, new SlotArena(this.ram, sq.size, slotBytes));
      this.wqArenas.set(rq.index, new SlotArena(this.ram, rq.size, slotBytes));
    }
  }

  static async start(opts: RigOptions = {}): Promise<Rig> {
    const rig = new Rig(opts);
    await rig.fe.negotiate(bit(VIRTIO_F_VERSION_1), (1n << 20n) - 1n);
    await rig.fe.setMemTable([rig.ram]);
    const skip = new Set(opts.notStarted ?? []);
    for (const q of rig.queues()) if (!skip.has(q.index)) await rig.startQueue(q);
    await rig.fe.setStatus(0xf);
    // Let the back-end attach the device (first run of a ring).
    await rig.until(() => rig.device.resources !== null, 2000, 'device attach');
    for (let s = 0; s < rig.cqQ.length; s++) rig.stockCq(s);
    return rig;
  }

  private *queues(): Iterable<RawQueue<unknown>> {
    yield this.ctrlQ as RawQueue<unknown>;
    for (const q of this.cqQ) yield q;
    for (let s = 0; s < this.sqQ.length; s++) {
      yield this.sqQ[s]!;
      yield this.rqQ[s]!;
    }
  }

  /** SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE, as QEMU starts a ring (again, after stopQueue, from `base`). */
  async startQueue<T>(q: RawQueue<T>, base = 0): Promise<void> {
    const fe = this.fe;
    const index = q.index;
    await fe.send(FrontendReq.SET_VRING_NUM, { kind: 'vringState', index, num: q.size });
    await fe.send(FrontendReq.SET_VRING_BASE, { kind: 'vringState', index, num: base });
    await fe.send(FrontendReq.SET_VRING_ADDR, {
      kind: 'vringAddr',
      index,
      flags: 0,
      desc: this.ram.uva(q.descGpa),
      used: this.ram.uva(q.usedGpa),
      avail: this.ram.uva(q.availGpa),
      log: q.usedGpa,
    });
    await fe.send(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: BigInt(index) }, [q.kickFd]);
    await fe.send(FrontendReq.SET_VRING_CALL, { kind: 'u64', value: BigInt(index) }, [q.callFd]);
    await fe.send(FrontendReq.SET_VRING_ENABLE, { kind: 'vringState', index, num: 1 });
    this.started.add(index);
  }

  /** GET_VRING_BASE: the ring stops; returns where the back-end stopped. */
  async stopQueue<T>(q: RawQueue<T>): Promise<number> {
    this.started.delete(q.index);
    return this.fe.getVringBase(q.index);
  }

  /**
   * Measures how long the event loop is blocked: returns a function that
   * stops measuring and gives the longest gap between two turns (ms).
   */
  watchStalls(): () => number {
    let last = performance.now();
    let max = 0;
    let on = true;
    const turn = (): void => {
      const now = performance.now();
      max = Math.max(max, now - last);
      last = now;
      if (on) setImmediate(turn);
    };
    setImmediate(turn);
    return () => {
      on = false;
      return Math.max(max, performance.now() - last);
    };
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.fe.close();
    await this.ended;
    this.engine.close();
    for (const q of this.queues()) q.release();
    this.ram.release();
  }

  get limits(): RdmaLimits {
    return this.device.limits;
  }

  // --- waiting ---------------------------------------------------------------

  async tick(): Promise<void> {
    await new Promise<void>((r) => setImmediate(r));
  }

  async sleep(ms: number): Promise<void> {
    await new Promise<void>((r) => setTimeout(r, ms));
  }

  /** Polls `cond` (reaping CQs each round) until it holds or the deadline passes. */
  async until(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.device.resources !== null) this.pollCqs();
      if (cond()) return;
      if (Date.now() > deadline) {
        throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}\n--- device errors:\n${this.log.errors.join('\n')}\n--- log tail:\n${this.log.tail()}`);
      }
      await this.tick();
    }
  }

  /** Lets the device and engine run for a while (at least `ms`), reaping CQs. */
  async settle(ms = 20): Promise<void> {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      this.pollCqs();
      await this.tick();
    }
    this.pollCqs();
  }

  // --- control queue -----------------------------------------------------------

  /** Posts control chains in one batch, kicks once and waits for all of them. */
  async ctrlBatch(items: readonly CtrlItem[], timeoutMs = 10_000): Promise<CtrlResult[]> {
    const q = this.ctrlQ;
    const results: (CtrlResult | null)[] = items.map(() => null);
    let left = items.length;
    let next = 0;
    const deadline = Date.now() + timeoutMs;
    while (left > 0) {
      // Add as many as fit (descriptors and arena slots).
      while (next < items.length) {
        const it = items[next]!;
        const readSegs = splitSizes(it.req.byteLength, it.split);
        const writable = it.writable ?? 8 + 256;
        const writeSegs = splitSizes(writable, it.writableSplit);
        const nsegs = readSegs.length + writeSegs.length;
        if (it.req.byteLength > 4096 || writable > 4096) throw new RangeError('control item too large for the arena');
        if (q.freeDescs < nsegs || this.ctrlArena.available === 0) break;
        const slot = this.ctrlArena.take()!;
        const readGpa = this.ctrlArena.gpa(slot);
        const writeGpa = readGpa + 4096;
        this.ram.bytes(readGpa, it.req.byteLength).set(it.req);
        this.ram.bytes(writeGpa, Math.min(4096, writable + 64)).fill(0xcc);
        const segs: Segment[] = [];
        let off = 0;
        for (const n of readSegs) {
          segs.push({ gpa: readGpa + off, len: n, writable: false });
          off += n;
        }
        off = 0;
        for (const n of writeSegs) {
          segs.push({ gpa: writeGpa + off, len: n, writable: true });
          off += n;
        }
        // A chain with nothing at all still needs one descriptor.
        if (segs.length === 0) segs.push({ gpa: readGpa, len: 0, writable: false });
        const head = q.add(segs, { i: next, slot, readGpa, writeGpa, writable });
        if (head === null) throw new Error('control queue: no descriptors');
        next++;
      }
      q.kick();
      for (;;) {
        const u = q.takeUsed();
        if (u === null) break;
        const t = u.tag;
        const w = this.ram.bytes(t.writeGpa, 4096);
        for (let k = u.len, end = Math.min(4096, t.writable + 64); k < end; k++) {
          if (w[k] !== 0xcc) throw new Error(`control chain ${t.i}: the device wrote byte ${k} of the writable part beyond used length ${u.len}`);
        }
        const status = u.len >= 8 ? CtrlStatus.decodeBytes(w).status : null;
        if (u.len >= 8 && CtrlStatus.decodeBytes(w).reserved !== 0) throw new Error(`control chain ${t.i}: ctrl_status.reserved is not zero`);
        results[t.i] = { used: u.len, status, resp: w.slice(8, Math.max(8, u.len)) };
        this.ctrlArena.give(t.slot);
        left--;
      }
      if (left === 0) break;
      if (Date.now() > deadline) {
        throw new Error(`control: ${left} of ${items.length} chains not returned after ${timeoutMs} ms\n--- device errors:\n${this.log.errors.join('\n')}\n--- log tail:\n${this.log.tail()}`);
      }
      await this.tick();
    }
    return results as CtrlResult[];
  }

  /** Posts one control chain of raw descriptors and returns the used length the device gave it. */
  async ctrlRaw(specs: readonly RawDesc[], timeoutMs = 3000): Promise<number> {
    const q = this.ctrlQ;
    const head = q.addRaw(specs, { i: -1, slot: -1, readGpa: 0, writeGpa: 0, writable: 0 });
    if (head === null) throw new Error('control queue: no descriptors');
    q.kick();
    let len = -1;
    await this.until(
      () => {
        const u = q.takeUsed();
        if (u === null) return false;
        if (u.head !== head) throw new Error(`control queue: device returned ${u.head}, expected ${head}`);
        len = u.len;
        return true;
      },
      timeoutMs,
      'a raw control chain',
    );
    return len;
  }

  async ctrl(req: Uint8Array, opts: Omit<CtrlItem, 'req'> = {}): Promise<CtrlResult> {
    return (await this.ctrlBatch([{ req, ...opts }]))[0]!;
  }

  /** Runs a command; decodes the response when it succeeded. */
  async call<S extends StructShape>(cmd: number, body: Uint8Array, resp: Struct<S> | null = null): Promise<CallResult<StructValue<S>>> {
    const r = await this.ctrl(msg(cmd, body));
    if (r.status === null) throw new Error(`command ${cmd}: no status (used ${r.used})`);
    const expected = r.status === Status.OK ? 8 + (RESP_SIZE[cmd as Cmd] ?? 0) : 8;
    if (r.used !== expected) throw new Error(`command ${Cmd[cmd] ?? cmd}: used length ${r.used}, expected ${expected} for status ${r.status}`);
    return { status: r.status, used: r.used, resp: r.status === Status.OK && resp !== null ? resp.decodeBytes(r.resp) : null };
  }

  /** Runs a command that must succeed. */
  async ok<S extends StructShape>(cmd: number, body: Uint8Array, resp: Struct<S>): Promise<StructValue<S>>;
  async ok(cmd: number, body: Uint8Array): Promise<null>;
  async ok<S extends StructShape>(cmd: number, body: Uint8Array, resp: Struct<S> | null = null): Promise<StructValue<S> | null> {
    const r = await this.call(cmd, body, resp);
    if (r.status !== Status.OK) throw new Error(`${Cmd[cmd] ?? cmd} failed with ${Status[r.status] ?? r.status}\n${this.log.tail(5)}`);
    return r.resp;
  }

  /** Status of a command (asserting the used length matches it). */
  async status(cmd: number, body: Uint8Array = new Uint8Array(0)): Promise<number> {
    return (await this.call(cmd, body)).status;
  }

  // --- typed valid operations -------------------------------------------------

  async createPd(): Promise<number> {
    return (await this.ok(Cmd.CREATE_PD, new Uint8Array(0), CreatePdResp)).pdn;
  }

  async createCq(cqe = 32): Promise<CqInfo> {
    const r = await this.ok(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe }), CreateCqResp);
    return { cqn: r.cqn, slot: r.slot, cqe: r.cqe };
  }

  async createQp(o: QpCreateOpts): Promise<QpInfo> {
    const type = o.type ?? QpType.RC;
    const recvCq = o.recvCq ?? o.sendCq;
    const r = await this.ok(
      Cmd.CREATE_QP,
      enc(CreateQpReq, {
        pdn: o.pdn,
        qp_type: type,
        sq_sig_all: o.sqSigAll ? 1 : 0,
        send_cqn: o.sendCq.cqn,
        recv_cqn: recvCq.cqn,
        max_send_wr: o.maxSendWr ?? 16,
        max_recv_wr: o.maxRecvWr ?? 16,
        max_send_sge: o.maxSendSge ?? this.limits.maxSge,
        max_recv_sge: o.maxRecvSge ?? this.limits.maxSge,
        max_inline_data: o.maxInline ?? this.limits.maxInlineData,
      }),
      CreateQpResp,
    );
    return { qpn: r.qpn, slot: r.slot, pdn: o.pdn, type, sendCq: o.sendCq, recvCq, caps: r };
  }

  async modify(qpn: number, mask: number, attr: Partial<QpAttrsValue> = {}, ah: Partial<AhAttrValue> | null = null): Promise<number> {
    return this.status(Cmd.MODIFY_QP, modifyBody(qpn, mask, attr, ah));
  }

  async modifyOk(qpn: number, mask: number, attr: Partial<QpAttrsValue> = {}, ah: Partial<AhAttrValue> | null = null): Promise<void> {
    await this.ok(Cmd.MODIFY_QP, modifyBody(qpn, mask, attr, ah));
  }

  async toInit(qp: QpInfo, qpAccess = Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC, qkey = 0x1111): Promise<void> {
    if (qp.type === QpType.UD) {
      await this.modifyOk(qp.qpn, QpAttr.STATE | QpAttr.PKEY_INDEX | QpAttr.PORT | QpAttr.QKEY, { qp_state: QpState.INIT, port_num: 1, qkey });
    } else {
      await this.modifyOk(qp.qpn, QpAttr.STATE | QpAttr.PKEY_INDEX | QpAttr.PORT | QpAttr.ACCESS_FLAGS, { qp_state: QpState.INIT, port_num: 1, qp_access_flags: qpAccess });
    }
  }

  async toRtr(qp: QpInfo, destQpn: number, minRnrTimer = 1): Promise<void> {
    const A = QpAttr;
    if (qp.type === QpType.UD) {
      await this.modifyOk(qp.qpn, A.STATE, { qp_state: QpState.RTR });
      return;
    }
    const base = A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN;
    const mask = qp.type === QpType.RC ? base | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER : base;
    await this.modifyOk(
      qp.qpn,
      mask,
      { qp_state: QpState.RTR, path_mtu: 3, dest_qp_num: destQpn, rq_psn: 0x100, max_dest_rd_atomic: this.limits.maxQpRdAtom, min_rnr_timer: minRnrTimer },
      {},
    );
  }

  async toRts(qp: QpInfo, rnrRetry = 3, timeout = 14, retryCnt = 7): Promise<void> {
    const A = QpAttr;
    const mask = qp.type === QpType.RC ? A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC : A.STATE | A.SQ_PSN;
    await this.modifyOk(qp.qpn, mask, { qp_state: QpState.RTS, sq_psn: 0x100, timeout, retry_cnt: retryCnt, rnr_retry: rnrRetry, max_rd_atomic: this.limits.maxQpRdAtom });
  }

  /** RESET (or anything) -> INIT -> RTR -> RTS, connected to `destQpn`. */
  async bringUp(qp: QpInfo, destQpn: number, o: { qpAccess?: number; rnrRetry?: number; minRnrTimer?: number; timeout?: number; retryCnt?: number; qkey?: number } = {}): Promise<void> {
    await this.toInit(qp, o.qpAccess, o.qkey);
    await this.toRtr(qp, destQpn, o.minRnrTimer);
    await this.toRts(qp, o.rnrRetry, o.timeout, o.retryCnt);
  }

  async queryQp(qpn: number): Promise<{ resp: StructValue<(typeof QueryQpResp)['fields']>; attr: QpAttrsValue } | null> {
    const r = await this.call(Cmd.QUERY_QP, handleBody(qpn), QueryQpResp);
    if (r.resp === null) return null;
    return { resp: r.resp, attr: QpAttrs.decodeBytes(r.resp.attr) };
  }

  async qpState(qpn: number): Promise<QpState> {
    const q = await this.queryQp(qpn);
    if (q === null) throw new Error(`QUERY_QP 0x${qpn.toString(16)} failed`);
    return q.attr.qp_state as QpState;
  }

  /** Page-aligned guest buffer of `len` bytes (at least one page), filled with `fill`. */
  allocBuffer(len: number, fill = 0): number {
    const bytes = Math.max(RDMA_PAGE_SIZE, Math.ceil(len / RDMA_PAGE_SIZE) * RDMA_PAGE_SIZE);
    const gpa = this.ram.alloc(bytes, RDMA_PAGE_SIZE);
    this.ram.bytes(gpa, bytes).fill(fill);
    return gpa;
  }

  /** Writes a page list (one or two levels, docs §4 REG_MR) into guest memory; returns its address. */
  writePageList(pages: readonly (number | bigint)[]): number {
    const put = (at: number, list: readonly (number | bigint)[]): void => {
      list.forEach((p, i) => this.ram.dv.setBigUint64(at - this.ram.gpa + 8 * i, BigInt.asUintN(64, BigInt(p)), true));
    };
    if (pages.length <= PAGE_LIST_ENTRIES) {
      const gpa = this.ram.alloc(Math.max(8, 8 * pages.length), 8);
      put(gpa, pages);
      return gpa;
    }
    const n2 = Math.ceil(pages.length / PAGE_LIST_ENTRIES);
    const l1: number[] = [];
    for (let i = 0; i < n2; i++) {
      const l2 = this.ram.alloc(RDMA_PAGE_SIZE, RDMA_PAGE_SIZE);
      put(l2, pages.slice(i * PAGE_LIST_ENTRIES, (i + 1) * PAGE_LIST_ENTRIES));
      l1.push(l2);
    }
    const gpa = this.ram.alloc(8 * n2, 8);
    put(gpa, l1);
    return gpa;
  }

  /** The REG_MR body for `len` bytes at page-aligned `gpa`, iova = gpa + iovaOffset (page list written to guest memory). */
  regMrBody(pdn: number, access: number, gpa: number, len: number, iovaOffset = 0): Uint8Array {
    const iova = BigInt(gpa + iovaOffset);
    const first = gpa + Math.floor(iovaOffset / RDMA_PAGE_SIZE) * RDMA_PAGE_SIZE;
    const npages = Math.ceil(((iovaOffset % RDMA_PAGE_SIZE) + len) / RDMA_PAGE_SIZE);
    const pages = Array.from({ length: npages }, (_, i) => first + i * RDMA_PAGE_SIZE);
    return enc(RegMrReq, { pdn, access, iova, length: BigInt(len), page_list: BigInt(this.writePageList(pages)), npages });
  }

  /** Registers `len` bytes of a fresh (or given) page-aligned buffer with iova = its GPA. */
  async regMr(pdn: number, len: number, access: number = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC, gpa?: number): Promise<MrInfo> {
    const at = gpa ?? this.allocBuffer(len);
    const r = await this.ok(Cmd.REG_MR, this.regMrBody(pdn, access, at, len), MrResp);
    return { mrn: r.mrn, lkey: r.lkey, rkey: r.rkey, pdn, access, gpa: at, iova: BigInt(at), length: len };
  }

  async dmaMr(pdn: number, access: number = Access.LOCAL_WRITE): Promise<MrInfo> {
    const r = await this.ok(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn, access }), MrResp);
    return { mrn: r.mrn, lkey: r.lkey, rkey: r.rkey, pdn, access, gpa: this.ram.gpa, iova: BigInt(this.ram.gpa), length: this.ram.size };
  }

  async createAh(pdn: number, ah: Partial<AhAttrValue> = {}): Promise<number> {
    return (await this.ok(Cmd.CREATE_AH, enc(CreateAhReq, { pdn, ah: ahBytes(ah) }), CreateAhResp)).ahn;
  }

  /** A connected pair of QPs (RC by default) in one PD, each with its own CQ and a registered MR. */
  async createPair(o: PairOpts = {}): Promise<Pair> {
    const type = o.type ?? QpType.RC;
    const pdn = o.pdn ?? (await this.createPd());
    const cqA = await this.createCq(Math.min(this.limits.maxCqe, this.cqQ[0]!.size - 1));
    const cqB = await this.createCq(Math.min(this.limits.maxCqe, this.cqQ[0]!.size - 1));
    const qo = { pdn, type, ...(o.sqSigAll !== undefined ? { sqSigAll: o.sqSigAll } : {}), ...(o.maxInline !== undefined ? { maxInline: o.maxInline } : {}) };
    const a = await this.createQp({ ...qo, sendCq: cqA });
    const b = await this.createQp({ ...qo, sendCq: cqB });
    const up = { ...(o.qpAccess !== undefined ? { qpAccess: o.qpAccess } : {}), ...(o.rnrRetry !== undefined ? { rnrRetry: o.rnrRetry } : {}), ...(o.minRnrTimer !== undefined ? { minRnrTimer: o.minRnrTimer } : {}) };
    await this.bringUp(a, b.qpn, up);
    await this.bringUp(b, a.qpn, up);
    const bytes = o.mrBytes ?? 2 * RDMA_PAGE_SIZE;
    const access = o.access ?? Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;
    const mrA = await this.regMr(pdn, bytes, access);
    const mrB = await this.regMr(pdn, bytes, access);
    return { pdn, a, b, mrA, mrB };
  }

  // --- CQ rings ----------------------------------------------------------------

  /** Keeps every free descriptor of a CQ ring posted with a 64-byte writable buffer. */
  stockCq(slot: number): void {
    const q = this.cqQ[slot]!;
    if (!this.started.has(q.index) || this.opts.manualCqSlots?.includes(slot)) return;
    const arena = this.cqArenas[slot]!;
    let added = false;
    while (q.freeDescs > 0 && arena.available > 0) {
      const i = arena.take()!;
      this.ram.bytes(arena.gpa(i), 64).fill(0xee);
      q.add([{ gpa: arena.gpa(i), len: 64, writable: true }], i);
      added = true;
    }
    if (added) q.kick();
  }

  /**
   * Posts one CQ buffer by hand: `readable` device-readable bytes (a malformed
   * CQ buffer) then `writable` device-writable bytes (at most 64 in all).
   */
  postCqBuffer(slot: number, writable = 64, readable = 0, kick = true, writableSplit?: number[]): number {
    const q = this.cqQ[slot]!;
    const arena = this.cqArenas[slot]!;
    if (readable + writable > 64) throw new RangeError('a CQ buffer slot is 64 bytes');
    const i = arena.take();
    if (i === null) throw new Error(`CQ slot ${slot}: no buffer slots left`);
    const gpa = arena.gpa(i);
    this.ram.bytes(gpa, 64).fill(0xee);
    const segs: Segment[] = [];
    if (readable > 0) segs.push({ gpa, len: readable, writable: false });
    let off = readable;
    for (const n of writable > 0 ? splitSizes(writable, writableSplit) : []) {
      segs.push({ gpa: gpa + off, len: n, writable: true });
      off += n;
    }
    if (segs.length === 0) segs.push({ gpa, len: 0, writable: true });
    const head = q.add(segs, i);
    if (head === null) throw new Error(`CQ slot ${slot}: no descriptors`);
    if (kick) q.kick();
    return head;
  }

  /** Reads every returned CQ buffer into `cqes`, checking each, and restocks. */
  pollCqs(): void {
    for (let s = 0; s < this.cqQ.length; s++) {
      const q = this.cqQ[s]!;
      const arena = this.cqArenas[s]!;
      let got = false;
      for (;;) {
        const u = q.takeUsed();
        if (u === null) break;
        got = true;
        const gpa = arena.gpa(u.tag);
        if (u.len === 0) this.cqUnused[s]!++;
        else if (u.len !== Cqe.size) throw new Error(`CQ slot ${s}: buffer returned with used length ${u.len}`);
        else {
          const c = Cqe.decodeBytes(this.ram.bytes(gpa, Cqe.size));
          const bad = cqeProblem(c);
          if (bad !== null) throw new Error(`CQ slot ${s}: malformed CQE: ${bad}: ${JSON.stringify(c, (_, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}`);
          const tail = this.ram.bytes(gpa + Cqe.size, 64 - Cqe.size);
          if (tail.some((b) => b !== 0xee)) throw new Error(`CQ slot ${s}: the device wrote past the 48-byte CQE`);
          this.cqes[s]!.push(c);
        }
        arena.give(u.tag);
      }
      if (got) this.stockCq(s);
    }
  }

  /** Takes the CQEs collected for a CQ. */
  takeCqes(cq: CqInfo | number): CqeValue[] {
    const s = typeof cq === 'number' ? cq : cq.slot;
    this.pollCqs();
    return this.cqes[s]!.splice(0);
  }

  /** Waits until at least `n` CQEs are collected for a CQ and takes them all (after a short settle for stragglers). */
  async waitCqes(cq: CqInfo, n: number, timeoutMs = 3000): Promise<CqeValue[]> {
    await this.until(() => this.cqes[cq.slot]!.length >= n, timeoutMs, `${n} CQEs on cqn ${cq.cqn} (have ${this.cqes[cq.slot]!.length})`);
    await this.settle(5);
    return this.takeCqes(cq);
  }

  // --- send and receive queues --------------------------------------------------

  private postWq(q: RawQueue<number>, bytes: Uint8Array, o: { split?: number[]; writable?: number; kick?: boolean }): number {
    const arena = this.wqArenas.get(q.index)!;
    const writable = o.writable ?? 0;
    let tag = -1;
    let gpa: number;
    if (bytes.byteLength + writable <= arena.slotBytes && arena.available > 0) {
      tag = arena.take()!;
      gpa = arena.gpa(tag);
    } else {
      gpa = this.ram.alloc(Math.max(1, bytes.byteLength + writable), 16);
    }
    this.ram.bytes(gpa, bytes.byteLength).set(bytes);
    const segs: Segment[] = [];
    let off = 0;
    if (bytes.byteLength > 0) {
      for (const n of splitSizes(bytes.byteLength, o.split)) {
        segs.push({ gpa: gpa + off, len: n, writable: false });
        off += n;
      }
    }
    if (writable > 0) segs.push({ gpa: gpa + off, len: writable, writable: true });
    if (segs.length === 0) segs.push({ gpa, len: 0, writable: false });
    const head = q.add(segs, tag);
    if (head === null) {
      if (tag >= 0) arena.give(tag);
      throw new Error(`vq ${q.index}: no free descriptors (${q.freeDescs})`);
    }
    if (o.kick ?? true) q.kick();
    return head;
  }

  postSend(qp: QpInfo | number, bytes: Uint8Array, o: { split?: number[]; writable?: number; kick?: boolean } = {}): number {
    return this.postWq(this.sqQ[typeof qp === 'number' ? qp : qp.slot]!, bytes, o);
  }

  postRecv(qp: QpInfo | number, bytes: Uint8Array, o: { split?: number[]; writable?: number; kick?: boolean } = {}): number {
    return this.postWq(this.rqQ[typeof qp === 'number' ? qp : qp.slot]!, bytes, o);
  }

  /** Collects returned SQ/RQ chains of a QP slot; returns them (head, len). */
  reapWq(q: RawQueue<number>): { head: number; len: number }[] {
    const arena = this.wqArenas.get(q.index)!;
    const out: { head: number; len: number }[] = [];
    for (;;) {
      const u = q.takeUsed();
      if (u === null) break;
      if (u.len !== 0) throw new Error(`vq ${q.index}: WQE chain ${u.head} returned with used length ${u.len} (must be 0)`);
      if (u.tag >= 0) arena.give(u.tag);
      out.push({ head: u.head, len: u.len });
    }
    return out;
  }

  /** Collects the returned SQ and RQ chains of a QP. */
  reapQp(qp: QpInfo | number): { sq: { head: number; len: number }[]; rq: { head: number; len: number }[] } {
    const slot = typeof qp === 'number' ? qp : qp.slot;
    return { sq: this.reapWq(this.sqQ[slot]!), rq: this.reapWq(this.rqQ[slot]!) };
  }

  /** Chains of a QP slot the device still holds. */
  held(qp: QpInfo | number): { sq: number; rq: number } {
    const slot = typeof qp === 'number' ? qp : qp.slot;
    return { sq: this.sqQ[slot]!.deviceHolds, rq: this.rqQ[slot]!.deviceHolds };
  }

  // --- device state -------------------------------------------------------------

  counts(): Counts {
    const r = this.device.resources!;
    let sendOut = 0;
    let recvOut = 0;
    for (const q of r.qps.values()) {
      sendOut += q.sendOut.size;
      recvOut += q.recvOut.size;
    }
    return {
      pds: r.pds.size,
      cqs: r.cqs.size,
      qps: r.qps.size,
      mrs: r.mrs.size,
      ahs: r.ahs.size,
      cqSlots: Array.from(r.cqSlots).filter((c) => c !== 0).length,
      qpSlots: Array.from(r.qpSlots).filter((q) => q >= 0).length,
      deferred: r.deferred.length,
      sendOut,
      recvOut,
    };
  }

  /**
   * Every table of the device (PDs, CQs with arming and backlog, QPs with
   * attributes and outstanding heads, MRs with copied page lists and key
   * counters, AHs, slots, deferred returns) as one JSON string, so a test can
   * show that a refused command changed nothing at all.
   */
  snapshot(): string {
    const r = this.device.resources!;
    const replacer = (_k: string, v: unknown): unknown => {
      if (typeof v === 'bigint') return `${v}n`;
      if (v instanceof Uint8Array) return Buffer.from(v).toString('hex');
      if (v instanceof Map) return [...(v as Map<unknown, unknown>).entries()];
      if (v instanceof Int32Array) return Array.from(v);
      return v;
    };
    return JSON.stringify(
      {
        pds: [...r.pds.values()],
        cqs: [...r.cqs.values()],
        qps: [...r.qps.values()],
        ahs: [...r.ahs.values()],
        mrs: r.mrs.saveState(),
        cqSlots: r.cqSlots,
        qpSlots: r.qpSlots,
        deferred: r.deferred,
      },
      replacer,
    );
  }
}

export { Access, Cmd, QpAttr, QpState, QpType, Status, WcOpcode, WcStatus };
