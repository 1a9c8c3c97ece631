/**
 * Test support (not used in production): peer sessions on loopback
 * addresses, all on one random RoCE port, closed after each test. Call at
 * a test file's top level (it registers an afterEach).
 */
import { afterEach } from 'vitest';
import { Logger } from '../../virtio/log.js';
import { openPeerSession, type PeerSession } from './peer-session.js';

export function peerSessions(): (address: string) => PeerSession {
  const rocePort = 30000 + Math.floor(Math.random() * 20000);
  const open: PeerSession[] = [];
  afterEach(() => {
    for (const s of open.splice(0)) s.close();
  });
  return (address) => {
    const s = openPeerSession({ address, rocePort, log: new Logger('error') });
    open.push(s);
    return s;
  };
}
