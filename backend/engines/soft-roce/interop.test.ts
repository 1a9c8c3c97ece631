/**
 * The codec checked by implementations that are not ours:
 *
 * - tshark (Wireshark's InfiniBand/RRoCE dissector) decodes every header
 *   field of every opcode from a capture our encoder wrote, validates the
 *   IPv4 header and UDP checksums, and finds nothing malformed. It shows
 *   the ICRC but cannot verify it (Wireshark 4.0 has no RoCEv2 ICRC check).
 * - scapy's contrib/roce.py (BTH.compute_icrc: 8 × 0xFF, masked IPv4/UDP/BTH,
 *   zlib.crc32) recomputes the ICRC of every IPv4 packet (scapy 2.5 has no
 *   IPv6 ICRC).
 * - A C program mirroring rxe_icrc.c (the kernel's struct iphdr/ipv6hdr
 *   masking, seed 0xDEBB20E3, zlib's crc32 as crc32_le) recomputes the ICRC
 *   of every IPv4 and IPv6 packet.
 *
 * Each ICRC check has a negative control: the same capture with one byte
 * changed per packet must fail everywhere.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RoceFlow } from './frame.js';
import { readIcrc } from './icrc.js';
import { Hdr, OPCODES, Opcode, SUPPORTED_OPCODES } from './opcodes.js';
import { RocePacket, encodePacket, packetLength } from './packet.js';
import { PcapWriter, readPcap } from './pcap.js';
import { ETH, FLOW_V4, FLOW_V6, allowedPayload, commandWorks, hasTshark, pattern, runTshark, samplePacket, tsharkArgs } from './test-support.js';

const dir = mkdtempSync(join(tmpdir(), 'vrdma-interop-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Sent {
  pkt: RocePacket;
  payload: Uint8Array;
  roce: Uint8Array;
  flow: RoceFlow;
  udpChecksum: boolean;
}

/** The reference's worked example (§5): RC SEND_ONLY "hello" to QP 0x11, PSN 0, AckReq. */
function workedExample(): RocePacket {
  const p = new RocePacket().setOpcode(Opcode.RC_SEND_ONLY);
  p.bth.destQp = 0x11;
  p.bth.ackReq = true;
  p.payloadLength = 5;
  return p;
}

/** Every opcode at several payload sizes (the worked example first on IPv4), written to `file`. */
function capture(file: string, flow: RoceFlow, udpChecksum: boolean): Sent[] {
  const sent: Sent[] = [];
  const add = (pkt: RocePacket, payload: Uint8Array) => {
    const roce = new Uint8Array(packetLength(pkt.bth.opcode, pkt.payloadLength));
    encodePacket(roce, 0, pkt, payload, flow);
    sent.push({ pkt, payload, roce, flow, udpChecksum });
  };
  if (flow.family === 4) add(workedExample(), Uint8Array.from(Buffer.from('hello')));
  let seed = 1;
  for (const op of SUPPORTED_OPCODES) {
    const sizes = [...new Set([0, 1, 5, 256, 4096].map((n) => allowedPayload(op, n)))];
    for (const n of sizes) {
      const pkt = samplePacket(op, n, seed++);
      add(pkt, pattern(pkt.payloadLength, seed));
    }
  }
  const w = PcapWriter.toFile(file);
  sent.forEach((s, i) => w.writeRoce(ETH, flow, s.roce, 0, s.roce.length, 1_700_000_000_000_000 + i, { udpChecksum }));
  w.close();
  return sent;
}

/** A copy of a capture with, in every frame, the last byte before the ICRC changed. */
function corrupt(file: string, out: string): void {
  const bytes = Uint8Array.from(readFileSync(file));
  for (const r of readPcap(bytes).records) r.data[r.data.length - 5] = r.data[r.data.length - 5]! ^ 0x5a;
  writeFileSync(out, bytes);
}

