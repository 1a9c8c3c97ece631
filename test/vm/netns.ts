/**
 * A network namespace for VM interop tests: a uniquely named namespace with
 * a tap device whose host side has 10.a.b.1/24, so a QEMU started inside the
 * namespace (see {@link NetNs.wrapQemu}) puts its guest on a private link
 * that nothing outside the namespace can reach. `remove()` deletes the
 * namespace and with it the tap; it is safe to call more than once.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import path from 'node:path';

export class NetNsError extends Error {
  override readonly name = 'NetNsError';
}

function ip(args: readonly string[]): void {
  const r = spawnSync('ip', args, { encoding: 'utf8', timeout: 10_000 });
  if (r.status !== 0) throw new NetNsError(`ip ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr.trim()}`);
}

/** Whether this process may create namespaces and tap devices (root with iproute2 and /dev/net/tun). */
export function canCreateNetNs(): boolean {
  const r = spawnSync('ip', ['netns', 'list'], { stdio: 'ignore', timeout: 10_000 });
  return r.status === 0 && typeof process.getuid === 'function' && process.getuid() === 0;
}

export class NetNs {
  readonly tap = 'vrtap0';
  /** Host-side address of the tap (inside the namespace). */
  readonly hostAddress: string;
  /** The address the guest should give its NIC. */
  readonly guestAddress: string;
  private removed = false;

  private constructor(
    readonly name: string,
    subnet: string,
  ) {
    this.hostAddress = `${subnet}.1`;
    this.guestAddress = `${subnet}.2`;
  }

  /**
   * Creates the namespace. The subnet 10.a.b.0/24 is derived from the pid
   * so parallel runs differ; it lives only inside the namespace anyway.
   */
  static create(prefix = 'vrdma'): NetNs {
    const tag = `${process.pid.toString(36)}${Math.floor(Math.random() * 36 ** 4).toString(36)}`;
    const subnet = `10.${200 + (process.pid % 50)}.${Math.floor(Math.random() * 250) + 1}`;
    const ns = new NetNs(`${prefix}-${tag}`, subnet);
    ip(['netns', 'add', ns.name]);
    try {
      ip(['-n', ns.name, 'link', 'set', 'lo', 'up']);
      ip(['-n', ns.name, 'tuntap', 'add', 'dev', ns.tap, 'mode', 'tap']);
      ip(['-n', ns.name, 'addr', 'add', `${ns.hostAddress}/24`, 'dev', ns.tap]);
      ip(['-n', ns.name, 'link', 'set', ns.tap, 'up']);
    } catch (e) {
      ns.remove();
      throw e;
    }
    return ns;
  }

  /** argv prefix running a program inside the namespace. */
  exec(argv: readonly string[]): string[] {
    return ['ip', 'netns', 'exec', this.name, ...argv];
  }

  /**
   * Writes an executable wrapper in `dir` that runs `qemu` inside the
   * namespace (`ip netns exec` execs, so the wrapper's pid is QEMU's and the
   * VM harness's kill/pdeathsig reach it). Returns its path.
   */
  wrapQemu(dir: string, qemu = '/usr/bin/qemu-system-x86_64'): string {
    const file = path.join(dir, 'qemu-in-netns.sh');
    writeFileSync(file, `#!/bin/sh\nexec ip netns exec '${this.name}' '${qemu}' "$@"\n`);
    chmodSync(file, 0o755);
    return file;
  }

  /** QEMU arguments for a virtio-net NIC on the namespace's tap. */
  nicArgs(mac = '52:54:00:12:34:56'): string[] {
    return ['-netdev', `tap,id=vrnet0,ifname=${this.tap},script=no,downscript=no`, '-device', `virtio-net-pci,netdev=vrnet0,mac=${mac}`];
  }

  remove(): void {
    if (this.removed) return;
    this.removed = true;
    spawnSync('ip', ['netns', 'del', this.name], { stdio: 'ignore', timeout: 10_000 });
  }
}
