import { describe, expect, it } from 'vitest';
import { runPingpong, type PingpongOptions } from './pingpong.js';
import { peerSessions } from './test-sessions.js';

const TCP_PORT = 30000 + Math.floor(Math.random() * 20000);
const session = peerSessions();

function opts(over: Partial<PingpongOptions>): PingpongOptions {
  return { server: null, port: TCP_PORT, ud: false, size: 4096, iters: 50, mtu: 1024, rxDepth: 500, gidIndex: 0, timeoutMs: 10_000, listenAddress: '127.0.0.1', out: () => {}, ...over };
}

describe('vrdma pingpong against itself over loopback UDP', () => {
  it.each([
    ['RC', false, 4096],
    ['UD', true, 1024],
  ])('%s: both sides count every exchange and learn each other\'s QPN and GID', async (_name, ud, size) => {
    const a = session('127.0.77.1');
    const b = session('127.0.77.2');
    let listening!: () => void;
    const ready = new Promise<void>((r) => (listening = r));
    const server = runPingpong(a, opts({ ud, size, onListening: listening }));
    await ready;
    const client = await runPingpong(b, opts({ ud, size, server: '127.0.0.1' }));
    const srv = await server;
    expect(client.bytes).toBe(size * 50 * 2);
    expect(srv.remote.qpn).toBe(client.local.qpn);
    expect(client.remote.qpn).toBe(srv.local.qpn);
    expect(Array.from(client.remote.gid.slice(12))).toEqual([127, 0, 77, 1]);
  });

  it('UD refuses a message larger than the MTU, as ibv_ud_pingpong does', async () => {
    await expect(runPingpong(session('127.0.77.3'), opts({ ud: true, size: 2048 }))).rejects.toThrow(/larger than port MTU/);
  });
});
