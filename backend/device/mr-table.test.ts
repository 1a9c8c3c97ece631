import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { GuestRam } from '../../virtio/frontend/guest-ram.js';
import { GuestMemory, MappedRegion } from '../../virtio/memory/guest-memory.js';
import { Access, MAX_PAGE_LIST_PAGES, Status } from '../abi/constants.js';
import { ControlError } from './errors.js';
import { DMA_MR_LENGTH, MrTable } from './mr-table.js';

const RAM_GPA = 0x10_0000;
const RAM_SIZE = 32 << 20;
const PAGE = 4096;
const GiB = 1n << 30n;

let ram: GuestRam;
let memory: GuestMemory;
let extra: GuestRam[] = [];

beforeEach(() => {
  ram = new GuestRam(RAM_GPA, RAM_SIZE);
  memory = new GuestMemory(8);
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
});

afterEach(() => {
  memory.clear();
  ram.release();
  for (const r of extra) r.release();
  extra = [];
});

/** `n` page addresses, deliberately out of order and not contiguous. */
function scatteredPages(n: number): number[] {
  const base = ram.alloc((2 * n + 1) * PAGE, PAGE);
  const pages: number[] = [];
  for (let i = 0; i < n; i++) pages.push(base + PAGE * ((i * 7919) % (2 * n + 1)));
  return pages;
}

function writeList(entries: (number | bigint)[], at?: number): bigint {
  const gpa = at ?? ram.alloc(entries.length * 8, 8);
  const dv = new DataView(ram.buffer, gpa - ram.gpa, entries.length * 8);
  entries.forEach((p, i) => dv.setBigUint64(i * 8, BigInt(p), true));
  return BigInt(gpa);
}

/** A two-level page list: level 1 names arrays of 512 page addresses. */
function writeTwoLevel(pages: number[]): bigint {
  const level2: bigint[] = [];
  for (let i = 0; i < pages.length; i += 512) level2.push(writeList(pages.slice(i, i + 512)));
  return writeList(level2);
}

function statusOf(fn: () => unknown): Status | 'ok' {
  try {
    fn();
    return 'ok';
  } catch (err) {
    if (err instanceof ControlError) return err.status;
    throw err;
  }
}

