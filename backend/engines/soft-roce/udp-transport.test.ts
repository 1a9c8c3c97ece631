/**
 * The batched UDP transport over real sockets on loopback only
 * (127.0.0.2 / 127.0.0.3: Linux routes all of 127/8 to lo; and ::1).
 */
import { existsSync, readFileSync, readlinkSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';

import { isSysError, native } from '../../../virtio/sys/native.js';
import {
  UDP_FLAG_IPV6,
  UDP_FLAG_TRUNCATED,
  UDP_META_WORDS,
  UdpBatch,
  UdpTransport,
  peerAddress,
  udpPeer,
  type UdpTransportOptions,
} from './udp-transport.js';

const A = '127.0.0.2';
const B = '127.0.0.3';

let open: UdpTransport[] = [];
let fds: number[] = [];
function transport(options: UdpTransportOptions): UdpTransport {
  const t = new UdpTransport(options);
  open.push(t);
  return t;
}
afterEach(() => {
  for (const t of open) t.close();
  for (const fd of fds) {
    try {
      native.close(fd);
    } catch {
      // already closed by the test
    }
  }
  open = [];
  fds = [];
});

function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected a throw');
}

/** Deterministic content: datagram `seq` of `len` bytes. */
function fill(bytes: Uint8Array, seq: number): void {
  bytes[0] = seq & 0xff;
  bytes[1] = (seq >>> 8) & 0xff;
  for (let i = 2; i < bytes.length; i++) bytes[i] = (seq * 31 + i * 7) & 0xff;
}
function sizeOf(seq: number): number {
  return 2 + ((seq * 977) % 4095); // 2 .. 4096
}