const colonHex = (b: Uint8Array): string => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(':');
const hexN = (v: number | bigint, digits: number): string => `0x${v.toString(16).padStart(digits, '0')}`;
const bit = (b: boolean): string => (b ? '1' : '0');

type Json = { [k: string]: Json } | Json[] | string;

/** Every value stored under `key` anywhere in `obj`. */
function findAll(obj: Json, key: string, out: Json[] = []): Json[] {
  if (Array.isArray(obj)) for (const v of obj) findAll(v, key, out);
  else if (typeof obj === 'object' && obj !== null) {
    for (const [k, v] of Object.entries(obj)) {
      if (k === key) out.push(v);
      findAll(v, key, out);
    }
  }
  return out;
}

/** The value stored under `key` (tshark repeats some, e.g. ImmDt inside its own subtree: all copies must agree). */
function one(obj: Json, key: string): string {
  const all = findAll(obj, key).flat();
  expect(all.length, key).toBeGreaterThan(0);
  expect(new Set(all).size, `${key}: ${JSON.stringify(all)}`).toBe(1);
  return all[0] as string;
}

/** Keys tshark uses for malformed packets and expert info. */
function complaints(obj: Json): string[] {
  const found: string[] = [];
  const walk = (o: Json, path: string) => {
    if (Array.isArray(o)) o.forEach((v) => walk(v, path));
    else if (typeof o === 'object' && o !== null)
      for (const [k, v] of Object.entries(o)) {
        if (k.startsWith('_ws.malformed') || k.startsWith('_ws.expert')) found.push(`${path}/${k}: ${JSON.stringify(v)}`);
        walk(v, `${path}/${k}`);
      }
  };
  walk(obj, '');
  return found;
}

