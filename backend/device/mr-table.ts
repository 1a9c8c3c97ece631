/**
 * The memory-region table (docs/virtio-rdma.md §4, REG_MR / GET_DMA_MR /
 * DEREG_MR). A registered MR keeps its own copy of the guest's page list,
 * read once at registration through bounds-checked guest-memory lookups;
 * later changes to the guest's list have no effect.
 *
 * Keys are `(mrn << 8) | key`. Every MR number has its own 8-bit key that
 * advances on each registration in that slot, so a key kept from an MR
 * that was deregistered does not name the MR that reuses its number (until
 * the slot has been reused 256 times).
 */
import { DeviceError } from '../../virtio/device.js';
import type { GuestMemory } from '../../virtio/memory/guest-memory.js';
import { ACCESS_ALL, ACCESS_REMOTE, Access, MAX_PAGE_LIST_PAGES, PAGE_LIST_ENTRIES, RDMA_PAGE_SIZE, Status } from '../abi/constants.js';
import { ControlError, invalid, noent } from './errors.js';

export interface MrRecord {
  mrn: number;
  pdn: number;
  access: number;
  iova: bigint;
  length: bigint;
  lkey: number;
  rkey: number;
  /** Guest-physical address of each 4 KiB page, null for a DMA MR. */
  pages: Float64Array | null;
}

const PAGE = BigInt(RDMA_PAGE_SIZE);
const U64_LIMIT = 1n << 64n;
/** Largest MR number whose key still fits 32 bits. */
export const MAX_MRN = 0xff_ffff;
/** What a DMA MR's length reads as: all of the 64-bit guest-physical space. */
export const DMA_MR_LENGTH = U64_LIMIT;
const SAVE_VERSION = 1;

/** Pages an MR of `length` bytes at `iova` spans (the value `npages` must equal). */
export function pagesSpanned(iova: bigint, length: bigint): bigint {
  return ((iova % PAGE) + length + PAGE - 1n) / PAGE;
}

/** Checks an access-flag set: known bits only, and remote write/atomic need local write. */
function accessProblem(access: number): string | null {
  if (!Number.isInteger(access) || access < 0 || (access & ~ACCESS_ALL) !== 0) return `unknown access flags 0x${access.toString(16)}`;
  if (access & (Access.REMOTE_WRITE | Access.REMOTE_ATOMIC) && !(access & Access.LOCAL_WRITE)) return 'REMOTE_WRITE and REMOTE_ATOMIC require LOCAL_WRITE';
  return null;
}

/**
 * Copies [gpa, gpa + dst.length) of guest memory into `dst`, across adjacent
 * regions when it has to; false (dst partly filled) when a byte is unmapped.
 */
function readGuest(memory: GuestMemory, gpa: number, dst: Uint8Array): boolean {
  let at = 0;
  while (at < dst.length) {
    const want = dst.length - at;
    let i = memory.find(gpa, want);
    let n = want;
    if (i < 0) {
      i = memory.find(gpa, 1);
      if (i < 0) return false;
      n = memory.region(i).end - gpa;
    }
    const r = memory.region(i);
    const off = gpa - r.gpa;
    dst.set(r.u8.subarray(off, off + n), at);
    at += n;
    gpa += n;
  }
  return true;
}

export class MrTable {
  private readonly records = new Map<number, MrRecord>();
  /** Per MR number, the key of its latest registration (0 = never used). */
  private keys: Uint8Array;
  private readonly perPd = new Map<number, number>();
  /** Every number below this is in use. */
  private lowestFree = 1;

  constructor(
    readonly limit: number,
    private readonly memory: GuestMemory,
    readonly maxMrSize: bigint,
  ) {
    if (!Number.isInteger(limit) || limit < 1 || limit > MAX_MRN) throw new RangeError(`MR limit ${limit} not in 1..${MAX_MRN}`);
    if (maxMrSize <= 0n) throw new RangeError('maxMrSize must be positive');
    this.keys = new Uint8Array(limit + 1);
  }

  get size(): number {
    return this.records.size;
  }

  get(mrn: number): MrRecord | undefined {
    return this.records.get(mrn);
  }

  /** The MR a local or remote key names: its number and its current key byte must both match. */
  byKey(key: number): MrRecord | undefined {
    const mr = this.records.get(key >>> 8);
    return mr !== undefined && (mr.lkey & 0xff) === (key & 0xff) ? mr : undefined;
  }

