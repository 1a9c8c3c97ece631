import { afterEach, describe, expect, it } from 'vitest';
import { Logger } from '../../virtio/log.js';
import { Access, QpState, QpType, SendFlag, SendOp, WcStatus } from '../abi/constants.js';
import { openPeerSession, type PeerSession } from './peer-session.js';

const ROCE_PORT = 30000 + Math.floor(Math.random() * 20000);
const sessions: PeerSession[] = [];
afterEach(() => {
  for (const s of sessions.splice(0)) s.close();
});

function session(address: string): PeerSession {
  const s = openPeerSession({ address, rocePort: ROCE_PORT, log: new Logger('error'), memoryBytes: 1 << 20 });
  sessions.push(s);
  return s;
}

/** Two RC QPs connected to each other. */
function pair(a: PeerSession, b: PeerSession): [number, number] {
  const qa = a.device.createQp(QpType.RC, 8, 8);
  const qb = b.device.createQp(QpType.RC, 8, 8);
  const all = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ;
  for (const [s, q, peer, rq] of [[a, qa, b, qb], [b, qb, a, qa]] as const) {
    s.device.modifyQp(q, { state: QpState.INIT, accessFlags: all });
    s.device.modifyQp(q, { state: QpState.RTR, av: { dgid: peer.gid, sgidIndex: 0, hopLimit: 1, trafficClass: 0, flowLabel: 0, sl: 0 }, pathMtu: 3, destQpn: rq, rqPsn: 100, maxDestRdAtomic: 1, minRnrTimer: 12 });
    s.device.modifyQp(q, { state: QpState.RTS, timeout: 14, retryCnt: 7, rnrRetry: 7, sqPsn: 100, maxRdAtomic: 1 });
  }
  return [qa, qb];
}

describe('the host-side peer device', () => {
  it('an RDMA WRITE lands in the peer MR byte for byte', async () => {
    const a = session('127.0.79.1');
    const b = session('127.0.79.2');
    const [qa] = pair(a, b);
    const src = a.device.registerMr(5000, 0);
    const dst = b.device.registerMr(8192, Access.REMOTE_WRITE);
    src.bytes.forEach((_, i) => (src.bytes[i] = (i * 7) & 0xff));
    a.device.postSend(qa, { wrId: 1n, opcode: SendOp.RDMA_WRITE, flags: SendFlag.SIGNALED, sges: [src.sge(0, 5000)], remoteAddr: dst.addr + 100n, rkey: dst.rkey });
    const wc = await a.device.next(5000, 'the write');
    expect(wc.status).toBe(WcStatus.SUCCESS);
    expect(Array.from(dst.bytes.subarray(100, 5100))).toEqual(Array.from(src.bytes));
    expect(dst.bytes[99]).toBe(0);
    expect(dst.bytes[5100]).toBe(0);
  });

  it('a remote WRITE past the end of the peer MR is refused and nothing outside the MR changes', async () => {
    const a = session('127.0.79.3');
    const b = session('127.0.79.4');
    const [qa] = pair(a, b);
    const src = a.device.registerMr(4096, 0);
    src.bytes.fill(0xee);
    const dst = b.device.registerMr(4096, Access.REMOTE_WRITE);
    const beyond = b.device.peek(dst.addr + 4096n, 16); // whatever follows the MR in peer memory
    const before = Array.from(beyond);
    a.device.postSend(qa, { wrId: 1n, opcode: SendOp.RDMA_WRITE, flags: SendFlag.SIGNALED, sges: [src.sge(0, 4096)], remoteAddr: dst.addr + 1n, rkey: dst.rkey });
    const wc = await a.device.next(5000, 'the write');
    expect(wc.status).toBe(WcStatus.REM_ACCESS_ERR);
    // Packets before the offending one may have landed inside the MR (the responder checks each
    // packet; rxe checks the whole RETH range first); the byte past its end never does.
    expect(Array.from(beyond)).toEqual(before);
    expect(dst.bytes[0]).toBe(0);
  });
});
