/**
 * VM test harness: boots the cached test guest (images/guest/build.sh) in
 * QEMU under TCG, runs a shell command in it and returns what it printed and
 * its exit code.
 *
 * How it works: the guest's initramfs (busybox + /init) is in the cache; per
 * run we append a second, uncompressed cpio archive holding /vrdma/cmd.sh
 * (and any `files`). Linux unpacks both. /init loads the modules listed in
 * images/guest/modules.txt, prints `@@VRDMA-BEGIN@@`, runs `sh /vrdma/cmd.sh`
 * (cwd /vrdma, stdin /dev/null), prints `\n@@VRDMA-EXIT <code>@@` and powers
 * off. The serial console (ttyS0) is QEMU's stdout (`-serial stdio`), read as
 * a stream. Lines starting with `@@VRDMA-` are reserved for this protocol.
 *
 * QEMU never outlives a run: it is killed on timeout, on error, when the
 * marker was seen but QEMU does not exit, and when the test runner exits
 * (exit handler + SIGINT/SIGTERM/SIGHUP handlers + `setpriv --pdeathsig`,
 * which covers a runner killed with SIGKILL).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { StringDecoder } from 'node:string_decoder';

// ---------------------------------------------------------------- types

export interface GuestFile {
  data: string | Uint8Array;
  /** permission bits, default 0o644 (0o755 for names ending in .sh) */
  mode?: number;
}

export interface GuestOptions {
  /** Shell script run in the guest with busybox `sh` (cwd /vrdma). Its exit code is the result's. */
  command: string;
  /** QEMU binary. Default: $VRDMA_QEMU or /usr/bin/qemu-system-x86_64. */
  qemu?: string;
  /** Guest RAM in MiB (default 256). With `sharedMemory` the memfd backend gets the same size. */
  memMiB?: number;
  /** vCPUs (default 1; under TCG a second vCPU costs boot time and buys little). */
  cpus?: number;
  /** QEMU machine type (default q35). */
  machine?: string;
  /** Accelerator (default tcg; this machine has no usable KVM). */
  accel?: string;
  /**
   * Back guest RAM with a shared memfd, as vhost-user needs:
   * `-object memory-backend-memfd,id=mem,size=<memMiB>M,share=on -numa node,memdev=mem`.
   * (Or pass those in extraArgs yourself; size must equal memMiB.)
   */
  sharedMemory?: boolean;
  /** Appended to the QEMU command line (-chardev, -device, -object, ...). */
  extraArgs?: string[];
  /** Extra files put into the guest under /vrdma/ (relative paths; subdirectories allowed). */
  files?: Record<string, string | Uint8Array | GuestFile>;
  /** Extra kernel command-line words, appended to the image's default. */
  append?: string;
  /** Whole run (boot + command) deadline in ms. Default 45000. */
  timeoutMs?: number;
  /** Also write the full serial console and QEMU's stderr here (a copy is always in the run's temp dir). */
  logFile?: string;
  /** Merged over process.env, for QEMU and for the VRDMA_QEMU / VRDMA_CACHE lookups. */
  env?: NodeJS.ProcessEnv;
  /** Keep the run's temp dir even on success (its path is in the result). */
  keepTempDir?: boolean;
  /** Boot this image instead of the cached one. */
  image?: GuestImage;
}

export interface GuestResult {
  /** Exit code of the command in the guest. */
  exitCode: number;
  /** Only what the command printed (stdout + stderr), between the markers. */
  output: string;
  /** Everything on the serial console. */
  console: string;
  /** QEMU's stderr. */
  stderr: string;
  /** `@@VRDMA-WARN ...@@` lines printed by /init (e.g. a module that failed to load). */
  warnings: string[];
  /** Spawn to QEMU exit (or teardown after the exit marker). */
  durationMs: number;
  /** Spawn to the begin marker: kernel boot + module loading. */
  bootMs: number;
  /** Set when the temp dir was kept (keepTempDir). */
  tempDir?: string;
}

export type GuestErrorKind =
  | 'image-missing' // no built image in the cache
  | 'qemu-missing' // QEMU binary not found
  | 'bad-options'
  | 'spawn' // QEMU could not be started
  | 'timeout' // deadline passed (run or waitForOutput)
  | 'qemu-exit' // QEMU ended before the command's exit marker
  | 'stopped'; // stop() / kill() ended the guest before the exit marker