  countForPd(pdn: number): number {
    return this.perPd.get(pdn) ?? 0;
  }

  all(): MrRecord[] {
    return [...this.records.values()].sort((a, b) => a.mrn - b.mrn);
  }

  /**
   * REG_MR. Validates every field (EINVAL), the table limit (ENOMEM) and the
   * page list (EFAULT when an array or page is not in guest memory, EINVAL
   * for a misaligned page), then copies the page list. Nothing changes when
   * it throws.
   */
  register(pdn: number, access: number, iova: bigint, length: bigint, pageList: bigint, npages: number): MrRecord {
    const bad = accessProblem(access);
    if (bad !== null) throw invalid(bad);
    if (iova < 0n || iova >= U64_LIMIT) throw invalid(`iova ${iova} is not a 64-bit address`);
    if (length <= 0n) throw invalid('length is 0');
    if (length > this.maxMrSize) throw invalid(`length ${length} exceeds max_mr_size ${this.maxMrSize}`);
    if (iova + length > U64_LIMIT) throw invalid(`iova 0x${iova.toString(16)} + length 0x${length.toString(16)} wraps`);
    if (!Number.isInteger(npages) || npages < 0) throw invalid(`npages ${npages}`);
    const spanned = pagesSpanned(iova, length);
    if (BigInt(npages) !== spanned) throw invalid(`npages ${npages} does not match iova 0x${iova.toString(16)} and length ${length} (${spanned} pages)`);
    if (npages > MAX_PAGE_LIST_PAGES) throw invalid(`npages ${npages} exceeds ${MAX_PAGE_LIST_PAGES}`);
    const mrn = this.freeNumber();
    const pages = this.readPageList(pageList, npages);
    return this.insert(mrn, pdn, access, iova, length, pages);
  }

  /** GET_DMA_MR: a local-only MR over all guest memory; SGE addresses in it are guest-physical. */
  registerDma(pdn: number, access: number): MrRecord {
    const bad = accessProblem(access);
    if (bad !== null) throw invalid(bad);
    if (access & ACCESS_REMOTE) throw invalid('a DMA MR cannot grant remote access');
    return this.insert(this.freeNumber(), pdn, access, 0n, DMA_MR_LENGTH, null);
  }

  deregister(mrn: number): void {
    const mr = this.records.get(mrn);
    if (mr === undefined) throw noent(`MR ${mrn} does not exist`);
    this.records.delete(mrn);
    const n = (this.perPd.get(mr.pdn) ?? 1) - 1;
    if (n === 0) this.perPd.delete(mr.pdn);
    else this.perPd.set(mr.pdn, n);
    if (mrn < this.lowestFree) this.lowestFree = mrn;
  }

  private freeNumber(): number {
    if (this.records.size >= this.limit) throw new ControlError(Status.ENOMEM, `MR limit ${this.limit} reached`);
    let n = this.lowestFree;
    while (this.records.has(n)) n++;
    // The size check above guarantees a free number at or below the limit.
    return n;
  }

  private insert(mrn: number, pdn: number, access: number, iova: bigint, length: bigint, pages: Float64Array | null): MrRecord {
    const key = (this.keys[mrn]! + 1) & 0xff;
    this.keys[mrn] = key;
    const lkey = ((mrn << 8) | key) >>> 0;
    const mr: MrRecord = { mrn, pdn, access, iova, length, lkey, rkey: lkey, pages };
    this.records.set(mrn, mr);
    this.perPd.set(pdn, (this.perPd.get(pdn) ?? 0) + 1);
    // freeNumber() handed out the lowest free number, so everything up to it is now in use.
    this.lowestFree = mrn + 1;
    return mr;
  }

  /** Reads and checks the one- or two-level page list; returns the copied page addresses. */
  private readPageList(pageList: bigint, npages: number): Float64Array {
    const pages = new Float64Array(npages);
    if (npages <= PAGE_LIST_ENTRIES) {
      this.readPageArray(pageList, pages, 0, npages, 'page list');
      return pages;
    }
    const level1Count = Math.ceil(npages / PAGE_LIST_ENTRIES);
    const level1 = this.readArray(pageList, level1Count, 'level-1 page list');
    for (let i = 0; i < level1Count; i++) {
      const count = Math.min(PAGE_LIST_ENTRIES, npages - i * PAGE_LIST_ENTRIES);
      this.readPageArray(level1.getBigUint64(i * 8, true), pages, i * PAGE_LIST_ENTRIES, count, `level-2 page list ${i}`);
    }
    return pages;
  }

