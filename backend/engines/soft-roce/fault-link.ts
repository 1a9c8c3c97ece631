/**
 * Test support (not used in production): a lossy, duplicating, reordering,
 * bit-flipping link on one engine's outgoing direction, built on the
 * engine's `outgoingHook`. Each datagram meets at most one fault, drawn
 * from a seeded PRNG so a failing run can be replayed:
 *
 *   drop       the datagram never leaves;
 *   duplicate  it leaves now and a copy leaves again a little later;
 *   reorder    it is held back and leaves after the next 1–3 datagrams
 *              (or after a few milliseconds if nothing else is sent);
 *   corrupt    one bit flips anywhere in the datagram (BTH, extension
 *              headers, payload, pad, ICRC) after its ICRC was computed.
 *
 * Extra and delayed datagrams go straight to the engine's transport, so
 * the engine's own counters see only what it sent itself.
 *
 * Corruption accounting: the receiver checks a datagram's structure before
 * its ICRC, as rxe_rcv() does, so a flip that breaks the structure (an
 * opcode, TVer or pad bit) is counted as malformed rather than as a bad
 * ICRC; the link predicts which by decoding the flipped bytes. A flip in
 * BTH byte 4 (FECN, BECN, reserved) cannot be seen at all: the ICRC masks
 * that byte, like the IP TTL, because switches may change it. Such packets
 * arrive intact as far as the transport is concerned and are counted apart.
 */
import type { SoftRoceEngine } from './soft-roce-engine.js';
import { RocePacket, decodePacket } from './packet.js';
import type { UdpPeer } from './udp-transport.js';

export interface FaultRates {
  drop: number;
  duplicate: number;
  reorder: number;
  corrupt: number;
}

export interface FaultCounts {
  /** Datagrams the engine handed to the link. */
  seen: number;
  dropped: number;
  duplicated: number;
  reordered: number;
  /** Corrupted datagrams, split by where the receiver must drop them. */
  corruptedIcrc: number;
  corruptedMalformed: number;
  /** Flips in BTH byte 4, which the ICRC does not cover. */
  corruptedUnseen: number;
}

/** BTH byte the ICRC masks (FECN, BECN, reserved). */
const ICRC_MASKED_BYTE = 4;
/** Longest a reordered datagram waits for later ones. */
const HOLD_MAX_MS = 3;
/** Longest a duplicate trails its original. */
const DUPLICATE_DELAY_MAX_MS = 2;

/** mulberry32: small, fast, good enough for fault draws. */
export function seededRandom(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Held {
  bytes: Uint8Array;
  /** Datagrams still to pass before this one goes. */
  after: number;
  timer: NodeJS.Timeout;
}

export class FaultLink {
  readonly counts: FaultCounts = { seen: 0, dropped: 0, duplicated: 0, reordered: 0, corruptedIcrc: 0, corruptedMalformed: 0, corruptedUnseen: 0 };
  private readonly random: () => number;
  private readonly held: Held[] = [];
  /** Trailing duplicates and their bytes. */
  private readonly timers = new Map<NodeJS.Timeout, Uint8Array>();
  private readonly probe = new RocePacket();
  private installed = false;

  /**
   * @param engine the sender whose outgoing datagrams pass the link
   * @param to where they go (every datagram of `engine` in a two-engine test)
   */
  constructor(
    private readonly engine: SoftRoceEngine,
    private readonly to: UdpPeer,
    private readonly rates: FaultRates,
    seed: number,
  ) {
    this.random = seededRandom(seed);
  }

  install(): this {
    this.engine.outgoingHook = (bytes) => this.onDatagram(bytes);
    this.installed = true;
    return this;
  }

  /** Stops injecting; held and trailing datagrams are delivered first. */
  remove(): void {
    if (!this.installed) return;
    this.installed = false;
    this.engine.outgoingHook = null;
    for (const h of this.held.splice(0)) {
      clearTimeout(h.timer);
      this.emit(h.bytes);
    }
    for (const [t, bytes] of this.timers) {
      clearTimeout(t);
      this.emit(bytes);
    }
    this.timers.clear();
  }

  /** Datagrams held back or trailing that have not left yet. */
  get pending(): number {
    return this.held.length + this.timers.size;
  }

  get corrupted(): number {
    return this.counts.corruptedIcrc + this.counts.corruptedMalformed + this.counts.corruptedUnseen;
  }

  private onDatagram(bytes: Uint8Array): boolean {
    const c = this.counts;
    c.seen++;
    this.releaseHeldAfterThis();
    const r = this.random();
    const { drop, duplicate, reorder, corrupt } = this.rates;
    if (r < drop) {
      c.dropped++;
      return false;
    }
    if (r < drop + duplicate) {
      c.duplicated++;
      this.later(bytes.slice(), this.random() * DUPLICATE_DELAY_MAX_MS);
      return true;
    }
    if (r < drop + duplicate + reorder) {
      c.reordered++;
      const h: Held = { bytes: bytes.slice(), after: 1 + Math.floor(this.random() * 3), timer: setTimeout(() => this.releaseHeld(h), HOLD_MAX_MS) };
      this.held.push(h);
      return false;
    }
    if (r < drop + duplicate + reorder + corrupt) {
      const bit = Math.floor(this.random() * bytes.length * 8);
      const at = bit >>> 3;
      bytes[at]! ^= 1 << (bit & 7);
      if (at === ICRC_MASKED_BYTE) c.corruptedUnseen++;
      else if (decodePacket(bytes, this.probe) !== 'ok') c.corruptedMalformed++;
      else c.corruptedIcrc++;
      return true;
    }
    return true;
  }

  /** Held datagrams whose turn comes after the one being sent now leave right behind it. */
  private releaseHeldAfterThis(): void {
    for (let i = 0; i < this.held.length; ) {
      const h = this.held[i]!;
      if (--h.after > 0) {
        i++;
        continue;
      }
      this.held.splice(i, 1);
      clearTimeout(h.timer);
      // The datagram being sent now is queued when the hook returns; this runs after it.
      queueMicrotask(() => this.emit(h.bytes));
    }
  }

  private releaseHeld(h: Held): void {
    const i = this.held.indexOf(h);
    if (i < 0) return;
    this.held.splice(i, 1);
    this.emit(h.bytes);
  }

  private later(bytes: Uint8Array, ms: number): void {
    const t = setTimeout(() => {
      this.timers.delete(t);
      this.emit(bytes);
    }, ms);
    this.timers.set(t, bytes);
  }

  private emit(bytes: Uint8Array): void {
    const transport = this.engine.link;
    if (!transport.isClosed) transport.queue(this.to, bytes);
  }
}