export class GuestError extends Error {
  override readonly name = 'GuestError';
  constructor(
    readonly kind: GuestErrorKind,
    message: string,
    readonly details: {
      console?: string;
      stderr?: string;
      tempDir?: string;
      qemuExit?: { code: number | null; signal: NodeJS.Signals | null };
    } = {},
  ) {
    super(GuestError.compose(kind, message, details));
  }

  /** The serial console captured so far. */
  get console(): string {
    return this.details.console ?? '';
  }

  /** The kept temp dir of the failed run (initrd, console.log), if any. */
  get tempDir(): string | undefined {
    return this.details.tempDir;
  }

  private static compose(kind: GuestErrorKind, message: string, d: GuestError['details']): string {
    const parts = [`[${kind}] ${message}`];
    if (d.qemuExit) parts.push(`QEMU exit: code=${String(d.qemuExit.code)} signal=${String(d.qemuExit.signal)}`);
    if (d.tempDir) parts.push(`run files kept in ${d.tempDir}`);
    if (d.stderr?.trim()) parts.push(`--- QEMU stderr ---\n${tail(d.stderr, 20, 2000)}`);
    if (d.console !== undefined) parts.push(`--- serial console (tail) ---\n${tail(d.console, 40, 4000) || '(empty)'}`);
    return parts.join('\n');
  }
}

export interface GuestManifest {
  kernelRelease: string;
  kernelPackage: string;
  kernelPackageVersion: string;
  kernel: string;
  bootMode: string;
  bzImage: string;
  initrd: string;
  append: string;
  modulesLoaded: string[];
  modulesIncluded: string[];
}

export interface GuestImage {
  /** Kernel to boot (the uncompressed vmlinux for PVH boot when available). */
  kernel: string;
  initrd: string;
  /** Default kernel command line. */
  append: string;
  kernelRelease: string;
  dir: string;
  manifest: GuestManifest;
}

export interface RunningGuest {
  readonly pid: number;
  /** Temp dir of this run (removed after success unless keepTempDir). */
  readonly tempDir: string;
  /** Serial console so far. */
  readonly console: string;
  /** QEMU's stderr so far (its error_report messages). */
  readonly stderr: string;
  /** Resolves with the first match of `re` on the serial console (including what was already printed). */
  waitForOutput(re: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
  /** Send a signal to QEMU (default SIGTERM). */
  kill(signal?: NodeJS.Signals): void;
  /** Resolves when the command's exit marker was seen and QEMU is gone; rejects with GuestError otherwise. */
  result(): Promise<GuestResult>;
  /** Tear QEMU down (SIGTERM, SIGKILL after a grace period); resolves once it has exited. */
  stop(): Promise<void>;
}

// ---------------------------------------------------------------- image

const BUILD_HINT = 'run `bash images/guest/build.sh` (it builds and caches the guest kernel + initramfs)';

/** The image directory: guest/ for Debian 12's kernel, guest-backports/ with VRDMA_GUEST_FLAVOUR=backports (images/guest/flavour.sh). */
export function guestCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const root = env.VRDMA_CACHE || path.join(env.HOME || os.homedir(), '.cache', 'vrdma');
  const flavour = env.VRDMA_GUEST_FLAVOUR || 'bookworm';
  return path.join(root, flavour === 'bookworm' ? 'guest' : `guest-${flavour}`);
}

function isStringArray(v: unknown): v is string[] {
  return Array.isArray(v) && v.every((x) => typeof x === 'string');
}

function parseManifest(text: string, file: string): GuestManifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new GuestError('image-missing', `${file} is not valid JSON (${String(e)}); ${BUILD_HINT}`);
  }
  if (typeof raw !== 'object' || raw === null) {
    throw new GuestError('image-missing', `${file} is not a JSON object; ${BUILD_HINT}`);
  }
  const r = raw as Record<string, unknown>;
  const str = (k: string): string => {
    const v = r[k];
    if (typeof v !== 'string' || v === '') {
      throw new GuestError('image-missing', `${file}: field "${k}" missing; ${BUILD_HINT}`);
    }
    return v;
  };
  return {
    kernelRelease: str('kernelRelease'),
    kernelPackage: str('kernelPackage'),
    kernelPackageVersion: str('kernelPackageVersion'),
    kernel: str('kernel'),
    bootMode: str('bootMode'),
    bzImage: str('bzImage'),
    initrd: str('initrd'),
    append: str('append'),
    modulesLoaded: isStringArray(r.modulesLoaded) ? r.modulesLoaded : [],
    modulesIncluded: isStringArray(r.modulesIncluded) ? r.modulesIncluded : [],
  };
}