  private readArray(gpa: bigint, count: number, what: string): DataView {
    const bytes = count * 8;
    if (gpa + BigInt(bytes) > BigInt(Number.MAX_SAFE_INTEGER)) throw new ControlError(Status.EFAULT, `${what} at 0x${gpa.toString(16)} is not in guest memory`);
    const buf = new Uint8Array(bytes);
    if (!readGuest(this.memory, Number(gpa), buf)) throw new ControlError(Status.EFAULT, `${what} at 0x${gpa.toString(16)} (${count} entries) is not in guest memory`);
    return new DataView(buf.buffer);
  }

  private readPageArray(gpa: bigint, into: Float64Array, at: number, count: number, what: string): void {
    const dv = this.readArray(gpa, count, what);
    for (let i = 0; i < count; i++) {
      const page = dv.getBigUint64(i * 8, true);
      if (page % PAGE !== 0n) throw invalid(`page ${at + i} at 0x${page.toString(16)} is not ${RDMA_PAGE_SIZE}-byte aligned`);
      if (page > BigInt(Number.MAX_SAFE_INTEGER) || this.memory.find(Number(page), RDMA_PAGE_SIZE) < 0) {
        throw new ControlError(Status.EFAULT, `page ${at + i} at 0x${page.toString(16)} is not in guest memory`);
      }
      into[at + i] = Number(page);
    }
  }

  // ---------------------------------------------------------------------------
  // State

  /** Plain JSON-able data: every MR with its copied page list (as runs of contiguous pages) and the key counters. */
  saveState(): unknown {
    let top = this.keys.length - 1;
    while (top > 0 && this.keys[top] === 0) top--;
    return {
      version: SAVE_VERSION,
      keys: Buffer.from(this.keys.subarray(0, top + 1)).toString('base64'),
      mrs: this.all().map((mr) => ({
        mrn: mr.mrn,
        pdn: mr.pdn,
        access: mr.access,
        iova: mr.iova.toString(),
        length: mr.length.toString(),
        key: mr.lkey & 0xff,
        pages: mr.pages === null ? null : toRuns(mr.pages),
      })),
    };
  }

  /** Replaces the table with saved data; throws (changing nothing) when the data is malformed or does not fit this table. */
  loadState(data: unknown): void {
    const parsed = this.parse(data);
    this.records.clear();
    this.perPd.clear();
    this.keys = parsed.keys;
    this.lowestFree = 1;
    for (const mr of parsed.mrs) {
      this.records.set(mr.mrn, mr);
      this.perPd.set(mr.pdn, (this.perPd.get(mr.pdn) ?? 0) + 1);
    }
    while (this.records.has(this.lowestFree)) this.lowestFree++;
  }