/** What tshark says about `s`, field by field, against what we encoded. */
function expectTsharkAgrees(layers: { [k: string]: Json }, s: Sent, where: string): void {
  const { pkt, roce, flow } = s;
  const info = OPCODES[pkt.bth.opcode]!;
  const pad = -pkt.payloadLength & 3;
  const udpLen = 8 + roce.length;
  const ib = layers.infiniband!;
  expect(ib, where).toBeDefined();

  // IP and UDP, including the checksums tshark validates.
  if (flow.family === 4) {
    const ip = layers.ip!;
    expect([one(ip, 'ip.src'), one(ip, 'ip.dst'), one(ip, 'ip.len'), one(ip, 'ip.id'), one(ip, 'ip.flags.df'), one(ip, 'ip.ttl'), one(ip, 'ip.proto')], where).toEqual([
      '192.168.1.1',
      '192.168.1.2',
      String(20 + udpLen),
      '0x0000',
      '1',
      String(flow.hopLimit),
      '17',
    ]);
    expect(one(ip, 'ip.checksum.status'), `${where}: IPv4 header checksum`).toBe('1');
  } else {
    const ip = layers.ipv6!;
    expect([one(ip, 'ipv6.src'), one(ip, 'ipv6.dst'), one(ip, 'ipv6.plen'), one(ip, 'ipv6.nxt'), one(ip, 'ipv6.hlim')], where).toEqual(['fd00::1', 'fd00::2', String(udpLen), '17', String(flow.hopLimit)]);
    expect(Number(one(ip, 'ipv6.tclass'))).toBe(flow.trafficClass);
    expect(Number(one(ip, 'ipv6.flow'))).toBe(flow.flowLabel);
  }
  const udp = layers.udp!;
  expect([one(udp, 'udp.srcport'), one(udp, 'udp.dstport'), one(udp, 'udp.length')], where).toEqual([String(flow.sport), '4791', String(udpLen)]);
  expect(one(udp, 'udp.checksum.status'), `${where}: UDP checksum`).toBe(s.udpChecksum ? '1' : '3'); // 1 good, 3 not present (zero)

  // BTH.
  const b = pkt.bth;
  const bth = (ib as { [k: string]: Json })['infiniband.bth_tree']!;
  expect(
    {
      opcode: one(bth, 'infiniband.bth.opcode'),
      se: one(bth, 'infiniband.bth.se'),
      m: one(bth, 'infiniband.bth.m'),
      pad: one(bth, 'infiniband.bth.padcnt'),
      tver: one(bth, 'infiniband.bth.tver'),
      pkey: one(bth, 'infiniband.bth.p_key'),
      fecnBecn: one(bth, 'infiniband.reserved'),
      destQp: one(bth, 'infiniband.bth.destqp'),
      ackReq: one(bth, 'infiniband.bth.a'),
      psn: one(bth, 'infiniband.bth.psn'),
    },
    where,
  ).toEqual({
    opcode: String(b.opcode),
    se: bit(b.se),
    m: bit(b.migReq),
    pad: String(pad),
    tver: '0',
    pkey: String(b.pkey),
    fecnBecn: ((b.fecn ? 0x80 : 0) | (b.becn ? 0x40 : 0)).toString(16).padStart(2, '0'),
    destQp: hexN(b.destQp, 6),
    ackReq: bit(b.ackReq),
    psn: String(b.psn),
  });

  if (pkt.bth.opcode === Opcode.RC_FLUSH || pkt.bth.opcode === Opcode.RC_ATOMIC_WRITE) {
    // Wireshark 4.0 predates the IBTA 1.5 opcodes: it shows everything after the BTH as vendor data.
    const vendor = findAll(ib, 'infiniband.vendor').flat() as string[];
    expect(vendor.sort((x, y) => y.length - x.length)[0], where).toBe(colonHex(roce.subarray(12)));
    return;
  }

  // Extension headers.
  const h = info.headers;
  if (h & Hdr.RETH) {
    expect([one(ib, 'infiniband.reth.va'), one(ib, 'infiniband.reth.r_key'), one(ib, 'infiniband.reth.dmalen')], where).toEqual([hexN(pkt.reth.va, 16), hexN(pkt.reth.rkey, 8), String(pkt.reth.dmaLength)]);
  }
  if (h & Hdr.AETH) expect([one(ib, 'infiniband.aeth.syndrome'), one(ib, 'infiniband.aeth.msn')], where).toEqual([String(pkt.aeth.syndrome), String(pkt.aeth.msn)]);
  if (h & Hdr.ATOMIC_ETH) {
    expect([one(ib, 'infiniband.reth.va'), one(ib, 'infiniband.reth.r_key'), one(ib, 'infiniband.atomiceth.swapdt'), one(ib, 'infiniband.atomiceth.cmpdt')], where).toEqual([
      hexN(pkt.atomicEth.va, 16),
      hexN(pkt.atomicEth.rkey, 8),
      pkt.atomicEth.swapAdd.toString(),
      pkt.atomicEth.compare.toString(),
    ]);
  }
  if (h & Hdr.ATOMIC_ACK_ETH) expect(one(ib, 'infiniband.atomicacketh.origremdt'), where).toBe(pkt.atomicAckEth.origRemoteData.toString());
  if (h & Hdr.IMMDT) expect(one(ib, 'infiniband.immdt'), where).toBe(colonHex(Uint8Array.of(pkt.immDt.imm >>> 24, (pkt.immDt.imm >>> 16) & 0xff, (pkt.immDt.imm >>> 8) & 0xff, pkt.immDt.imm & 0xff)));
  if (h & Hdr.IETH) expect(one(ib, 'infiniband.ieth'), where).toBe(colonHex(roce.subarray(info.iethAt, info.iethAt + 4)));
  if (h & Hdr.DETH) expect([one(ib, 'infiniband.deth.q_key'), one(ib, 'infiniband.deth.srcqp')], where).toEqual([hexN(pkt.deth.qkey, 16), hexN(pkt.deth.srcQp, 8)]);
  for (const [bitFlag, key] of [
    [Hdr.RETH, 'infiniband.reth'],
    [Hdr.AETH, 'infiniband.aeth'],
    [Hdr.ATOMIC_ETH, 'infiniband.atomiceth'],
    [Hdr.ATOMIC_ACK_ETH, 'infiniband.atomicacketh'],
    [Hdr.DETH, 'infiniband.deth'],
  ] as const) {
    expect(findAll(ib, key).length > 0, `${where}: ${key} present`).toBe((h & bitFlag) !== 0);
  }

  // Payload (tshark includes the pad bytes) and the ICRC where it expects it.
  const data = layers.data ? one(layers.data, 'data.data') : '';
  const padded = new Uint8Array(pkt.payloadLength + pad);
  padded.set(s.payload.subarray(0, pkt.payloadLength));
  expect(data, `${where}: payload`).toBe(colonHex(padded));
  expect(one(ib, 'infiniband.invariant.crc'), `${where}: ICRC field`).toBe(`0x${Buffer.from(roce.subarray(roce.length - 4)).toString('hex')}`);
}