/**
 * The cached guest image. Throws GuestError('image-missing') telling to run
 * images/guest/build.sh when it is absent. Set VRDMA_GUEST_BZIMAGE=1 to boot
 * the compressed bzImage instead of the vmlinux (slower; for comparison).
 */
export function guestImage(env: NodeJS.ProcessEnv = process.env): GuestImage {
  const dir = guestCacheDir(env);
  const manifestFile = path.join(dir, 'manifest.json');
  if (!existsSync(manifestFile)) {
    throw new GuestError('image-missing', `no guest image in ${dir} (${manifestFile} not found); ${BUILD_HINT}`);
  }
  const manifest = parseManifest(readFileSync(manifestFile, 'utf8'), manifestFile);
  const kernel = path.join(dir, env.VRDMA_GUEST_BZIMAGE === '1' ? manifest.bzImage : manifest.kernel);
  const initrd = path.join(dir, manifest.initrd);
  for (const f of [kernel, initrd]) {
    if (!existsSync(f)) throw new GuestError('image-missing', `guest image incomplete: ${f} not found; ${BUILD_HINT}`);
  }
  return { kernel, initrd, append: manifest.append, kernelRelease: manifest.kernelRelease, dir, manifest };
}

export function qemuBinary(env: NodeJS.ProcessEnv = process.env): string {
  return env.VRDMA_QEMU || '/usr/bin/qemu-system-x86_64';
}

// ---------------------------------------------------------------- cpio

