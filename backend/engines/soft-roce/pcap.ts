/**
 * Classic libpcap capture files (the format tcpdump -w writes): a 24-byte
 * global header, then per packet a 16-byte record header and the frame.
 * Written little-endian with microsecond timestamps and Ethernet link type,
 * which every reader (tshark, tcpdump, scapy) accepts. Used by `--pcap FILE`
 * to record what the soft-RoCE engine sends and receives.
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import { type EthernetAddresses, type FrameOptions, type RoceFlow, headersLength, writeFrameHeaders } from './frame.js';

export const PCAP_MAGIC_MICROS = 0xa1b2c3d4;
export const PCAP_MAGIC_NANOS = 0xa1b23c4d;
export const LINKTYPE_ETHERNET = 1;
export const PCAP_GLOBAL_HEADER = 24;
export const PCAP_RECORD_HEADER = 16;
export const DEFAULT_SNAPLEN = 65535;

export interface PcapOptions {
  /** Longest frame stored; longer ones are cut (orig_len keeps their size). */
  readonly snaplen?: number;
  readonly linkType?: number;
}

/** Microseconds since the Unix epoch, from the monotonic clock anchored at process start. */
export function nowMicros(): number {
  return Math.floor((performance.timeOrigin + performance.now()) * 1000);
}

export function pcapGlobalHeader(snaplen = DEFAULT_SNAPLEN, linkType = LINKTYPE_ETHERNET): Uint8Array {
  const h = new Uint8Array(PCAP_GLOBAL_HEADER);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, PCAP_MAGIC_MICROS, true);
  dv.setUint16(4, 2, true); // version 2.4
  dv.setUint16(6, 4, true);
  dv.setInt32(8, 0, true); // thiszone: UTC
  dv.setUint32(12, 0, true); // sigfigs
  dv.setUint32(16, snaplen, true);
  dv.setUint32(20, linkType, true);
  return h;
}

/**
 * Writes a capture to a sink, one `write` per packet (record header and
 * frame together, so a reader never sees half a record).
 */
export class PcapWriter {
  private scratch = new Uint8Array(PCAP_RECORD_HEADER + 2048);
  private closed = false;
  readonly snaplen: number;
  /** Packets written. */
  count = 0;

  constructor(
    private readonly sink: (chunk: Uint8Array) => void,
    opts: PcapOptions = {},
    private readonly onClose: () => void = () => {},
  ) {
    this.snaplen = opts.snaplen ?? DEFAULT_SNAPLEN;
    if (!Number.isInteger(this.snaplen) || this.snaplen < 1 || this.snaplen > 0x7fffffff) throw new RangeError(`snaplen ${this.snaplen}`);
    sink(pcapGlobalHeader(this.snaplen, opts.linkType ?? LINKTYPE_ETHERNET));
  }

  /** A writer appending to a new file at `path` (truncated if it exists). */
  static toFile(path: string, opts: PcapOptions = {}): PcapWriter {
    const fd = openSync(path, 'w');
    return new PcapWriter(
      (chunk) => {
        let done = 0;
        while (done < chunk.length) done += writeSync(fd, chunk, done, chunk.length - done);
      },
      opts,
      () => closeSync(fd),
    );
  }

  private room(n: number): Uint8Array {
    if (this.scratch.length < n) this.scratch = new Uint8Array(Math.max(n, this.scratch.length * 2));
    return this.scratch;
  }

  private header(buf: Uint8Array, frameLen: number, stored: number, micros: number): void {
    const sec = Math.floor(micros / 1e6);
    const usec = micros - sec * 1e6;
    const dv = new DataView(buf.buffer, buf.byteOffset, PCAP_RECORD_HEADER);
    dv.setUint32(0, sec >>> 0, true);
    dv.setUint32(4, usec, true);
    dv.setUint32(8, stored, true);
    dv.setUint32(12, frameLen, true);
  }