describe('MrTable.register', () => {
  it('copies the page list at registration: later changes to the guest list have no effect', () => {
    const t = new MrTable(16, memory, GiB);
    const pages = scatteredPages(3);
    const list = writeList(pages);
    const mr = t.register(1, Access.LOCAL_WRITE, 0x1000n, 3n * 4096n, list, 3);
    writeList([0xdead000, 0xbeef000, 0xf00d000], Number(list));
    expect(Array.from(mr.pages!)).toEqual(pages);
    expect(mr.mrn).toBe(1);
    expect(mr.lkey).toBe(mr.rkey);
    expect(mr.lkey >>> 8).toBe(1);
    expect(t.byKey(mr.lkey)).toBe(mr);
    expect(t.byKey(mr.lkey ^ 1)).toBeUndefined();
    expect(t.get(1)).toBe(mr);
    expect(t.size).toBe(1);
    expect(t.countForPd(1)).toBe(1);
    expect(t.countForPd(2)).toBe(0);
  });

  it('cross-checks npages against iova and length (CVE-2021-3582 class): one too few, one too many, and 0 are EINVAL', () => {
    const t = new MrTable(16, memory, GiB);
    const pages = scatteredPages(4);
    const list = writeList(pages);
    // iova 0xff0 + 0x20 bytes straddles two pages.
    expect(statusOf(() => t.register(1, 0, 0xff0n, 0x20n, list, 1))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, 0xff0n, 0x20n, list, 3))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, list, 0))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, 0n, 4097n, list, 1))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, 0xfffn, 4096n * 3n + 1n, list, 4))).toBe('ok');
    expect(statusOf(() => t.register(1, 0, 0xff0n, 0x20n, list, 2))).toBe('ok');
    expect(t.size).toBe(2);
  });

  it('refuses length 0, length above max_mr_size, and iova + length that wraps 2^64', () => {
    const t = new MrTable(16, memory, 1n << 20n);
    const list = writeList(scatteredPages(2));
    expect(statusOf(() => t.register(1, 0, 0n, 0n, list, 0))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, 0n, (1n << 20n) + 1n, list, 257))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, (1n << 64n) - 4096n, 8192n, list, 2))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, (1n << 64n) - 8192n, 8192n, list, 2))).toBe('ok');
  });

  it('refuses npages above 512*512 before reading any page list', () => {
    const t = new MrTable(16, memory, 1n << 40n);
    const n = MAX_PAGE_LIST_PAGES + 1;
    // The list address is not guest memory: EINVAL (not EFAULT) proves nothing was read.
    expect(statusOf(() => t.register(1, 0, 0n, BigInt(n) * 4096n, 0xdead_0000_0000n, n))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, 0xdead_0000_0000n, 0xffff_ffff))).toBe(Status.EINVAL);
    // An exactly 1 GiB MR that is not page aligned needs 262145 pages: refused too.
    expect(statusOf(() => t.register(1, 0, 1n, GiB, 0xdead_0000_0000n, MAX_PAGE_LIST_PAGES + 1))).toBe(Status.EINVAL);
  });

  it('refuses unknown access bits, and REMOTE_WRITE or REMOTE_ATOMIC without LOCAL_WRITE', () => {
    const t = new MrTable(16, memory, GiB);
    const list = writeList(scatteredPages(1));
    expect(statusOf(() => t.register(1, 0x10, 0n, 4096n, list, 1))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, Access.REMOTE_WRITE, 0n, 4096n, list, 1))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, Access.REMOTE_ATOMIC, 0n, 4096n, list, 1))).toBe(Status.EINVAL);
    expect(statusOf(() => t.register(1, Access.REMOTE_READ, 0n, 4096n, list, 1))).toBe('ok');
    expect(statusOf(() => t.register(1, Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_ATOMIC, 0n, 4096n, list, 1))).toBe('ok');
  });

  it('gives EFAULT for a page list outside guest memory or running past its end', () => {
    const t = new MrTable(16, memory, GiB);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, 0x1000n, 1))).toBe(Status.EFAULT);
    expect(statusOf(() => t.register(1, 0, 0n, 8192n, BigInt(RAM_GPA + RAM_SIZE - 8), 2))).toBe(Status.EFAULT);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, (1n << 64n) - 8n, 1))).toBe(Status.EFAULT);
    expect(t.size).toBe(0);
  });

  it('gives EFAULT for a page outside guest memory (or running past its end) and EINVAL for a misaligned page', () => {
    const t = new MrTable(16, memory, GiB);
    const good = scatteredPages(1)[0]!;
    expect(statusOf(() => t.register(1, 0, 0n, 8192n, writeList([good, 0x1000]), 2))).toBe(Status.EFAULT);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, writeList([RAM_GPA + RAM_SIZE]), 1))).toBe(Status.EFAULT);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, writeList([1n << 60n]), 1))).toBe(Status.EFAULT);
    expect(statusOf(() => t.register(1, 0, 0n, 8192n, writeList([good, good + 8]), 2))).toBe(Status.EINVAL);
    expect(t.size).toBe(0);
  });

  it('reads a two-level page list for more than 512 pages, and checks every level-2 array and page', () => {
    const t = new MrTable(16, memory, GiB);
    const pages = scatteredPages(1100);
    const mr = t.register(1, Access.LOCAL_WRITE, 0x234n, 1100n * 4096n - 0x234n, writeTwoLevel(pages), 1100);
    expect(Array.from(mr.pages!)).toEqual(pages);
    // A level-2 array outside memory.
    const l1 = writeList([writeList(pages.slice(0, 512)), 0x2000n, writeList(pages.slice(1024))]);
    expect(statusOf(() => t.register(1, 0, 0n, 1100n * 4096n, l1, 1100))).toBe(Status.EFAULT);
    // A bad page in the last, short level-2 array.
    const bad = pages.slice();
    bad[1099] = 0x3000;
    expect(statusOf(() => t.register(1, 0, 0n, 1100n * 4096n, writeTwoLevel(bad), 1100))).toBe(Status.EFAULT);
    bad[1099] = pages[1099]! + 1;
    expect(statusOf(() => t.register(1, 0, 0n, 1100n * 4096n, writeTwoLevel(bad), 1100))).toBe(Status.EINVAL);
    expect(t.size).toBe(1);
  });

  it('reads a page list that straddles two adjacent memory regions', () => {
    const next = new GuestRam(RAM_GPA + RAM_SIZE, 1 << 20);
    extra.push(next);
    memory.add(new MappedRegion(next.gpa, next.size, next.userAddr, 0, next.buffer, null));
    const t = new MrTable(16, memory, GiB);
    const pages = [RAM_GPA, RAM_GPA + RAM_SIZE, RAM_GPA + 2 * PAGE, RAM_GPA + RAM_SIZE + PAGE];
    // Two entries at the end of the first region, two at the start of the second.
    const at = RAM_GPA + RAM_SIZE - 16;
    const dv1 = new DataView(ram.buffer, RAM_SIZE - 16, 16);
    const dv2 = new DataView(next.buffer, 0, 16);
    dv1.setBigUint64(0, BigInt(pages[0]!), true);
    dv1.setBigUint64(8, BigInt(pages[1]!), true);
    dv2.setBigUint64(0, BigInt(pages[2]!), true);
    dv2.setBigUint64(8, BigInt(pages[3]!), true);
    const mr = t.register(1, 0, 0n, 4n * 4096n, BigInt(at), 4);
    expect(Array.from(mr.pages!)).toEqual(pages);
  });
});

