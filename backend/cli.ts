#!/usr/bin/env node
/**
 * `vrdma`: the command-line entry point. `serve` runs a vhost-user back-end
 * on a unix socket for QEMU to connect to.
 */
import { spawn } from 'node:child_process';
import { isIPv4 } from 'node:net';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { Logger, isLogLevel, type LogLevel } from '../virtio/log.js';
import { isSysError, native } from '../virtio/sys/native.js';
import { VhostUserBackend } from '../virtio/vhost-user/backend.js';
import { ProtocolFeature } from '../virtio/vhost-user/protocol.js';
import { VhostUserServer } from '../virtio/vhost-user/server.js';
import { RngDevice } from '../virtio/examples/rng-device.js';
import { EchoDevice } from '../virtio/examples/echo-device.js';
import type { VirtioDevice } from '../virtio/device.js';
import { RdmaDevice } from './device/rdma-device.js';
import { LoopbackEngine } from './engines/loopback/loopback-engine.js';
import { SoftRoceEngine } from './engines/soft-roce/soft-roce-engine.js';
import { PcapCapture } from './engines/soft-roce/capture.js';
import { ROCEV2_UDP_PORT } from './engines/soft-roce/udp-transport.js';
import type { Engine } from './engine/engine.js';
import { gidFromAddress } from './gid.js';
import { numQueues } from './abi/constants.js';
import { DEFAULT_LIMITS, resolveLimits, type RdmaLimits } from './device/limits.js';
import { PeerError } from './peer/peer-device.js';
import { OobError } from './peer/oob-channel.js';
import { PingpongMessageError } from './peer/pingpong-message.js';
import { PerftestMessageError } from './peer/perftest-message.js';
import { openPeerSession } from './peer/peer-session.js';
import { runPingpong } from './peer/pingpong.js';
import { RUN_TIMEOUT_STEPS, runPerf, type PerfVerb } from './peer/perftest.js';

const DEVICES = ['rdma', 'rng', 'echo'] as const;
type DeviceName = (typeof DEVICES)[number];
const ENGINES = ['loopback', 'soft-roce'] as const;
type EngineName = (typeof ENGINES)[number];

/** A refusal to start, reported as one `vrdma: ...` line and exit code 2. */
class StartupError extends Error {}

interface RdmaArgs {
  engine: EngineName;
  gids: string[];
  /** UDP port the soft-RoCE engine binds and sends to. */
  rocePort: number;
  /** soft-roce: pcap file recording every RoCEv2 datagram sent and received. */
  pcap: string | undefined;
  cqSlots: number;
  qpSlots: number;
  limits: Partial<RdmaLimits>;
  /** A migration's destination: take the address only once the VM runs here. */
  incoming: boolean;
  /** Shell commands run before the address is taken and after it is given up. */
  onAddressAcquire: string | undefined;
  onAddressRelease: string | undefined;
}

/**
 * A hook command run through /bin/sh with the address in its environment
 * (VRDMA_ADDRESS, VRDMA_PORT, VRDMA_EVENT); it must finish within 30 s.
 * Resolves when it exits 0, rejects with its status and stderr otherwise.
 */
