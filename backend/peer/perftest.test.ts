import { describe, expect, it } from 'vitest';
import { runPerf, type PerfOptions, type PerfVerb } from './perftest.js';
import { peerSessions } from './test-sessions.js';

let tcpPort = 30000 + Math.floor(Math.random() * 20000);
const session = peerSessions();

function opts(verb: PerfVerb, port: number, over: Partial<PerfOptions>): PerfOptions {
  return { verb, server: null, port, size: 8192, iters: 64, txDepth: 16, rxDepth: 32, mtu: 1024, gidIndex: 0, outReads: 4, timeoutMs: 10_000, listenAddress: '127.0.0.1', out: () => {}, ...over };
}

/**
 * A server on `serverAddress` and a client on `clientAddress`, the client
 * started once the server listens; both results and what each printed.
 */
async function runPair(verb: PerfVerb, serverAddress: string, clientAddress: string, over: Partial<PerfOptions> = {}) {
  const port = tcpPort++;
  let listening!: () => void;
  const ready = new Promise<void>((r) => (listening = r));
  const serverLines: string[] = [];
  const clientLines: string[] = [];
  const server = runPerf(session(serverAddress), opts(verb, port, { ...over, onListening: listening, out: (l) => serverLines.push(l) }));
  await ready;
  const client = await runPerf(session(clientAddress), opts(verb, port, { ...over, server: '127.0.0.1', out: (l) => clientLines.push(l) }));
  return { client, srv: await server, clientLines, serverLines };
}

describe('vrdma perf against itself over loopback UDP', () => {
  it.each(['write', 'read', 'send'] as const)('%s: the client finishes every iteration and the server learns its report', async (verb) => {
    const { client, srv } = await runPair(verb, '127.0.78.1', '127.0.78.2');
    expect(client.report.iterations).toBe(64n);
    expect(client.report.size).toBe(8192n);
    expect(client.report.bwAvg).toBeGreaterThan(0);
    expect(client.report.bwPeak).toBeGreaterThanOrEqual(client.report.bwAvg);
    expect(srv.remote.qpn).toBe(client.local.qpn);
    expect(client.remote.rkey).toBe(srv.local.rkey);
    if (verb === 'send') expect(srv.report.iterations).toBe(64n);
    else expect(srv.remoteReport).toEqual(client.report);
  });

  it('send-lat: both sides ping-pong every iteration and print latencies from their own send times', async () => {
    const { client, srv, clientLines, serverLines } = await runPair('send-lat', '127.0.78.4', '127.0.78.5', { size: 64, iters: 50 });
    for (const [r, lines] of [[client, clientLines], [srv, serverLines]] as const) {
      const l = r.latency!;
      expect(l.size).toBe(64);
      expect(l.iterations).toBe(50);
      expect(l.min).toBeGreaterThan(0);
      expect(l.min).toBeLessThanOrEqual(l.typical);
      expect(l.typical).toBeLessThanOrEqual(l.max);
      expect(l.avg).toBeGreaterThanOrEqual(l.min);
      expect(l.avg).toBeLessThanOrEqual(l.max);
      expect(l.p99).toBeLessThanOrEqual(l.max);
      // the line ib_send_lat prints: #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
      expect(lines.join('\n')).toMatch(/^ 64\s+50\s+([\d.]+\s+){6}[\d.]+$/m);
    }
    // (runPingPong throws unless each side got all 50 receives and 50 send completions.)
    expect(srv.remote.qpn).toBe(client.local.qpn);
    expect(client.report.iterations).toBe(50n);
  });

  it('write-lat: each side writes the count into the last byte of the other side\'s landing area and waits for the next one', async () => {
    const { client, srv, clientLines } = await runPair('write-lat', '127.0.78.6', '127.0.78.7', { size: 100, iters: 300 });
    for (const r of [client, srv]) {
      expect(r.latency!.iterations).toBe(300);
      expect(r.latency!.min).toBeGreaterThan(0);
    }
    // the landing area is what each side advertises; 300 writes wrapped the 8-bit count past 255
    expect(client.remote.vaddr).toBe(srv.local.vaddr);
    expect(clientLines.join('\n')).toMatch(/^ 100\s+300\s+([\d.]+\s+){6}[\d.]+$/m);
  });

  it('read-lat: the client READs one at a time and prints whole round trips; the server only answers', async () => {
    const { client, srv, clientLines, serverLines } = await runPair('read-lat', '127.0.78.8', '127.0.78.9', { size: 256, iters: 100 });
    expect(client.latency!.iterations).toBe(100);
    expect(client.latency!.min).toBeGreaterThan(0);
    expect(clientLines.join('\n')).toMatch(/^ 256\s+100\s+([\d.]+\s+){6}[\d.]+$/m);
    expect(srv.latency).toBeNull();
    expect(serverLines.join('\n')).not.toMatch(/t_min/);
  });

  it('send-lat statistics: halved intervals between sends, median and percentiles as ib_send_lat sorts them', async () => {
    const { latencyStats } = await import('./perftest-lat.js');
    // sends at 0, 2, 6, 8, 18 ms: round trips 2, 4, 2, 10 ms → one-way 1000, 2000, 1000, 5000 µs
    const s = latencyStats(64, [0, 2, 6, 8, 18]);
    expect(s).toMatchObject({ size: 64, iterations: 5, min: 1000, max: 5000, typical: 2000, avg: 2250, p99: 5000, p999: 5000 });
    expect(s.stdev).toBeCloseTo(Math.sqrt((1250 ** 2 * 2 + 250 ** 2 + 2750 ** 2) / 4), 6);
    expect(() => latencyStats(64, [0])).toThrow(/at least 2/);
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
