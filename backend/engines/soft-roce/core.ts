/**
 * What the requester, responder and completer share: the attached host,
 * the packet sender, counters, and the few engine-wide operations they
 * call on each other through the engine (pump a QP, fail a QP).
 */
import type { EngineHost, MemoryAccess } from '../../engine/engine.js';
import type { PacketOut } from './packet-out.js';
import type { RoceQp } from './roce-qp.js';
import type { UdpPeer } from './udp-transport.js';

/** What the engine counts (tests, diagnostics). */
export interface SoftRoceStats {
  /** Datagrams dropped before reaching a QP: malformed, bad ICRC, unknown/wrong QP. */
  malformed: number;
  badIcrc: number;
  noQp: number;
  /** Requests and responses that were valid but not acted on (duplicates, unexpected responses). */
  ignored: number;
  retransmits: number;
  rnrNaks: number;
  naksSent: number;
  packetsSent: number;
  /** Datagrams whose handling threw (a bug): the QP went to ERR, the engine kept running. */
  internalErrors: number;
  /** While suspended (migration blackout): requests answered with RNR NAK, and datagrams dropped. */
  blackoutRnrNaks: number;
  blackoutDropped: number;
}

export function newStats(): SoftRoceStats {
  return { malformed: 0, badIcrc: 0, noQp: 0, ignored: 0, retransmits: 0, rnrNaks: 0, naksSent: 0, packetsSent: 0, internalErrors: 0, blackoutRnrNaks: 0, blackoutDropped: 0 };
}

export interface RoceCore {
  readonly out: PacketOut;
  readonly stats: SoftRoceStats;
  /** The local UDP endpoint (the device's GID address). */
  readonly local: UdpPeer;
  /** UDP port of peers. */
  readonly remotePort: number;
  readonly suspended: boolean;
  /** The attached host; roles run only after attach(). */
  host(): EngineHost;
  /** Guest memory, or null while the device has none (no memory table yet). */
  memory(): MemoryAccess | null;
  /** The QP is still the engine's (not destroyed or replaced by a load). */
  isLive(qp: RoceQp): boolean;
  /** Sends what the window allows of the QP's send queue (the requester). */
  pump(qp: RoceQp): void;
  /** Moves the QP to ERR, tells the host, and flushes its queues. */
  failQp(qp: RoceQp, reason: string): void;
}
