#!/usr/bin/env node
/**
 * `vrdma`: the command-line entry point. `serve` runs a vhost-user back-end
 * on a unix socket for QEMU to connect to.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { Logger, isLogLevel, type LogLevel } from '../virtio/log.js';
import { native } from '../virtio/sys/native.js';
import { VhostUserBackend } from '../virtio/vhost-user/backend.js';
import { VhostUserServer } from '../virtio/vhost-user/server.js';
import { RngDevice } from '../virtio/examples/rng-device.js';
import { EchoDevice } from '../virtio/examples/echo-device.js';
import type { VirtioDevice } from '../virtio/device.js';

const DEVICES = ['rng', 'echo'] as const;
type DeviceName = (typeof DEVICES)[number];

function makeDevice(name: DeviceName): { device: VirtioDevice; qemuDevice: string | null; summary: () => string } {
  switch (name) {
    case 'rng': {
      const d = new RngDevice();
      return { device: d, qemuDevice: 'vhost-user-rng-pci', summary: () => `rng: served ${d.bytesServed} bytes in ${d.requestsServed} requests` };
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
    `-device ${qemuDevice},chardev=vrdma0`,
  ].join(' \\\n  ');
}

async function serve(args: { socket: string; device: DeviceName; logLevel: LogLevel; qemuMem: number }): Promise<void> {
  const log = new Logger(args.logLevel);
  const { device, qemuDevice, summary } = makeDevice(args.device);
  const backend = new VhostUserBackend(device, log.child('vhost-user'));
  const server = new VhostUserServer(args.socket, backend, log.child('server'));
  server.onConnectionEnd = () => {
    const m = native.mappingStats();
    log.info(`${summary()}; guest memory mappings still held: ${m.mappings} (${m.bytes} bytes)`);
  };
  server.listen();
  if (qemuDevice !== null) {
    process.stdout.write(`QEMU arguments for this back-end (guest RAM must be shared):\n  ${qemuArgs(args.socket, qemuDevice, args.qemuMem)}\n`);
  }
  const stop = (sig: string): void => {
    log.info(`${sig}: shutting down; ${summary()}`);
    server.close();
    process.exit(0);
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

await yargs(hideBin(process.argv))
  .scriptName('vrdma')
  .usage('$0 <command> [options]')
  .command(
    'serve',
    'Run a vhost-user back-end on a unix socket; QEMU connects to it with -chardev socket,path=... and a vhost-user device.',
    (y) =>
      y
        .option('socket', { alias: 's', type: 'string', default: '/tmp/vrdma.sock', describe: 'Unix socket path QEMU connects to (a stale socket file there is replaced)' })
        .option('device', { alias: 'd', choices: DEVICES, default: 'rng' as DeviceName, describe: 'Device to serve: rng (virtio-rng, use with vhost-user-rng-pci) or echo (test device)' })
        .option('log-level', { type: 'string', default: 'info', describe: 'error | warn | info | debug | trace' })
        .option('qemu-mem', { type: 'number', default: 256, describe: 'Guest RAM size (MiB) used in the printed QEMU arguments' })
        .check((a) => {
          if (!isLogLevel(a['log-level'])) throw new Error(`unknown log level ${a['log-level']}`);
          return true;
        }),
    (a) => serve({ socket: a.socket, device: a.device, logLevel: a['log-level'] as LogLevel, qemuMem: a['qemu-mem'] }),
  )
  .demandCommand(1)
  .strict()
  .help()
  .parseAsync();