/** A cpio "newc" archive (what the kernel's initramfs unpacker reads). */
function cpioNewc(entries: { name: string; mode: number; data?: Uint8Array }[]): Buffer {
  const chunks: Buffer[] = [];
  let size = 0;
  const push = (b: Buffer): void => {
    chunks.push(b);
    size += b.length;
  };
  const pad4 = (): void => {
    if (size % 4) push(Buffer.alloc(4 - (size % 4)));
  };
  const mtime = Math.floor(Date.now() / 1000);
  const all = [...entries, { name: 'TRAILER!!!', mode: 0, data: undefined }];
  all.forEach((e, i) => {
    const data = e.data ?? new Uint8Array(0);
    const name = Buffer.from(`${e.name}\0`, 'utf8');
    const isTrailer = e.name === 'TRAILER!!!';
    const fields = [
      isTrailer ? 0 : 0x7000 + i, // ino
      e.mode,
      0, // uid
      0, // gid
      isTrailer ? 1 : (e.mode & 0o170000) === 0o040000 ? 2 : 1, // nlink
      isTrailer ? 0 : mtime,
      data.length,
      0,
      0, // devmajor, devminor
      0,
      0, // rdevmajor, rdevminor
      name.length,
      0, // check
    ];
    push(Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`, 'ascii'));
    push(name);
    pad4();
    if (data.length) {
      push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
      pad4();
    }
  });
  if (size % 512) push(Buffer.alloc(512 - (size % 512)));
  return Buffer.concat(chunks, size);
}

function commandArchive(command: string, files: GuestOptions['files']): Buffer {
  const dirs = new Set<string>(['vrdma']);
  const entries: { name: string; mode: number; data?: Uint8Array }[] = [];
  const addFile = (rel: string, data: string | Uint8Array, mode: number): void => {
    const norm = path.posix.normalize(rel);
    if (path.posix.isAbsolute(norm) || norm === '.' || norm.startsWith('..') || norm === 'cmd.sh') {
      throw new GuestError('bad-options', `files: "${rel}" must be a relative path inside /vrdma (and not cmd.sh)`);
    }
    const parts = norm.split('/');
    for (let i = 1; i < parts.length; i++) dirs.add(`vrdma/${parts.slice(0, i).join('/')}`);
    entries.push({ name: `vrdma/${norm}`, mode: 0o100000 | mode, data: typeof data === 'string' ? Buffer.from(data, 'utf8') : data });
  };
  entries.push({ name: 'vrdma/cmd.sh', mode: 0o100755, data: Buffer.from(command.endsWith('\n') ? command : `${command}\n`, 'utf8') });
  for (const [rel, f] of Object.entries(files ?? {})) {
    if (typeof f === 'string' || f instanceof Uint8Array) addFile(rel, f, rel.endsWith('.sh') ? 0o755 : 0o644);
    else addFile(rel, f.data, f.mode ?? (rel.endsWith('.sh') ? 0o755 : 0o644));
  }
  const dirEntries = [...dirs].sort().map((name) => ({ name, mode: 0o040755 }));
  return cpioNewc([...dirEntries, ...entries]);
}

// ---------------------------------------------------------------- process registry

/** Running QEMUs -> their temp dir (to remove if the runner exits under them), or null to keep. */
const live = new Map<ChildProcess, string | null>();
const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
let handlersInstalled = false;

function killAllNow(): void {
  for (const [c, dir] of live) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* already gone */
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
  live.clear();
}

function onSignal(sig: NodeJS.Signals): void {
  killAllNow();
  // If nobody else handles this signal, restore the default behaviour (die by it).
  if (process.listenerCount(sig) <= 1) {
    uninstallHandlers();
    process.kill(process.pid, sig);
  }
}

function installHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on('exit', killAllNow);
  for (const s of SIGNALS) process.on(s, onSignal);
}

function uninstallHandlers(): void {
  if (!handlersInstalled) return;
  handlersInstalled = false;
  process.removeListener('exit', killAllNow);
  for (const s of SIGNALS) process.removeListener(s, onSignal);
}

let setprivPath: string | null | undefined;
function setpriv(): string | null {
  if (setprivPath === undefined) {
    setprivPath = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p)) ?? null;
  }
  return setprivPath;
}

// ---------------------------------------------------------------- helpers

function tail(text: string, lines: number, chars: number): string {
  const t = text.split('\n').slice(-lines).join('\n');
  return t.length > chars ? `...${t.slice(-chars)}` : t;
}

const BEGIN_RE = /@@VRDMA-BEGIN@@\r?\n/;
const EXIT_RE = /\r?\n@@VRDMA-EXIT (-?\d+)@@/;
const WARN_RE = /@@VRDMA-WARN ([^\n]*?)@@/g;
const GRACE_MS = 2000; // SIGTERM -> SIGKILL
const POWEROFF_MS = 3000; // exit marker seen -> QEMU should have powered off

function buildArgs(opts: GuestOptions, image: GuestImage, initrd: string): string[] {
  const mem = opts.memMiB ?? 256;
  const cpus = opts.cpus ?? 1;
  if (!Number.isInteger(mem) || mem < 64) throw new GuestError('bad-options', `memMiB must be an integer >= 64 (got ${mem})`);
  if (!Number.isInteger(cpus) || cpus < 1) throw new GuestError('bad-options', `cpus must be an integer >= 1 (got ${cpus})`);
  const append = [image.append, opts.append ?? ''].join(' ').trim();
  const args = [
    '-machine', opts.machine ?? 'q35',
    '-accel', opts.accel ?? 'tcg',
    '-cpu', 'max',
    '-m', `${mem}M`,
    '-smp', String(cpus),
    '-nodefaults',
    '-no-reboot',
    '-display', 'none',
    '-serial', 'stdio',
    '-kernel', image.kernel,
    '-initrd', initrd,
    '-append', append,
  ];
  if (opts.sharedMemory) {
    args.push('-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`, '-numa', 'node,memdev=mem');
  }
  args.push(...(opts.extraArgs ?? []));
  return args;
}

// ---------------------------------------------------------------- run

/** Boots the guest and runs `opts.command`; resolves when it finished. */
export async function runInGuest(opts: GuestOptions): Promise<GuestResult> {
  return startGuest(opts).result();
}

/** Boots the guest in the background. Always call result() or stop() so the run is cleaned up. */
export function startGuest(opts: GuestOptions): RunningGuest {
  const env: NodeJS.ProcessEnv = { ...process.env, ...(opts.env ?? {}) };
  const image = opts.image ?? guestImage(env);
  const qemu = opts.qemu ?? qemuBinary(env);
  if (!existsSync(qemu)) {
    throw new GuestError('qemu-missing', `QEMU not found at ${qemu}: apt-get install qemu-system-x86, or set VRDMA_QEMU`);
  }
  const timeoutMs = opts.timeoutMs ?? 45_000;

  const tempDir = mkdtempSync(path.join(os.tmpdir(), 'vrdma-guest-'));
  let args: string[];
  const logFds: number[] = [];
  try {
    // base initramfs, zero-padded to 4 bytes (the kernel wants each cpio
    // header 4-byte aligned; zeros between archives are skipped), then ours.
    const base = readFileSync(image.initrd);
    const padded = base.length % 4 ? Buffer.concat([base, Buffer.alloc(4 - (base.length % 4))]) : base;
    const initrd = path.join(tempDir, 'initrd.img');
    writeFileSync(initrd, Buffer.concat([padded, commandArchive(opts.command, opts.files)]));
    writeFileSync(path.join(tempDir, 'cmd.sh'), opts.command);
    args = buildArgs(opts, image, initrd);
    writeFileSync(path.join(tempDir, 'qemu-cmdline.txt'), [qemu, ...args].map((a) => (/[\s'"]/.test(a) ? `'${a}'` : a)).join(' ') + '\n');
    logFds.push(openSync(path.join(tempDir, 'console.log'), 'w'));
    if (opts.logFile) logFds.push(openSync(opts.logFile, 'w'));
  } catch (e) {
    for (const fd of logFds) closeSync(fd);
    rmSync(tempDir, { recursive: true, force: true });
    throw e;
  }

  const log = (s: string): void => {
    for (const fd of logFds) {
      try {
        writeSync(fd, s);
      } catch {
        /* logging must not break the run */
      }
    }
  };
  const closeLogs = (): void => {
    for (const fd of logFds.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        /* ignore */
      }
    }
  };

  const sp = setpriv();
  const [file, argv] = sp ? [sp, ['--pdeathsig', 'SIGKILL', '--', qemu, ...args]] : [qemu, args];
  const start = Date.now();
  const child = spawn(file, argv, { env, stdio: ['pipe', 'pipe', 'pipe'] });
  installHandlers();
  if (child.pid !== undefined) live.set(child, opts.keepTempDir ? null : tempDir);

  let consoleText = '';
  let stderrText = '';
  let bootMs = -1;
  let exitCode: number | undefined;
  let exitSeenAt = 0;
  let exitScanFrom = -1; // where to look for the exit marker next (after the begin marker)
  let failure: GuestError | undefined;
  let stopRequested = false;
  let closed = false;
  const outDecoder = new StringDecoder('utf8');
  const errDecoder = new StringDecoder('utf8');
  const timers = new Set<NodeJS.Timeout>();
  const waiters = new Set<{ re: RegExp; resolve: (m: RegExpExecArray) => void; reject: (e: Error) => void; timer?: NodeJS.Timeout }>();

  const details = (): GuestError['details'] => ({ console: consoleText, stderr: stderrText, tempDir });

  let resolveClosed!: () => void;
  const closedPromise = new Promise<void>((r) => (resolveClosed = r));

  const later = (ms: number, fn: () => void): NodeJS.Timeout => {
    const t = setTimeout(() => {
      timers.delete(t);
      fn();
    }, ms);
    timers.add(t);
    return t;
  };

  const terminate = (): void => {
    if (closed) return;
    try {
      child.kill('SIGTERM');
    } catch {
      /* gone */
    }
    later(GRACE_MS, () => {
      if (!closed) child.kill('SIGKILL');
    });
  };

  const fail = (e: GuestError): void => {
    if (!failure && exitCode === undefined) failure = e;
    terminate();
  };

  const checkWaiters = (): void => {
    for (const w of waiters) {
      w.re.lastIndex = 0;
      const m = w.re.exec(consoleText);
      if (m) {
        waiters.delete(w);
        if (w.timer) clearTimeout(w.timer);
        w.resolve(m);
      }
    }
  };

  child.stdout?.on('data', (chunk: Buffer) => {
    const s = outDecoder.write(chunk);
    consoleText += s;
    log(s);
    if (bootMs < 0) {
      const begin = BEGIN_RE.exec(consoleText);
      if (begin) {
        bootMs = Date.now() - start;
        exitScanFrom = begin.index + begin[0].length - 1; // keep the '\n': output may be empty
      }
    }
    if (exitCode === undefined && exitScanFrom >= 0) {
      const m = EXIT_RE.exec(consoleText.slice(exitScanFrom));
      exitScanFrom = Math.max(exitScanFrom, consoleText.length - 64);
      if (m?.[1] !== undefined) {
        exitCode = Number(m[1]);
        exitSeenAt = Date.now();
        // /init powers off right after the marker; do not wait long for it.
        later(POWEROFF_MS, terminate);
      }
    }
    checkWaiters();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    const s = errDecoder.write(chunk);
    stderrText += s;
    log(s.replace(/^(?=.)/gm, '[qemu stderr] '));
  });
  // stdin stays open and unused: QEMU's stdio chardev reads it.
  child.stdin?.on('error', () => undefined);

  child.on('error', (err) => {
    fail(new GuestError('spawn', `failed to start ${qemu}: ${err.message}`, details()));
    if (child.pid === undefined) onClose(null, null);
  });

  const overall = later(timeoutMs, () => {
    fail(new GuestError('timeout', `guest did not finish within ${timeoutMs} ms (command: ${JSON.stringify(opts.command.slice(0, 200))})`, details()));
  });

  let settle!: { resolve: (r: GuestResult) => void; reject: (e: Error) => void };
  const resultPromise = new Promise<GuestResult>((resolve, reject) => (settle = { resolve, reject }));
  resultPromise.catch(() => undefined); // a caller that only stop()s must not get an unhandled rejection

  function onClose(code: number | null, signal: NodeJS.Signals | null): void {
    if (closed) return;
    closed = true;
    live.delete(child);
    if (live.size === 0) uninstallHandlers();
    clearTimeout(overall);
    for (const t of timers) clearTimeout(t);
    timers.clear();
    consoleText += outDecoder.end();
    stderrText += errDecoder.end();
    const qemuExit = { code, signal };
    const durationMs = (exitSeenAt && code === null ? exitSeenAt : Date.now()) - start;
    log(`\n[harness] QEMU exited: code=${String(code)} signal=${String(signal)} after ${Date.now() - start} ms\n`);
    closeLogs();

    let err: GuestError | undefined;
    if (exitCode === undefined) {
      err =
        failure ??
        (stopRequested
          ? new GuestError('stopped', 'guest stopped before the command finished', { console: consoleText, stderr: stderrText, qemuExit })
          : new GuestError(
              'qemu-exit',
              bootMs < 0
                ? 'QEMU exited before the guest started the command (boot failure? see console)'
                : 'QEMU exited before the command printed its exit marker (the command powered off or crashed the guest?)',
              { ...details(), qemuExit },
            ));
    }
    for (const w of waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(err ?? new GuestError('qemu-exit', `guest ended before the console matched ${String(w.re)}`, { ...details(), qemuExit }));
    }
    waiters.clear();
    resolveClosed();

    if (err) {
      // Failures keep the temp dir for inspection (its path is in the message);
      // an explicit stop()/kill() does not.
      if (err.kind === 'stopped' && !opts.keepTempDir) rmSync(tempDir, { recursive: true, force: true });
      settle.reject(err);
      return;
    }
    const begin = BEGIN_RE.exec(consoleText);
    const from = begin ? begin.index + begin[0].length : 0;
    const rest = consoleText.slice(from - 1);
    const m = EXIT_RE.exec(rest);
    const output = m ? rest.slice(1, m.index) : consoleText.slice(from);
    const warnings = [...consoleText.slice(0, begin?.index ?? consoleText.length).matchAll(WARN_RE)].map((w) => w[1] ?? '');
    const keep = opts.keepTempDir === true;
    if (!keep) rmSync(tempDir, { recursive: true, force: true });
    settle.resolve({
      exitCode: exitCode ?? -1,
      output,
      console: consoleText,
      stderr: stderrText,
      warnings,
      durationMs,
      bootMs,
      ...(keep ? { tempDir } : {}),
    });
  }
  child.on('close', onClose);

  return {
    get pid(): number {
      return child.pid ?? -1;
    },
    tempDir,
    get console(): string {
      return consoleText;
    },
    get stderr(): string {
      return stderrText;
    },
    waitForOutput(re: RegExp, waitMs = timeoutMs): Promise<RegExpExecArray> {
      return new Promise<RegExpExecArray>((resolve, reject) => {
        re.lastIndex = 0;
        const m = re.exec(consoleText);
        if (m) return resolve(m);
        if (closed) {
          return reject(new GuestError('qemu-exit', `guest already ended; console never matched ${String(re)}`, details()));
        }
        const w: { re: RegExp; resolve: (m: RegExpExecArray) => void; reject: (e: Error) => void; timer?: NodeJS.Timeout } = { re, resolve, reject };
        w.timer = setTimeout(() => {
          waiters.delete(w);
          reject(new GuestError('timeout', `console did not match ${String(re)} within ${waitMs} ms`, details()));
        }, waitMs);
        waiters.add(w);
      });
    },
    kill(signal: NodeJS.Signals = 'SIGTERM'): void {
      if (closed) return;
      stopRequested = true;
      child.kill(signal);
    },
    result(): Promise<GuestResult> {
      return resultPromise;
    },
    async stop(): Promise<void> {
      if (!closed) {
        stopRequested = true;
        terminate();
      }
      await closedPromise;
    },
  };
}
