/**
 * Sample flows and packets for the soft-RoCE codec tests: one packet per
 * opcode with distinctive values in every field (high bits set, so sign
 * and width mistakes show).
 */
import { spawnSync } from 'node:child_process';
import { IPV4_DF, ROCE_UDP_PORT } from './icrc.js';
import type { EthernetAddresses, RoceFlow } from './frame.js';
import { OPCODES, PayloadRule, SUPPORTED_OPCODES } from './opcodes.js';
import { RocePacket } from './packet.js';

export const ETH: EthernetAddresses = {
  srcMac: new Uint8Array([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]),
  dstMac: new Uint8Array([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]),
};

/** The reference's worked example: 192.168.1.1 → 192.168.1.2, ID 0, DF. */
export const FLOW_V4: RoceFlow = {
  family: 4,
  src: new Uint8Array([192, 168, 1, 1]),
  dst: new Uint8Array([192, 168, 1, 2]),
  sport: 0xc000,
  dport: ROCE_UDP_PORT,
  ipId: 0,
  ipFlagsFragment: IPV4_DF,
  trafficClass: 0,
  hopLimit: 64,
  flowLabel: 0,
};

export const FLOW_V6: RoceFlow = {
  family: 6,
  src: new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01]),
  dst: new Uint8Array([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02]),
  sport: 0xd123,
  dport: ROCE_UDP_PORT,
  ipId: 0,
  ipFlagsFragment: 0,
  trafficClass: 0x68,
  hopLimit: 1,
  flowLabel: 0x12345,
};

/** Deterministic bytes. */
export function pattern(n: number, seed = 1): Uint8Array {
  const b = new Uint8Array(n);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** A payload length the opcode allows, near `wanted`. */
export function allowedPayload(opcode: number, wanted: number): number {
  const rule = OPCODES[opcode]!.payload;
  return rule === PayloadRule.NONE ? 0 : rule === PayloadRule.EIGHT ? 8 : wanted;
}

/** A packet of `opcode` with every header field set to something distinctive (varied by `seed`). */
export function samplePacket(opcode: number, payloadLength: number, seed = 1): RocePacket {
  const p = new RocePacket().setOpcode(opcode);
  const s = seed >>> 0;
  p.bth.se = (s & 1) === 1;
  p.bth.migReq = (s & 2) === 2;
  p.bth.pkey = s & 4 ? 0xffff : 0x7fff;
  p.bth.fecn = (s & 8) === 8;
  p.bth.becn = (s & 16) === 16;
  p.bth.destQp = (0xabcdef + s * 977) & 0xffffff;
  p.bth.ackReq = (s & 1) === 0;
  p.bth.psn = (0xfffff0 + s * 13) & 0xffffff;
  p.reth.va = 0xfedc_ba98_7654_3210n + BigInt(s);
  p.reth.rkey = (0x89abcdef + s) >>> 0;
  p.reth.dmaLength = (0x80000000 - s) >>> 0;
  p.aeth.syndrome = [0x1f, 0x20 | (s % 32), 0x60, 0x61, 0x62, 0x63][s % 6]!;
  p.aeth.msn = (0xf0f0f0 + s) & 0xffffff;
  p.atomicEth.va = 0x8000_0000_0000_1000n + BigInt(s) * 8n;
  p.atomicEth.rkey = (0xdeadbeef ^ s) >>> 0;
  p.atomicEth.swapAdd = 0xffff_ffff_ffff_fffen - BigInt(s);
  p.atomicEth.compare = 0x0123_4567_89ab_cdefn + BigInt(s);
  p.atomicAckEth.origRemoteData = 0xa5a5_a5a5_5a5a_5a5an ^ BigInt(s);
  p.immDt.imm = (0xc0ffee00 + s) >>> 0;
  p.ieth.rkey = (0xbadc0de0 + s) >>> 0;
  p.deth.qkey = s & 1 ? 0x80010000 : (0x11111111 * ((s % 15) + 1)) >>> 0;
  p.deth.srcQp = (0x800000 + s) & 0xffffff;
  p.feth.placementType = s & 0xf;
  p.feth.selectivityLevel = s & 3;
  p.payloadLength = allowedPayload(opcode, payloadLength);
  return p;
}

export { SUPPORTED_OPCODES };

// --- external tools (interop tests) ---------------------------------------------

/** Whether `cmd args…` runs and exits 0. */
export function commandWorks(cmd: string, args: readonly string[]): boolean {
  const r = spawnSync(cmd, args, { stdio: 'ignore', timeout: 30_000 });
  return r.status === 0;
}

let tsharkPresent: boolean | null = null;
export function hasTshark(): boolean {
  tsharkPresent ??= commandWorks('tshark', ['--version']);
  return tsharkPresent;
}

/**
 * Dissectors tshark tries on InfiniBand payloads (`tshark -G
 * heuristic-decodes`, table infiniband.payload); turned off so random SEND
 * payloads stay plain data instead of "malformed RPC-over-RDMA" or an
 * Ethernet frame carried over IB.
 */
export const TSHARK_PAYLOAD_DISSECTORS = ['smc', 'smb_direct', 'rpcordma', 'nvme-rdma', 'lnet', 'iser', 'infiniband_sdp', 'fcoib', 'drbd'] as const;
/** The two payload heuristics that belong to protocols we cannot turn off (ethertype, infiniband). */
export const TSHARK_PAYLOAD_HEURISTICS = ['eth_over_ib', 'mellanox_eoib'] as const;

export function tsharkArgs(file: string, ...extra: string[]): string[] {
  return ['-r', file, ...TSHARK_PAYLOAD_DISSECTORS.flatMap((p) => ['--disable-protocol', p]), ...TSHARK_PAYLOAD_HEURISTICS.flatMap((h) => ['--disable-heuristic', h]), ...extra];
}

/** Runs tshark; throws with its stderr when it fails. */
export function runTshark(args: readonly string[]): string {
  const r = spawnSync('tshark', args, { encoding: 'utf8', maxBuffer: 256 << 20, timeout: 120_000 });
  if (r.status !== 0) throw new Error(`tshark ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}`);
  return r.stdout;
}
