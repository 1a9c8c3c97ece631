/**
 * Test support (not used in production): soft-RoCE engines on loopback
 * addresses, each with real guest RAM, a real MR table and MR-checked
 * memory access behind a RecordingHost (every token completes exactly
 * once), plus MRs over contiguous pages with guard bytes around them, RC
 * connection set-up and WR posting.
 */
import { readFileSync } from 'node:fs';
import { GuestRam } from '../../../virtio/frontend/guest-ram.js';
import { GuestMemory, MappedRegion } from '../../../virtio/memory/guest-memory.js';
import { Access, PAGE_LIST_ENTRIES, QpState, QpType, SendFlag, SendOp } from '../../abi/constants.js';
import { GuestMemoryAccess } from '../../device/memory-access.js';
import { MrTable } from '../../device/mr-table.js';
import { resetQpAttributes, type QpAttributes, type SendWr, type Sge } from '../../engine/engine.js';
import { RecordingHost } from '../../engine/recording-host.js';
import { SoftRoceEngine, ipv4Gid } from './soft-roce-engine.js';

const PAGE = 4096;
const RAM_GPA = 0x10_0000;
export const PD = 1;
export const ALL_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;

/** A random UDP port for one test file, so parallel files do not collide. */
export function randomPort(): number {
  return 20000 + Math.floor(Math.random() * 20000);
}

export interface Side {
  readonly address: string;
  readonly ram: GuestRam;
  readonly memory: GuestMemory;
  readonly mrs: MrTable;
  readonly host: RecordingHost;
  readonly engine: SoftRoceEngine;
  readonly gid: Uint8Array;
}