  private parse(data: unknown): { keys: Uint8Array; mrs: MrRecord[] } {
    const fail = (what: string): never => {
      throw new DeviceError(`MR table state: ${what}`);
    };
    const o = obj(data, 'root', fail);
    if (o.version !== SAVE_VERSION) fail(`version ${String(o.version)} is not ${SAVE_VERSION}`);
    if (typeof o.keys !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(o.keys)) fail('keys is not base64');
    const savedKeys = Buffer.from(o.keys as string, 'base64');
    if (savedKeys.length > this.limit + 1) fail(`key table of ${savedKeys.length} entries exceeds the limit ${this.limit}`);
    const keys = new Uint8Array(this.limit + 1);
    keys.set(savedKeys);
    if (!Array.isArray(o.mrs)) fail('mrs is not an array');
    const list = o.mrs as unknown[];
    if (list.length > this.limit) fail(`${list.length} MRs exceed the limit ${this.limit}`);
    const seen = new Set<number>();
    const mrs = list.map((x, i): MrRecord => {
      const w = `mrs[${i}]`;
      const m = obj(x, w, fail);
      const mrn = int(m.mrn, `${w}.mrn`, 1, this.limit, fail);
      if (seen.has(mrn)) fail(`${w}: MR ${mrn} twice`);
      seen.add(mrn);
      const pdn = int(m.pdn, `${w}.pdn`, 1, 0xffff_ffff, fail);
      const access = int(m.access, `${w}.access`, 0, ACCESS_ALL, fail);
      const bad = accessProblem(access);
      if (bad !== null) fail(`${w}: ${bad}`);
      const key = int(m.key, `${w}.key`, 0, 255, fail);
      if (keys[mrn] !== key) fail(`${w}: key ${key} disagrees with the key table (${keys[mrn]})`);
      const iova = u64(m.iova, `${w}.iova`, fail);
      const length = bigIntStr(m.length, `${w}.length`, fail);
      const lkey = ((mrn << 8) | key) >>> 0;
      if (m.pages === null) {
        if (access & ACCESS_REMOTE) fail(`${w}: a DMA MR with remote access`);
        if (iova !== 0n || length !== DMA_MR_LENGTH) fail(`${w}: a DMA MR with iova ${iova} and length ${length}`);
        return { mrn, pdn, access, iova, length, lkey, rkey: lkey, pages: null };
      }
      if (length <= 0n || length > this.maxMrSize) fail(`${w}: length ${length} not in 1..${this.maxMrSize}`);
      if (iova + length > U64_LIMIT) fail(`${w}: iova + length wraps`);
      const npages = Number(pagesSpanned(iova, length));
      if (npages > MAX_PAGE_LIST_PAGES) fail(`${w}: ${npages} pages`);
      const pages = fromRuns(m.pages, npages, `${w}.pages`, fail);
      return { mrn, pdn, access, iova, length, lkey, rkey: lkey, pages };
    });
    return { keys, mrs };
  }
}

type Fail = (what: string) => never;

function obj(x: unknown, where: string, fail: Fail): Record<string, unknown> {
  if (typeof x !== 'object' || x === null || Array.isArray(x)) fail(`${where} is not an object`);
  return x as Record<string, unknown>;
}

function int(x: unknown, where: string, min: number, max: number, fail: Fail): number {
  if (typeof x !== 'number' || !Number.isInteger(x) || x < min || x > max) fail(`${where}: ${String(x)} is not an integer in ${min}..${max}`);
  return x as number;
}

function bigIntStr(x: unknown, where: string, fail: Fail): bigint {
  if (typeof x !== 'string' || !/^\d{1,20}$/.test(x)) fail(`${where} is not a decimal string`);
  return BigInt(x as string);
}

function u64(x: unknown, where: string, fail: Fail): bigint {
  const v = bigIntStr(x, where, fail);
  if (v >= U64_LIMIT) fail(`${where} exceeds 64 bits`);
  return v;
}

/** Page addresses as [first, count] runs of contiguous pages: compact for the usual mostly contiguous lists. */
function toRuns(pages: Float64Array): [number, number][] {
  const runs: [number, number][] = [];
  let i = 0;
  while (i < pages.length) {
    const first = pages[i]!;
    let n = 1;
    while (i + n < pages.length && pages[i + n] === first + n * RDMA_PAGE_SIZE) n++;
    runs.push([first, n]);
    i += n;
  }
  return runs;
}

function fromRuns(x: unknown, npages: number, where: string, fail: Fail): Float64Array {
  if (!Array.isArray(x)) fail(`${where} is not an array`);
  const pages = new Float64Array(npages);
  let at = 0;
  (x as unknown[]).forEach((run, i) => {
    if (!Array.isArray(run) || run.length !== 2) fail(`${where}[${i}] is not a [first, count] pair`);
    const [first, count] = run as unknown[];
    const f = int(first, `${where}[${i}][0]`, 0, Number.MAX_SAFE_INTEGER, fail);
    const n = int(count, `${where}[${i}][1]`, 1, npages - at, fail);
    if (f % RDMA_PAGE_SIZE !== 0) fail(`${where}[${i}]: page 0x${f.toString(16)} is not aligned`);
    if (f + n * RDMA_PAGE_SIZE > Number.MAX_SAFE_INTEGER) fail(`${where}[${i}]: run ends past 2^53`);
    for (let k = 0; k < n; k++) pages[at + k] = f + k * RDMA_PAGE_SIZE;
    at += n;
  });
  if (at !== npages) fail(`${where} holds ${at} pages, the MR spans ${npages}`);
  return pages;
}
