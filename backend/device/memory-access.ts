/**
 * Guest memory as RDMA sees it (the engine's MemoryAccess): every access
 * names an MR by key and is checked for key, PD, bounds and rights before a
 * byte moves. Addresses inside an MR are translated page by page through the
 * MR's copied page list (pages need not be contiguous), and every piece is
 * looked up in the guest-memory table, so nothing outside guest memory is
 * ever touched. Writes mark the dirty log.
 */
import type { GuestMemory, MappedRegion } from '../../virtio/memory/guest-memory.js';
import { Access, RDMA_PAGE_SIZE, WcStatus } from '../abi/constants.js';
import type { AtomicOp, MemoryAccess, Sge } from '../engine/engine.js';
import type { MrRecord, MrTable } from './mr-table.js';

const PAGE = RDMA_PAGE_SIZE;
const PAGE_N = BigInt(PAGE);
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

export class GuestMemoryAccess implements MemoryAccess {
  /** 64-bit views for atomics, one per mapped region. */
  private readonly views64 = new WeakMap<MappedRegion, BigUint64Array>();
  /** Scratch for the MRs a gather/scatter resolved, reused between calls. */
  private readonly resolved: MrRecord[] = [];

  constructor(
    private readonly mrs: MrTable,
    private readonly memory: GuestMemory,
  ) {}

  gather(pdn: number, sges: readonly Sge[], dst: Uint8Array, dstOffset: number): WcStatus {
    let total = 0;
    for (const s of sges) total += s.length;
    if (!Number.isInteger(dstOffset) || dstOffset < 0 || total > dst.length - dstOffset) return WcStatus.LOC_LEN_ERR;
    const mrs = this.resolved;
    for (let i = 0; i < sges.length; i++) {
      const s = sges[i]!;
      if (s.length === 0) continue;
      const r = this.resolveLocal(pdn, s.lkey, s.addr, s.length, false);
      if (typeof r === 'number') return r;
      mrs[i] = r;
    }
    let at = dstOffset;
    for (let i = 0; i < sges.length; i++) {
      const s = sges[i]!;
      if (s.length === 0) continue;
      if (!this.transfer(mrs[i]!, s.addr, s.length, dst, at, false)) return WcStatus.LOC_PROT_ERR;
      at += s.length;
    }
    return WcStatus.SUCCESS;
  }

  scatter(pdn: number, sges: readonly Sge[], src: Uint8Array, srcOffset: number, len: number): WcStatus {
    if (!Number.isInteger(len) || !Number.isInteger(srcOffset) || len < 0 || srcOffset < 0 || len > src.length - srcOffset) return WcStatus.LOC_LEN_ERR;
    let room = 0;
    for (const s of sges) room += s.length;
    if (room < len) return WcStatus.LOC_LEN_ERR;
    // Check every SGE the data reaches before writing any of them.
    const mrs = this.resolved;
    let left = len;
    let used = 0;
    for (; used < sges.length && left > 0; used++) {
      const s = sges[used]!;
      if (s.length === 0) continue;
      const n = Math.min(s.length, left);
      const r = this.resolveLocal(pdn, s.lkey, s.addr, n, true);
      if (typeof r === 'number') return r;
      mrs[used] = r;
      left -= n;
    }
    left = len;
    let at = srcOffset;
    for (let i = 0; i < used; i++) {
      const s = sges[i]!;
      if (s.length === 0) continue;
      const n = Math.min(s.length, left);
      if (!this.transfer(mrs[i]!, s.addr, n, src, at, true)) return WcStatus.LOC_PROT_ERR;
      at += n;
      left -= n;
    }
    return WcStatus.SUCCESS;
  }

  remoteWrite(pdn: number, rkey: number, addr: bigint, src: Uint8Array, srcOffset: number, len: number): WcStatus {
    if (len === 0) return WcStatus.SUCCESS;
    if (!Number.isInteger(len) || !Number.isInteger(srcOffset) || len < 0 || srcOffset < 0 || len > src.length - srcOffset) return WcStatus.REM_ACCESS_ERR;
    const mr = this.resolveRemote(pdn, rkey, addr, len, Access.REMOTE_WRITE);
    if (mr === null || !this.transfer(mr, addr, len, src, srcOffset, true)) return WcStatus.REM_ACCESS_ERR;
    return WcStatus.SUCCESS;
  }

