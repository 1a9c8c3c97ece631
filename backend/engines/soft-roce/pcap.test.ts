import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { headersLength, writeFrame } from './frame.js';
import { Opcode } from './opcodes.js';
import { encodePacket, packetLength } from './packet.js';
import { PcapWriter, readPcap } from './pcap.js';
import { ETH, FLOW_V4, FLOW_V6, hasTshark, pattern, runTshark, samplePacket, tsharkArgs } from './test-support.js';

const dir = mkdtempSync(join(tmpdir(), 'vrdma-pcap-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const toHex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

function collect(opts = {}): { writer: PcapWriter; bytes: () => Uint8Array; writes: Uint8Array[] } {
  const writes: Uint8Array[] = [];
  const writer = new PcapWriter((c) => writes.push(c.slice()), opts);
  return { writer, writes, bytes: () => Uint8Array.from(Buffer.concat(writes)) };
}

function roce(op: number, len: number, seed: number, flow = FLOW_V4): Uint8Array {
  const p = samplePacket(op, len, seed);
  const b = new Uint8Array(packetLength(p.bth.opcode, p.payloadLength));
  encodePacket(b, 0, p, pattern(p.payloadLength, seed), flow);
  return b;
}

describe('pcap writer', () => {
  it('starts with the classic libpcap global header: magic a1b2c3d4 (little-endian), v2.4, UTC, snaplen, Ethernet', () => {
    const { bytes } = collect();
    expect(toHex(bytes())).toBe('d4c3b2a1' + '0200' + '0400' + '00000000' + '00000000' + 'ffff0000' + '01000000');
    expect(toHex(collect({ snaplen: 1500, linkType: 101 }).bytes()).slice(32)).toBe('dc050000' + '65000000');
  });

  it('writes each packet as one 16-byte record header (seconds, microseconds, stored length, original length) plus the frame, in one write', () => {
    const { writer, writes, bytes } = collect();
    const frame = pattern(70, 1);
    writer.writeFrame(frame, 0, frame.length, 1_700_000_000_123_456);
    expect(writes).toHaveLength(2);
    const rec = writes[1]!;
    expect(toHex(rec.subarray(0, 16))).toBe('00f15365' + '40e20100' + '46000000' + '46000000');
    expect(toHex(rec.subarray(16))).toBe(toHex(frame));
    const f = readPcap(bytes());
    expect(f).toMatchObject({ linkType: 1, snaplen: 65535, nanos: false });
    expect(f.records).toHaveLength(1);
    expect(f.records[0]!.micros).toBe(1_700_000_000_123_456);
    expect(writer.count).toBe(1);
  });

  it('cuts frames longer than the snaplen but keeps their original length', () => {
    const { writer, bytes } = collect({ snaplen: 64 });
    writer.writeFrame(pattern(100, 2), 0, 100, 0);
    const r = readPcap(bytes()).records[0]!;
    expect(r.data.length).toBe(64);
    expect(r.originalLength).toBe(100);
    expect(toHex(r.data)).toBe(toHex(pattern(100, 2).subarray(0, 64)));
  });

  it('writeRoce records exactly the frame writeFrame builds around the packet (IPv4 and IPv6)', () => {
    const { writer, bytes } = collect();
    const packets = [roce(Opcode.RC_SEND_ONLY, 5, 1, FLOW_V4), roce(Opcode.UD_SEND_ONLY, 4096, 2, FLOW_V6)];
    writer.writeRoce(ETH, FLOW_V4, packets[0]!, 0, packets[0]!.length, 10);
    writer.writeRoce(ETH, FLOW_V6, packets[1]!, 0, packets[1]!.length, 11, { udpChecksum: true });
    const recs = readPcap(bytes()).records;
    expect(recs.map((r) => r.micros)).toEqual([10, 11]);
    for (const [i, flow] of [FLOW_V4, FLOW_V6].entries()) {
      const f = new Uint8Array(headersLength(flow.family) + packets[i]!.length);
      writeFrame(f, 0, ETH, flow, packets[i]!, 0, packets[i]!.length, { udpChecksum: i === 1 });
      expect(toHex(recs[i]!.data)).toBe(toHex(f));
    }
  });

  it('toFile writes the same bytes to disk; close is idempotent and writing after it throws', () => {
    const path = join(dir, 'to-file.pcap');
    const w = PcapWriter.toFile(path);
    const mem = collect();
    for (let i = 0; i < 3; i++) {
      const r = roce(Opcode.RC_RDMA_WRITE_ONLY, 100 * i, i);
      w.writeRoce(ETH, FLOW_V4, r, 0, r.length, i);
      mem.writer.writeRoce(ETH, FLOW_V4, r, 0, r.length, i);
    }
    w.close();
    w.close();
    expect(() => w.writeFrame(new Uint8Array(60))).toThrow(/closed/);
    expect(toHex(readFileSync(path))).toBe(toHex(mem.bytes()));
  });

  it('readPcap also reads big-endian and nanosecond files, and refuses truncated or foreign ones', () => {
    const be = Buffer.from('a1b2c3d4' + '00020004' + '00000000' + '00000000' + '0000ffff' + '00000001' + '00000002' + '00000003' + '00000004' + '00000004' + 'deadbeef', 'hex');
    const f = readPcap(be);
    expect(f.records[0]).toMatchObject({ micros: 2_000_003, originalLength: 4 });
    expect(toHex(f.records[0]!.data)).toBe('deadbeef');
    const ns = Buffer.from('4d3cb2a1' + '02000400' + '00000000' + '00000000' + 'ffff0000' + '01000000' + '01000000' + '40420f00' + '00000000' + '00000000', 'hex');
    expect(readPcap(ns)).toMatchObject({ nanos: true, records: [{ micros: 1_001_000 }] });
    expect(() => readPcap(be.subarray(0, 20))).toThrow(/global header/);
    expect(() => readPcap(be.subarray(0, 30))).toThrow(/record header/);
    expect(() => readPcap(be.subarray(0, be.length - 1))).toThrow(/truncated record/);
    expect(() => readPcap(Buffer.alloc(24))).toThrow(/magic/);
  });
});

describe('pcap writer, read by tshark', () => {
  // A missing tool is a failure, not a skip: scripts/setup.sh installs it.
  beforeAll(() => {
    if (!hasTshark()) throw new Error('tshark is not installed: run `npm run setup`');
  });

  it('tshark reads every record with its length and timestamp, decoded Ethernet/IP/UDP/InfiniBand', () => {
    const path = join(dir, 'tshark.pcap');
    const w = PcapWriter.toFile(path);
    const sent: { len: number; micros: number; family: 4 | 6 }[] = [];
    const ops = [Opcode.RC_SEND_FIRST, Opcode.RC_ACKNOWLEDGE, Opcode.UC_RDMA_WRITE_ONLY, Opcode.UD_SEND_ONLY_WITH_IMMEDIATE, Opcode.RC_RDMA_READ_RESPONSE_MIDDLE];
    for (let i = 0; i < 20; i++) {
      const flow = i % 2 ? FLOW_V6 : FLOW_V4;
      const r = roce(ops[i % ops.length]!, i * 37, i, flow);
      const micros = 1_700_000_000_000_000 + i * 1_000_001;
      w.writeRoce(ETH, flow, r, 0, r.length, micros, { udpChecksum: true });
      sent.push({ len: headersLength(flow.family) + r.length, micros, family: flow.family });
    }
    w.close();
    const out = runTshark(tsharkArgs(path, '-T', 'fields', '-E', 'separator=|', '-e', 'frame.len', '-e', 'frame.cap_len', '-e', 'frame.time_epoch', '-e', 'frame.protocols', '-e', '_ws.malformed', '-e', '_ws.expert'));
    const rows = out.trim().split('\n').map((l) => l.split('|'));
    expect(rows).toHaveLength(sent.length);
    rows.forEach(([len, cap, epoch, protocols, malformed, expert], i) => {
      expect(Number(len)).toBe(sent[i]!.len);
      expect(Number(cap)).toBe(sent[i]!.len);
      const m = sent[i]!.micros;
      expect(epoch).toBe(`${Math.floor(m / 1e6)}.${String(m % 1e6).padStart(6, '0')}000`);
      expect(protocols).toMatch(sent[i]!.family === 4 ? /^eth:ethertype:ip:udp:infiniband(:data)?$/ : /^eth:ethertype:ipv6:udp:infiniband(:data)?$/);
      expect(malformed).toBe('');
      expect(expert).toBe('');
    });
  });
});
