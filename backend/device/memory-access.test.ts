import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { registerScatteredMr, type ScatteredMr } from './scattered-mr.js';
import { GuestRam } from '../../virtio/frontend/guest-ram.js';
import { DirtyLog } from '../../virtio/memory/dirty-log.js';
import { GuestMemory, MappedRegion } from '../../virtio/memory/guest-memory.js';
import { Access, WcStatus } from '../abi/constants.js';
import type { Sge } from '../engine/engine.js';
import { GuestMemoryAccess } from './memory-access.js';
import { MrTable } from './mr-table.js';

const RAM_GPA = 0x10_0000;
const RAM_SIZE = 16 << 20;
const PAGE = 4096;

let ram: GuestRam;
let memory: GuestMemory;
let mrs: MrTable;
let access: GuestMemoryAccess;
let extra: GuestRam[] = [];

beforeEach(() => {
  ram = new GuestRam(RAM_GPA, RAM_SIZE);
  memory = new GuestMemory(8);
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  mrs = new MrTable(64, memory, 1n << 30n);
  access = new GuestMemoryAccess(mrs, memory);
});

afterEach(() => {
  memory.clear();
  ram.release();
  for (const r of extra) r.release();
  extra = [];
});

/** An MR whose pages are scattered (out of order, never adjacent), with helpers that find its bytes by walking the page list. */

function makeMr(length: number, acc: number, opts: { pdn?: number; iova?: bigint; contiguous?: boolean } = {}): ScatteredMr {
  return registerScatteredMr(ram, mrs, length, acc, { pdn: opts.pdn ?? 1, iova: opts.iova ?? 0x7fff_0000_0000_0321n, ...(opts.contiguous !== undefined ? { contiguous: opts.contiguous } : {}) });
}

