/**
 * An EngineHost for engine tests, standing where the device model stands:
 * it records every completion and failure the engine reports, checks that
 * each token completes exactly once, and can pretend guest memory is not
 * attached yet.
 */
import { Logger } from '../../virtio/log.js';
import type { Completion, EngineHost, GrhLayout, MemoryAccess } from './engine.js';

export interface RecordedCompletion extends Completion {
  qpn: number;
  token: number;
}

export class RecordingHost implements EngineHost {
  readonly log = new Logger('error');
  readonly sends: RecordedCompletion[] = [];
  readonly recvs: RecordedCompletion[] = [];
  readonly failed: { qpn: number; reason: string }[] = [];
  /** Breaches of "exactly once per token"; a test expects this empty. */
  readonly violations: string[] = [];
  /** "qpn/token" of every WR the test posted and the engine has not completed. */
  readonly outstandingSends = new Set<string>();
  readonly outstandingRecvs = new Set<string>();
  memoryAvailable = true;

  constructor(
    private readonly access: MemoryAccess,
    readonly gids: readonly (Uint8Array | null)[],
  ) {}

  get memory(): MemoryAccess {
    if (!this.memoryAvailable) throw new Error('no guest memory yet');
    return this.access;
  }

  sendDone(qpn: number, token: number, c: Completion): void {
    if (!this.outstandingSends.delete(`${qpn}/${token}`)) this.violations.push(`send ${qpn}/${token} completed but not outstanding`);
    this.sends.push({ qpn, token, ...c });
  }

  recvDone(qpn: number, token: number, c: Completion): void {
    if (!this.outstandingRecvs.delete(`${qpn}/${token}`)) this.violations.push(`recv ${qpn}/${token} completed but not outstanding`);
    this.recvs.push({ qpn, token, ...c });
  }

  qpFailed(qpn: number, reason: string): void {
    this.failed.push({ qpn, reason });
  }

  gid(index: number): Uint8Array | null {
    return this.gids[index] ?? null;
  }

  grhLayout: GrhLayout = 'rocev2';

  sendsOf(qpn: number): RecordedCompletion[] {
    return this.sends.filter((d) => d.qpn === qpn);
  }

  recvsOf(qpn: number): RecordedCompletion[] {
    return this.recvs.filter((d) => d.qpn === qpn);
  }
}