describe('MrTable numbers and keys', () => {
  it('fills the table to its limit: the limit-th registration works, the next is ENOMEM, and nothing leaks', () => {
    const t = new MrTable(4, memory, GiB);
    const list = writeList(scatteredPages(1));
    const mrs = [1, 2, 3].map(() => t.register(1, 0, 0n, 4096n, list, 1));
    const dma = t.registerDma(2, Access.LOCAL_WRITE);
    expect([...mrs.map((m) => m.mrn), dma.mrn]).toEqual([1, 2, 3, 4]);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, list, 1))).toBe(Status.ENOMEM);
    expect(statusOf(() => t.registerDma(1, 0))).toBe(Status.ENOMEM);
    expect(t.size).toBe(4);
    expect(t.countForPd(1)).toBe(3);
    expect(t.countForPd(2)).toBe(1);
    t.deregister(2);
    expect(t.countForPd(1)).toBe(2);
    const again = t.register(1, 0, 0n, 4096n, list, 1);
    expect(again.mrn).toBe(2);
    expect(statusOf(() => t.register(1, 0, 0n, 4096n, list, 1))).toBe(Status.ENOMEM);
    for (const m of t.all()) t.deregister(m.mrn);
    expect(t.size).toBe(0);
    expect(t.countForPd(1)).toBe(0);
    expect(t.countForPd(2)).toBe(0);
    expect(t.register(1, 0, 0n, 4096n, list, 1).mrn).toBe(1);
  });

  it('reuses the lowest free number', () => {
    const t = new MrTable(8, memory, GiB);
    for (let i = 0; i < 5; i++) t.registerDma(1, 0);
    t.deregister(4);
    t.deregister(2);
    expect(t.registerDma(1, 0).mrn).toBe(2);
    expect(t.registerDma(1, 0).mrn).toBe(4);
    expect(t.registerDma(1, 0).mrn).toBe(6);
  });

  it('changes the key on every registration of a number, so a stale key does not name the new MR', () => {
    const t = new MrTable(4, memory, GiB);
    const list = writeList(scatteredPages(1));
    const first = t.register(1, Access.LOCAL_WRITE, 0n, 4096n, list, 1);
    t.deregister(first.mrn);
    expect(t.byKey(first.lkey)).toBeUndefined();
    const second = t.register(1, Access.LOCAL_WRITE, 0n, 4096n, list, 1);
    expect(second.mrn).toBe(first.mrn);
    expect(second.lkey).not.toBe(first.lkey);
    expect(t.byKey(first.lkey)).toBeUndefined();
    expect(t.byKey(second.lkey)).toBe(second);
    // 255 more registrations of the same number never repeat the key of the one before.
    const seen = new Set<number>([first.lkey, second.lkey]);
    let prev = second;
    for (let i = 0; i < 254; i++) {
      t.deregister(prev.mrn);
      prev = t.registerDma(1, 0);
      expect(seen.has(prev.lkey)).toBe(false);
      seen.add(prev.lkey);
    }
    expect(seen.size).toBe(256);
  });

  it('a failed registration changes nothing: same number and key sequence afterwards', () => {
    const a = new MrTable(4, memory, GiB);
    const b = new MrTable(4, memory, GiB);
    const list = writeList(scatteredPages(1));
    expect(statusOf(() => a.register(1, 0, 0n, 4096n, 0x10n, 1))).toBe(Status.EFAULT);
    expect(statusOf(() => a.register(1, 0, 0n, 4096n, writeList([0x5000]), 1))).toBe(Status.EFAULT);
    const x = a.register(1, 0, 0n, 4096n, list, 1);
    const y = b.register(1, 0, 0n, 4096n, list, 1);
    expect(x.lkey).toBe(y.lkey);
    expect(a.size).toBe(1);
  });

  it('GET_DMA_MR: a local-only MR with no page list; remote access flags are EINVAL', () => {
    const t = new MrTable(4, memory, GiB);
    const mr = t.registerDma(3, Access.LOCAL_WRITE);
    expect(mr.pages).toBeNull();
    expect(mr.iova).toBe(0n);
    expect(mr.length).toBe(DMA_MR_LENGTH);
    for (const a of [Access.REMOTE_READ, Access.LOCAL_WRITE | Access.REMOTE_WRITE, Access.LOCAL_WRITE | Access.REMOTE_ATOMIC, 0x20]) {
      expect(statusOf(() => t.registerDma(3, a))).toBe(Status.EINVAL);
    }
    expect(t.size).toBe(1);
  });

  it('deregistering an unknown MR is ENOENT', () => {
    const t = new MrTable(4, memory, GiB);
    expect(statusOf(() => t.deregister(1))).toBe(Status.ENOENT);
    const mr = t.registerDma(1, 0);
    t.deregister(mr.mrn);
    expect(statusOf(() => t.deregister(mr.mrn))).toBe(Status.ENOENT);
    expect(statusOf(() => t.deregister(0))).toBe(Status.ENOENT);
  });
});

