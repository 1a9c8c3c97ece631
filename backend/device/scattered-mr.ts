/**
 * Test support: registers an MR whose pages are out of order and never
 * adjacent in guest-physical memory (or contiguous, when asked), so that
 * every copy through it really walks the page list. More than 512 pages
 * get a two-level list. The helpers find the MR's bytes by walking the
 * page list themselves, independently of the code under test.
 */
import type { GuestRam } from '../../virtio/frontend/guest-ram.js';
import type { Sge } from '../engine/engine.js';
import type { MrRecord, MrTable } from './mr-table.js';

const PAGE = 4096;
const LIST_ENTRIES = 512;

export interface ScatteredMr {
  mr: MrRecord;
  iova: bigint;
  length: number;
  pages: number[];
  /** Guest-physical address of MR byte `off`. */
  gpa(off: number): number;
  write(off: number, bytes: Uint8Array): void;
  read(off: number, len: number): Uint8Array;
  sge(off: number, len: number): Sge;
}

export interface ScatteredMrOptions {
  pdn: number;
  iova: bigint;
  contiguous?: boolean;
}

export function registerScatteredMr(ram: GuestRam, mrs: MrTable, length: number, access: number, opts: ScatteredMrOptions): ScatteredMr {
  const { iova } = opts;
  const first = Number(iova % BigInt(PAGE));
  const n = Math.ceil((first + length) / PAGE);
  const span = opts.contiguous ? n : 2 * n + 1;
  const base = ram.alloc(span * PAGE, PAGE);
  const pages = Array.from({ length: n }, (_, i) => (opts.contiguous ? base + i * PAGE : base + PAGE * ((2 * n - 2 * i) % (2 * n + 1))));
  const writeArray = (entries: number[]): number => {
    const at = ram.alloc(entries.length * 8, 8);
    const dv = new DataView(ram.buffer, at - ram.gpa, entries.length * 8);
    entries.forEach((p, i) => dv.setBigUint64(i * 8, BigInt(p), true));
    return at;
  };
  let list: number;
  if (n <= LIST_ENTRIES) list = writeArray(pages);
  else {
    const l2: number[] = [];
    for (let i = 0; i < n; i += LIST_ENTRIES) l2.push(writeArray(pages.slice(i, i + LIST_ENTRIES)));
    list = writeArray(l2);
  }
  const mr = mrs.register(opts.pdn, access, iova, BigInt(length), BigInt(list), n);
  const gpa = (off: number): number => pages[Math.floor((first + off) / PAGE)]! + ((first + off) % PAGE);
  const each = (off: number, len: number, fn: (g: number, at: number, k: number) => void): void => {
    let at = 0;
    while (at < len) {
      const g = gpa(off + at);
      const k = Math.min(len - at, PAGE - (g % PAGE));
      fn(g, at, k);
      at += k;
    }
  };
  return {
    mr,
    iova,
    length,
    pages,
    gpa,
    write: (off, bytes) => each(off, bytes.length, (g, at, k) => ram.bytes(g, k).set(bytes.subarray(at, at + k))),
    read: (off, len) => {
      const out = new Uint8Array(len);
      each(off, len, (g, at, k) => out.set(ram.bytes(g, k), at));
      return out;
    },
    sge: (off, len) => ({ addr: iova + BigInt(off), length: len, lkey: mr.lkey }),
  };
}
