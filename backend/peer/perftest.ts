/**
 * `vrdma perf write|read|send|send-lat|write-lat|read-lat`: the other end
 * of perftest's ib_write_bw, ib_read_bw, ib_send_bw, ib_send_lat,
 * ib_write_lat and ib_read_lat (RC, one QP, the TCP
 * "ethernet" exchange of perftest 4.5-0.17, see perftest-message.ts). The
 * step order, measured on the stock tools:
 *
 *   version, cycle buffer, cache line, MTU   (both roles)
 *   keys #1, QPs to RTR/RTS, keys #2, keys #3
 *   write/read: client runs, keys #4 (the server waits in it), 5 report
 *               fields (the client's numbers; the server prints them), keys #5
 *   send:       keys #4, client sends while the server receives, keys #5
 *   send-lat:   keys #4, SEND ping-pong (perftest-lat.ts), keys #5; each
 *               side prints its own latencies, none are exchanged
 *   "done\0" from both sides
 *   write-lat:  keys #4, RDMA WRITE ping-pong polled in memory
 *               (perftest-lat.ts), then nothing more: the stock
 *               ib_write_lat closes the connection after its report
 *   read-lat:   keys #4, the client READs one at a time (the server only
 *               answers, and prints no numbers), keys #5, "done\0"
 */
import { Access, QpState, QpType, SendFlag, SendOp, WcStatus } from '../abi/constants.js';
import type { AddressVector, Sge } from '../engine/engine.js';
import { OobChannel } from './oob-channel.js';
import { LAT_HEADER, latencyLine, latencyStats, runPingPong, runWritePingPong, type LatencyStats } from './perftest-lat.js';
import { PeerError, statusName } from './peer-device.js';
import { formatGid, mtuEnum, randomPsn, type PeerSession } from './peer-session.js';
import {
  PERFTEST_DONE,
  PERFTEST_KEYS_SIZE,
  decodeKeys,
  decodeMtu,
  decodeReport,
  decodeU32,
  decodeVersion,
  encodeKeys,
  encodeMtu,
  encodeReport,
  encodeU32,
  encodeVersion,
  type PerftestKeys,
  type PerftestReport,
} from './perftest-message.js';

export type PerfVerb = 'write' | 'read' | 'send' | 'send-lat' | 'write-lat' | 'read-lat';

export interface PerfOptions {
  verb: PerfVerb;
  server: string | null;
  port: number;
  size: number;
  iters: number;
  /** Outstanding WRs the client keeps posted (perftest -t, default 128). */
  txDepth: number;
  /** Receives the server keeps posted for send, each side for send-lat (perftest -r, default 512). */
  rxDepth: number;
  mtu: number;
  gidIndex: number;
  /** READ: outstanding reads this side accepts / issues (perftest -o; rxe allows 128). */
  outReads: number;
  timeoutMs: number;
  /** Server: address to listen on (default all, like the stock tools). */
  listenAddress?: string;
  onListening?: () => void;
  out: (line: string) => void;
}

export interface PerfResult {
  report: PerftestReport;
  /** Write/read servers: the client's report; send servers and clients: our own. */
  remoteReport: PerftestReport | null;
  /** send-lat: this side's latencies (`report` then holds its size, iterations and average rates). */
  latency: LatencyStats | null;
  local: PerftestKeys;
  remote: PerftestKeys;
  mtu: number;
}

const PAGE_SIZE = 4096;
/** A server waits this many step timeouts for the client's whole run (it sees no progress meanwhile). */
export const RUN_TIMEOUT_STEPS = 10;

function runDeadline(opts: PerfOptions): number {
  return opts.timeoutMs * RUN_TIMEOUT_STEPS;
}
const CACHE_LINE = 64;
const HEADER = ' #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]';

function keyLine(side: string, k: PerftestKeys): string {
  const h = (v: number | bigint, n: number): string => v.toString(16).padStart(n, '0');
  return ` ${side} address: LID ${h(k.lid, 4)} QPN 0x${h(k.qpn, 4)} PSN 0x${h(k.psn, 6)} RKey 0x${h(k.rkey, 6)} VAddr 0x${h(k.vaddr, 14)} GID ${formatGid(k.gid)}`;
}

