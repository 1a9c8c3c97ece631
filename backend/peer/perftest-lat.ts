/**
 * `vrdma perf send-lat`: the run and the statistics of perftest's
 * ib_send_lat (RC SEND ping-pong), as measured on Debian 12's perftest
 * 4.5-0.17 (strace of ib_send_lat against itself on rxe):
 *
 * - The TCP exchange is ib_send_bw's (perftest.ts): version, cycle buffer,
 *   cache line, MTU, keys #1, QPs to RTR/RTS, keys #2, #3, #4, the run,
 *   keys #5, "done\0" from both sides. No report fields are exchanged:
 *   each side prints its own numbers. Its keys carry out_reads 1 and rkey 0.
 * - Both sides have their receives posted before keys #4 (RX depth
 *   min(-r, -n)). The client sends first; each side sends its next message
 *   after each receive, so both send and receive `-n` messages of `-s`
 *   bytes (inline for small sizes on the stock tool, which does not show
 *   on the wire).
 * - Each side takes a timestamp as it posts each send. The n-1 intervals
 *   between consecutive posts are round trips; halved, they are the
 *   one-way latencies the line reports: t_min, t_max, t_typical (the
 *   median: sorted[(n-1)/2]), t_avg, t_stdev, and the 99% and 99.9%
 *   percentiles (sorted[ceil(count·p)-1]; with 20 iterations both equal
 *   t_max, as the stock tool prints).
 */
import { SendFlag, SendOp, WcStatus } from '../abi/constants.js';
import type { Sge } from '../engine/engine.js';
import { PeerError, statusName } from './peer-device.js';
import type { PeerSession } from './peer-session.js';

export interface LatencyStats {
  size: number;
  iterations: number;
  /** One-way latencies in µs (half of each measured round trip). */
  min: number;
  max: number;
  typical: number;
  avg: number;
  stdev: number;
  p99: number;
  p999: number;
}

export const LAT_HEADER =
  ' #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] ';

export function latencyLine(s: LatencyStats): string {
  const f = (v: number): string => v.toFixed(2).padEnd(7);
  return (
    ` ${String(s.size).padEnd(7)} ${String(s.iterations).padEnd(7)}     ${f(s.min)}        ${f(s.max)}      ${f(s.typical)}  \t       ${f(s.avg)}     \t${f(s.stdev)}\t\t${f(s.p99)} \t\t${f(s.p999)}`
  ).trimEnd();
}

/**
 * Statistics of the post times (ms, one per iteration) of one side, as
 * perftest prints them: the intervals between posts divided by `factor`
 * (2 for the ping-pongs, whose interval is a round trip; 1 for READs).
 */
export function latencyStats(size: number, postTimesMs: ArrayLike<number>, factor = 2): LatencyStats {
  const n = postTimesMs.length - 1;
  if (n < 1) throw new RangeError('a latency test needs at least 2 iterations (latencies are intervals between posts)');
  const d: number[] = [];
  for (let i = 0; i < n; i++) d.push(((postTimesMs[i + 1]! - postTimesMs[i]!) * 1000) / factor);
  const sorted = [...d].sort((a, b) => a - b);
  const avg = d.reduce((a, b) => a + b, 0) / n;
  const stdev = Math.sqrt(d.reduce((a, b) => a + (b - avg) ** 2, 0) / n);
  const pct = (p: number): number => sorted[Math.max(0, Math.ceil(n * p) - 1)]!;
  return { size, iterations: postTimesMs.length, min: sorted[0]!, max: sorted[n - 1]!, typical: sorted[Math.floor(n / 2)]!, avg, stdev, p99: pct(0.99), p999: pct(0.999) };
}

export interface PingPongRun {
  isClient: boolean;
  qpn: number;
  iters: number;
  sendSge: Sge;
  recvSge: Sge;
  /** Receives already posted (before keys #4); more are posted as they complete, up to `iters`. */
  recvPosted: number;
  /** Sends allowed in flight (SQ depth). */
  sqDepth: number;
  /** Wait for the first message (server: the client's whole start-up). */
  firstTimeoutMs: number;
  timeoutMs: number;
}

export interface WritePingPongRun {
  isClient: boolean;
  qpn: number;
  iters: number;
  /** The message this side writes; its last byte carries the iteration count. */
  send: { sge: Sge; lastByte: Uint8Array; at: number };
  /** Where the peer's messages land; this side watches their last byte. */
  landing: { bytes: Uint8Array; at: number };
  remoteAddr: bigint;
  rkey: number;
  /** Wait for the first message (the client's: the server's whole start-up). */
  firstTimeoutMs: number;
  timeoutMs: number;
}