  remoteRead(pdn: number, rkey: number, addr: bigint, dst: Uint8Array, dstOffset: number, len: number): WcStatus {
    if (len === 0) return WcStatus.SUCCESS;
    if (!Number.isInteger(len) || !Number.isInteger(dstOffset) || len < 0 || dstOffset < 0 || len > dst.length - dstOffset) return WcStatus.REM_ACCESS_ERR;
    const mr = this.resolveRemote(pdn, rkey, addr, len, Access.REMOTE_READ);
    if (mr === null || !this.transfer(mr, addr, len, dst, dstOffset, false)) return WcStatus.REM_ACCESS_ERR;
    return WcStatus.SUCCESS;
  }

  remoteCheck(pdn: number, rkey: number, addr: bigint, len: number, right: 'write' | 'read'): WcStatus {
    if (!Number.isInteger(len) || len < 0) return WcStatus.REM_ACCESS_ERR;
    const mr = this.resolveRemote(pdn, rkey, addr, len, right === 'write' ? Access.REMOTE_WRITE : Access.REMOTE_READ);
    return mr === null ? WcStatus.REM_ACCESS_ERR : WcStatus.SUCCESS;
  }

  remoteAtomic(pdn: number, rkey: number, addr: bigint, op: AtomicOp, compareAdd: bigint, swap: bigint): { status: WcStatus; original: bigint } {
    // A misaligned atomic is an invalid request (IBTA), not an access violation.
    if (addr % 8n !== 0n) return { status: WcStatus.REM_INV_REQ_ERR, original: 0n };
    const mr = this.resolveRemote(pdn, rkey, addr, 8, Access.REMOTE_ATOMIC);
    if (mr === null) return { status: WcStatus.REM_ACCESS_ERR, original: 0n };
    // 8-byte aligned in an MR whose pages are 4 KiB aligned: the word never straddles a page.
    const gpa = this.translate(mr, addr);
    const i = this.memory.find(gpa, 8);
    if (i < 0) return { status: WcStatus.REM_ACCESS_ERR, original: 0n };
    const r = this.memory.region(i);
    const off = gpa - r.gpa;
    const operand = BigInt.asUintN(64, compareAdd);
    const replacement = BigInt.asUintN(64, swap);
    let original: bigint;
    if (LITTLE_ENDIAN && off % 8 === 0) {
      // Atomic with respect to guest CPUs too: the region is shared memory.
      const words = this.view64(r);
      original = op === 'cmp_swap' ? Atomics.compareExchange(words, off / 8, operand, replacement) : Atomics.add(words, off / 8, operand);
    } else {
      original = r.dv.getBigUint64(off, true);
      const next = op === 'cmp_swap' ? (original === operand ? replacement : original) : BigInt.asUintN(64, original + operand);
      r.dv.setBigUint64(off, next, true);
    }
    this.memory.log?.mark(gpa, 8);
    return { status: WcStatus.SUCCESS, original };
  }

  /** SEND_WITH_INV and LOCAL_INV are not part of ABI version 1: no key can be invalidated. */
  invalidate(_pdn: number, _rkey: number): boolean {
    return false;
  }

  // ---------------------------------------------------------------------------

  /** The MR for a local access of [addr, addr+len), or the status that refuses it. */
  private resolveLocal(pdn: number, lkey: number, addr: bigint, len: number, write: boolean): MrRecord | WcStatus {
    const mr = this.mrs.byKey(lkey);
    if (mr === undefined || mr.pdn !== pdn) return WcStatus.LOC_PROT_ERR;
    if (!this.inRange(mr, addr, len)) return WcStatus.LOC_PROT_ERR;
    // No LOCAL_WRITE where data lands: the MR is not valid for the operation (LOC_PROT_ERR, as rxe reports it too).
    if (write && !(mr.access & Access.LOCAL_WRITE)) return WcStatus.LOC_PROT_ERR;
    return mr;
  }