function reportLine(r: PerftestReport): string {
  return ` ${String(r.size).padEnd(10)} ${String(r.iterations).padEnd(16)} ${r.bwPeak.toFixed(2).padStart(10)}         ${r.bwAvg.toFixed(2).padStart(10)}   \t\t   ${r.msgRate.toFixed(6)}`;
}

export async function runPerf(session: Pick<PeerSession, 'device'>, opts: PerfOptions): Promise<PerfResult> {
  const { device } = session;
  const isClient = opts.server !== null;
  if (!Number.isInteger(opts.size) || opts.size < 1) throw new PeerError(`--size ${opts.size} must be a positive integer`);
  if (!Number.isInteger(opts.iters) || opts.iters < 1) throw new PeerError(`--iters ${opts.iters} must be a positive integer`);
  const pingPong = opts.verb === 'send-lat' || opts.verb === 'write-lat';
  const readLat = opts.verb === 'read-lat';
  const reads = opts.verb === 'read' || readLat;
  if ((pingPong || readLat) && opts.iters < 2) throw new PeerError(`${opts.verb} needs --iters of at least 2 (latencies are intervals between sends)`);
  const localGid = device.gid(opts.gidIndex);
  if (localGid === null) throw new PeerError(`no GID at index ${opts.gidIndex}`);
  const t = opts.timeoutMs;

  const ch = isClient ? await OobChannel.connect(opts.server!, opts.port, t) : await OobChannel.accept(opts.port, t, opts.listenAddress, opts.onListening);
  try {
    const version = decodeVersion(await ch.exchange(isClient, encodeVersion(), t, 'the perftest version'));
    if (version.value < 5.33) throw new PeerError(`perftest version ${version.text} is older than 5.33, whose exchange this tool does not speak`);
    const cycleBuffer = Math.max(PAGE_SIZE, decodeU32(await ch.exchange(isClient, encodeU32(PAGE_SIZE), t, 'the cycle buffer size')));
    decodeU32(await ch.exchange(isClient, encodeU32(CACHE_LINE), t, 'the cache line size'));
    const mtu = Math.min(mtuEnum(opts.mtu), decodeMtu(await ch.exchange(isClient, encodeMtu(mtuEnum(opts.mtu)), t, 'the MTU')));

    // The remote may write or read anywhere in a cycle buffer from the address we give (perftest walks it).
    const bufLen = Math.max(opts.size, cycleBuffer) * 2;
    const mr = device.registerMr(bufLen, Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ);
    const qpn = device.createQp(QpType.RC, opts.txDepth, opts.rxDepth);
    device.modifyQp(qpn, { state: QpState.INIT, pkeyIndex: 0, accessFlags: Access.REMOTE_WRITE | Access.REMOTE_READ | Access.LOCAL_WRITE });
    const outReads = reads ? opts.outReads : 1;
    // write-lat: the peer writes into the second half (ib_write_lat polls there too); the first is what we write.
    const landingOffset = opts.verb === 'write-lat' ? bufLen / 2 : 0;
    const local: PerftestKeys = { lid: 0, outReads, qpn, psn: randomPsn(), rkey: mr.rkey, vaddr: mr.addr + BigInt(landingOffset), gid: localGid, srqn: 0 };
    opts.out(keyLine('local', local));
    const keys = (timeoutMs = t): Promise<Uint8Array> => ch.exchange(isClient, encodeKeys(local), timeoutMs, 'the perftest keys message');
    const remote = decodeKeys(await keys());
    opts.out(keyLine('remote', remote));

    const av: AddressVector = { dgid: remote.gid, sgidIndex: opts.gidIndex, hopLimit: 1, trafficClass: 0, flowLabel: 0, sl: 0 };
    device.modifyQp(qpn, { state: QpState.RTR, av, pathMtu: mtu, destQpn: remote.qpn, rqPsn: remote.psn, maxDestRdAtomic: reads ? outReads : 1, minRnrTimer: 12 });
    device.modifyQp(qpn, { state: QpState.RTS, timeout: 14, retryCnt: 7, rnrRetry: 7, sqPsn: local.psn, maxRdAtomic: reads ? Math.min(outReads, remote.outReads || 1) : 1 });

    // Receives for send are up before the client can start (it starts after keys #4).
    // send-lat: both sides receive, into the second half of the buffer.
    const recvSges = [mr.sge(pingPong ? bufLen / 2 : 0, opts.size)];
    let posted = 0;
    if ((opts.verb === 'send' && !isClient) || opts.verb === 'send-lat') {
      for (; posted < Math.min(opts.rxDepth, opts.iters); posted++) device.postRecv(qpn, BigInt(posted), recvSges);
    }
    await keys(); // #2: both QPs past RTR
    await keys(); // #3

    let report: PerftestReport;
    let remoteReport: PerftestReport | null = null;
    let latency: LatencyStats | null = null;
    if (readLat) {
      await keys(); // #4: both ready
      // The server only answers READs (it then waits in keys #5 for the client's whole run).
      if (isClient) latency = latencyStats(opts.size, await runReads(device, qpn, opts, mr.sge(0, opts.size), remote), 1);
      report = { size: BigInt(opts.size), iterations: BigInt(opts.iters), bwPeak: 0, bwAvg: 0, msgRate: 0 };
    } else if (pingPong) {
      await keys(); // #4: both sides' receives are posted
      const start = performance.now();
      const times =
        opts.verb === 'write-lat'
          ? await runWritePingPong(device, {
              isClient,
              qpn,
              iters: opts.iters,
              send: { sge: mr.sge(0, opts.size), lastByte: mr.bytes, at: opts.size - 1 },
              landing: { bytes: mr.bytes, at: landingOffset + opts.size - 1 },
              remoteAddr: remote.vaddr,
              rkey: remote.rkey,
              firstTimeoutMs: isClient ? runDeadline(opts) : t,
              timeoutMs: t,
            })
          : await runPingPong(device, {
              isClient,
              qpn,
              iters: opts.iters,
              sendSge: mr.sge(0, opts.size),
              recvSge: recvSges[0]!,
              recvPosted: posted,
              sqDepth: Math.max(1, opts.txDepth),
              firstTimeoutMs: isClient ? t : runDeadline(opts),
              timeoutMs: t,
            });
      latency = latencyStats(opts.size, times);
      const usec = Math.max(1, (performance.now() - start) * 1000);
      const bwAvg = (opts.size * opts.iters) / usec;
      report = { size: BigInt(opts.size), iterations: BigInt(opts.iters), bwPeak: bwAvg, bwAvg, msgRate: opts.iters / usec };
    } else if (isClient) {
      if (opts.verb === 'send') await keys(); // #4: the server's receives are posted
      report = await clientRun(device, qpn, opts, mr.sge(0, opts.size), remote, remote.outReads || 1);
      if (opts.verb !== 'send') {
        await keys(); // #4: "I am done"
        const theirs: Uint8Array[] = [];
        for (const f of encodeReport(report)) theirs.push(await ch.exchange(true, f, t, 'a report field'));
        decodeReport(theirs); // the server's fields are uninitialised; only their shape is checked
      }
    } else if (opts.verb === 'send') {
      await keys(); // #4
      report = await serverReceive(device, qpn, opts, recvSges, posted);
    } else {
      await ch.read(PERFTEST_KEYS_SIZE, runDeadline(opts), 'the client\'s end-of-test message').then(() => ch.write(encodeKeys(local))); // #4
      const mine = encodeReport({ size: BigInt(opts.size), iterations: BigInt(opts.iters), bwPeak: 0, bwAvg: 0, msgRate: 0 });
      const theirs: Uint8Array[] = [];
      for (const f of mine) theirs.push(await ch.exchange(false, f, t, 'a report field'));
      remoteReport = decodeReport(theirs);
      report = remoteReport;
    }
    if (!(readLat && !isClient)) {
      opts.out(latency ? LAT_HEADER : HEADER);
      opts.out(latency ? latencyLine(latency) : reportLine(report));
    }
    if (opts.verb !== 'write-lat') {
      await keys(readLat && !isClient ? runDeadline(opts) : t); // #5: close
      ch.write(PERFTEST_DONE);
    }
    return { report, remoteReport, latency, local, remote, mtu };
  } finally {
    await ch.close();
  }
}