export function makeSide(address: string, port: number, ramBytes: number): Side {
  const ram = new GuestRam(RAM_GPA, ramBytes);
  const memory = new GuestMemory(8);
  memory.replace([new MappedRegion(ram.gpa, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  const mrs = new MrTable(64, memory, 1n << 30n);
  const gid = ipv4Gid(address);
  const host = new RecordingHost(new GuestMemoryAccess(mrs, memory), [gid]);
  const engine = new SoftRoceEngine({ address, port });
  engine.attach(host);
  return { address, ram, memory, mrs, host, engine, gid };
}

export function closeSide(s: Side): void {
  s.engine.close();
  s.memory.clear();
  s.ram.release();
}

/**
 * An MR over contiguous guest pages that starts `lead` bytes into its first
 * page: the bytes of those pages outside the MR (and one whole page on each
 * side) are guard bytes that no remote access may touch.
 */
export interface Region {
  readonly iova: bigint;
  readonly length: number;
  readonly lkey: number;
  readonly rkey: number;
  /** The MR's bytes in guest RAM (a view, no copy). */
  readonly bytes: Uint8Array;
  /** Everything around the MR: pages before, the MR, pages after (a view). */
  readonly span: Uint8Array;
  /** Offset of the MR's first byte in `span`. */
  readonly spanStart: number;
  sge(off: number, n: number): Sge;
}

let nextIova = 0x5000_0000_0000n;

export function region(s: Side, length: number, access = ALL_ACCESS, lead = 0): Region {
  const npages = Math.ceil((lead + length) / PAGE);
  const mem = s.ram.alloc((npages + 2) * PAGE, PAGE);
  const first = mem + PAGE;
  const list = pageList(s, Array.from({ length: npages }, (_, i) => first + i * PAGE));
  const iova = nextIova + BigInt(lead);
  nextIova += 0x1_0000_0000n;
  const rec = s.mrs.register(PD, access, iova, BigInt(length), BigInt(list), npages);
  const span = s.ram.bytes(mem, (npages + 2) * PAGE);
  return {
    iova,
    length,
    lkey: rec.lkey,
    rkey: rec.rkey,
    bytes: s.ram.bytes(first + lead, length),
    span,
    spanStart: PAGE + lead,
    sge: (off, n) => ({ addr: iova + BigInt(off), length: n, lkey: rec.lkey }),
  };
}

/** Writes a page list the MR table reads: one level up to PAGE_LIST_ENTRIES pages, two above. */
function pageList(s: Side, pages: readonly number[]): number {
  const array = (entries: readonly number[]): number => {
    const at = s.ram.alloc(entries.length * 8, 8);
    const dv = new DataView(s.ram.buffer, at - s.ram.gpa, entries.length * 8);
    entries.forEach((p, i) => dv.setBigUint64(i * 8, BigInt(p), true));
    return at;
  };
  if (pages.length <= PAGE_LIST_ENTRIES) return array(pages);
  const level2: number[] = [];
  for (let i = 0; i < pages.length; i += PAGE_LIST_ENTRIES) level2.push(array(pages.slice(i, i + PAGE_LIST_ENTRIES)));
  return array(level2);
}

/** Fills `b` with xorshift32 words from `seed` (fast enough for hundreds of MiB). */
export function fillPattern(b: Uint8Array, seed: number): void {
  let x = seed >>> 0 || 1;
  if (b.byteOffset % 4 === 0) {
    const words = b.length >>> 2;
    const w = new Uint32Array(b.buffer, b.byteOffset, words);
    for (let i = 0; i < words; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      w[i] = x;
    }
    for (let i = words * 4; i < b.length; i++) b[i] = i * 31 + seed;
    return;
  }
  for (let i = 0; i < b.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x;
  }
}

/** A new QP's attributes with what an RC connection here uses (path MTU 1024, retries, rights), then `over`. */
export function rcAttrs(over: Partial<QpAttributes>): QpAttributes {
  return {
    ...resetQpAttributes(),
    pathMtu: 3, // 1024
    timeout: 14,
    retryCnt: 7,
    rnrRetry: 7,
    minRnrTimer: 12,
    maxRdAtomic: 4,
    maxDestRdAtomic: 4,
    accessFlags: Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC,
    ...over,
  };
}

export function avTo(gid: Uint8Array): NonNullable<QpAttributes['av']> {
  return { dgid: gid.slice(), sgidIndex: 0, hopLimit: 64, trafficClass: 0, flowLabel: 0, sl: 0 };
}

/** An RC QP on each side, connected to each other and in RTS. */
export function connectRc(a: Side, b: Side, over: Partial<QpAttributes> = {}, psnA = 0xfffff0, psnB = 0x123456): [number, number] {
  const qa = a.engine.createQp({ type: QpType.RC, pdn: PD, maxSendWr: 1024, maxRecvWr: 1024 }, null, () => false)!;
  const qb = b.engine.createQp({ type: QpType.RC, pdn: PD, maxSendWr: 1024, maxRecvWr: 1024 }, null, () => false)!;
  for (const state of [QpState.INIT, QpState.RTR, QpState.RTS]) {
    a.engine.modifyQp(qa, rcAttrs({ state, destQpn: qb, av: avTo(b.gid), sqPsn: psnA, rqPsn: psnB, ...over }), 0);
    b.engine.modifyQp(qb, rcAttrs({ state, destQpn: qa, av: avTo(a.gid), sqPsn: psnB, rqPsn: psnA, ...over }), 0);
  }
  return [qa, qb];
}

export function sendWr(over: Partial<SendWr>): SendWr {
  const sges = over.sges ?? [];
  return {
    wrId: 0n,
    opcode: SendOp.SEND,
    flags: SendFlag.SIGNALED,
    sges,
    inline: null,
    length: sges.reduce((n, s) => n + s.length, 0),
    imm: 0,
    remoteAddr: 0n,
    rkey: 0,
    compareAdd: 0n,
    swap: 0n,
    ud: null,
    ...over,
  };
}

let nextToken = 1;

/** Posts a send WR and registers its token as outstanding with the side's RecordingHost. */
/** Posts a send WR through the engine, registering its token with the recording host. */
export function postSend(s: Pick<Side, 'host' | 'engine'>, qpn: number, over: Partial<SendWr>): number {
  const t = nextToken++;
  s.host.outstandingSends.add(`${qpn}/${t}`);
  s.engine.postSend(qpn, sendWr(over), t);
  return t;
}

export function postRecv(s: Pick<Side, 'host' | 'engine'>, qpn: number, sges: Sge[]): number {
  const t = nextToken++;
  s.host.outstandingRecvs.add(`${qpn}/${t}`);
  s.engine.postRecv(qpn, { wrId: 0n, sges, length: sges.reduce((n, x) => n + x.length, 0) }, t);
  return t;
}

export async function until(cond: () => boolean, ms = 3000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/**
 * Datagrams the kernel dropped at `s`'s socket because its receive buffer
 * was full (the `drops` column of /proc/net/udp): real loss on loopback,
 * on top of what a test injects.
 */
export function kernelDrops(s: Side): number {
  const [a0, a1, a2, a3] = s.address.split('.').map(Number) as [number, number, number, number];
  const hex = (n: number, w: number): string => n.toString(16).toUpperCase().padStart(w, '0');
  const key = `${hex(a3, 2)}${hex(a2, 2)}${hex(a1, 2)}${hex(a0, 2)}:${hex(s.engine.link.local.port, 4)}`;
  const line = readFileSync('/proc/net/udp', 'utf8')
    .split('\n')
    .find((l) => l.trim().split(/\s+/)[1] === key);
  if (line === undefined) throw new Error(`no socket ${key} in /proc/net/udp`);
  return Number(line.trim().split(/\s+/).at(-1));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