const CAPTURES = [
  { name: 'ipv4-rxe', flow: FLOW_V4, udpChecksum: false, what: 'IPv4, UDP checksum 0 as rxe sends' },
  { name: 'ipv4-csum', flow: FLOW_V4, udpChecksum: true, what: 'IPv4, UDP checksum filled in' },
  { name: 'ipv6-csum', flow: FLOW_V6, udpChecksum: true, what: 'IPv6, UDP checksum filled in' },
] as const;

describe('interop: tshark decodes what we encode', () => {
  // A missing tool is a failure, not a skip: scripts/setup.sh installs it.
  beforeAll(() => {
    if (!hasTshark()) throw new Error('tshark is not installed: run `npm run setup`');
  });

  for (const c of CAPTURES) {
    it(`every opcode, every field, no malformed packets, checksums good (${c.what})`, () => {
      const file = join(dir, `${c.name}.pcap`);
      const sent = capture(file, c.flow, c.udpChecksum);
      const json = JSON.parse(runTshark(tsharkArgs(file, '-o', 'ip.check_checksum:TRUE', '-o', 'udp.check_checksum:TRUE', '-T', 'json', '--no-duplicate-keys'))) as { _source: { layers: { [k: string]: Json } } }[];
      expect(json).toHaveLength(sent.length);
      json.forEach((frame, i) => {
        const s = sent[i]!;
        const where = `${c.name} frame ${i + 1} (${OPCODES[s.pkt.bth.opcode]!.name}, ${s.pkt.payloadLength} B)`;
        expect(complaints(frame._source.layers), where).toEqual([]);
        expect(one(frame._source.layers.frame!, 'frame.protocols'), where).toMatch(/:udp:infiniband(:data)?$/);
        expectTsharkAgrees(frame._source.layers, s, where);
      });
    });
  }

  it("shows the worked example's ICRC as a3b8e0d6 (read big-endian from the wire bytes a3 b8 e0 d6)", () => {
    const file = join(dir, 'example.pcap');
    capture(file, FLOW_V4, false);
    const out = runTshark(tsharkArgs(file, '-c', '1', '-T', 'fields', '-e', 'infiniband.invariant.crc', '-e', 'data.data'));
    expect(out.trim()).toBe('0xa3b8e0d6\t68656c6c6f000000');
  });

  it('flags an IPv6 packet with UDP checksum 0 (what rxe sends) as an illegal checksum, and nothing else', () => {
    const file = join(dir, 'ipv6-zero.pcap');
    capture(file, FLOW_V6, false);
    const json = JSON.parse(runTshark(tsharkArgs(file, '-c', '3', '-T', 'json', '--no-duplicate-keys'))) as { _source: { layers: { [k: string]: Json } } }[];
    for (const frame of json) {
      expect(findAll(frame._source.layers, '_ws.expert.message')).toEqual(['Illegal checksum value (0)']);
      expect(findAll(frame._source.layers, '_ws.malformed')).toEqual([]);
    }
  });
});

// --- scapy ----------------------------------------------------------------------