/** ib_read_lat's client: one RDMA READ at a time; returns the post time (ms) of each. */
async function runReads(device: PeerSession['device'], qpn: number, opts: PerfOptions, sge: Sge, remote: PerftestKeys): Promise<Float64Array> {
  const times = new Float64Array(opts.iters);
  const sges = [sge];
  for (let i = 0; i < opts.iters; i++) {
    times[i] = performance.now();
    device.postSend(qpn, { wrId: BigInt(i), opcode: SendOp.RDMA_READ, flags: SendFlag.SIGNALED, sges, remoteAddr: remote.vaddr, rkey: remote.rkey });
    const wc = device.poll() ?? (await device.next(opts.timeoutMs, `READ ${i + 1} of ${opts.iters} (read-lat) on qpn 0x${qpn.toString(16)}`));
    if (wc.status !== WcStatus.SUCCESS) throw new PeerError(`READ completion with error: ${statusName(wc.status)} (${wc.status}) on qpn 0x${qpn.toString(16)}`);
  }
  return times;
}

/** Posts `iters` WRs keeping at most `depth` in flight; every one signalled (a CQE per WR keeps the count exact). */
async function clientRun(
  device: PeerSession['device'],
  qpn: number,
  opts: PerfOptions,
  sge: Sge,
  remote: PerftestKeys,
  remoteOutReads: number,
): Promise<PerftestReport> {
  const opcode = opts.verb === 'write' ? SendOp.RDMA_WRITE : opts.verb === 'read' ? SendOp.RDMA_READ : SendOp.SEND;
  const depth = Math.max(1, opts.verb === 'read' ? Math.min(opts.txDepth, remoteOutReads, opts.outReads) : opts.txDepth);
  const sges = [sge];
  let posted = 0;
  let done = 0;
  // Completion times; the peak is taken over windows of `depth` completions, so a burst of
  // completions handled in one event-loop turn does not read as infinite bandwidth.
  const times = new Float64Array(opts.iters + 1);
  const start = performance.now();
  times[0] = start;
  const post = (): void => {
    device.postSend(qpn, { wrId: BigInt(posted), opcode, flags: SendFlag.SIGNALED, sges, remoteAddr: remote.vaddr, rkey: remote.rkey });
    posted++;
  };
  while (posted < opts.iters && posted - done < depth) post();
  while (done < opts.iters) {
    // Completions that are already there are taken without a promise per WR.
    const wc = device.poll() ?? (await device.next(opts.timeoutMs, `completion ${done + 1} of ${opts.iters} (${opts.verb}) on qpn 0x${qpn.toString(16)}`));
    if (wc.status !== WcStatus.SUCCESS) throw new PeerError(`completion with error: ${statusName(wc.status)} (${wc.status}) for wr_id ${wc.wrId} on qpn 0x${qpn.toString(16)}`);
    done++;
    times[done] = performance.now();
    while (posted < opts.iters && posted - done < depth) post();
  }
  const usec = (performance.now() - start) * 1000;
  const bwAvg = (opts.size * opts.iters) / usec; // bytes/usec = MB/s (10^6)
  const window = Math.min(depth, opts.iters);
  let peak = bwAvg;
  for (let i = 0; i + window <= opts.iters; i++) {
    const dt = (times[i + window]! - times[i]!) * 1000;
    if (dt > 0) peak = Math.max(peak, (opts.size * window) / dt);
  }
  return { size: BigInt(opts.size), iterations: BigInt(opts.iters), bwPeak: peak, bwAvg, msgRate: opts.iters / usec };
}

/** Counts `iters` receives, re-posting while more are due. */
async function serverReceive(device: PeerSession['device'], qpn: number, opts: PerfOptions, sges: Sge[], posted: number): Promise<PerftestReport> {
  let got = 0;
  let start = 0;
  while (got < opts.iters) {
    const wc = device.poll() ?? (await device.next(got === 0 ? runDeadline(opts) : opts.timeoutMs, `receive ${got + 1} of ${opts.iters} on qpn 0x${qpn.toString(16)}`));
    if (!wc.recv) continue;
    if (wc.status !== WcStatus.SUCCESS) throw new PeerError(`receive completion with error: ${statusName(wc.status)} (${wc.status}) on qpn 0x${qpn.toString(16)}`);
    if (got === 0) start = performance.now();
    got++;
    if (posted < opts.iters) device.postRecv(qpn, BigInt(posted++), sges);
  }
  const usec = Math.max(1, (performance.now() - start) * 1000);
  const bwAvg = (opts.size * opts.iters) / usec;
  return { size: BigInt(opts.size), iterations: BigInt(opts.iters), bwPeak: bwAvg, bwAvg, msgRate: opts.iters / usec };
}