  /** The MR for a remote access, or null (REM_ACCESS_ERR): a registered (never a DMA) MR of the PD granting `right` over the range. */
  private resolveRemote(pdn: number, rkey: number, addr: bigint, len: number, right: number): MrRecord | null {
    const mr = this.mrs.byKey(rkey);
    if (mr === undefined || mr.pages === null || mr.pdn !== pdn || !(mr.access & right)) return null;
    return this.inRange(mr, addr, len) ? mr : null;
  }

  private inRange(mr: MrRecord, addr: bigint, len: number): boolean {
    if (addr < 0n) return false;
    const end = addr + BigInt(len);
    if (mr.pages === null) {
      // DMA MR: guest-physical addresses; the range must be guest memory.
      return end <= MAX_SAFE && this.covered(Number(addr), len);
    }
    return addr >= mr.iova && end <= mr.iova + mr.length;
  }

  /** True when every byte of [gpa, gpa+len) is in some region. */
  private covered(gpa: number, len: number): boolean {
    const mem = this.memory;
    while (len > 0) {
      if (mem.find(gpa, len) >= 0) return true;
      const i = mem.find(gpa, 1);
      if (i < 0) return false;
      const n = mem.region(i).end - gpa;
      gpa += n;
      len -= n;
    }
    return true;
  }

  /** Guest-physical address of one in-range MR address. */
  private translate(mr: MrRecord, addr: bigint): number {
    if (mr.pages === null) return Number(addr);
    const off = Number(addr - mr.iova) + Number(mr.iova % PAGE_N);
    return mr.pages[Math.floor(off / PAGE)]! + (off % PAGE);
  }

  /**
   * Copies [addr, addr+len) of an MR to or from `buf`, page by page (runs of
   * contiguous pages in one piece). False when a piece is not guest memory
   * any more (the memory table changed after registration).
   */
  private transfer(mr: MrRecord, addr: bigint, len: number, buf: Uint8Array, bufOff: number, toGuest: boolean): boolean {
    if (mr.pages === null) return this.move(Number(addr), len, buf, bufOff, toGuest);
    const pages = mr.pages;
    let off = Number(addr - mr.iova) + Number(mr.iova % PAGE_N);
    while (len > 0) {
      let p = Math.floor(off / PAGE);
      const inPage = off % PAGE;
      const gpa = pages[p]! + inPage;
      let n = Math.min(len, PAGE - inPage);
      while (n < len && pages[p + 1] === pages[p]! + PAGE) {
        p++;
        n = Math.min(len, n + PAGE);
      }
      if (!this.move(gpa, n, buf, bufOff, toGuest)) return false;
      off += n;
      len -= n;
      bufOff += n;
    }
    return true;
  }

  /** Copies guest-physical [gpa, gpa+n) to or from `buf`, one region at a time. */
  private move(gpa: number, n: number, buf: Uint8Array, bufOff: number, toGuest: boolean): boolean {
    const mem = this.memory;
    while (n > 0) {
      let i = mem.find(gpa, n);
      let take = n;
      if (i < 0) {
        i = mem.find(gpa, 1);
        if (i < 0) return false;
        take = mem.region(i).end - gpa;
      }
      const r = mem.region(i);
      const off = gpa - r.gpa;
      if (toGuest) {
        r.u8.set(buf.subarray(bufOff, bufOff + take), off);
        mem.log?.mark(gpa, take);
      } else {
        buf.set(r.u8.subarray(off, off + take), bufOff);
      }
      gpa += take;
      n -= take;
      bufOff += take;
    }
    return true;
  }

  private view64(r: MappedRegion): BigUint64Array {
    let v = this.views64.get(r);
    if (v === undefined) {
      v = new BigUint64Array(r.buffer, 0, Math.floor(r.size / 8));
      this.views64.set(r, v);
    }
    return v;
  }
}