const SCAPY_SCRIPT = `
import sys
from scapy.all import rdpcap, raw, conf
from scapy.layers.inet import IP, UDP
from scapy.contrib.roce import BTH
conf.verb = 0
for i, p in enumerate(rdpcap(sys.argv[1])):
    if IP not in p or BTH not in p:
        print(i, "skip", "skip")
        continue
    print(i, raw(p[UDP].payload)[-4:].hex(), p[BTH].compute_icrc(None).hex())
`;

function findScapyPython(): string | null {
  for (const py of ['/usr/bin/python3', 'python3']) if (commandWorks(py, ['-c', 'import scapy.contrib.roce'])) return py;
  return null;
}
const PYTHON = findScapyPython();

function runChecker(cmd: string, args: string[]): { idx: number; a: string; b: string }[] {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000, maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout
    .trim()
    .split('\n')
    .map((l) => {
      const [idx, a, b] = l.trim().split(/\s+/);
      return { idx: Number(idx), a: a!, b: b! };
    });
}

describe("interop: scapy's RoCE ICRC (IPv4) agrees with ours", () => {
  // A missing tool is a failure, not a skip: scripts/setup.sh installs it.
  beforeAll(() => {
    if (PYTHON === null) throw new Error('python3-scapy is not installed: run `npm run setup`');
  });

  it('recomputes the ICRC of every opcode and size, the worked example included, and rejects a corrupted copy', () => {
    const script = join(dir, 'scapy_icrc.py');
    writeFileSync(script, SCAPY_SCRIPT);
    for (const c of CAPTURES.filter((x) => x.flow.family === 4)) {
      const file = join(dir, `scapy-${c.name}.pcap`);
      const sent = capture(file, c.flow, c.udpChecksum);
      const rows = runChecker(PYTHON!, [script, file]);
      expect(rows).toHaveLength(sent.length);
      rows.forEach((r, i) => {
        const ours = Buffer.from(sent[i]!.roce.subarray(sent[i]!.roce.length - 4)).toString('hex');
        expect(r.a, `${c.name} frame ${i + 1}: wire`).toBe(ours);
        expect(r.b, `${c.name} frame ${i + 1}: scapy's ICRC`).toBe(ours);
      });
      expect(rows[0]!.b).toBe('a3b8e0d6'); // the worked example
      const bad = join(dir, `scapy-${c.name}-bad.pcap`);
      corrupt(file, bad);
      for (const r of runChecker(PYTHON!, [script, bad])) expect(r.a, `corrupted frame ${r.idx + 1}`).not.toBe(r.b);
    }
  });
});

// --- C + zlib, mirroring rxe_icrc.c ------------------------------------------------

