/**
 * UDP receive rate on loopback, 127.0.0.2 -> 127.0.0.3, sender and receiver
 * in two processes: the batched transport (recvmmsg into preallocated slots,
 * one JS call per batch) beside Node's `dgram` (one event and one Buffer
 * per datagram) as the baseline, measured in the same run with the same
 * sender.
 *
 * The sender is always the batched transport (sendmmsg), 256 datagrams per
 * batch and one turn of the event loop between batches, in two modes:
 * - "unpaced": batches as fast as it can make them, losses expected where
 *   the receiver is slower;
 * - "window 1024": at most 1024 datagrams ahead of the receiver, which
 *   returns a cumulative count every 64 datagrams (what RC's window and
 *   ACKs will do); a window that makes no progress for 20 ms is written
 *   off as lost.
 *
 *   node dist/bench/udp-transport.js [seconds-per-case]
 */
import { fork, type ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { fileURLToPath } from 'node:url';
import { UdpTransport, udpPeer, type UdpPeer } from '../backend/engines/soft-roce/udp-transport.js';

const SENDER = '127.0.0.2';
const RECEIVER = '127.0.0.3';
const BATCH = 256;
const WINDOW = 1024;
const ACK_EVERY = 64;

type Receiver = 'transport' | 'dgram';

interface RecvReport {
  received: number;
  bytes: number;
  /** ms between the first and the last datagram. */
  spanMs: number;
  rcvbuf: number;
  /** Receiver process CPU (user + system) from ready to report, in µs. */
  cpuUs: number;
}

interface SendReport {
  sent: number;
  stalls: number;
}

type ToChild = { cmd: 'report' } | { cmd: 'start' };
type FromChild = { ready: number } | { recv: RecvReport } | { send: SendReport };

function progress(msg: string): void {
  process.stderr.write(`[bench] ${msg}\n`);
}

// ---------------------------------------------------------------- receiver

function runReceiver(kind: Receiver): void {
  let received = 0;
  let bytes = 0;
  let first = 0;
  let last = 0;
  let lastAck = 0;
  const ack = new Uint8Array(4);
  const ackView = new DataView(ack.buffer);
  let rcvbuf = 0;
  const cpuStart = process.cpuUsage();

  if (kind === 'transport') {
    const t = new UdpTransport({ address: RECEIVER, port: 0, recvSlots: 64, recvSlotSize: 4096 + 64 });
    rcvbuf = t.rcvbuf;
    let peer: UdpPeer | null = null;
    t.onBatch((batch) => {
      const now = performance.now();
      if (received === 0) first = now;
      last = now;
      for (let i = 0; i < batch.count; i++) {
        if (batch.truncated(i)) continue;
        bytes += batch.length(i);
      }
      received += batch.count;
      if (received - lastAck >= ACK_EVERY) {
        peer ??= batch.source(0);
        lastAck = received;
        ackView.setUint32(0, received, true);
        t.queue(peer, ack);
      }
    });
    process.send?.({ ready: t.local.port } satisfies FromChild);
  } else {
    const s = createSocket({ type: 'udp4', recvBufferSize: 8 << 20 });
    s.on('message', (msg, rinfo) => {
      const now = performance.now();
      if (received === 0) first = now;
      last = now;
      received++;
      bytes += msg.length;
      if (received - lastAck >= ACK_EVERY) {
        lastAck = received;
        ackView.setUint32(0, received, true);
        s.send(ack, rinfo.port, rinfo.address);
      }
    });
    s.bind(0, RECEIVER, () => {
      rcvbuf = s.getRecvBufferSize();
      process.send?.({ ready: s.address().port } satisfies FromChild);
    });
  }
  process.on('message', (m: ToChild) => {
    if (m.cmd === 'report') {
      const cpu = process.cpuUsage(cpuStart);
      const cpuUs = cpu.user + cpu.system;
      process.send?.({ recv: { received, bytes, spanMs: last - first, rcvbuf, cpuUs } } satisfies FromChild, () => process.exit(0));
    }
  });
}

// ------------------------------------------------------------------ sender

function runSender(size: number, port: number, seconds: number, windowed: boolean): void {
  const t = new UdpTransport({ address: SENDER, port: 0, sendSlots: BATCH, sendSlotSize: 4096 + 64 });
  const dst = udpPeer(RECEIVER, port);
  let sent = 0;
  let acked = 0;
  let stalls = 0;
  let lastProgress = performance.now();
  t.onBatch((batch) => {
    for (let i = 0; i < batch.count; i++) {
      const at = batch.offset(i);
      const n = batch.buf[at]! | (batch.buf[at + 1]! << 8) | (batch.buf[at + 2]! << 16) | (batch.buf[at + 3]! * 2 ** 24);
      if (n > acked) {
        acked = n;
        lastProgress = performance.now();
      }
    }
  });
  process.on('message', (m: ToChild) => {
    if (m.cmd !== 'start') return;
    const end = performance.now() + seconds * 1000;
    const step = (): void => {
      const now = performance.now();
      if (now >= end) {
        t.flush();
        process.send?.({ send: { sent, stalls } } satisfies FromChild, () => {
          t.close();
          process.exit(0);
        });
        return;
      }
      if (windowed && sent - acked + BATCH > WINDOW) {
        if (now - lastProgress > 20) {
          stalls++;
          acked = sent;
          lastProgress = now;
        } else {
          setImmediate(step);
          return;
        }
      }
      for (let k = 0; k < BATCH; k++) {
        const at = t.reserve(dst, size);
        if (at < 0) break;
        const seq = sent + k;
        t.sendBuffer[at] = seq & 0xff;
        t.sendBuffer[at + 1] = (seq >>> 8) & 0xff;
      }
      // Counted as sent once the kernel took them.
      sent += t.flush();
      setImmediate(step);
    };
    lastProgress = performance.now();
    setImmediate(step);
  });
  process.send?.({ ready: t.local.port } satisfies FromChild);
}

// ------------------------------------------------------------------ parent

function once(child: ChildProcess, key: 'ready' | 'recv' | 'send'): Promise<FromChild> {
  return new Promise((resolve, reject) => {
    const onMessage = (m: FromChild): void => {
      if (key in m) {
        child.off('message', onMessage);
        child.off('exit', onExit);
        resolve(m);
      }
    };
    const onExit = (code: number | null): void => reject(new Error(`child exited (${code}) before '${key}'`));
    child.on('message', onMessage);
    child.on('exit', onExit);
  });
}

interface Row {
  receiver: Receiver;
  size: number;
  pacing: string;
  sent: number;
  received: number;
  pps: number;
  mbps: number;
  loss: number;
  stalls: number;
  rcvbuf: number;
  cpuPerPacket: number;
}

async function runCase(receiver: Receiver, size: number, windowed: boolean, seconds: number): Promise<Row> {
  const self = fileURLToPath(import.meta.url);
  const rx = fork(self, ['recv', receiver], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const ready = await once(rx, 'ready');
  const port = 'ready' in ready ? ready.ready : 0;
  const tx = fork(self, ['send', String(size), String(port), String(seconds), windowed ? '1' : '0'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  await once(tx, 'ready');
  const done = once(tx, 'send');
  tx.send({ cmd: 'start' } satisfies ToChild);
  const s = await done;
  // Let the receiver drain what is still in its socket buffer.
  await new Promise((r) => setTimeout(r, 300));
  const reported = once(rx, 'recv');
  rx.send({ cmd: 'report' } satisfies ToChild);
  const r = await reported;
  const send = 'send' in s ? s.send : { sent: 0, stalls: 0 };
  const recv = 'recv' in r ? r.recv : { received: 0, bytes: 0, spanMs: 1, rcvbuf: 0, cpuUs: 0 };
  const secs = Math.max(recv.spanMs, 1) / 1000;
  return {
    receiver,
    size,
    pacing: windowed ? `window ${WINDOW}` : 'unpaced',
    sent: send.sent,
    received: recv.received,
    pps: recv.received / secs,
    mbps: recv.bytes / secs / 1e6,
    loss: send.sent === 0 ? 0 : 1 - recv.received / send.sent,
    stalls: send.stalls,
    rcvbuf: recv.rcvbuf,
    cpuPerPacket: recv.received === 0 ? 0 : recv.cpuUs / recv.received,
  };
}

async function main(): Promise<void> {
  const seconds = Number(process.argv[2] ?? 2);
  const rows: Row[] = [];
  for (const size of [4096, 64]) {
    for (const windowed of [false, true]) {
      for (const receiver of ['transport', 'dgram'] as const) {
        progress(`${receiver} ${size} B ${windowed ? 'windowed' : 'unpaced'}...`);
        rows.push(await runCase(receiver, size, windowed, seconds));
      }
    }
  }
  const header = ['receiver', 'size', 'sender', 'sent', 'received', 'k pkt/s', 'MB/s', 'loss', 'stalls', 'rx CPU µs/pkt', 'rcvbuf'];
  const table = rows.map((r) => [
    r.receiver === 'transport' ? 'UdpTransport (recvmmsg)' : 'node:dgram',
    String(r.size),
    r.pacing,
    String(r.sent),
    String(r.received),
    (r.pps / 1000).toFixed(0),
    r.mbps.toFixed(0),
    `${(r.loss * 100).toFixed(1)}%`,
    String(r.stalls),
    r.cpuPerPacket.toFixed(2),
    `${(r.rcvbuf / 2 ** 20).toFixed(0)} MiB`,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...table.map((row) => row[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ');
  console.log(`UDP 127.0.0.2 -> 127.0.0.3, two processes, ${seconds} s per case, sender: UdpTransport sendmmsg, ${BATCH} per batch`);
  console.log(line(header));
  for (const row of table) console.log(line(row));
}

const [role, a, b, c, d] = process.argv.slice(2);
if (role === 'recv') runReceiver(a === 'dgram' ? 'dgram' : 'transport');
else if (role === 'send') runSender(Number(a), Number(b), Number(c), d === '1');
else
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
