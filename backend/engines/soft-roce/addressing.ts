/**
 * GIDs as IP addresses, and the IP/UDP fields the ICRC covers for a pair of
 * endpoints (rxe sends IPv4 with DF set and IP ID 0, reference §6).
 */
import { IPV4_DF, type IcrcPath } from './icrc.js';
import { udpPeer, type UdpPeer } from './udp-transport.js';

/** The IPv4 address of an IPv4-mapped GID (::ffff:a.b.c.d), or the IPv6 text of any other GID. */
export function gidToAddress(gid: Uint8Array): string {
  if (gid.length !== 16) throw new RangeError('a GID has 16 bytes');
  let mapped = gid[10] === 0xff && gid[11] === 0xff;
  for (let i = 0; i < 10 && mapped; i++) if (gid[i] !== 0) mapped = false;
  if (mapped) return `${gid[12]}.${gid[13]}.${gid[14]}.${gid[15]}`;
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((gid[i]! << 8) | gid[i + 1]!).toString(16));
  return groups.join(':');
}

/** The IPv4-mapped GID of an IPv4 address. */
export function ipv4Gid(address: string): Uint8Array {
  const peer = udpPeer(address, 0);
  if (peer.family !== 4) throw new TypeError(`not an IPv4 address: ${address}`);
  const a = peer.words[0];
  return new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a >>> 24, (a >>> 16) & 0xff, (a >>> 8) & 0xff, a & 0xff]);
}

/** Writes an endpoint's address bytes, network order (4 for IPv4, 16 for IPv6), into `out` from `at`. */
export function putPeerBytes(out: Uint8Array, p: UdpPeer, at = 0): void {
  const n = p.family === 4 ? 1 : 4;
  for (let w = 0; w < n; w++) {
    const v = p.words[w]!;
    const o = at + w * 4;
    out[o] = v >>> 24;
    out[o + 1] = (v >>> 16) & 0xff;
    out[o + 2] = (v >>> 8) & 0xff;
    out[o + 3] = v & 0xff;
  }
}

/** The address bytes of an endpoint, network order (4 for IPv4, 16 for IPv6). */
export function peerBytes(p: UdpPeer): Uint8Array {
  const out = new Uint8Array(p.family === 4 ? 4 : 16);
  putPeerBytes(out, p);
  return out;
}

/** Writes the GID an endpoint's address stands for into `out` (16 bytes). */
export function putPeerGid(out: Uint8Array, p: UdpPeer): void {
  if (p.family === 6) return putPeerBytes(out, p);
  out.fill(0, 0, 10);
  out[10] = 0xff;
  out[11] = 0xff;
  putPeerBytes(out, p, 12);
}

/** The GID an endpoint's address stands for. */
export function peerGid(p: UdpPeer): Uint8Array {
  const gid = new Uint8Array(16);
  putPeerGid(gid, p);
  return gid;
}

export function makePath(src: UdpPeer, dst: UdpPeer): IcrcPath {
  return { family: src.family, src: peerBytes(src), dst: peerBytes(dst), sport: src.port, dport: dst.port, ipId: 0, ipFlagsFragment: src.family === 4 ? IPV4_DF : 0 };
}
