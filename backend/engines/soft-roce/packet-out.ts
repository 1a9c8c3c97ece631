/**
 * Builds and sends outgoing packets: one reusable packet object and one
 * staging buffer (the transport copies each datagram when it queues it),
 * the common BTH fields, ACK/NAK packets, the capture and the test hook.
 */
import { QPN_MASK } from '../../abi/constants.js';
import { type RoceCapture, captureNowMs } from './capture.js';
import type { SoftRoceStats } from './core.js';
import { syndromeKind } from './headers.js';
import type { IcrcPath } from './icrc.js';
import { Opcode } from './opcodes.js';
import { MAX_MTU, RocePacket, encodePacket } from './packet.js';
import type { RoceQp } from './roce-qp.js';
import type { UdpPeer } from './udp-transport.js';

/** Where built packets go: the device's RoCE address (roce-address.ts). */
export interface DatagramSender {
  readonly local: UdpPeer;
  /** False when the datagram was dropped. */
  queue(dst: UdpPeer, bytes: Uint8Array): boolean;
  flush(): number;
}

/** Room for the largest header set plus MTU payload, pad and ICRC. */
const STAGING = MAX_MTU + 128;

export class PacketOut {
  /** The packet being built; `start()` resets it for an opcode. */
  readonly pkt = new RocePacket();
  /** Headers and payload of the packet being built (the packet at {@link base}, payload at {@link payloadOffset}). */
  readonly staging = new Uint8Array(STAGING);
  /**
   * Where the packet being built starts in `staging`: 0..7 bytes in, so
   * that its payload sits on an 8-byte boundary. Guest buffers usually do,
   * and V8's copies out of a SharedArrayBuffer (guest memory) are about 4×
   * slower for a 4 KiB payload when the two sides differ in alignment
   * modulo 8 (docs/benchmarks.md).
   */
  private base = 0;
  /**
   * Set by the receive loop while datagrams of the current batch are still
   * to be handled: an ACK then leaves at once (see {@link ack}).
   */
  moreInBatch = false;
  /** Test hook: sees (and may alter) every outgoing datagram before it is queued; returning false drops it. */
  hook: ((bytes: Uint8Array) => boolean) | null = null;
  /** Packet capture: every datagram sent and received, malformed ones included; null when off. */
  capture: RoceCapture | null = null;

  constructor(
    private readonly transport: DatagramSender,
    private readonly stats: SoftRoceStats,
  ) {}

  /** Starts a packet of `opcode` to `qp`'s peer with the common BTH fields. */
  start(qp: RoceQp, opcode: number, psn: number, ackReq: boolean): RocePacket {
    const pkt = this.pkt.setOpcode(opcode);
    const b = pkt.bth;
    b.se = false;
    b.migReq = false;
    b.pkey = 0xffff;
    b.fecn = false;
    b.becn = false;
    b.destQp = qp.attrs.destQpn & QPN_MASK;
    b.ackReq = ackReq;
    b.psn = psn;
    this.base = (8 - (pkt.info!.headerLength & 7)) & 7;
    return pkt;
  }

  /** Payload area of the packet being built. */
  get payloadOffset(): number {
    return this.base + this.pkt.info!.headerLength;
  }

  /** Encodes the packet being built (payload already in `staging`) and sends it. */
  send(peer: UdpPeer, path: IcrcPath): void {
    const len = encodePacket(this.staging, this.base, this.pkt, null, path);
    const bytes = this.staging.subarray(this.base, this.base + len);
    if (this.hook !== null && !this.hook(bytes)) return;
    this.stats.packetsSent++;
    if (this.capture !== null) this.capture.write('tx', this.transport.local, peer, bytes, captureNowMs());
    this.transport.queue(peer, bytes);
  }

  /** Sends the packet being built to `qp`'s connected peer. */
  sendTo(qp: RoceQp): void {
    this.send(qp.peer!, qp.path!);
  }

  /** Hands what is queued to the kernel now (outside the receive path, which flushes at the end of a batch). */
  flush(): void {
    this.transport.flush();
  }

  /** ACK, NAK or RNR NAK for `psn` carrying the QP's MSN. */
  ack(qp: RoceQp, psn: number, syndrome: number): void {
    if (syndromeKind(syndrome) === 'nak') this.stats.naksSent++;
    const pkt = this.start(qp, Opcode.RC_ACKNOWLEDGE, psn, false);
    pkt.aeth.syndrome = syndrome;
    pkt.aeth.msn = qp.msn;
    pkt.payloadLength = 0;
    this.sendTo(qp);
    // With more of the batch to handle, out now rather than after it: the
    // requester waits on this ACK to reopen its window, and the rest of the
    // batch can take as long as it needs to refill it. The batch's last ACK
    // waits for the end of the batch, so that its completion (e.g. a
    // SEND's receive CQE) is written first.
    if (this.moreInBatch) this.transport.flush();
  }
}

