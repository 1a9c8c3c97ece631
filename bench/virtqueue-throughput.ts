/**
 * Descriptors per second through one virtqueue: the test front-end in this
 * process, `vrdma serve --device echo` in another, over a real unix socket,
 * memfd guest RAM and eventfds. Each chain is a 256-byte device-readable
 * buffer and a 256-byte device-writable one; the device copies one into the
 * other. Batches of 1 and 32 chains per kick.
 *
 * Baselines measured in the same run:
 * - "in-process ring": the same driver-queue and device-queue code and the
 *   same copy, in one process over the same memory, no socket, no eventfds,
 *   no second process — what the ring code costs by itself;
 * - "memcpy": copying 256 bytes between two buffers, the floor.
 *
 *   npm run bench                     (or: node dist/bench/virtqueue-throughput.js [seconds-per-case])
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { GuestRam } from '../virtio/frontend/guest-ram.js';
import { DriverQueue } from '../virtio/frontend/driver-queue.js';
import { VhostUserFrontend } from '../virtio/frontend/frontend.js';
import { GuestMemory, MappedRegion } from '../virtio/memory/guest-memory.js';
import { DescriptorChain } from '../virtio/queue/descriptor-chain.js';
import { SplitVirtqueue } from '../virtio/queue/split-queue.js';
import { native } from '../virtio/sys/native.js';
import { VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, bit } from '../virtio/vhost-user/protocol.js';

const BUF = 256;
const QSIZE = 256;
const SECONDS = Number(process.argv[2] ?? 2);

interface Result {
  name: string;
  batch: number;
  perSecond: number;
}

function progress(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

function addBatch(ram: GuestRam, q: DriverQueue, src: number[], dst: number[], n: number): void {
  for (let i = 0; i < n; i++) {
    q.add([
      { gpa: src[i]!, len: BUF, writable: false },
      { gpa: dst[i]!, len: BUF, writable: true },
    ]);
  }
}

/** Front-end <-> back-end in two processes. */
async function overVhostUser(batch: number): Promise<Result> {
  const dir = mkdtempSync(join(tmpdir(), 'vrdma-bench-'));
  const sock = join(dir, 'vu.sock');
  const cli = fileURLToPath(new URL('../backend/cli.js', import.meta.url));
  const child = spawn(process.execPath, [cli, 'serve', '--device', 'echo', '--socket', sock, '--log-level', 'warn'], { stdio: ['ignore', 'ignore', 'inherit'] });
  try {
    // The back-end creates the socket file when it listens.
    for (let i = 0; !existsSync(sock); i++) {
      if (i > 400) throw new Error('back-end did not start');
      await new Promise((r) => setTimeout(r, 25));
    }
    const fe = VhostUserFrontend.connect(sock);
    const ram = new GuestRam(0, 8 << 20);
    await fe.negotiate(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX), (1n << 20n) - 1n);
    await fe.setMemTable([ram]);
    const q = new DriverQueue(ram, 0, QSIZE, { eventIdx: true });
    await fe.startQueue(ram, q);
    const src = Array.from({ length: batch }, () => ram.alloc(BUF));
    const dst = Array.from({ length: batch }, () => ram.alloc(BUF));
    let done = 0;
    const deadline = performance.now() + SECONDS * 1000;
    const t0 = performance.now();
    while (performance.now() < deadline) {
      addBatch(ram, q, src, dst, batch);
      q.kick();
      let got = 0;
      while (got < batch) {
        native.waitReadable(q.callFd, 1000);
        q.takeInterrupt();
        while (q.getUsed() !== null) got++;
      }
      done += batch;
    }
    const elapsed = (performance.now() - t0) / 1000;
    fe.close();
    q.release();
    ram.release();
    return { name: 'vhost-user (2 processes, eventfds)', batch, perSecond: done / elapsed };
  } finally {
    child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The same queue code and copy, in one process, no protocol. */
function inProcessRing(batch: number): Result {
  const ram = new GuestRam(0, 8 << 20);
  const memory = new GuestMemory(1);
  memory.replace([new MappedRegion(0, ram.size, ram.userAddr, 0, ram.buffer, null)]);
  const dq = new DriverQueue(ram, 0, QSIZE, { eventIdx: true });
  const vq = new SplitVirtqueue(0, memory);
  vq.eventIdx = true;
  vq.setSize(QSIZE, QSIZE);
  vq.setAddresses({ descUva: ram.uva(dq.descGpa), availUva: ram.uva(dq.availGpa), usedUva: ram.uva(dq.usedGpa), logGpa: 0, logUsed: false });
  if (vq.resolve() !== null) throw new Error('ring did not resolve');
  const chain = new DescriptorChain();
  const scratch = new Uint8Array(BUF);
  const echo = (c: DescriptorChain): void => {
    c.read(scratch, 0, 0, BUF);
    vq.pushUsed(c.head, c.write(scratch, 0, 0, BUF));
  };
  const src = Array.from({ length: batch }, () => ram.alloc(BUF));
  const dst = Array.from({ length: batch }, () => ram.alloc(BUF));
  let done = 0;
  const deadline = performance.now() + SECONDS * 1000;
  const t0 = performance.now();
  while (performance.now() < deadline) {
    addBatch(ram, dq, src, dst, batch);
    dq.publish();
    vq.drain(chain, echo);
    while (dq.getUsed() !== null) done++;
  }
  const elapsed = (performance.now() - t0) / 1000;
  dq.release();
  ram.release();
  return { name: 'in-process ring (no protocol)', batch, perSecond: done / elapsed };
}

function memcpy(): Result {
  const a = new Uint8Array(new ArrayBuffer(BUF * 64));
  const b = new Uint8Array(new ArrayBuffer(BUF * 64));
  let done = 0;
  const deadline = performance.now() + SECONDS * 1000;
  const t0 = performance.now();
  while (performance.now() < deadline) {
    for (let i = 0; i < 1024; i++) {
      const o = (i & 63) * BUF;
      b.set(a.subarray(o, o + BUF), o);
    }
    done += 1024;
  }
  return { name: 'memcpy 256 B (plain ArrayBuffers)', batch: 1, perSecond: done / ((performance.now() - t0) / 1000) };
}

const results: Result[] = [];
progress(`${SECONDS}s per case, 256-byte buffers, queue size ${QSIZE}`);
results.push(memcpy());
for (const batch of [1, 32]) {
  progress(`in-process ring, batch ${batch}`);
  results.push(inProcessRing(batch));
  progress(`vhost-user, batch ${batch}`);
  results.push(await overVhostUser(batch));
}

const fmt = (n: number): string => Math.round(n).toLocaleString('en-US');
const rows = results.map((r) => {
  const base = results.find((b) => b.name.startsWith('in-process') && b.batch === r.batch);
  const ratio = r.name.startsWith('vhost-user') && base ? ` (${((r.perSecond / base.perSecond) * 100).toFixed(1)}% of in-process ring)` : '';
  return `| ${r.name} | ${r.batch} | ${fmt(r.perSecond)}${ratio} |`;
});
process.stdout.write(['| path | batch | descriptors/s |', '|---|---|---|', ...rows].join('\n') + '\n');
