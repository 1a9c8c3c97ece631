/**
 * Starts a virtio-rdma device for the reference driver, either in this
 * process (VhostUserBackend over a socketpair, same event loop) or as a
 * separate `vrdma serve --device rdma` process on a unix socket, and opens
 * reference-driver contexts on it. The in-process device runs the loopback
 * engine, or with {@link DeviceOptions.softRoce} a soft-RoCE engine on a UDP
 * address, so that two devices can talk over the network.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RdmaDevice } from '../backend/device/rdma-device.js';
import type { RdmaLimits } from '../backend/device/limits.js';
import type { Engine } from '../backend/engine/engine.js';
import { LoopbackEngine } from '../backend/engines/loopback/loopback-engine.js';
import { SoftRoceEngine } from '../backend/engines/soft-roce/soft-roce-engine.js';
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
  /**
   * In-process only: run a soft-RoCE engine bound to this UDP address/port
   * instead of the loopback engine. The GID table is then `[address]` unless
   * {@link gids} is given (its first entry should be the address).
   */
  softRoce?: SoftRoceDeviceOptions;
}

export interface SoftRoceDeviceOptions {
  /** IPv4 address to bind, e.g. 127.0.0.2 (Linux routes all of 127/8 to lo). */
  address: string;
  /** UDP port to bind and to send to; default 4791. */
  port?: number;
  /** A migration's destination: the address is taken when the device first runs (see SoftRoceOptions.incoming). */
  incoming?: boolean;
}

/** A random UDP port in 20000..39999, for a pair of soft-RoCE devices on distinct loopback addresses. */
export function randomRocePort(): number {
  return 20000 + Math.floor(Math.random() * 20000);
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

/** A front-end connected to an in-process device's back-end: a second QEMU's role, e.g. a migration's destination. */
export function frontendTo(dev: DeviceUnderTest): VhostUserFrontend {
  if (!(dev instanceof InProcessDevice)) throw new Error('frontendTo needs an in-process device');
  const [mine, theirs] = native.socketPair();
  void dev.backend.serve(mine);
  return VhostUserFrontend.fromFd(theirs);
}

export async function startDevice(opts: DeviceOptions = {}): Promise<DeviceUnderTest> {
  const mode = opts.mode ?? 'in-process';
  if (opts.softRoce !== undefined && mode !== 'in-process') throw new Error('harness: softRoce is for in-process devices only');
  return mode === 'in-process' ? new InProcessDevice(opts) : startDeviceProcess(opts);
}

class InProcessDevice implements DeviceUnderTest {
  readonly mode = 'in-process' as const;
  readonly device: RdmaDevice;
  readonly backend: VhostUserBackend;
  readonly engine: Engine;
  private readonly lines: string[] = [];
  private ended: Promise<ConnectionSummary> | null = null;
  private driver: RefDriver | null = null;

  constructor(opts: DeviceOptions) {
    const sink = (l: string): void => {
      this.lines.push(l);
      if (opts.echoLog) process.stderr.write(l + '\n');
    };
    const log = new Logger(opts.logLevel ?? 'info', '', sink);
    const rc = opts.softRoce;
    this.engine = rc !== undefined ? new SoftRoceEngine({ address: rc.address, ...(rc.port !== undefined ? { port: rc.port } : {}), incoming: rc.incoming === true }) : new LoopbackEngine();
    try {
      this.device = new RdmaDevice({
        engine: this.engine,
        log: log.child('rdma'),
        gids: (opts.gids ?? (rc !== undefined ? [rc.address] : ['10.0.0.1'])).map(gidFromAddress),
        ...(opts.limits !== undefined ? { limits: opts.limits } : {}),
      });
    } catch (err) {
      this.engine.close(); // a soft-RoCE engine holds a bound UDP socket
      throw err;
    }
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
