/**
 * What every peer command sets up: a soft-RoCE engine bound to the local
 * address, an optional pcap of its RoCEv2 traffic, and a {@link PeerDevice}
 * over it; plus the settings the pingpong and perftest runners share.
 */
import { isIPv4 } from 'node:net';
import type { Logger } from '../../virtio/log.js';
import { isSysError } from '../../virtio/sys/native.js';
import { gidFromAddress } from '../gid.js';
import { PcapCapture } from '../engines/soft-roce/capture.js';
import { SoftRoceEngine } from '../engines/soft-roce/soft-roce-engine.js';
import { ROCEV2_UDP_PORT } from '../engines/soft-roce/udp-transport.js';
import { PeerDevice, PeerError } from './peer-device.js';

export interface PeerSessionOptions {
  /** Local IPv4 address: bound for RoCEv2 and put in the GID table. */
  address: string;
  /** UDP port to bind and send to (4791). */
  rocePort?: number;
  pcap?: string;
  log: Logger;
  memoryBytes?: number;
}

export interface PeerSession {
  device: PeerDevice;
  gid: Uint8Array;
  close(): void;
}

export function openPeerSession(opts: PeerSessionOptions): PeerSession {
  if (!isIPv4(opts.address)) throw new PeerError(`--gid must be an IPv4 address of this host (got '${opts.address}')`);
  const port = opts.rocePort ?? ROCEV2_UDP_PORT;
  let engine: SoftRoceEngine;
  try {
    engine = new SoftRoceEngine({ address: opts.address, port });
  } catch (err) {
    if (!isSysError(err)) throw err;
    const hint = err.code === 'EADDRNOTAVAIL' ? ' (the address is not on this host)' : err.code === 'EADDRINUSE' ? ' (another process uses it)' : '';
    throw new PeerError(`cannot bind UDP ${opts.address}:${port}: ${err.code}${hint}`);
  }
  let capture: PcapCapture | null = null;
  if (opts.pcap !== undefined) {
    try {
      capture = PcapCapture.toFile(opts.pcap);
    } catch (err) {
      engine.close();
      throw new PeerError(`cannot open --pcap file '${opts.pcap}': ${(err as { code?: unknown }).code ?? String(err)}`);
    }
    engine.capture = capture;
  }
  const gid = gidFromAddress(opts.address);
  const device = new PeerDevice(engine, [gid], opts.log, opts.memoryBytes);
  let closed = false;
  return {
    device,
    gid,
    close: () => {
      if (closed) return;
      closed = true;
      if (capture !== null) {
        engine.capture = null;
        capture.close();
        opts.log.info(`pcap ${opts.pcap}: ${capture.count} packets (${capture.tx} sent, ${capture.rx} received)`);
      }
      device.close();
    },
  };
}

/** A random 24-bit PSN, as the tools pick theirs (lrand48() & 0xffffff). */
export function randomPsn(): number {
  return Math.floor(Math.random() * 0x1000000);
}

/** ib_mtu enum (1..5) of an MTU in bytes. */
export function mtuEnum(bytes: number): number {
  const e = [256, 512, 1024, 2048, 4096].indexOf(bytes);
  if (e < 0) throw new PeerError(`MTU ${bytes} is not one of 256, 512, 1024, 2048, 4096`);
  return e + 1;
}

/** A GID as inet_ntop prints it (what the stock tools show): ::ffff:a.b.c.d for IPv4-mapped ones. */
export function formatGid(gid: Uint8Array): string {
  let mapped = gid[10] === 0xff && gid[11] === 0xff;
  for (let i = 0; i < 10; i++) if (gid[i] !== 0) mapped = false;
  if (mapped) return `::ffff:${gid[12]}.${gid[13]}.${gid[14]}.${gid[15]}`;
  const g: number[] = [];
  for (let i = 0; i < 16; i += 2) g.push((gid[i]! << 8) | gid[i + 1]!);
  // The longest run of two or more zero groups becomes "::".
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  const hex = g.map((v) => v.toString(16));
  if (best < 0) return hex.join(':');
  return `${hex.slice(0, best).join(':')}::${hex.slice(best + bestLen).join(':')}`;
}
