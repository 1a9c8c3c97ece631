import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { EchoDevice } from '../examples/echo-device.js';
import { VhostUserFrontend } from '../frontend/frontend.js';
import { Logger } from '../log.js';
import { VhostUserBackend } from './backend.js';
import { FrontendReq } from './protocol.js';
import { VhostUserServer } from './server.js';

let dir: string;
let path: string;
let logs: string[];
let backend: VhostUserBackend;
let server: VhostUserServer;
const frontends: VhostUserFrontend[] = [];

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

function connect(): VhostUserFrontend {
  const fe = VhostUserFrontend.connect(path);
  frontends.push(fe);
  return fe;
}

function features(fe: VhostUserFrontend): Promise<bigint> {
  return fe.u64Request(FrontendReq.GET_FEATURES);
}

/** Settles to 'pending' when `p` has not settled within `ms`. */
function within<T>(p: Promise<T>, ms: number): Promise<T | 'pending'> {
  return Promise.race([p, new Promise<'pending'>((r) => setTimeout(() => r('pending'), ms))]);
}

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 400 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vrdma-server-'));
  path = join(dir, 'vu.sock');
  logs = [];
  const log = new Logger('debug', 'test', (l) => logs.push(l));
  backend = new VhostUserBackend(new EchoDevice(), log.child('vhost-user'));
  server = new VhostUserServer(path, backend, log.child('server'));
  server.listen();
});

afterEach(() => {
  for (const fe of frontends.splice(0)) if (!fe.isClosed) fe.close();
  server.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('vhost-user server', () => {
  it('serves a front-end that hangs up and connects again at once, 200 times in a row', async () => {
    let fe = connect();
    for (let i = 0; i < 200; i++) {
      expect(await features(fe)).toBe(backend.offeredFeatures);
      // Hang up and reconnect in the same tick, so the back-end sees the old
      // connection's EOF and the new connection in the same poll; every
      // other time the new one comes first, as it can from another process.
      const old = fe;
      if (i % 2 === 0) old.close();
      fe = connect();
      if (i % 2 === 1) old.close();
    }
    expect(await features(fe)).toBe(backend.offeredFeatures);
    await until(() => server.history.length === 200, 'every earlier session to end');
    expect(server.history.every((s) => s.reason === 'peer closed the connection' && s.error === undefined)).toBe(true);
    expect(logs.filter((l) => l.includes('refusing'))).toEqual([]);
    expect(logs.filter((l) => l.includes('WARN'))).toEqual([]);
  });

  it('holds a second front-end while the first is alive, warns about it, and serves it when the first goes', async () => {
    server.holdWarnMs = 50;
    const first = connect();
    expect(await features(first)).toBe(backend.offeredFeatures);
    const second = connect();
    const answer = features(second);
    expect(await within(answer, 150)).toBe('pending');
    expect(second.isClosed).toBe(false);
    expect(logs.some((l) => l.includes('WARN') && l.includes('a second front-end is waiting'))).toBe(true);
    // The first is served as before.
    expect(await first.getQueueNum()).toBe(1);
    first.close();
    expect(await within(answer, 2000)).toBe(backend.offeredFeatures);
    expect(logs.some((l) => /front-end connected \(it waited \d+ ms/.test(l))).toBe(true);
  });

  it('drops a held front-end that hung up before its turn, then serves the next one', async () => {
    const first = connect();
    expect(await features(first)).toBe(backend.offeredFeatures);
    const quitter = connect();
    // Let the server take it into its hands before it hangs up.
    await new Promise((r) => setTimeout(r, 20));
    quitter.close();
    const third = connect();
    const answer = features(third);
    expect(await within(answer, 100)).toBe('pending');
    first.close();
    expect(await within(answer, 2000)).toBe(backend.offeredFeatures);
    // The first, then the quitter (served, and found closed at once).
    await until(() => server.history.length === 2, 'the first two sessions to end');
    expect(server.history.map((s) => s.reason)).toEqual(['peer closed the connection', 'peer closed the connection']);
  });

  it('closes a held front-end when it shuts down, leaking no fd', async () => {
    const before = openFds();
    const first = connect();
    expect(await features(first)).toBe(backend.offeredFeatures);
    const second = connect();
    void features(second).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 20));
    server.close();
    await Promise.all([first.closed, second.closed]);
    // Both front-end ends were closed by the hang-ups, both back-end ends and the listener by close().
    expect(openFds()).toBe(before - 1);
  });
});