/** Waits (on the event loop) until `cond` holds. */
async function until(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe('udpPeer', () => {
  it('parses and formats IPv4 and IPv6 literals', () => {
    expect(udpPeer('127.0.0.2', 4791)).toEqual({ family: 4, port: 4791, scope: 0, words: [0x7f000002, 0, 0, 0] });
    expect(udpPeer('::1', 1).words).toEqual([0, 0, 0, 1]);
    expect(udpPeer('::ffff:10.0.0.1', 1).words).toEqual([0, 0, 0xffff, 0x0a000001]);
    expect(udpPeer('fe80::1:2%3', 1)).toMatchObject({ scope: 3, words: [0xfe800000, 0, 0, 0x00010002] });
    expect(udpPeer('1:2:3:4:5:6:7:8', 1).words).toEqual([0x00010002, 0x00030004, 0x00050006, 0x00070008]);
    expect(peerAddress(udpPeer('10.1.2.3', 0))).toBe('10.1.2.3');
    expect(peerAddress(udpPeer('fe80::1', 0))).toBe('fe80:0:0:0:0:0:0:1');
    for (const bad of ['', '1.2.3', '1.2.3.256', '01.2.3.4', 'x::1', '1::2::3', '1:2:3:4:5:6:7:8:9', '::1%eth0', 'localhost']) {
      expect(() => udpPeer(bad, 0), bad).toThrow(TypeError);
    }
    expect(() => udpPeer('::1', 65536)).toThrow(RangeError);
  });
});

describe('udpBind', () => {
  it('binds non-blocking and close-on-exec, with big buffers and no SO_REUSEADDR', () => {
    const fd = native.udpBind(A, 0);
    fds.push(fd);
    const info = native.udpInfo(fd);
    expect(info).toMatchObject({ family: 4, address: A });
    expect(info.port).toBeGreaterThan(0);
    // The kernel doubles the value it accepts; at least the 4 MiB default cap.
    expect(info.rcvbuf).toBeGreaterThanOrEqual(4 << 20);
    expect(info.sndbuf).toBeGreaterThanOrEqual(4 << 20);
    expect(readlinkSync(`/proc/self/fd/${fd}`)).toMatch(/^socket:/);
    const flags = parseInt(/flags:\s*([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);
    expect(flags & 0o4000).toBe(0o4000); // O_NONBLOCK
    expect(flags & 0o2000000).toBe(0o2000000); // O_CLOEXEC
  });

  it('fails with EADDRINUSE on an address and port in use', () => {
    const fd = native.udpBind(A, 0);
    fds.push(fd);
    const port = native.udpInfo(fd).port;
    const err = thrown(() => fds.push(native.udpBind(A, port)));
    expect(isSysError(err, 'EADDRINUSE')).toBe(true);
    expect((err as Error).message).toContain(`bind '${A}' port ${port}`);
    // The same port on another loopback address is a different socket address.
    fds.push(native.udpBind(B, port));
  });

  it('refuses bad addresses and ports', () => {
    expect(isSysError(thrown(() => native.udpBind('not-an-address', 0)), 'EINVAL')).toBe(true);
    expect(isSysError(thrown(() => native.udpBind('127.0.0.300', 0)), 'EINVAL')).toBe(true);
    // A well-formed address that is not local.
    expect(isSysError(thrown(() => native.udpBind('192.0.2.1', 0)), 'EADDRNOTAVAIL')).toBe(true);
    expect(isSysError(thrown(() => native.udpBind('fe80::1%no-such-if0', 0)), 'ENODEV')).toBe(true);
    expect(() => native.udpBind(A, 65536)).toThrow(RangeError);
    expect(() => native.udpBind(A, -1)).toThrow(RangeError);
    expect(() => new UdpTransport({ address: 'bogus', port: 0 })).toThrow(/inet_pton/);
  });
});

describe('udpRecvBatch / udpSendBatch', () => {
  it('checks its buffers and returns 0 when nothing is waiting', () => {
    const fd = native.udpBind(A, 0);
    fds.push(fd);
    const buf = new Uint8Array(4 * 100);
    const meta = new Uint32Array(4 * UDP_META_WORDS);
    expect(native.udpRecvBatch(fd, buf, 100, 4, meta)).toBe(0);
    expect(() => native.udpRecvBatch(fd, buf, 101, 4, meta)).toThrow(RangeError);
    expect(() => native.udpRecvBatch(fd, buf, 100, 5, meta)).toThrow(RangeError);
    expect(() => native.udpRecvBatch(fd, buf, 100, 2000, meta)).toThrow(RangeError);
    expect(() => native.udpRecvBatch(fd, buf, 100, 4, new Int32Array(32) as unknown as Uint32Array)).toThrow(TypeError);
    const offsets = new Uint32Array([0, 390]);
    const sendMeta = new Uint32Array(2 * UDP_META_WORDS);
    sendMeta[UDP_META_WORDS] = 11; // 390 + 11 > 400
    expect(() => native.udpSendBatch(fd, buf, offsets, sendMeta, 0, 2)).toThrow(RangeError);
    expect(() => native.udpSendBatch(fd, buf, offsets, sendMeta, 1, 2)).toThrow(RangeError);
    expect(native.udpSendBatch(fd, buf, offsets, sendMeta, 0, 0)).toBe(0);
  });
});

describe('UdpTransport', () => {
  it('carries 1000 datagrams of varied sizes intact, with lengths and source', async () => {
    const rx = transport({ address: B, port: 0, recvSlots: 64 });
    const tx = transport({ address: A, port: 0, sendSlots: 128 });
    const to = rx.local;
    const from = udpPeer(A, tx.local.port);
    const N = 1000;
    const seen = new Uint8Array(N);
    let good = 0;
    const problems: string[] = [];
    let batches = 0;
    rx.onBatch((batch: UdpBatch) => {
      batches++;
      for (let i = 0; i < batch.count; i++) {
        const at = batch.offset(i);
        const len = batch.length(i);
        if (batch.truncated(i)) problems.push(`truncated ${len}`);
        if (!batch.isFrom(i, from) || batch.sourcePort(i) !== tx.local.port || batch.sourceIPv4(i) !== 0x7f000002) {
          problems.push(`source ${peerAddress(batch.source(i))}:${batch.sourcePort(i)}`);
        }
        const seq = batch.buf[at]! | (batch.buf[at + 1]! << 8);
        if (seq >= N || len !== sizeOf(seq)) {
          problems.push(`seq ${seq} length ${len}`);
          continue;
        }
        const expected = new Uint8Array(len);
        fill(expected, seq);
        if (!Buffer.from(batch.buf.buffer, batch.buf.byteOffset + at, len).equals(expected)) problems.push(`bytes of ${seq}`);
        else if (seen[seq]!++ === 0) good++;
      }
    });

    // Paced by batches: 125 datagrams (one full 128-slot batch or less) per
    // turn of the event loop, so the 8 MiB receive buffer never overflows.
    const scratch = new Uint8Array(4096);
    for (let seq = 0; seq < N; seq++) {
      const bytes = scratch.subarray(0, sizeOf(seq));
      fill(bytes, seq);
      expect(tx.queue(to, bytes)).toBe(true);
      if (seq % 125 === 124) await new Promise((r) => setImmediate(r));
    }
    await until(() => good === N || problems.length > 0);
    expect(problems).toEqual([]);
    expect(good).toBe(N);
    expect(tx.stats).toMatchObject({ sent: N, sendDropped: 0, sendErrors: 0 });
    expect(tx.stats.sendCalls).toBeLessThan(20);
    expect(rx.stats).toMatchObject({ received: N, truncated: 0 });
    expect(batches).toBe(rx.stats.batches);
    expect(batches).toBeLessThan(N / 4);
  });

  it('reports a datagram longer than its slot as truncated without touching the next slot', async () => {
    const SLOT = 256;
    const rx = transport({ address: B, port: 0, recvSlots: 8, recvSlotSize: SLOT });
    const tx = transport({ address: A, port: 0 });
    const sizes = [100, 1000, SLOT, SLOT + 1, 50];
    const got: { len: number; truncated: boolean; first: number; slotTail: number[] }[] = [];
    rx.onBatch((batch) => {
      for (let i = 0; i < batch.count; i++) {
        const at = batch.offset(i);
        got.push({
          len: batch.length(i),
          truncated: batch.truncated(i),
          first: batch.buf[at]!,
          // The bytes just past this datagram's slot belong to the next one.
          slotTail: Array.from(batch.buf.subarray(at + SLOT - 2, at + SLOT)),
        });
      }
    });
    // Stage all five in one sendmmsg so they arrive in one recvmmsg.
    sizes.forEach((n, k) => tx.queue(rx.local, new Uint8Array(n).fill(k + 1)));
    await until(() => got.length === sizes.length);
    expect(got.map((g) => [g.len, g.truncated, g.first])).toEqual([
      [100, false, 1],
      [1000, true, 2],
      [SLOT, false, 3],
      [SLOT + 1, true, 4],
      [50, false, 5],
    ]);
    // Truncated datagrams filled exactly their own slot.
    expect(got[1]!.slotTail).toEqual([2, 2]);
    expect(got[3]!.slotTail).toEqual([4, 4]);
    expect(rx.stats.truncated).toBe(2);
    expect(rx.stats.batches).toBe(1);

    // The raw record says the same.
    const fd = native.udpBind(A, 0);
    fds.push(fd);
    const meta = new Uint32Array(UDP_META_WORDS);
    const offsets = new Uint32Array([0]);
    const sendBuf = new Uint8Array(300);
    meta.set([300, 0, rx.local.port, 0, 0x7f000003, 0, 0, 0]);
    const probe = native.udpBind(B, 0);
    fds.push(probe);
    meta[2] = native.udpInfo(probe).port;
    expect(native.udpSendBatch(fd, sendBuf, offsets, meta, 0, 1)).toBe(1);
    expect(native.waitReadable(probe, 2000)).toBe(true);
    const recvMeta = new Uint32Array(2 * UDP_META_WORDS);
    expect(native.udpRecvBatch(probe, new Uint8Array(2 * 64), 64, 2, recvMeta)).toBe(1);
    expect(Array.from(recvMeta.subarray(0, UDP_META_WORDS))).toEqual([300, UDP_FLAG_TRUNCATED, native.udpInfo(fd).port, 0, 0x7f000002, 0, 0, 0]);
  });

  it('starts every receive slot 4 bytes past an 8-byte boundary, so payload behind a 12-byte BTH lands 8-byte aligned', async () => {
    const rx = transport({ address: B, port: 0, recvSlots: 8, recvSlotSize: 4160 });
    const tx = transport({ address: A, port: 0 });
    const leads: number[] = [];
    const firsts: number[] = [];
    rx.onBatch((batch) => {
      for (let i = 0; i < batch.count; i++) {
        leads.push((batch.buf.byteOffset + batch.offset(i)) % 8);
        firsts.push(batch.buf[batch.offset(i)]!);
      }
    });
    for (let k = 0; k < 5; k++) tx.queue(rx.local, new Uint8Array(4108).fill(k + 1));
    await until(() => leads.length === 5);
    expect(leads).toEqual([4, 4, 4, 4, 4]);
    expect(firsts).toEqual([1, 2, 3, 4, 5]);
    // Explicit leads, and slots that cannot keep one alignment.
    const none = transport({ address: B, port: 0, recvLead: 0 });
    expect(none.isClosed).toBe(false);
    expect(() => new UdpTransport({ address: B, port: 0, recvLead: 8 })).toThrow(RangeError);
    expect(() => new UdpTransport({ address: B, port: 0, recvSlotSize: 100, recvLead: 4 })).toThrow(RangeError);
    expect(transport({ address: B, port: 0, recvSlotSize: 100 }).isClosed).toBe(false);
  });

  it('works over IPv6 (::1)', async () => {
    const rx = transport({ address: '::1', port: 0 });
    const tx = transport({ address: '::1', port: 0 });
    expect(rx.local).toMatchObject({ family: 6, words: [0, 0, 0, 1] });
    const got: string[] = [];
    rx.onBatch((batch) => {
      for (let i = 0; i < batch.count; i++) {
        const src = batch.source(i);
        expect(batch.meta[i * UDP_META_WORDS + 1]! & UDP_FLAG_IPV6).toBe(UDP_FLAG_IPV6);
        expect(batch.isFrom(i, tx.local)).toBe(true);
        got.push(`${peerAddress(src)}:${src.port} ${Buffer.from(batch.buf.subarray(batch.offset(i), batch.offset(i) + batch.length(i))).toString()}`);
      }
    });
    for (const word of ['one', 'two', 'three']) tx.queue(rx.local, Buffer.from(word));
    await until(() => got.length === 3);
    const src = `0:0:0:0:0:0:0:1:${tx.local.port}`;
    expect(got).toEqual([`${src} one`, `${src} two`, `${src} three`]);
    // An IPv6-only socket cannot reach an IPv4 peer.
    const errors: Error[] = [];
    tx.onError((err) => errors.push(err));
    tx.queue(udpPeer(A, 9), new Uint8Array(4));
    tx.flush();
    expect(errors.length).toBe(1);
    expect(tx.stats.sendErrors).toBe(1);
  });

  it('drops a datagram the kernel refuses and sends the rest of the batch', async () => {
    const rx = transport({ address: B, port: 0 });
    const tx = transport({ address: A, port: 0, sendSlotSize: 65536 });
    const errors: string[] = [];
    tx.onError((err) => errors.push(isSysError(err) ? err.code : String(err)));
    let received = 0;
    rx.onBatch((batch) => {
      received += batch.count;
    });
    tx.queue(rx.local, new Uint8Array(10));
    tx.queue(rx.local, new Uint8Array(65536)); // over the largest UDP payload
    tx.queue(rx.local, new Uint8Array(10));
    await until(() => received === 2);
    expect(errors).toEqual(['EMSGSIZE']);
    expect(tx.stats).toMatchObject({ sent: 2, sendErrors: 1 });
  });

  it('builds datagrams in place with reserve()', async () => {
    const rx = transport({ address: B, port: 0 });
    const tx = transport({ address: A, port: 0, sendSlots: 4 });
    const got: number[] = [];
    rx.onBatch((batch) => {
      for (let i = 0; i < batch.count; i++) got.push(batch.buf[batch.offset(i)]!);
    });
    for (let k = 0; k < 10; k++) {
      const at = tx.reserve(rx.local, 1);
      expect(at).toBeGreaterThanOrEqual(0);
      tx.sendBuffer[at] = k;
    }
    await until(() => got.length === 10);
    expect(got).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });

  it('close stops the watcher and frees the fd and the port', async () => {
    const rx = new UdpTransport({ address: B, port: 0 });
    const tx = transport({ address: A, port: 0 });
    const fd = rx.fd;
    const port = rx.local.port;
    let calls = 0;
    rx.onBatch(() => {
      calls++;
    });
    tx.queue(rx.local, new Uint8Array(8));
    await until(() => calls === 1);
    rx.close();
    rx.close(); // idempotent
    expect(rx.isClosed).toBe(true);
    expect(existsSync(`/proc/self/fd/${fd}`)).toBe(false);
    expect(() => rx.queue(tx.local, new Uint8Array(1))).toThrow(/closed/);
    tx.queue(udpPeer(B, port), new Uint8Array(8));
    await new Promise((r) => setTimeout(r, 50));
    expect(calls).toBe(1);
    // The address and port are free again.
    const again = transport({ address: B, port });
    expect(again.local.port).toBe(port);
  });
});
