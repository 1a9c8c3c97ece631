/**
 * Packet capture for the soft-RoCE engine: every RoCEv2 datagram it sends
 * and every one it receives (malformed ones included: they are evidence)
 * goes to a {@link RoceCapture}. {@link PcapCapture} records them in a
 * libpcap file as the Ethernet/IPv4/UDP frames that carried them.
 *
 * The engine talks UDP through a socket, so the kernel builds the real IP
 * header; the capture rebuilds it the way rxe does (rxe_net.c): DF set,
 * ID 0, TTL 64, TOS 0, UDP checksum 0. The ICRC in the packet covers that
 * same header, so a reader checking the ICRC finds it good. MAC addresses
 * are made up from the IP address (locally administered 02:00:a.b.c.d).
 */
import { peerBytes } from './addressing.js';
import { type EthernetAddresses, type RoceFlow, headersLength, writeFrameHeaders } from './frame.js';
import { IPV4_DF } from './icrc.js';
import { type PcapOptions, PcapWriter } from './pcap.js';
import type { UdpPeer } from './udp-transport.js';

export type CaptureDirection = 'tx' | 'rx';

/** Sees every datagram the engine sends (after the outgoing hook) and every one it receives. */
export interface RoceCapture {
  /**
   * `udpPayload` is valid only during the call (the engine reuses its
   * buffers). `timeMs`: milliseconds since the Unix epoch. `wireLength`:
   * the datagram's real length when `udpPayload` holds only its start (it
   * was longer than a receive slot).
   */
  write(direction: CaptureDirection, src: UdpPeer, dst: UdpPeer, udpPayload: Uint8Array, timeMs: number, wireLength?: number): void;
}

/** Milliseconds since the Unix epoch (fractional), from the monotonic clock. */
export function captureNowMs(): number {
  return performance.timeOrigin + performance.now();
}

/** A locally administered MAC standing for an IP address: 02:00 and its last four bytes. */
export function macFor(p: UdpPeer): Uint8Array {
  const v = p.family === 4 ? p.words[0] : p.words[3];
  return new Uint8Array([0x02, 0x00, v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff]);
}

/** The flow of a datagram from `src` to `dst` as rxe would put it on the wire. */
export function captureFlow(src: UdpPeer, dst: UdpPeer): RoceFlow {
  return {
    family: src.family,
    src: peerBytes(src),
    dst: peerBytes(dst),
    sport: src.port,
    dport: dst.port,
    ipId: 0,
    ipFlagsFragment: src.family === 4 ? IPV4_DF : 0,
    trafficClass: 0,
    hopLimit: 64,
    flowLabel: 0,
  };
}

/** Records what a {@link RoceCapture} sees in a pcap file (or any {@link PcapWriter}). */
export class PcapCapture implements RoceCapture {
  /** Datagrams recorded, by direction. */
  tx = 0;
  rx = 0;
  private closed = false;
  private cut = new Uint8Array(0);

  constructor(readonly writer: PcapWriter) {}

  /** A capture into a new file at `path` (truncated if it exists). Throws the open error. */
  static toFile(path: string, opts: PcapOptions = {}): PcapCapture {
    return new PcapCapture(PcapWriter.toFile(path, opts));
  }

  get count(): number {
    return this.writer.count;
  }

  write(direction: CaptureDirection, src: UdpPeer, dst: UdpPeer, udpPayload: Uint8Array, timeMs: number, wireLength?: number): void {
    if (this.closed || src.family !== dst.family) return;
    const eth: EthernetAddresses = { srcMac: macFor(src), dstMac: macFor(dst) };
    const flow = captureFlow(src, dst);
    const micros = Math.floor(timeMs * 1000);
    if (wireLength !== undefined && wireLength > udpPayload.length) {
      // Only the start arrived: headers for the whole datagram, then what we have.
      const hl = headersLength(flow.family);
      if (this.cut.length < hl + udpPayload.length) this.cut = new Uint8Array(hl + udpPayload.length);
      writeFrameHeaders(this.cut, 0, eth, flow, wireLength);
      this.cut.set(udpPayload, hl);
      this.writer.writeFrame(this.cut, 0, hl + udpPayload.length, micros);
    } else {
      this.writer.writeRoce(eth, flow, udpPayload, 0, udpPayload.length, micros);
    }
    if (direction === 'tx') this.tx++;
    else this.rx++;
  }

  /** Closes the file; later datagrams are ignored. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.writer.close();
  }
}