function pattern(len: number, seed = 1): Uint8Array {
  const b = new Uint8Array(len);
  let x = seed;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

const sge = (m: ScatteredMr, off: number, length: number, lkey = m.mr.lkey): Sge => ({ addr: m.iova + BigInt(off), length, lkey });

describe('local access (gather, scatter)', () => {
  it('scatters and gathers across page boundaries of non-contiguous pages', () => {
    const m = makeMr(5 * PAGE, Access.LOCAL_WRITE);
    const data = pattern(3 * PAGE + 100);
    // Starts 50 bytes before the end of the MR's second page.
    const off = 2 * PAGE - 0x321 - 50;
    expect(access.scatter(1, [sge(m, off, data.length)], data, 0, data.length)).toBe(WcStatus.SUCCESS);
    expect(m.read(off, data.length)).toEqual(data);
    // The pages really are scattered: consecutive MR pages are not adjacent in guest memory.
    expect(m.pages[2]! - m.pages[1]!).not.toBe(PAGE);
    const back = new Uint8Array(data.length + 7);
    expect(access.gather(1, [sge(m, off, data.length)], back, 7)).toBe(WcStatus.SUCCESS);
    expect(back.subarray(7)).toEqual(data);
  });

  it('gathers several SGEs from several MRs in order, and scatters len bytes over several SGEs', () => {
    const a = makeMr(3 * PAGE, Access.LOCAL_WRITE);
    const b = makeMr(2 * PAGE, Access.LOCAL_WRITE, { iova: 0x1000n });
    const pa = pattern(5000, 2);
    const pb = pattern(3000, 3);
    a.write(100, pa);
    b.write(4000, pb);
    const out = new Uint8Array(8000);
    expect(access.gather(1, [sge(a, 100, 5000), { addr: 0x1000n, length: 0, lkey: 0xdead }, sge(b, 4000, 3000)], out, 0)).toBe(WcStatus.SUCCESS);
    expect(out.subarray(0, 5000)).toEqual(pa);
    expect(out.subarray(5000)).toEqual(pb);
    const src = pattern(6000, 4);
    const untouched = b.read(1010, 100);
    // 6000 bytes into SGEs of 5000 + 3000: the second SGE gets 1000 and the rest of it is left alone.
    expect(access.scatter(1, [sge(a, 0, 5000), sge(b, 10, 3000)], src, 0, 6000)).toBe(WcStatus.SUCCESS);
    expect(a.read(0, 5000)).toEqual(src.subarray(0, 5000));
    expect(b.read(10, 1000)).toEqual(src.subarray(5000));
    expect(b.read(1010, 100)).toEqual(untouched);
  });

  it('refuses bad local keys, another PD, and ranges outside the MR with LOC_PROT_ERR', () => {
    const m = makeMr(2 * PAGE, Access.LOCAL_WRITE);
    const other = makeMr(PAGE, Access.LOCAL_WRITE, { pdn: 2 });
    const buf = new Uint8Array(2 * PAGE + 16);
    const cases: Sge[] = [
      sge(m, 0, 16, 0x12345),
      sge(m, 0, 16, m.mr.lkey ^ 0x80),
      sge(other, 0, 16),
      { addr: m.iova - 1n, length: 16, lkey: m.mr.lkey },
      sge(m, 2 * PAGE - 15, 16),
      sge(m, 0, 2 * PAGE + 1),
      { addr: (1n << 64n) - 8n, length: 16, lkey: m.mr.lkey },
    ];
    for (const s of cases) {
      expect(access.gather(1, [s], buf, 0)).toBe(WcStatus.LOC_PROT_ERR);
      expect(access.scatter(1, [s], buf, 0, s.length)).toBe(WcStatus.LOC_PROT_ERR);
    }
    expect(access.gather(1, [sge(m, 2 * PAGE - 16, 16)], buf, 0)).toBe(WcStatus.SUCCESS);
  });

  it('scatter needs LOCAL_WRITE (LOC_PROT_ERR); gather does not', () => {
    const ro = makeMr(PAGE, Access.REMOTE_READ);
    const buf = pattern(64);
    expect(access.scatter(1, [sge(ro, 0, 64)], buf, 0, 64)).toBe(WcStatus.LOC_PROT_ERR);
    expect(access.gather(1, [sge(ro, 0, 64)], new Uint8Array(64), 0)).toBe(WcStatus.SUCCESS);
  });

  it('scatter returns LOC_LEN_ERR when the SGEs hold less than len, and writes nothing', () => {
    const m = makeMr(PAGE, Access.LOCAL_WRITE);
    const before = m.read(0, 200);
    expect(access.scatter(1, [sge(m, 0, 100), sge(m, 100, 99)], pattern(200), 0, 200)).toBe(WcStatus.LOC_LEN_ERR);
    expect(m.read(0, 200)).toEqual(before);
    // gather into a destination that is too small is refused too.
    expect(access.gather(1, [sge(m, 0, 100)], new Uint8Array(99), 0)).toBe(WcStatus.LOC_LEN_ERR);
  });

  it('checks every SGE a scatter reaches before writing any: a bad second SGE leaves the first untouched', () => {
    const m = makeMr(PAGE, Access.LOCAL_WRITE);
    const before = m.read(0, 100);
    expect(access.scatter(1, [sge(m, 0, 100), sge(m, 100, 100, 0x999)], pattern(150), 0, 150)).toBe(WcStatus.LOC_PROT_ERR);
    expect(m.read(0, 100)).toEqual(before);
    // An SGE the data does not reach is not checked.
    expect(access.scatter(1, [sge(m, 0, 100), sge(m, 100, 100, 0x999)], pattern(100), 0, 100)).toBe(WcStatus.SUCCESS);
  });

  it('an empty SGE list and zero-length SGEs need no key', () => {
    expect(access.gather(1, [], new Uint8Array(0), 0)).toBe(WcStatus.SUCCESS);
    expect(access.scatter(1, [], new Uint8Array(0), 0, 0)).toBe(WcStatus.SUCCESS);
    expect(access.scatter(1, [{ addr: 5n, length: 0, lkey: 0xbad }], new Uint8Array(0), 0, 0)).toBe(WcStatus.SUCCESS);
    expect(access.gather(1, [{ addr: 5n, length: 0, lkey: 0xbad }], new Uint8Array(0), 0)).toBe(WcStatus.SUCCESS);
  });

  it('a DMA MR takes guest-physical addresses anywhere in guest memory, across adjacent regions, and nothing outside', () => {
    const next = new GuestRam(RAM_GPA + RAM_SIZE, 1 << 20);
    extra.push(next);
    memory.add(new MappedRegion(next.gpa, next.size, next.userAddr, 0, next.buffer, null));
    const dma = mrs.registerDma(1, Access.LOCAL_WRITE);
    const data = pattern(300);
    const at = RAM_GPA + RAM_SIZE - 100;
    expect(access.scatter(1, [{ addr: BigInt(at), length: 300, lkey: dma.lkey }], data, 0, 300)).toBe(WcStatus.SUCCESS);
    expect(ram.bytes(at, 100)).toEqual(data.subarray(0, 100));
    expect(new Uint8Array(next.buffer, 0, 200)).toEqual(data.subarray(100));
    const out = new Uint8Array(300);
    expect(access.gather(1, [{ addr: BigInt(at), length: 300, lkey: dma.lkey }], out, 0)).toBe(WcStatus.SUCCESS);
    expect(out).toEqual(data);
    for (const addr of [0n, BigInt(RAM_GPA - 1), BigInt(next.gpa + next.size - 10), 1n << 62n]) {
      expect(access.gather(1, [{ addr, length: 16, lkey: dma.lkey }], new Uint8Array(16), 0)).toBe(WcStatus.LOC_PROT_ERR);
      expect(access.scatter(1, [{ addr, length: 16, lkey: dma.lkey }], new Uint8Array(16), 0, 16)).toBe(WcStatus.LOC_PROT_ERR);
    }
    // Local-only: its key is never a valid rkey.
    expect(access.remoteRead(1, dma.rkey, BigInt(at), new Uint8Array(8), 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
  });

  it('fails cleanly when a registered page left guest memory after registration', () => {
    const next = new GuestRam(0x4000_0000, 1 << 20);
    extra.push(next);
    memory.add(new MappedRegion(next.gpa, next.size, next.userAddr, 0, next.buffer, null));
    const list = ram.alloc(8, 8);
    new DataView(ram.buffer, list - ram.gpa, 8).setBigUint64(0, BigInt(next.gpa), true);
    const mr = mrs.register(1, Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC, 0n, 4096n, BigInt(list), 1);
    memory.remove(next.region());
    const buf = new Uint8Array(64);
    expect(access.gather(1, [{ addr: 0n, length: 64, lkey: mr.lkey }], buf, 0)).toBe(WcStatus.LOC_PROT_ERR);
    expect(access.scatter(1, [{ addr: 0n, length: 64, lkey: mr.lkey }], buf, 0, 64)).toBe(WcStatus.LOC_PROT_ERR);
    expect(access.remoteWrite(1, mr.rkey, 0n, buf, 0, 64)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteRead(1, mr.rkey, 0n, buf, 0, 64)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteAtomic(1, mr.rkey, 0n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.REM_ACCESS_ERR);
  });
});

describe('remote access', () => {
  it('RDMA WRITE and READ go through the rkey across scattered pages', () => {
    const m = makeMr(4 * PAGE, Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ);
    const data = pattern(2 * PAGE + 500);
    expect(access.remoteWrite(1, m.mr.rkey, m.iova + 3000n, data, 0, data.length)).toBe(WcStatus.SUCCESS);
    expect(m.read(3000, data.length)).toEqual(data);
    const out = new Uint8Array(data.length + 3);
    expect(access.remoteRead(1, m.mr.rkey, m.iova + 3000n, out, 3, data.length)).toBe(WcStatus.SUCCESS);
    expect(out.subarray(3)).toEqual(data);
  });

  it('refuses a bad or stale rkey, another PD, a missing right, or a range outside the MR with REM_ACCESS_ERR', () => {
    const w = makeMr(PAGE, Access.LOCAL_WRITE | Access.REMOTE_WRITE);
    const r = makeMr(PAGE, Access.REMOTE_READ);
    const buf = new Uint8Array(PAGE + 8);
    expect(access.remoteWrite(1, 0x4242, w.iova, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteWrite(2, w.mr.rkey, w.iova, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteWrite(1, r.mr.rkey, r.iova, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteRead(1, w.mr.rkey, w.iova, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteWrite(1, w.mr.rkey, w.iova + 4090n, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteWrite(1, w.mr.rkey, w.iova - 1n, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteRead(1, r.mr.rkey, r.iova, buf, 0, PAGE + 1)).toBe(WcStatus.REM_ACCESS_ERR);
    const stale = w.mr.rkey;
    mrs.deregister(w.mr.mrn);
    const reborn = makeMr(PAGE, Access.LOCAL_WRITE | Access.REMOTE_WRITE);
    expect(reborn.mr.mrn).toBe(w.mr.mrn);
    expect(access.remoteWrite(1, stale, reborn.iova, buf, 0, 8)).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteWrite(1, reborn.mr.rkey, reborn.iova, buf, 0, 8)).toBe(WcStatus.SUCCESS);
  });

  it('a zero-length RDMA READ or WRITE does not check the rkey', () => {
    expect(access.remoteWrite(1, 0xbad, 123n, new Uint8Array(0), 0, 0)).toBe(WcStatus.SUCCESS);
    expect(access.remoteRead(1, 0xbad, 123n, new Uint8Array(0), 0, 0)).toBe(WcStatus.SUCCESS);
  });

  it('compare-and-swap and fetch-and-add are 64-bit little-endian, return the original, and wrap mod 2^64', () => {
    const m = makeMr(PAGE, Access.LOCAL_WRITE | Access.REMOTE_ATOMIC);
    // iova ends in 0x321: MR offset 0xcf + 16 is 8-byte aligned in iova space.
    const off = 0xcf + 16;
    const at = m.iova + BigInt(off);
    expect(at % 8n).toBe(0n);
    const dv = new DataView(ram.buffer, m.gpa(off) - ram.gpa, 8);
    dv.setBigUint64(0, 0x1122_3344_5566_7788n, true);
    expect(access.remoteAtomic(1, m.mr.rkey, at, 'cmp_swap', 4n, 9n)).toEqual({ status: WcStatus.SUCCESS, original: 0x1122_3344_5566_7788n });
    expect(dv.getBigUint64(0, true)).toBe(0x1122_3344_5566_7788n);
    expect(access.remoteAtomic(1, m.mr.rkey, at, 'cmp_swap', 0x1122_3344_5566_7788n, 9n)).toEqual({ status: WcStatus.SUCCESS, original: 0x1122_3344_5566_7788n });
    expect(dv.getBigUint64(0, true)).toBe(9n);
    // Little-endian in guest memory.
    expect(ram.bytes(m.gpa(off), 2)).toEqual(new Uint8Array([9, 0]));
    expect(access.remoteAtomic(1, m.mr.rkey, at, 'fetch_add', (1n << 64n) - 10n, 0n)).toEqual({ status: WcStatus.SUCCESS, original: 9n });
    expect(dv.getBigUint64(0, true)).toBe((1n << 64n) - 1n);
    expect(access.remoteAtomic(1, m.mr.rkey, at, 'fetch_add', 2n, 0n)).toEqual({ status: WcStatus.SUCCESS, original: (1n << 64n) - 1n });
    expect(dv.getBigUint64(0, true)).toBe(1n);
  });

  it('atomics need REMOTE_ATOMIC, the right PD and key, and an 8-byte-aligned address', () => {
    const m = makeMr(PAGE, Access.LOCAL_WRITE | Access.REMOTE_ATOMIC | Access.REMOTE_WRITE, { iova: 0x10000n });
    const noAtomic = makeMr(PAGE, Access.LOCAL_WRITE | Access.REMOTE_WRITE, { iova: 0x20000n });
    expect(access.remoteAtomic(1, m.mr.rkey, 0x10004n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.REM_INV_REQ_ERR);
    expect(access.remoteAtomic(1, noAtomic.mr.rkey, 0x20000n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteAtomic(2, m.mr.rkey, 0x10000n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteAtomic(1, m.mr.rkey + 1, 0x10000n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteAtomic(1, m.mr.rkey, 0x11000n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.REM_ACCESS_ERR);
    expect(access.remoteAtomic(1, m.mr.rkey, 0x10ff8n, 'fetch_add', 1n, 0n).status).toBe(WcStatus.SUCCESS);
  });
});

describe('dirty logging', () => {
  it('marks every page a scatter, RDMA WRITE or atomic writes, and none for reads', () => {
    const log = new DirtyLog(new SharedArrayBuffer(DirtyLog.bytesFor(RAM_GPA + RAM_SIZE)), DirtyLog.bytesFor(RAM_GPA + RAM_SIZE));
    memory.log = log;
    const m = makeMr(4 * PAGE, Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC, { iova: 0n });
    const dirty = (): boolean[] => m.pages.map((p) => log.isDirty(p));
    expect(access.gather(1, [sge(m, 0, 4 * PAGE)], new Uint8Array(4 * PAGE), 0)).toBe(WcStatus.SUCCESS);
    expect(access.remoteRead(1, m.mr.rkey, 0n, new Uint8Array(4 * PAGE), 0, 4 * PAGE)).toBe(WcStatus.SUCCESS);
    expect(dirty()).toEqual([false, false, false, false]);
    expect(access.scatter(1, [sge(m, PAGE - 1, 2)], pattern(2), 0, 2)).toBe(WcStatus.SUCCESS);
    expect(dirty()).toEqual([true, true, false, false]);
    expect(access.remoteAtomic(1, m.mr.rkey, BigInt(3 * PAGE), 'fetch_add', 1n, 0n).status).toBe(WcStatus.SUCCESS);
    expect(dirty()).toEqual([true, true, false, true]);
    expect(access.remoteWrite(1, m.mr.rkey, BigInt(2 * PAGE + 10), pattern(1), 0, 1)).toBe(WcStatus.SUCCESS);
    expect(dirty()).toEqual([true, true, true, true]);
  });
});
