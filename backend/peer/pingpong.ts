/**
 * `vrdma pingpong`: the other end of rdma-core's ibv_rc_pingpong and
 * ibv_ud_pingpong. Same exchange (TCP, 52-byte LID:QPN:PSN:GID), same QP
 * settings (RC: MTU from --mtu, rd_atomic 1, min_rnr_timer 12, timeout 14,
 * retry 7/7, hop limit 1; UD: Q_Key 0x11111111, 40-byte GRH room in
 * receive buffers) and the same message loop: the client sends first, each
 * side sends its next message once its previous send and a receive have
 * both completed, until both counted `iters` of each.
 */
import { QpState, QpType, SendFlag, SendOp, WcStatus } from '../abi/constants.js';
import type { AddressVector } from '../engine/engine.js';
import { OobChannel } from './oob-channel.js';
import { PeerError, statusName, type PeerMr } from './peer-device.js';
import { formatGid, mtuEnum, randomPsn, type PeerSession } from './peer-session.js';
import { PINGPONG_DONE, PINGPONG_MESSAGE_SIZE, decodePingpongDest, encodePingpongDest, type PingpongDest } from './pingpong-message.js';

export const UD_QKEY = 0x11111111;
/** Room the receiver keeps for the GRH in front of a UD payload. */
export const GRH_BYTES = 40;
const RECV_WRID = 1n;
const SEND_WRID = 2n;

export interface PingpongOptions {
  /** Server to connect to; null: be the server. */
  server: string | null;
  port: number;
  ud: boolean;
  size: number;
  iters: number;
  mtu: number;
  rxDepth: number;
  gidIndex: number;
  /** Deadline for the exchange and for each completion. */
  timeoutMs: number;
  /** Server: address to listen on (default all, like the stock tools). */
  listenAddress?: string;
  /** Called once the server listens (tests start the other side then). */
  onListening?: () => void;
  out: (line: string) => void;
}

export interface PingpongResult {
  bytes: number;
  seconds: number;
  usecPerIter: number;
  local: PingpongDest;
  remote: PingpongDest;
}

function describe(side: string, d: PingpongDest): string {
  const h = (v: number, n: number): string => v.toString(16).padStart(n, '0');
  return `  ${side} address:${side === 'local' ? '  ' : ' '}LID 0x${h(d.lid, 4)}, QPN 0x${h(d.qpn, 6)}, PSN 0x${h(d.psn, 6)}, GID ${formatGid(d.gid)}`;
}

