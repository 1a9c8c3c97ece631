import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { OobChannel, OobError } from './oob-channel.js';

let port = 40000 + Math.floor(Math.random() * 10000);
const closers: (() => void)[] = [];
afterEach(() => {
  for (const c of closers.splice(0)) c();
});

/** A raw TCP server on 127.0.0.1 that runs `fn` on its one connection. */
async function rawServer(fn: (s: net.Socket) => void): Promise<number> {
  const p = port++;
  const srv = net.createServer(fn);
  await new Promise<void>((r) => srv.listen(p, '127.0.0.1', r));
  closers.push(() => srv.close());
  return p;
}

describe('the out-of-band TCP channel', () => {
  it('reassembles a message that arrives in pieces and keeps what follows it', async () => {
    const p = await rawServer((s) => {
      s.write('abc');
      setTimeout(() => s.write('defgh'), 20);
    });
    const ch = await OobChannel.connect('127.0.0.1', p, 2000);
    expect(Buffer.from(await ch.read(6, 2000, 'six bytes')).toString()).toBe('abcdef');
    expect(Buffer.from(await ch.read(2, 2000, 'two more')).toString()).toBe('gh');
    await ch.close();
  });

  it('names what it waited for when the peer closes early', async () => {
    const p = await rawServer((s) => s.end('ab'));
    const ch = await OobChannel.connect('127.0.0.1', p, 2000);
    await expect(ch.read(52, 2000, "the server's address")).rejects.toThrow(/closed the connection while 52 bytes of the server's address/);
    await ch.close();
  });

  it('gives up on a silent peer at the deadline', async () => {
    const p = await rawServer(() => {});
    const ch = await OobChannel.connect('127.0.0.1', p, 2000);
    const t0 = Date.now();
    await expect(ch.read(4, 200, 'the MTU')).rejects.toThrow(OobError);
    expect(Date.now() - t0).toBeLessThan(2000);
    await ch.close();
  });

  it('a client waits for a server that starts late; the server side reads first, then writes', async () => {
    const p = port++;
    const client = OobChannel.connect('127.0.0.1', p, 3000);
    await new Promise((r) => setTimeout(r, 300));
    const server = OobChannel.accept(p, 3000, '127.0.0.1');
    const [c, s] = await Promise.all([client, server]);
    const [fromServer, fromClient] = await Promise.all([c.exchange(true, new Uint8Array([1, 2]), 2000, 'x'), s.exchange(false, new Uint8Array([3, 4]), 2000, 'x')]);
    expect(Array.from(fromServer)).toEqual([3, 4]);
    expect(Array.from(fromClient)).toEqual([1, 2]);
    await c.close();
    await s.close();
  });
});