  /** Records a whole frame `frame[off, off+len)`. `micros`: timestamp, microseconds since the epoch. */
  writeFrame(frame: Uint8Array, off = 0, len = frame.length - off, micros = nowMicros()): void {
    if (this.closed) throw new Error('pcap writer is closed');
    const stored = Math.min(len, this.snaplen);
    const buf = this.room(PCAP_RECORD_HEADER + stored);
    this.header(buf, len, stored, micros);
    buf.set(frame.subarray(off, off + stored), PCAP_RECORD_HEADER);
    this.sink(buf.subarray(0, PCAP_RECORD_HEADER + stored));
    this.count++;
  }

  /**
   * Records a RoCEv2 packet (a UDP payload, BTH through ICRC) as the
   * Ethernet/IP/UDP frame that carries it on `flow` — what a sender using a
   * UDP socket would have put on the wire.
   */
  writeRoce(eth: EthernetAddresses, flow: RoceFlow, roce: Uint8Array, roceOff = 0, roceLen = roce.length - roceOff, micros = nowMicros(), opts: FrameOptions = {}): void {
    if (this.closed) throw new Error('pcap writer is closed');
    const hl = headersLength(flow.family);
    const frameLen = hl + roceLen;
    const buf = this.room(PCAP_RECORD_HEADER + frameLen);
    buf.set(roce.subarray(roceOff, roceOff + roceLen), PCAP_RECORD_HEADER + hl);
    writeFrameHeaders(buf, PCAP_RECORD_HEADER, eth, flow, roceLen, opts);
    const stored = Math.min(frameLen, this.snaplen);
    this.header(buf, frameLen, stored, micros);
    this.sink(buf.subarray(0, PCAP_RECORD_HEADER + stored));
    this.count++;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.onClose();
  }
}

export interface PcapRecord {
  micros: number;
  originalLength: number;
  data: Uint8Array;
}

export interface PcapFile {
  linkType: number;
  snaplen: number;
  nanos: boolean;
  records: PcapRecord[];
}

/** Reads a classic pcap file (either byte order, µs or ns timestamps). Throws on a malformed file. */
export function readPcap(bytes: Uint8Array): PcapFile {
  if (bytes.length < PCAP_GLOBAL_HEADER) throw new Error('pcap: shorter than the global header');
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let le: boolean;
  const m = dv.getUint32(0, true);
  if (m === PCAP_MAGIC_MICROS || m === PCAP_MAGIC_NANOS) le = true;
  else if (dv.getUint32(0, false) === PCAP_MAGIC_MICROS || dv.getUint32(0, false) === PCAP_MAGIC_NANOS) le = false;
  else throw new Error(`pcap: bad magic 0x${m.toString(16)}`);
  const nanos = dv.getUint32(0, le) === PCAP_MAGIC_NANOS;
  const snaplen = dv.getUint32(16, le);
  const linkType = dv.getUint32(20, le);
  const records: PcapRecord[] = [];
  let o = PCAP_GLOBAL_HEADER;
  while (o < bytes.length) {
    if (o + PCAP_RECORD_HEADER > bytes.length) throw new Error(`pcap: truncated record header at ${o}`);
    const sec = dv.getUint32(o, le);
    const frac = dv.getUint32(o + 4, le);
    const incl = dv.getUint32(o + 8, le);
    const orig = dv.getUint32(o + 12, le);
    if (o + PCAP_RECORD_HEADER + incl > bytes.length) throw new Error(`pcap: truncated record at ${o}`);
    records.push({
      micros: sec * 1e6 + (nanos ? Math.floor(frac / 1000) : frac),
      originalLength: orig,
      data: bytes.subarray(o + PCAP_RECORD_HEADER, o + PCAP_RECORD_HEADER + incl),
    });
    o += PCAP_RECORD_HEADER + incl;
  }
  return { linkType, snaplen, nanos, records };
}