function addressHook(command: string, event: 'acquire' | 'release', address: string, port: number, log: Logger): () => Promise<void> {
  return () =>
    new Promise<void>((resolve, reject) => {
      log.info(`address ${event} hook: ${command}`);
      const child = spawn('/bin/sh', ['-c', command], {
        stdio: ['ignore', 'inherit', 'pipe'],
        env: { ...process.env, VRDMA_ADDRESS: address, VRDMA_PORT: String(port), VRDMA_EVENT: event },
        timeout: 30_000,
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('error', reject);
      child.on('close', (code, signal) => {
        if (code === 0) resolve();
        else reject(new Error(`'${command}' ${signal !== null ? `killed by ${signal}` : `exited ${code}`}${stderr.trim() ? `: ${stderr.trim().split('\n').pop()}` : ''}`));
      });
    });
}


/** Things to close on SIGINT/SIGTERM (the pcap file). */
type Cleanup = (() => void)[];

function makeEngine(rdma: RdmaArgs, log: Logger, cleanup: Cleanup): Engine {
  switch (rdma.engine) {
    case 'loopback':
      if (rdma.onAddressAcquire !== undefined || rdma.onAddressRelease !== undefined) throw new StartupError('--on-address-acquire/--on-address-release move the soft-roce engine\'s RoCE address; the loopback engine has none');
      if (rdma.pcap !== undefined) throw new StartupError('--pcap records the soft-roce engine\'s RoCEv2 datagrams; the loopback engine sends none (use --engine soft-roce)');
      return new LoopbackEngine();
    case 'soft-roce': {
      const address = rdma.gids[0];
      if (address === undefined || !isIPv4(address)) {
        throw new StartupError(`the soft-roce engine binds the first --gid, which must be an IPv4 address (got ${address === undefined ? 'none' : `'${address}'`})`);
      }
      if (!Number.isInteger(rdma.rocePort) || rdma.rocePort < 1 || rdma.rocePort > 65535) throw new StartupError(`--roce-port must be an integer in 1..65535 (got ${rdma.rocePort})`);
      let engine: SoftRoceEngine;
      const hooks = {
        ...(rdma.onAddressAcquire !== undefined ? { beforeAcquire: addressHook(rdma.onAddressAcquire, 'acquire', address, rdma.rocePort, log) } : {}),
        ...(rdma.onAddressRelease !== undefined ? { afterRelease: addressHook(rdma.onAddressRelease, 'release', address, rdma.rocePort, log) } : {}),
      };
      try {
        engine = new SoftRoceEngine({ address, port: rdma.rocePort, incoming: rdma.incoming, hooks, warn: (line) => log.warn(`soft-roce: ${line}`) });
      } catch (err) {
        if (!isSysError(err)) throw err;
        const hint = err.code === 'EADDRNOTAVAIL' ? ' (the address is not on this host)' : err.code === 'EADDRINUSE' ? ' (another process uses it; try --roce-port)' : '';
        throw new StartupError(`soft-roce engine cannot bind UDP ${address}:${rdma.rocePort}: ${err.code}${hint}`);
      }
      if (rdma.incoming) log.info(`soft-roce engine waiting for an incoming migration: UDP ${engine.link.describe()} is taken once the VM runs here`);
      else log.info(`soft-roce engine bound to UDP ${engine.localAddress}`);
      if (rdma.pcap !== undefined) {
        const path = rdma.pcap;
        let capture: PcapCapture;
        try {
          capture = PcapCapture.toFile(path);
        } catch (err) {
          engine.close();
          if (!isSysError(err) && !(err instanceof Error && 'code' in err)) throw err;
          throw new StartupError(`cannot open --pcap file '${path}': ${(err as { code?: unknown }).code}`);
        }
        engine.capture = capture;
        cleanup.push(() => {
          engine.capture = null;
          capture.close();
          log.info(`pcap ${path}: ${capture.count} packets (${capture.tx} sent, ${capture.rx} received)`);
        });
        log.info(`soft-roce engine capturing RoCEv2 packets to pcap ${path}`);
      }
      return engine;
    }
  }
}

function makeDevice(name: DeviceName, log: Logger, rdma: RdmaArgs, cleanup: Cleanup): { device: VirtioDevice; qemuDevice: string | null; summary: () => string } {
  switch (name) {
    case 'rdma': {
      const limits = { ...rdma.limits, numCqSlots: rdma.cqSlots, numQpSlots: rdma.qpSlots, maxCq: rdma.cqSlots, maxQp: rdma.qpSlots };
      resolveLimits(limits); // refuse impossible limits before the engine binds its socket
      const engine = makeEngine(rdma, log, cleanup);
      const d = new RdmaDevice({ engine, log: log.child('rdma'), gids: rdma.gids.map(gidFromAddress), limits });
      return {
        device: d,
        qemuDevice: `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${rdma.cqSlots},qp-slots=${rdma.qpSlots}`,
        summary: () => `rdma (${rdma.engine} engine): ${d.resources?.qps.size ?? 0} QPs, ${d.resources?.cqs.size ?? 0} CQs live`,
      };
    }
    case 'rng': {
      const d = new RngDevice();
      return { device: d, qemuDevice: 'vhost-user-rng-pci,chardev=vrdma0', summary: () => `rng: served ${d.bytesServed} bytes in ${d.requestsServed} requests` };
    }
    case 'echo': {
      const d = new EchoDevice();
      return { device: d, qemuDevice: null, summary: () => `echo: ${d.chainsServed} chains, ${d.bytesEchoed} bytes` };
    }
  }
}

function qemuArgs(socket: string, qemuDevice: string, memMiB: number): string {
  return [
    `-object memory-backend-memfd,id=mem,size=${memMiB}M,share=on`,
    `-numa node,memdev=mem`,
    `-chardev socket,id=vrdma0,path=${socket}`,
    `-device ${qemuDevice}`,
  ].join(' \\\n  ');
}

async function serve(args: { socket: string; device: DeviceName; logLevel: LogLevel; qemuMem: number; rdma: RdmaArgs; deviceState: boolean }): Promise<void> {
  const log = new Logger(args.logLevel);
  let made: ReturnType<typeof makeDevice>;
  const cleanup: Cleanup = [];
  try {
    if (args.rdma.pcap !== undefined && args.device !== 'rdma') throw new StartupError(`--pcap needs --device rdma with --engine soft-roce (got --device ${args.device})`);
    made = makeDevice(args.device, log, args.rdma, cleanup);
  } catch (err) {
    if (!(err instanceof RangeError) && !(err instanceof StartupError)) throw err;
    process.stderr.write(`vrdma: ${err.message}\n`);
    process.exit(2);
  }
  const { device, qemuDevice, summary } = made;
  const backend = new VhostUserBackend(device, log.child('vhost-user'), {
    withheldProtocolFeatures: args.deviceState ? [] : [ProtocolFeature.DEVICE_STATE],
  });
  const server = new VhostUserServer(args.socket, backend, log.child('server'));
  server.onConnectionEnd = () => {
    const m = native.mappingStats();
    log.info(`${summary()}; guest memory mappings still held: ${m.mappings} (${m.bytes} bytes)`);
  };
  server.listen();
  if (qemuDevice !== null) {
    process.stdout.write(`QEMU arguments for this back-end (guest RAM must be shared):\n  ${qemuArgs(args.socket, qemuDevice, args.qemuMem)}\n`);
    if (args.device === 'rdma') {
      const n = numQueues(args.rdma.cqSlots, args.rdma.qpSlots);
      process.stdout.write(
        `With stock QEMU >= 10.2 (no migration), instead of the last line:\n  -device vhost-user-test-device-pci,chardev=vrdma0,virtio-id=42,num_vqs=${n},config_size=${device.configSize}\n`,
      );
    }
  }
  const stop = (sig: string): void => {
    log.info(`${sig}: shutting down; ${summary()}`);
    server.close();
    for (const c of cleanup) c();
    process.exit(0);
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

// ---------------------------------------------------------------------------
// pingpong / perf: a host-side peer for rdma-core's and perftest's stock tools

interface PeerCommonArgs {
  server: string | undefined;
  gid: string;
  gidIndex: number;
  port: number;
  rocePort: number;
  pcap: string | undefined;
  timeout: number;
  logLevel: LogLevel;
}

/** Runs one peer command; a failure is one `vrdma: ...` line and exit code 1, never a hang. */
async function runPeer(args: PeerCommonArgs, what: string, body: (session: ReturnType<typeof openPeerSession>) => Promise<void>): Promise<void> {
  const log = new Logger(args.logLevel).child(what);
  let session: ReturnType<typeof openPeerSession> | null = null;
  // A last guard: whatever the runner awaits has its own deadline, this one catches the rest.
  const guardMs = args.timeout * (RUN_TIMEOUT_STEPS + 2) + 60_000;
  const guard = setTimeout(() => {
    process.stderr.write(`vrdma: ${what}: not finished after ${Math.round(guardMs / 1000)} s, giving up\n`);
    session?.close();
    process.exit(1);
  }, guardMs);
  guard.unref();
  const onSignal = (sig: NodeJS.Signals): void => {
    process.stderr.write(`vrdma: ${what}: ${sig}, stopping\n`);
    session?.close(); // closes the pcap file with what was recorded
    process.exit(1);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    session = openPeerSession({ address: args.gid, rocePort: args.rocePort, pcap: args.pcap, log });
    await body(session);
    session.close();
    process.exit(0);
  } catch (err) {
    session?.close();
    if (err instanceof PeerError || err instanceof OobError || err instanceof PingpongMessageError || err instanceof PerftestMessageError || err instanceof RangeError) {
      process.stderr.write(`vrdma: ${what}: ${err.message}\n`);
      process.exit(1);
    }
    throw err;
  }
}

function peerOptions<T>(y: import('yargs').Argv<T>) {
  return y
    .positional('server', { type: 'string', describe: 'Server to connect to (TCP); without it, be the server and wait for a client' })
    .option('gid', { type: 'string', demandOption: true, describe: 'Local IPv4 address: RoCEv2 (UDP 4791) is bound here and it is GID index 0 (::ffff:a.b.c.d)' })
    .option('gid-index', { alias: 'g', type: 'number', default: 0, describe: 'Local GID index to use (only 0, the --gid address, exists)' })
    .option('port', { alias: 'p', type: 'number', default: 18515, describe: 'TCP port of the out-of-band exchange' })
    .option('roce-port', { type: 'number', default: ROCEV2_UDP_PORT, describe: 'UDP port to bind and send RoCEv2 to' })
    .option('mtu', { alias: 'm', type: 'number', default: 1024, describe: 'Path MTU (256..4096; rxe on a 1500-byte link uses 1024)' })
    .option('pcap', { type: 'string', describe: 'Record the RoCEv2 traffic in this pcap file (Ethernet/IPv4/UDP frames, for tshark/Wireshark)' })
    .option('timeout', { type: 'number', default: 30_000, describe: `ms to wait for the peer at each step (connection, message, completion); a perf server waits ${RUN_TIMEOUT_STEPS}× this for the client's run` })
    .option('log-level', { type: 'string', default: 'warn', describe: 'error | warn | info | debug | trace' })
    .check((a) => {
      if (!isLogLevel(a['log-level'] as string)) throw new Error(`unknown log level ${String(a['log-level'])}`);
      return true;
    });
}

function commonArgs(a: { server?: string; gid: string; 'gid-index': number; port: number; 'roce-port': number; pcap?: string; timeout: number; 'log-level': string }): PeerCommonArgs {
  return { server: a.server, gid: a.gid, gidIndex: a['gid-index'], port: a.port, rocePort: a['roce-port'], pcap: a.pcap, timeout: a.timeout, logLevel: a['log-level'] as LogLevel };
}

const out = (line: string): void => void process.stdout.write(line + '\n');

await yargs(hideBin(process.argv))
  .scriptName('vrdma')
  .usage('$0 <command> [options]')
  .command(
    'serve',
    'Run a vhost-user back-end on a unix socket; QEMU connects to it with -chardev socket,path=... and a vhost-user device.',
    (y) =>
      y
        .option('socket', { alias: 's', type: 'string', default: '/tmp/vrdma.sock', describe: 'Unix socket path QEMU connects to (a stale socket file there is replaced)' })
        .option('device', { alias: 'd', choices: DEVICES, default: 'rdma' as DeviceName, describe: 'Device to serve: rdma (virtio-rdma), rng (virtio-rng, use with vhost-user-rng-pci) or echo (test device)' })
        .option('engine', {
          alias: 'e',
          choices: ENGINES,
          default: 'soft-roce' as EngineName,
          describe:
            'RDMA engine: soft-roce (RoCEv2 over UDP, wire-compatible with Linux rdma_rxe; binds the first --gid, which must be an IPv4 address of this host) or loopback (QPs of this device talk only to each other; no network)',
        })
        .option('roce-port', { type: 'number', default: ROCEV2_UDP_PORT, describe: 'soft-roce: UDP port to bind and to send to (RoCEv2 is 4791; use another to run two engines on one address)' })
        .option('pcap', { type: 'string', describe: 'soft-roce: record every RoCEv2 packet sent and received (malformed ones too) in this pcap file, as Ethernet/IPv4/UDP frames, for tshark/Wireshark' })
        .option('gid', { type: 'string', array: true, default: ['127.0.0.1'], describe: 'IP address for the GID table (repeat for more; IPv4 becomes ::ffff:a.b.c.d)' })
        .option('cq-slots', { type: 'number', default: 16, describe: 'CQ virtqueues (must match the QEMU device)' })
        .option('qp-slots', { type: 'number', default: 16, describe: 'QP slots, two virtqueues each (must match the QEMU device)' })
        .option('max-pd', { type: 'number', default: DEFAULT_LIMITS.maxPd, group: 'Device limits:', describe: 'Protection domains' })
        .option('max-mr', { type: 'number', default: DEFAULT_LIMITS.maxMr, group: 'Device limits:', describe: 'Memory regions' })
        .option('max-ah', { type: 'number', default: DEFAULT_LIMITS.maxAh, group: 'Device limits:', describe: 'Address handles' })
        .option('max-cqe', { type: 'number', default: DEFAULT_LIMITS.maxCqe, group: 'Device limits:', describe: 'Entries per CQ' })
        .option('max-qp-wr', { type: 'number', default: DEFAULT_LIMITS.maxQpWr, group: 'Device limits:', describe: 'Outstanding work requests per queue' })
        .option('max-sge', { type: 'number', default: DEFAULT_LIMITS.maxSge, group: 'Device limits:', describe: 'SGEs per work request' })
        .option('max-inline-data', { type: 'number', default: DEFAULT_LIMITS.maxInlineData, group: 'Device limits:', describe: 'Inline bytes per send' })
        .option('max-qp-rd-atom', { type: 'number', default: DEFAULT_LIMITS.maxQpRdAtom, group: 'Device limits:', describe: 'Outstanding RDMA READ/atomic per QP' })
        .option('log-level', { type: 'string', default: 'info', describe: 'error | warn | info | debug | trace' })
        .option('device-state', { type: 'boolean', default: true, describe: 'Offer VHOST_USER_PROTOCOL_F_DEVICE_STATE (migration); --no-device-state plays a back-end without it' })
        .option('incoming', {
          type: 'boolean',
          default: false,
          describe: 'Destination of a live migration: start without the RoCE address (the source holds it) and take it once the migrated VM runs here',
        })
        .option('on-address-acquire', { type: 'string', describe: 'soft-roce: shell command run before the RoCE address is taken (e.g. add the IP and announce it); gets VRDMA_ADDRESS, VRDMA_PORT, VRDMA_EVENT' })
        .option('on-address-release', { type: 'string', describe: 'soft-roce: shell command run after the RoCE address was given up at a migration (e.g. remove the IP)' })
        .option('qemu-mem', { type: 'number', default: 256, describe: 'Guest RAM size (MiB) used in the printed QEMU arguments' })
        .check((a) => {
          if (!isLogLevel(a['log-level'])) throw new Error(`unknown log level ${a['log-level']}`);
          return true;
        }),
    (a) =>
      serve({
        socket: a.socket,
        device: a.device,
        logLevel: a['log-level'] as LogLevel,
        qemuMem: a['qemu-mem'],
        deviceState: a['device-state'],
        rdma: {
          engine: a.engine,
          gids: a.gid,
          rocePort: a['roce-port'],
          pcap: a.pcap,
          incoming: a.incoming,
          onAddressAcquire: a['on-address-acquire'],
          onAddressRelease: a['on-address-release'],
          cqSlots: a['cq-slots'],
          qpSlots: a['qp-slots'],
          limits: {
            maxPd: a['max-pd'],
            maxMr: a['max-mr'],
            maxAh: a['max-ah'],
            maxCqe: a['max-cqe'],
            maxQpWr: a['max-qp-wr'],
            maxSge: a['max-sge'],
            maxInlineData: a['max-inline-data'],
            maxQpRdAtom: a['max-qp-rd-atom'],
          },
        },
      }),
  )
  .command(
    'pingpong [server]',
    'The other end of ibv_rc_pingpong / ibv_ud_pingpong (rdma-core): same TCP exchange, QP settings and message loop, over the soft-RoCE engine.',
    (y) =>
      peerOptions(y)
        .option('ud', { type: 'boolean', default: false, describe: 'UD (ibv_ud_pingpong) instead of RC (ibv_rc_pingpong)' })
        .option('size', { alias: 's', type: 'number', describe: 'Message size (default 4096 for RC, 1024 for UD: it must fit the MTU)' })
        .option('iters', { alias: 'n', type: 'number', default: 1000, describe: 'Exchanges' })
        .option('rx-depth', { alias: 'r', type: 'number', default: 500, describe: 'Receives kept posted' }),
    async (a) => {
      const c = commonArgs(a);
      await runPeer(c, 'pingpong', async (session) => {
        await runPingpong(session, {
          server: c.server ?? null,
          port: c.port,
          ud: a.ud,
          size: a.size ?? (a.ud ? Math.min(1024, a.mtu) : 4096),
          iters: a.iters,
          mtu: a.mtu,
          rxDepth: a['rx-depth'],
          gidIndex: c.gidIndex,
          timeoutMs: c.timeout,
          out,
        });
      });
    },
  )
  .command(
    'perf <verb> [server]',
    'The other end of perftest ib_write_bw / ib_read_bw / ib_send_bw / ib_send_lat (RC, TCP exchange; run the stock tool with -x <GID index of ::ffff:a.b.c.d>).',
    (y) =>
      peerOptions(y.positional('verb', { choices: ['write', 'read', 'send', 'send-lat', 'write-lat', 'read-lat'] as const, demandOption: true, describe: 'RDMA WRITE, RDMA READ or SEND bandwidth, or SEND, RDMA WRITE or RDMA READ latency (ib_send_lat, ib_write_lat, ib_read_lat)' }))
        .option('size', { alias: 's', type: 'number', default: 65536, describe: 'Message size (give the stock tool the same -s)' })
        .option('iters', { alias: 'n', type: 'number', default: 5000, describe: 'Messages (give the stock tool the same -n)' })
        .option('tx-depth', { alias: 't', type: 'number', default: 128, describe: 'Outstanding work requests of the client' })
        .option('rx-depth', { alias: 'r', type: 'number', default: 512, describe: 'Receives the send server keeps posted' })
        .option('outs', { alias: 'o', type: 'number', default: 16, describe: 'READ: outstanding reads accepted / issued' }),
    async (a) => {
      const c = commonArgs(a);
      await runPeer(c, `perf ${a.verb}`, async (session) => {
        await runPerf(session, {
          verb: a.verb as PerfVerb,
          server: c.server ?? null,
          port: c.port,
          size: a.size,
          iters: a.iters,
          txDepth: a['tx-depth'],
          rxDepth: a['rx-depth'],
          mtu: a.mtu,
          gidIndex: c.gidIndex,
          outReads: a.outs,
          timeoutMs: c.timeout,
          out,
        });
      });
    },
  )
  .demandCommand(1)
  .strict()
  .help()
  .parseAsync();
