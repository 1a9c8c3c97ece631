import { afterEach, describe, expect, it } from 'vitest';
import { Logger } from '../../virtio/log.js';
import { openPeerSession, type PeerSession } from './peer-session.js';
import { runPerf, type PerfOptions, type PerfVerb } from './perftest.js';

const ROCE_PORT = 30000 + Math.floor(Math.random() * 20000);
let tcpPort = 30000 + Math.floor(Math.random() * 20000);
const sessions: PeerSession[] = [];

function session(address: string): PeerSession {
  const s = openPeerSession({ address, rocePort: ROCE_PORT, log: new Logger('error') });
  sessions.push(s);
  return s;
}

afterEach(() => {
  for (const s of sessions.splice(0)) s.close();
});

function opts(verb: PerfVerb, port: number, over: Partial<PerfOptions>): PerfOptions {
  return { verb, server: null, port, size: 8192, iters: 64, txDepth: 16, rxDepth: 32, mtu: 1024, gidIndex: 0, outReads: 4, timeoutMs: 10_000, listenAddress: '127.0.0.1', out: () => {}, ...over };
}

describe('vrdma perf against itself over loopback UDP', () => {
  it.each(['write', 'read', 'send'] as const)('%s: the client finishes every iteration and the server learns its report', async (verb) => {
    const port = tcpPort++;
    const a = session('127.0.78.1');
    const b = session('127.0.78.2');
    let listening!: () => void;
    const ready = new Promise<void>((r) => (listening = r));
    const server = runPerf(a, opts(verb, port, { onListening: listening }));
    await ready;
    const client = await runPerf(b, opts(verb, port, { server: '127.0.0.1' }));
    const srv = await server;
    expect(client.report.iterations).toBe(64n);
    expect(client.report.size).toBe(8192n);
    expect(client.report.bwAvg).toBeGreaterThan(0);
    expect(client.report.bwPeak).toBeGreaterThanOrEqual(client.report.bwAvg);
    expect(srv.remote.qpn).toBe(client.local.qpn);
    expect(client.remote.rkey).toBe(srv.local.rkey);
    if (verb === 'send') expect(srv.report.iterations).toBe(64n);
    else expect(srv.remoteReport).toEqual(client.report);
  });

  it('a client whose server never answers gives up with the step it waited for', async () => {
    const port = tcpPort++;
    const net = await import('node:net');
    const silent = net.createServer(() => {});
    await new Promise<void>((r) => silent.listen(port, '127.0.0.1', r));
    try {
      await expect(runPerf(session('127.0.78.3'), opts('write', port, { server: '127.0.0.1', timeoutMs: 300 }))).rejects.toThrow(/perftest version/);
    } finally {
      silent.close();
    }
  });
});