describe('MrTable state', () => {
  function populated(): MrTable {
    const t = new MrTable(8, memory, GiB);
    t.register(1, Access.LOCAL_WRITE | Access.REMOTE_READ, 0x7000_0000_0123n, 5000n, writeList(scatteredPages(2)), 2);
    t.registerDma(2, Access.LOCAL_WRITE);
    const contiguous = ram.alloc(700 * PAGE, PAGE);
    t.register(1, 0, 0n, 700n * 4096n, writeTwoLevel(Array.from({ length: 700 }, (_, i) => contiguous + i * PAGE)), 700);
    const gone = t.registerDma(1, 0);
    t.deregister(gone.mrn);
    t.deregister(t.registerDma(1, 0).mrn);
    return t;
  }

  it('round-trips through JSON: same MRs, page lists, keys, and the same next number and key', () => {
    const t = populated();
    const json = JSON.parse(JSON.stringify(t.saveState())) as unknown;
    const u = new MrTable(8, memory, GiB);
    u.registerDma(9, 0); // replaced by the load
    u.loadState(json);
    expect(u.size).toBe(t.size);
    expect(u.all()).toEqual(t.all());
    expect(u.countForPd(1)).toBe(2);
    expect(u.countForPd(9)).toBe(0);
    // The contiguous 700-page list is stored as one run.
    const saved = json as { mrs: { pages: unknown[] | null }[] };
    expect(saved.mrs[2]!.pages).toHaveLength(1);
    const a = t.registerDma(1, 0);
    const b = u.registerDma(1, 0);
    expect(b.mrn).toBe(a.mrn);
    expect(b.lkey).toBe(a.lkey);
  });

  it('refuses malformed or unfitting state and changes nothing', () => {
    const t = populated();
    const good = JSON.parse(JSON.stringify(t.saveState())) as { version: number; keys: string; mrs: Record<string, unknown>[] };
    const variants: unknown[] = [
      null,
      [],
      { ...good, version: 2 },
      { ...good, keys: '!!' },
      { ...good, mrs: {} },
      { ...good, mrs: [{ ...good.mrs[0], mrn: 9 }] },
      { ...good, mrs: [good.mrs[0], good.mrs[0]] },
      { ...good, mrs: [{ ...good.mrs[0], key: 77 }] },
      { ...good, mrs: [{ ...good.mrs[0], length: '-5' }] },
      { ...good, mrs: [{ ...good.mrs[0], length: '0' }] },
      { ...good, mrs: [{ ...good.mrs[0], iova: '18446744073709551616' }] },
      { ...good, mrs: [{ ...good.mrs[0], access: Access.REMOTE_WRITE }] },
      { ...good, mrs: [{ ...good.mrs[0], pages: [[RAM_GPA, 1]] }] },
      { ...good, mrs: [{ ...good.mrs[0], pages: [[RAM_GPA + 1, 2]] }] },
      { ...good, mrs: [{ ...good.mrs[0], pages: [[RAM_GPA, 3]] }] },
      { ...good, mrs: [{ ...good.mrs[1], access: Access.LOCAL_WRITE | Access.REMOTE_READ }] },
      { ...good, mrs: [{ ...good.mrs[1], length: '4096' }] },
    ];
    const u = new MrTable(8, memory, GiB);
    const keep = u.registerDma(4, 0);
    for (const v of variants) {
      expect(() => u.loadState(v)).toThrow(/MR table state/);
      expect(u.all()).toEqual([keep]);
    }
    // A smaller table cannot take it.
    expect(() => new MrTable(2, memory, GiB).loadState(good)).toThrow(/MR table state/);
    // Nor one with a smaller max_mr_size.
    expect(() => new MrTable(8, memory, 4096n).loadState(good)).toThrow(/MR table state/);
  });
});
