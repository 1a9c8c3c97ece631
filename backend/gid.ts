/**
 * GIDs from IP addresses, as RoCEv2 forms them: an IPv6 address as is, an
 * IPv4 address as ::ffff:a.b.c.d.
 */
import { isIPv4, isIPv6 } from 'node:net';

export function gidFromAddress(ip: string): Uint8Array {
  const gid = new Uint8Array(16);
  if (isIPv4(ip)) {
    gid[10] = 0xff;
    gid[11] = 0xff;
    ip.split('.').forEach((o, i) => (gid[12 + i] = Number(o)));
    return gid;
  }
  if (!isIPv6(ip)) throw new RangeError(`${ip} is not an IPv4 or IPv6 address`);
  let text = ip;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    const b = gidFromAddress(v4[1]!);
    text = text.slice(0, -v4[1]!.length) + `${((b[12]! << 8) | b[13]!).toString(16)}:${((b[14]! << 8) | b[15]!).toString(16)}`;
  }
  const [left, right] = text.includes('::') ? text.split('::') : [text, undefined];
  const l = left ? left.split(':') : [];
  const r = right ? right.split(':') : [];
  const groups = right === undefined ? l : [...l, ...new Array<string>(8 - l.length - r.length).fill('0'), ...r];
  groups.forEach((g, i) => {
    const v = parseInt(g, 16);
    gid[2 * i] = v >> 8;
    gid[2 * i + 1] = v & 0xff;
  });
  return gid;
}

export function gidToString(gid: Uint8Array): string {
  if (gid.subarray(0, 10).every((b) => b === 0) && gid[10] === 0xff && gid[11] === 0xff) return `::ffff:${gid[12]}.${gid[13]}.${gid[14]}.${gid[15]}`;
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((gid[i]! << 8) | gid[i + 1]!).toString(16));
  return groups.join(':');
}
