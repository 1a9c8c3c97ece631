import { closeSync, mkdtempSync, openSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Socket } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { native } from '../sys/native.js';
import { Logger } from '../log.js';
import { EchoDevice, ECHO_MAGIC } from '../examples/echo-device.js';
import { GuestRam } from '../frontend/guest-ram.js';
import { DriverQueue } from '../frontend/driver-queue.js';
import { VhostUserFrontend } from '../frontend/frontend.js';
import { VhostUserBackend, type ConnectionSummary } from './backend.js';
import { encodeHeader, encodeRequest } from './codec.js';
import { FrontendReq, HDR_NEED_REPLY, HDR_VERSION, HEADER_SIZE, ProtocolFeature, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, bit } from './protocol.js';

const ALL_PROTOCOL = (1n << 20n) - 1n;

interface Harness {
  device: EchoDevice;
  backend: VhostUserBackend;
  fe: VhostUserFrontend;
  ram: GuestRam;
  logs: string[];
  ended: Promise<ConnectionSummary>;
}

let h: Harness;
const toRelease: Array<() => void> = [];

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

function start(): Harness {
  const logs: string[] = [];
  const device = new EchoDevice();
  const backend = new VhostUserBackend(device, new Logger('debug', 'test', (l) => logs.push(l)));
  const [a, b] = native.socketPair();
  const ended = backend.serve(a);
  const fe = VhostUserFrontend.fromFd(b);
  const ram = new GuestRam(0, 1 << 20);
  toRelease.push(() => ram.release());
  return { device, backend, fe, ram, logs, ended };
}

async function negotiate(): Promise<void> {
  await h.fe.negotiate(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX), ALL_PROTOCOL);
}