/**
 * ib_write_lat's ping-pong, as its loop runs: each side RDMA WRITEs the
 * message with the count in its last byte, and waits (polling memory) for
 * the peer's write carrying the next count before writing again. The
 * server writes first. Returns the post time (ms) of each write.
 */
export async function runWritePingPong(device: PeerSession['device'], run: WritePingPongRun): Promise<Float64Array> {
  const { qpn, iters } = run;
  const times = new Float64Array(iters);
  const sges = [run.send.sge];
  let scnt = 0;
  let ccnt = 0;
  let rcnt = 0;
  const landed = async (count: number, timeoutMs: number): Promise<void> => {
    const want = count & 0xff;
    const deadline = performance.now() + timeoutMs;
    // Memory polling, like the stock tool; a turn of the event loop between looks lets the engine receive.
    while (run.landing.bytes[run.landing.at] !== want) {
      if (performance.now() > deadline) throw new PeerError(`write ${count} of ${iters} (write-lat) did not land within ${timeoutMs} ms on qpn 0x${qpn.toString(16)}`);
      await new Promise<void>((r) => setImmediate(r));
    }
  };
  while (scnt < iters || ccnt < iters || rcnt < iters) {
    if (rcnt < iters && !(scnt < 1 && !run.isClient)) {
      rcnt++;
      await landed(rcnt, rcnt === 1 ? run.firstTimeoutMs : run.timeoutMs);
    }
    if (scnt < iters) {
      times[scnt] = performance.now();
      scnt++;
      run.send.lastByte[run.send.at] = scnt & 0xff;
      device.postSend(qpn, { wrId: BigInt(scnt), opcode: SendOp.RDMA_WRITE, flags: SendFlag.SIGNALED, sges, remoteAddr: run.remoteAddr, rkey: run.rkey });
    }
    if (ccnt < iters) {
      const wc = device.poll() ?? (await device.next(run.timeoutMs, `write completion ${ccnt + 1} of ${iters} (write-lat) on qpn 0x${qpn.toString(16)}`));
      if (wc.status !== WcStatus.SUCCESS) throw new PeerError(`write completion with error: ${statusName(wc.status)} (${wc.status}) on qpn 0x${qpn.toString(16)}`);
      ccnt++;
    }
  }
  return times;
}

/** The ping-pong: returns the post time (ms) of each of this side's sends. */
export async function runPingPong(device: PeerSession['device'], run: PingPongRun): Promise<Float64Array> {
  const { qpn, iters } = run;
  const times = new Float64Array(iters);
  const sges = [run.sendSge];
  const recvSges = [run.recvSge];
  let recvPosted = run.recvPosted;
  let received = 0;
  let sent = 0;
  let sendsDone = 0;
  const step = async (timeoutMs: number, what: string): Promise<void> => {
    const wc = device.poll() ?? (await device.next(timeoutMs, `${what} on qpn 0x${qpn.toString(16)}`));
    if (wc.status !== WcStatus.SUCCESS) throw new PeerError(`${wc.recv ? 'receive' : 'send'} completion with error: ${statusName(wc.status)} (${wc.status}) for wr_id ${wc.wrId} on qpn 0x${qpn.toString(16)}`);
    if (wc.recv) {
      received++;
      if (recvPosted < iters) device.postRecv(qpn, BigInt(recvPosted++), recvSges);
    } else {
      sendsDone++;
    }
  };
  const untilReceived = async (n: number, timeoutMs: number): Promise<void> => {
    while (received < n) await step(timeoutMs, `receive ${n} of ${iters} (send-lat)`);
  };
  for (let i = 0; i < iters; i++) {
    if (!run.isClient) await untilReceived(i + 1, i === 0 ? run.firstTimeoutMs : run.timeoutMs);
    while (sent - sendsDone >= run.sqDepth) await step(run.timeoutMs, `send completion ${sendsDone + 1} of ${iters} (send-lat)`);
    times[i] = performance.now();
    device.postSend(qpn, { wrId: BigInt(sent), opcode: SendOp.SEND, flags: SendFlag.SIGNALED, sges });
    sent++;
    if (run.isClient) await untilReceived(i + 1, run.timeoutMs);
  }
  while (sendsDone < iters) await step(run.timeoutMs, `send completion ${sendsDone + 1} of ${iters} (send-lat)`);
  return times;
}
