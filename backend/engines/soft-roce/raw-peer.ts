/**
 * Test support (not used in production): a hand-driven RoCEv2 peer on a
 * plain node:dgram socket. It builds datagrams with the project's codec
 * and a correct ICRC for its own address (unless told otherwise), sends
 * them to an engine, and records every datagram that comes back.
 */
import { type Socket, createSocket } from 'node:dgram';
import { makePath } from './addressing.js';
import { RocePacket, decodePacket, encodePacket } from './packet.js';
import { type UdpPeer, udpPeer } from './udp-transport.js';

export interface Reply {
  opcode: number;
  destQp: number;
  psn: number;
  /** AETH syndrome and MSN when the reply carries an AETH, else -1. */
  syndrome: number;
  msn: number;
  payloadLength: number;
}

export class RawPeer {
  readonly replies: Reply[] = [];
  /** Datagrams that came back and did not decode. */
  undecodable = 0;
  private readonly rx = new RocePacket();

  private constructor(
    private readonly sock: Socket,
    readonly local: UdpPeer,
  ) {
    sock.on('message', (msg) => this.onMessage(new Uint8Array(msg.buffer, msg.byteOffset, msg.length)));
  }

  static async open(address: string, port: number): Promise<RawPeer> {
    const sock = createSocket('udp4');
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject);
      sock.bind(port, address, () => {
        sock.off('error', reject);
        resolve();
      });
    });
    return new RawPeer(sock, udpPeer(address, port));
  }

  /** Encodes `pkt` with `payload` and a correct ICRC for this peer → `to`. */
  build(pkt: RocePacket, payload: Uint8Array | null, to: UdpPeer): Uint8Array {
    const out = new Uint8Array(4200);
    const n = encodePacket(out, 0, pkt, payload, makePath(this.local, to));
    return out.subarray(0, n);
  }

  async sendRaw(bytes: Uint8Array, to: UdpPeer, address: string): Promise<void> {
    await new Promise<void>((resolve, reject) => this.sock.send(bytes, to.port, address, (err) => (err ? reject(err) : resolve())));
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.sock.close(() => resolve()));
  }

  private onMessage(bytes: Uint8Array): void {
    const p = this.rx;
    if (decodePacket(bytes, p) !== 'ok') {
      this.undecodable++;
      return;
    }
    const aeth = p.info!.aethAt >= 0;
    this.replies.push({ opcode: p.opcode, destQp: p.bth.destQp, psn: p.bth.psn, syndrome: aeth ? p.aeth.syndrome : -1, msn: aeth ? p.aeth.msn : -1, payloadLength: p.payloadLength });
  }
}