async function echoOnce(q: DriverQueue, payload: Uint8Array): Promise<Uint8Array> {
  const src = h.ram.alloc(payload.byteLength, 8);
  const dst = h.ram.alloc(payload.byteLength, 8);
  h.ram.bytes(src, payload.byteLength).set(payload);
  q.add([
    { gpa: src, len: payload.byteLength, writable: false },
    { gpa: dst, len: payload.byteLength, writable: true },
  ]);
  q.kick();
  for (let i = 0; i < 200; i++) {
    const used = q.getUsed();
    if (used !== null) return h.ram.bytes(dst, used.len).slice();
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error('no used element');
}

async function expectAlive(): Promise<void> {
  expect(await h.fe.getQueueNum()).toBe(1);
}

beforeEach(() => {
  h = start();
});

afterEach(async () => {
  h.fe.close();
  // Let the back-end see the hang-up and release what it mapped before the next test counts mappings.
  await h.ended;
  for (const f of toRelease.splice(0)) f();
});

describe('vhost-user back-end', () => {
  it('negotiates, maps memory, runs a queue and answers config reads', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const q = new DriverQueue(h.ram, 0, 16, { eventIdx: true });
    toRelease.push(() => q.release());
    await h.fe.startQueue(h.ram, q);
    await h.fe.setStatus(0xf);
    const out = await echoOnce(q, new Uint8Array([1, 2, 3, 250]));
    expect(Array.from(out)).toEqual([1, 2, 3, 250]);
    const cfg = new DataView((await h.fe.getConfig(0, 16)).buffer);
    expect(cfg.getBigUint64(0, true)).toBe(ECHO_MAGIC);
    expect(cfg.getBigUint64(8, true)).toBe(1n);
    expect(h.logs.some((l) => l.includes('DRIVER_OK'))).toBe(true);
    expect(h.logs.some((l) => l.includes('vq 0: started'))).toBe(true);
  });

  it('answers an unknown request with an error when a reply is asked for, and keeps serving', async () => {
    await negotiate();
    const reply = await h.fe.request(99 as FrontendReq, { kind: 'none' }, 'u64', [], true);
    expect(reply).toEqual({ kind: 'u64', value: 1n });
    await expectAlive();
  });

  it('logs an unknown request without a reply flag, and keeps serving', async () => {
    await negotiate();
    h.fe.sendRaw(encodeRequest(77 as FrontendReq, { kind: 'none' }, false));
    await expectAlive();
    expect(h.logs.some((l) => l.includes('unknown request 77'))).toBe(true);
  });

  it('closes the connection on an oversized message, with the reason logged', async () => {
    const hdr = new Uint8Array(HEADER_SIZE);
    encodeHeader(hdr, { request: FrontendReq.SET_FEATURES, flags: HDR_VERSION, size: 0x10000 });
    h.fe.sendRaw(hdr);
    const end = await h.ended;
    expect(end.reason).toMatch(/exceeds/);
    expect(h.logs.some((l) => l.includes('front-end disconnected') && l.includes('exceeds'))).toBe(true);
  });

  it('closes the connection when a message is truncated before hang-up', async () => {
    const msg = encodeRequest(FrontendReq.SET_FEATURES, { kind: 'u64', value: 1n }, false);
    h.fe.sendRaw(msg.subarray(0, HEADER_SIZE + 3));
    setTimeout(() => h.fe.close(), 20);
    const end = await h.ended;
    expect(end.reason).toMatch(/mid-message/);
  });

  it('closes the connection on missing or extra fds and leaks none of them', async () => {
    await negotiate();
    const before = openFds();
    const extra = native.eventfd(0);
    // SET_MEM_TABLE names one region but carries two fds.
    h.fe.sendRaw(encodeRequest(FrontendReq.SET_MEM_TABLE, { kind: 'memTable', regions: [h.ram.region()] }, true), [h.ram.fd, extra]);
    const end = await h.ended;
    expect(end.reason).toMatch(/2 fds attached, expected 1/);
    native.close(extra);
    // Our end of the socket is gone too; every fd the back-end received was closed.
    expect(openFds()).toBe(before - 1);
  });

  it('closes the connection when SET_VRING_KICK comes without its fd', async () => {
    await negotiate();
    h.fe.sendRaw(encodeRequest(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: 0n }, false));
    expect((await h.ended).reason).toMatch(/0 fds attached, expected 1/);
  });

  it('refuses requests naming queues that do not exist, and keeps serving', async () => {
    await negotiate();
    await expect(h.fe.send(FrontendReq.SET_VRING_NUM, { kind: 'vringState', index: 5, num: 64 })).rejects.toThrow(/status 1/);
    await expect(h.fe.send(FrontendReq.SET_VRING_BASE, { kind: 'vringState', index: 0xffffffff, num: 0 })).rejects.toThrow(/status 1/);
    const call = native.eventfd(0);
    await expect(h.fe.send(FrontendReq.SET_VRING_CALL, { kind: 'u64', value: 200n }, [call])).rejects.toThrow(/status 1/);
    native.close(call);
    await expectAlive();
    expect(h.logs.some((l) => l.includes('queue 5 does not exist'))).toBe(true);
  });

  it('answers GET_VRING_BASE on a queue that never started', async () => {
    await negotiate();
    expect(await h.fe.getVringBase(0)).toBe(0);
    await expectAlive();
  });

  it('closes the connection for GET_VRING_BASE on a queue that does not exist', async () => {
    await negotiate();
    await expect(h.fe.getVringBase(9)).rejects.toThrow(/connection closed/);
    expect((await h.ended).reason).toMatch(/GET_VRING_BASE: queue 9 does not exist/);
  });

  it('refuses a memory region that lies past the end of its fd', async () => {
    await negotiate();
    const region = { ...h.ram.region(), mmapOffset: 1 << 20 };
    await expect(h.fe.send(FrontendReq.SET_MEM_TABLE, { kind: 'memTable', regions: [region] }, [h.ram.fd])).rejects.toThrow(/status 1/);
    expect(h.logs.some((l) => l.includes('past the end of its fd'))).toBe(true);
    await expectAlive();
  });

  it('refuses overlapping regions', async () => {
    await negotiate();
    const r = h.ram.region();
    await expect(
      h.fe.send(FrontendReq.SET_MEM_TABLE, { kind: 'memTable', regions: [r, { ...r, userAddr: r.userAddr + (4 << 20) }] }, [h.ram.fd, h.ram.fd]),
    ).rejects.toThrow(/status 1/);
    expect(h.logs.some((l) => l.includes('overlap'))).toBe(true);
    expect(native.mappingStats().mappings).toBeGreaterThan(0);
    await expectAlive();
  });

  it('refuses a dirty log too small for guest memory', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const logFd = native.memfdCreate('log', 4096);
    const reply = await h.fe.request(FrontendReq.SET_LOG_BASE, { kind: 'log', size: 1, offset: 0 }, 'u64', [logFd]);
    native.close(logFd);
    expect(reply).toEqual({ kind: 'u64', value: 1n });
    expect(h.logs.some((l) => l.includes('cannot cover guest memory'))).toBe(true);
  });

  it('refuses features it did not offer', async () => {
    await negotiate();
    await expect(h.fe.setFeatures(bit(63))).rejects.toThrow(/status 1/);
    await expectAlive();
  });

  it('replaces the kick fd of a running queue', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const q = new DriverQueue(h.ram, 0, 16);
    toRelease.push(() => q.release());
    await h.fe.startQueue(h.ram, q);
    expect(Array.from(await echoOnce(q, new Uint8Array([9])))).toEqual([9]);
    const kick2 = native.eventfd(0);
    await h.fe.send(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: 0n }, [kick2]);
    const src = h.ram.alloc(1);
    const dst = h.ram.alloc(1);
    h.ram.bytes(src, 1)[0] = 42;
    q.add([
      { gpa: src, len: 1, writable: false },
      { gpa: dst, len: 1, writable: true },
    ]);
    q.publish();
    native.eventfdWrite(kick2, 1);
    await new Promise((r) => setTimeout(r, 50));
    expect(q.getUsed()).not.toBeNull();
    expect(h.ram.bytes(dst, 1)[0]).toBe(42);
    native.close(kick2);
  });

  it('refuses a kick fd that cannot be polled (a memfd, a regular file), closes it, and keeps the ring running', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const q = new DriverQueue(h.ram, 0, 16);
    toRelease.push(() => q.release());
    await h.fe.startQueue(h.ram, q);
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-kick-'));
    toRelease.push(() => rmSync(dir, { recursive: true, force: true }));
    const memfd = native.memfdCreate('not-a-kick', 0);
    const file = openSync(join(dir, 'kick'), 'w+');
    const before = openFds();
    for (const fd of [memfd, file]) {
      await expect(h.fe.send(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: 0n }, [fd])).rejects.toThrow(/status 1/);
      // The back-end's copy of the fd is closed.
      expect(openFds()).toBe(before);
    }
    native.close(memfd);
    closeSync(file);
    const refused = h.logs.filter((l) => l.includes('SET_VRING_KICK refused: vq 0: kick fd is not pollable (a regular file?): EPERM'));
    expect(refused).toHaveLength(2);
    expect(h.logs.filter((l) => l.includes('internal error'))).toEqual([]);
    // Nothing changed: the ring still runs on its old kick fd.
    expect(Array.from(await echoOnce(q, new Uint8Array([7])))).toEqual([7]);
    await expectAlive();
  });

  it('refuses a call or error fd that is not an eventfd, closes it, and keeps interrupts on the old call fd', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const q = new DriverQueue(h.ram, 0, 16);
    toRelease.push(() => q.release());
    await h.fe.startQueue(h.ram, q);
    const dir = mkdtempSync(join(tmpdir(), 'vrdma-call-'));
    toRelease.push(() => rmSync(dir, { recursive: true, force: true }));
    const memfd = native.memfdCreate('not-a-call', 0);
    const file = openSync(join(dir, 'call'), 'w+');
    const [sockA, sockB] = native.socketPair();
    const before = openFds();
    for (const req of [FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR]) {
      for (const fd of [memfd, file, sockA]) {
        await expect(h.fe.send(req, { kind: 'u64', value: 0n }, [fd])).rejects.toThrow(/status 1/);
        expect(openFds()).toBe(before);
      }
    }
    for (const fd of [memfd, file, sockA, sockB]) native.close(fd);
    const lines = (name: string, what: string): string[] => h.logs.filter((l) => l.includes(`${name} refused: vq 0: ${what} fd is not an eventfd (`));
    expect(lines('SET_VRING_CALL', 'call')).toHaveLength(3);
    expect(lines('SET_VRING_ERR', 'error')).toHaveLength(3);
    expect(h.logs.some((l) => l.includes('call fd is not an eventfd (a regular file? /memfd:not-a-call'))).toBe(true);
    expect(h.logs.some((l) => l.includes('call fd is not an eventfd (socket:['))).toBe(true);
    expect(h.logs.filter((l) => l.includes('internal error'))).toEqual([]);
    // The old call fd still gets the interrupt.
    q.takeInterrupt();
    expect(Array.from(await echoOnce(q, new Uint8Array([8])))).toEqual([8]);
    expect(q.takeInterrupt()).toBe(true);
    // And a real eventfd is still taken.
    const call2 = native.eventfd(0);
    await h.fe.send(FrontendReq.SET_VRING_CALL, { kind: 'u64', value: 0n }, [call2]);
    await h.fe.send(FrontendReq.SET_VRING_ERR, { kind: 'u64', value: 0n }, [call2]);
    native.close(call2);
    await expectAlive();
  });

  it('stops a queue whose ring the guest broke, and still answers requests', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const q = new DriverQueue(h.ram, 0, 16);
    toRelease.push(() => q.release());
    await h.fe.startQueue(h.ram, q);
    q.setAvailIdx(1000);
    native.eventfdWrite(q.kickFd, 1);
    await new Promise((r) => setTimeout(r, 50));
    expect(h.logs.some((l) => l.includes('vq 0: stopped') && l.includes('more than the queue size'))).toBe(true);
    await expectAlive();
  });

  it('unmaps guest memory when the front-end disconnects', async () => {
    const before = native.mappingStats().mappings;
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    expect(native.mappingStats().mappings).toBe(before + 1);
    h.fe.close();
    await h.ended;
    expect(native.mappingStats().mappings).toBe(before);
    expect(h.logs.some((l) => l.includes('unmapped 1 memory regions'))).toBe(true);
  });

  it('moves device state out through SET_DEVICE_STATE_FD and back into a fresh back-end', async () => {
    await negotiate();
    await h.fe.setMemTable([h.ram]);
    const q = new DriverQueue(h.ram, 0, 16);
    toRelease.push(() => q.release());
    await h.fe.startQueue(h.ram, q);
    for (let i = 0; i < 3; i++) await echoOnce(q, new Uint8Array([i]));
    await h.fe.getVringBase(0);
    // Save: the back-end writes its state into our end and closes its own.
    const [mine, theirs] = native.socketPair();
    expect(await h.fe.setDeviceStateFd(0, theirs)).toBe(0x100n);
    native.close(theirs);
    const saved = await readAll(mine);
    expect(await h.fe.checkDeviceState()).toBe(0n);
    // Load into a second back-end.
    const dest = start();
    await dest.fe.negotiate(bit(VIRTIO_F_VERSION_1), ALL_PROTOCOL);
    const [mine2, theirs2] = native.socketPair();
    expect(await dest.fe.setDeviceStateFd(1, theirs2)).toBe(0x100n);
    native.close(theirs2);
    await writeAllAndClose(mine2, saved);
    expect(await dest.fe.checkDeviceState()).toBe(0n);
    expect(dest.device.chainsServed).toBe(3n);
    // A corrupt blob is reported by CHECK_DEVICE_STATE, not by a crash.
    const [mine3, theirs3] = native.socketPair();
    await dest.fe.setDeviceStateFd(1, theirs3);
    native.close(theirs3);
    await writeAllAndClose(mine3, new Uint8Array([1, 2, 3]));
    expect(await dest.fe.checkDeviceState()).toBe(1n);
    dest.fe.close();
  });

  it('refuses DEVICE_STATE when the back-end does not offer it', async () => {
    h.fe.close();
    const logs: string[] = [];
    const backend = new VhostUserBackend(new EchoDevice(), new Logger('debug', 't', (l) => logs.push(l)), {
      withheldProtocolFeatures: [ProtocolFeature.DEVICE_STATE],
    });
    expect(backend.offeredProtocolFeatures & bit(ProtocolFeature.DEVICE_STATE)).toBe(0n);
    const [a, b] = native.socketPair();
    void backend.serve(a);
    h = { ...h, fe: VhostUserFrontend.fromFd(b) };
    await negotiate();
    const [mine, theirs] = native.socketPair();
    expect((await h.fe.setDeviceStateFd(0, theirs)) & 0xffn).not.toBe(0n);
    native.close(theirs);
    native.close(mine);
  });

  it('answers NEED_REPLY on a request with no reply body even without REPLY_ACK', async () => {
    await h.fe.negotiate(bit(VIRTIO_F_VERSION_1), 0n);
    const hdr = encodeRequest(FrontendReq.SET_OWNER, { kind: 'none' }, true);
    expect(new DataView(hdr.buffer).getUint32(4, true) & HDR_NEED_REPLY).toBe(HDR_NEED_REPLY);
    const reply = await h.fe.request(FrontendReq.SET_OWNER, { kind: 'none' }, 'u64', [], true);
    expect(reply).toEqual({ kind: 'u64', value: 0n });
  });
});

function readAll(fd: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const s = new Socket({ fd, readable: true, writable: false });
    const chunks: Buffer[] = [];
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('end', () => {
      s.destroy();
      resolve(new Uint8Array(Buffer.concat(chunks)));
    });
    s.on('error', reject);
  });
}

function writeAllAndClose(fd: number, data: Uint8Array): Promise<void> {
  return new Promise((resolve) => {
    const s = new Socket({ fd, readable: false, writable: true });
    s.end(data, () => {
      s.destroy();
      resolve();
    });
  });
}
