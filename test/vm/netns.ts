/**
 * A network namespace for VM interop tests: a uniquely named namespace with
 * a tap device whose host side has 10.a.b.1/24, so a QEMU started inside the
 * namespace (see {@link NetNs.wrapQemu}) puts its guest on a private link
 * that nothing outside the namespace can reach. With several guests, the
 * taps are ports of a bridge that holds 10.a.b.1; guest i is 10.a.b.(2+i).
 * `remove()` deletes the namespace and with it the taps and the bridge; it
 * is safe to call more than once.
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
  /** The first guest's tap. */
  readonly tap = 'vrtap0';
  /** Host-side address (inside the namespace): on the tap, or on the bridge when there are several guests. */
  readonly hostAddress: string;
  /** The address the first guest should give its NIC. */
  readonly guestAddress: string;
  private removed = false;

  private constructor(
    readonly name: string,
    private readonly subnet: string,
    /** How many guests (taps) the namespace has. */
    readonly guests: number,
  ) {
    this.hostAddress = `${subnet}.1`;
    this.guestAddress = `${subnet}.2`;
  }

  /**
   * Creates the namespace with `guests` taps (a bridge joins them when
   * there are several). The subnet 10.a.b.0/24 is derived from the pid so
   * parallel runs differ; it lives only inside the namespace anyway.
   */
  static create(prefix = 'vrdma', guests = 1): NetNs {
    if (!Number.isInteger(guests) || guests < 1 || guests > 8) throw new RangeError(`guests must be 1..8 (got ${guests})`);
    const tag = `${process.pid.toString(36)}${Math.floor(Math.random() * 36 ** 4).toString(36)}`;
    const subnet = `10.${200 + (process.pid % 50)}.${Math.floor(Math.random() * 250) + 1}`;
    const ns = new NetNs(`${prefix}-${tag}`, subnet, guests);
    ip(['netns', 'add', ns.name]);
    try {
      const n = (args: string[]): void => ip(['-n', ns.name, ...args]);
      n(['link', 'set', 'lo', 'up']);
      if (guests === 1) {
        n(['tuntap', 'add', 'dev', ns.tap, 'mode', 'tap']);
        n(['addr', 'add', `${ns.hostAddress}/24`, 'dev', ns.tap]);
        n(['link', 'set', ns.tap, 'up']);
      } else {
        n(['link', 'add', 'vrbr0', 'type', 'bridge']);
        n(['addr', 'add', `${ns.hostAddress}/24`, 'dev', 'vrbr0']);
        n(['link', 'set', 'vrbr0', 'up']);
        for (let i = 0; i < guests; i++) {
          n(['tuntap', 'add', 'dev', ns.tapOf(i), 'mode', 'tap']);
          n(['link', 'set', ns.tapOf(i), 'master', 'vrbr0']);
          n(['link', 'set', ns.tapOf(i), 'up']);
        }
      }
    } catch (e) {
      ns.remove();
      throw e;
    }
    return ns;
  }

  /** Guest i's tap. */
  tapOf(i: number): string {
    return `vrtap${i}`;
  }

  /** The address guest i should give its NIC. */
  guestAddressOf(i: number): string {
    return `${this.subnet}.${2 + i}`;
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

  /** QEMU arguments for a virtio-net NIC on guest i's tap (each guest gets its own MAC). */
  nicArgs(mac?: string, i = 0): string[] {
    const m = mac ?? `52:54:00:12:34:${(0x56 + i).toString(16).padStart(2, '0')}`;
    return ['-netdev', `tap,id=vrnet0,ifname=${this.tapOf(i)},script=no,downscript=no`, '-device', `virtio-net-pci,netdev=vrnet0,mac=${m}`];
  }

  remove(): void {
    if (this.removed) return;
    this.removed = true;
    spawnSync('ip', ['netns', 'del', this.name], { stdio: 'ignore', timeout: 10_000 });
  }
}