const C_CHECKER = String.raw`
#define _DEFAULT_SOURCE
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define BTH_BYTES 12
#define BTH_QPN_MASK 0x00ffffffu

/* The kernel's crc32_le (no pre/post inversion) from zlib's crc32 (which inverts both). */
static uint32_t crc32_le(uint32_t crc, const uint8_t *p, size_t n) {
    return ~(uint32_t)crc32((uLong)(uint32_t)~crc, p, (uInt)n);
}

static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

int main(int argc, char **argv) {
    if (argc != 2) return 1;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    static uint8_t buf[64 << 20];
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    if (len < 24 || le32(buf) != 0xa1b2c3d4u) return 3;
    int idx = 0;
    for (size_t o = 24; o + 16 <= len; idx++) {
        uint32_t incl = le32(buf + o + 8);
        const uint8_t *fr = buf + o + 16;
        o += 16 + incl;
        uint16_t ethertype = (uint16_t)(fr[12] << 8 | fr[13]);
        const uint8_t *ip = fr + 14;
        /* rxe_icrc_hdr(): copy IP + UDP + BTH, mask, hash; then the rest. */
        uint8_t pshdr[sizeof(struct ip6_hdr) + sizeof(struct udphdr) + BTH_BYTES];
        size_t hdr_size;
        struct udphdr *udph;
        if (ethertype == 0x0800) {
            hdr_size = sizeof(struct iphdr) + sizeof(struct udphdr);
            memcpy(pshdr, ip, hdr_size);
            struct iphdr *ip4h = (struct iphdr *)pshdr;
            udph = (struct udphdr *)(ip4h + 1);
            ip4h->ttl = 0xff;
            ip4h->check = 0xffff;
            ip4h->tos = 0xff;
        } else if (ethertype == 0x86dd) {
            hdr_size = sizeof(struct ip6_hdr) + sizeof(struct udphdr);
            memcpy(pshdr, ip, hdr_size);
            struct ip6_hdr *ip6h = (struct ip6_hdr *)pshdr;
            udph = (struct udphdr *)(ip6h + 1);
            ip6h->ip6_flow |= htonl(0x0fffffffu); /* priority = 0xf, flow_lbl = ff ff ff */
            ip6h->ip6_hlim = 0xff;
        } else {
            printf("%d skip skip\n", idx);
            continue;
        }
        udph->check = 0xffff;
        const uint8_t *bth = ip + hdr_size;
        memcpy(pshdr + hdr_size, bth, BTH_BYTES);
        uint32_t qpn;
        memcpy(&qpn, pshdr + hdr_size + 4, 4);
        qpn |= htonl(~BTH_QPN_MASK); /* bth->qpn |= cpu_to_be32(~BTH_QPN_MASK): FECN, BECN, resv */
        memcpy(pshdr + hdr_size + 4, &qpn, 4);
        size_t udp_len = ntohs(udph->len);
        size_t rest = udp_len - sizeof(struct udphdr) - BTH_BYTES - 4;
        uint32_t crc = crc32_le(0xdebb20e3u, pshdr, hdr_size + BTH_BYTES);
        crc = crc32_le(crc, bth + BTH_BYTES, rest);
        uint32_t icrc = ~crc;
        printf("%d %08x %08x\n", idx, icrc, le32(bth + udp_len - sizeof(struct udphdr) - 4));
    }
    return 0;
}
`;

const HAS_CC = commandWorks('cc', ['--version']) && existsSync('/usr/include/zlib.h');

describe('interop: an rxe_icrc.c mirror in C with zlib agrees with ours (IPv4 and IPv6)', () => {
  // A missing tool is a failure, not a skip: scripts/setup.sh installs it.
  beforeAll(() => {
    if (!HAS_CC) throw new Error('gcc and zlib1g-dev is not installed: run `npm run setup`');
  });

  let checker = '';
  beforeAll(() => {
    const src = join(dir, 'rxe_icrc_check.c');
    checker = join(dir, 'rxe_icrc_check');
    writeFileSync(src, C_CHECKER);
    const r = spawnSync('cc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', checker, src, '-lz'], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`compiling the checker failed: ${r.stderr}`);
  });

  for (const c of CAPTURES) {
    it(`recomputes the ICRC of every packet and rejects a corrupted copy (${c.what})`, () => {
      const file = join(dir, `c-${c.name}.pcap`);
      const sent = capture(file, c.flow, c.udpChecksum);
      const rows = runChecker(checker, [file]);
      expect(rows).toHaveLength(sent.length);
      rows.forEach((r, i) => {
        const ours = readIcrc(sent[i]!.roce, sent[i]!.roce.length - 4).toString(16).padStart(8, '0');
        expect(r.b, `${c.name} frame ${i + 1}: wire`).toBe(ours);
        expect(r.a, `${c.name} frame ${i + 1}: rxe-style ICRC`).toBe(ours);
      });
      if (c.flow.family === 4) expect(rows[0]!.a).toBe('d6e0b8a3'); // the worked example
      const bad = join(dir, `c-${c.name}-bad.pcap`);
      corrupt(file, bad);
      for (const r of runChecker(checker, [bad])) expect(r.a, `corrupted frame ${r.idx + 1}`).not.toBe(r.b);
    });
  }

});