export async function runPingpong(session: PingpongSessionLike, opts: PingpongOptions): Promise<PingpongResult> {
  const { device } = session;
  if (!Number.isInteger(opts.size) || opts.size < 1) throw new PeerError(`--size ${opts.size} must be a positive integer`);
  if (!Number.isInteger(opts.iters) || opts.iters < 1) throw new PeerError(`--iters ${opts.iters} must be a positive integer`);
  const mtu = mtuEnum(opts.mtu);
  if (opts.ud && opts.size > opts.mtu) throw new PeerError(`Requested size larger than port MTU (${opts.mtu})`);
  const localGid = device.gid(opts.gidIndex);
  if (localGid === null) throw new PeerError(`no GID at index ${opts.gidIndex}`);
  const rxDepth = Math.max(2, opts.rxDepth);

  const bufLen = opts.ud ? opts.size + GRH_BYTES : opts.size;
  const mr: PeerMr = device.registerMr(bufLen, 0);
  mr.bytes.fill(0x7b);
  const qpn = device.createQp(opts.ud ? QpType.UD : QpType.RC, 1, rxDepth);
  device.modifyQp(qpn, opts.ud ? { state: QpState.INIT, pkeyIndex: 0, qkey: UD_QKEY } : { state: QpState.INIT, pkeyIndex: 0, accessFlags: 0 });
  const recvSges = [mr.sge(0, bufLen)];
  const postRecv = (): void => device.postRecv(qpn, RECV_WRID, recvSges);
  for (let i = 0; i < rxDepth; i++) postRecv();

  const local: PingpongDest = { lid: 0, qpn, psn: randomPsn(), gid: localGid };
  opts.out(describe('local', local));

  let av: AddressVector | null = null;
  const connect = (remote: PingpongDest): void => {
    av = { dgid: remote.gid, sgidIndex: opts.gidIndex, hopLimit: 1, trafficClass: 0, flowLabel: 0, sl: 0 };
    if (opts.ud) {
      device.modifyQp(qpn, { state: QpState.RTR });
      device.modifyQp(qpn, { state: QpState.RTS, sqPsn: local.psn });
      return;
    }
    device.modifyQp(qpn, { state: QpState.RTR, av, pathMtu: mtu, destQpn: remote.qpn, rqPsn: remote.psn, maxDestRdAtomic: 1, minRnrTimer: 12 });
    device.modifyQp(qpn, { state: QpState.RTS, timeout: 14, retryCnt: 7, rnrRetry: 7, sqPsn: local.psn, maxRdAtomic: 1 });
  };

  let remote: PingpongDest;
  const mine = encodePingpongDest(local);
  if (opts.server !== null) {
    const ch = await OobChannel.connect(opts.server, opts.port, opts.timeoutMs);
    try {
      ch.write(mine);
      remote = decodePingpongDest(await ch.read(PINGPONG_MESSAGE_SIZE, opts.timeoutMs, 'the server\'s address'));
      ch.write(PINGPONG_DONE);
    } finally {
      await ch.close();
    }
    connect(remote);
  } else {
    const ch = await OobChannel.accept(opts.port, opts.timeoutMs, opts.listenAddress, opts.onListening);
    try {
      remote = decodePingpongDest(await ch.read(PINGPONG_MESSAGE_SIZE, opts.timeoutMs, 'the client\'s address'));
      connect(remote);
      ch.write(mine);
      // The client answers "done"; it may also just close.
      await ch.read(PINGPONG_DONE.length, opts.timeoutMs, '"done"').catch(() => undefined);
    } finally {
      await ch.close();
    }
  }
  opts.out(describe('remote', remote));

  const sendSges = [opts.ud ? mr.sge(GRH_BYTES, opts.size) : mr.sge(0, opts.size)];
  const ud = opts.ud && av !== null ? { av, remoteQpn: remote.qpn, remoteQkey: UD_QKEY } : undefined;
  const postSend = (): void => device.postSend(qpn, { wrId: SEND_WRID, opcode: SendOp.SEND, flags: SendFlag.SIGNALED, sges: sendSges, ud });

  const start = performance.now();
  let pending = 1; // RECV
  if (opts.server !== null) {
    postSend();
    pending |= 2;
  }
  let scnt = 0;
  let rcnt = 0;
  while (rcnt < opts.iters || scnt < opts.iters) {
    const wc = device.poll() ?? (await device.next(opts.timeoutMs, `completion ${scnt + rcnt + 1} of ${2 * opts.iters} on qpn 0x${qpn.toString(16)}`));
    if (wc.status !== WcStatus.SUCCESS) throw new PeerError(`Failed status ${statusName(wc.status)} (${wc.status}) for wr_id ${wc.wrId}`);
    if (wc.wrId === SEND_WRID) {
      scnt++;
      pending &= ~2;
    } else if (wc.wrId === RECV_WRID) {
      rcnt++;
      postRecv();
      pending &= ~1;
    } else throw new PeerError(`Completion for unknown wr_id ${wc.wrId}`);
    if (scnt < opts.iters && pending === 0) {
      postSend();
      pending = 3;
    }
  }
  const usec = (performance.now() - start) * 1000;
  const bytes = opts.size * opts.iters * 2;
  opts.out(`${bytes} bytes in ${(usec / 1e6).toFixed(2)} seconds = ${((bytes * 8) / usec).toFixed(2)} Mbit/sec`);
  opts.out(`${opts.iters} iters in ${(usec / 1e6).toFixed(2)} seconds = ${(usec / opts.iters).toFixed(2)} usec/iter`);
  return { bytes, seconds: usec / 1e6, usecPerIter: usec / opts.iters, local, remote };
}

type PingpongSessionLike = Pick<PeerSession, 'device'>;
