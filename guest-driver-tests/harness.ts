/**
 * Starts a virtio-rdma device for the reference driver, either in this
 * process (VhostUserBackend over a socketpair, same event loop) or as a
 * separate `vrdma serve --device rdma` process on a unix socket, and opens
 * reference-driver contexts on it.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RdmaDevice } from '../backend/device/rdma-device.js';
import type { RdmaLimits } from '../backend/device/limits.js';
import { LoopbackEngine } from '../backend/engines/loopback/loopback-engine.js';
import { gidFromAddress } from '../backend/gid.js';
import { VhostUserFrontend } from '../virtio/frontend/frontend.js';
import { Logger, type LogLevel } from '../virtio/log.js';
import { native } from '../virtio/sys/native.js';
import { VhostUserBackend, type ConnectionSummary } from '../virtio/vhost-user/backend.js';
import { BackendProcess } from '../test/support/backend-process.js';
import { sleep } from './driver/event-wait.js';
import { RefDriver, type RefDriverOptions } from './driver/ref-driver.js';

export type DeviceMode = 'in-process' | 'process';

export interface DeviceOptions {
  mode?: DeviceMode;
  /** Device limits (in-process only, except the slot counts, which the CLI takes too). */
  limits?: Partial<RdmaLimits>;
  /** GID table as IP addresses (IPv4 becomes ::ffff:a.b.c.d). Default ['10.0.0.1']. */
  gids?: string[];
  /** Device log level; lines are kept in memory (see {@link DeviceUnderTest.logLines}). */
  logLevel?: LogLevel;
  /** Also print device log lines to stderr. */
  echoLog?: boolean;
}

export interface DeviceUnderTest {
  readonly mode: DeviceMode;
  /** Connects a front-end and opens the reference driver on it (one connection at a time). */
  open(opts?: RefDriverOptions): Promise<RefDriver>;
  /** Device log so far. */
  logLines(): string[];
  /** Closes any open driver and stops the device. */
  stop(): Promise<void>;
}

export async function startDevice(opts: DeviceOptions = {}): Promise<DeviceUnderTest> {
  return (opts.mode ?? 'in-process') === 'in-process' ? new InProcessDevice(opts) : startDeviceProcess(opts);
}

class InProcessDevice implements DeviceUnderTest {
  readonly mode = 'in-process' as const;
  readonly device: RdmaDevice;
  readonly backend: VhostUserBackend;
  readonly engine: LoopbackEngine;
  private readonly lines: string[] = [];
  private ended: Promise<ConnectionSummary> | null = null;
  private driver: RefDriver | null = null;

  constructor(opts: DeviceOptions) {
    const sink = (l: string): void => {
      this.lines.push(l);
      if (opts.echoLog) process.stderr.write(l + '\n');
    };
    const log = new Logger(opts.logLevel ?? 'info', '', sink);
    this.engine = new LoopbackEngine();
    this.device = new RdmaDevice({
      engine: this.engine,
      log: log.child('rdma'),
      gids: (opts.gids ?? ['10.0.0.1']).map(gidFromAddress),
      ...(opts.limits !== undefined ? { limits: opts.limits } : {}),
    });
    this.backend = new VhostUserBackend(this.device, log.child('vhost-user'));
  }

  async open(opts: RefDriverOptions = {}): Promise<RefDriver> {
    if (this.ended !== null) await this.ended;
    const [a, b] = native.socketPair();
    this.ended = this.backend.serve(a);
    const fe = VhostUserFrontend.fromFd(b);
    try {
      this.driver = await RefDriver.open(fe, opts);
    } catch (err) {
      fe.close();
      throw err;
    }
    return this.driver;
  }

  logLines(): string[] {
    return this.lines;
  }

  async stop(): Promise<void> {
    await this.driver?.close();
    this.driver = null;
    if (this.ended !== null) await Promise.race([this.ended, sleep(2000)]);
    this.ended = null;
    this.engine.close();
  }
}

async function startDeviceProcess(opts: DeviceOptions): Promise<DeviceUnderTest> {
  const dir = mkdtempSync(join(tmpdir(), 'vrdma-gdt-'));
  const socket = join(dir, 'vrdma.sock');
  const args = ['serve', '--device', 'rdma', '--engine', 'loopback', '--socket', socket, '--log-level', opts.logLevel ?? 'info'];
  for (const g of opts.gids ?? ['10.0.0.1']) args.push('--gid', g);
  if (opts.limits?.numCqSlots !== undefined) args.push('--cq-slots', String(opts.limits.numCqSlots));
  if (opts.limits?.numQpSlots !== undefined) args.push('--qp-slots', String(opts.limits.numQpSlots));
  const proc = new BackendProcess(args);
  try {
    await proc.waitFor(/listening on/);
  } catch (err) {
    await proc.stop();
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  let driver: RefDriver | null = null;
  return {
    mode: 'process',
    async open(dopts: RefDriverOptions = {}): Promise<RefDriver> {
      const fe = VhostUserFrontend.connect(socket);
      try {
        driver = await RefDriver.open(fe, dopts);
      } catch (err) {
        fe.close();
        throw err;
      }
      return driver;
    },
    logLines: () => proc.output.split('\n'),
    async stop(): Promise<void> {
      await driver?.close();
      driver = null;
      await proc.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
