/**
 * The vhost-user-rdma-pci device (QEMU 10.0 + images/qemu/0001-vhost-user-rdma-pci.patch,
 * built by images/qemu/build.sh) with `vrdma serve --device rdma` as its back-end.
 *
 * There is no guest driver yet, so the guest drives the device with `vdrv.sh`
 * below: a few lines of busybox sh + devmem that speak virtio-pci (modern) to it
 * directly (the stock virtio_pci driver is unbound first). The control queue's
 * memory is a 64 KiB range the guest kernel is told to leave alone
 * (`memmap=64K$0x8000000`).
 *
 * These tests FAIL when the binary is missing: run `bash images/qemu/build.sh`
 * (scripts/setup.sh should do it). VRDMA_QEMU_RDMA overrides the binary.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Qmp, migrate } from './qmp.js';
import { BackendProcess } from '../support/backend-process.js';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { runInGuest, startGuest, type RunningGuest } from './guest.js';

const QEMU =
  process.env.VRDMA_QEMU_RDMA ||
  join(process.env.VRDMA_CACHE || join(homedir(), '.cache', 'vrdma'), 'qemu', 'current', 'bin', 'qemu-system-x86_64');

const CQ_SLOTS = 4;
const QP_SLOTS = 8;
const NUM_QUEUES = 1 + CQ_SLOTS + 2 * QP_SLOTS; // 21
const RING_GPA = 0x8000000; // 128 MiB: inside the 256 MiB of RAM, clear of the PVH-loaded kernel at 16 MiB
const APPEND = `memmap=64K$0x${RING_GPA.toString(16)}`;

// Control commands (docs/virtio-rdma.md §4).
const QUERY_DEVICE = 1;
const QUERY_GID = 3;
const CREATE_PD = 5;
const DESTROY_PD = 6;

/**
 * vdrv.sh: a minimal virtio-pci modern driver for the vhost-user-rdma device.
 *   sh vdrv.sh probe           identity, config space, MSI-X size, device features
 *   sh vdrv.sh start           reset, negotiate VERSION_1, set up vq 0 (control), DRIVER_OK
 *   sh vdrv.sh cmd CMD [W...]  one control command with request words W (u32);
 *                              prints "cmd=CMD status=S len=L resp=w0,w1,..."
 * (No ${...} in here: this is a JS template literal.)
 */
const VDRV = String.raw`#!/bin/sh
set -e
RING=${RING_GPA}
QSIZE=16
DESC=$RING
AVAIL=$((RING + 256))
USED=$((RING + 512))
REQ=$((RING + 4096))
RESP=$((RING + 8192))

PCI=
for d in /sys/bus/pci/devices/*; do
	if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x106a ]; then PCI=$d; fi
done
[ -n "$PCI" ] || { echo "vdrv: no 1af4:106a device" >&2; exit 1; }
BDF=$(basename $PCI)

c8() { od -An -tu1 -j $1 -N1 $PCI/config | tr -d ' '; }
c16() { od -An -tu2 -j $1 -N2 $PCI/config | tr -d ' '; }
c32() { od -An -tu4 -j $1 -N4 $PCI/config | tr -d ' '; }
rd() { echo $(( $(devmem $1 $2) )); }
wr() { devmem $1 $2 $3; }
bar() { sed -n "$(($1 + 1))p" $PCI/resource | cut -d' ' -f1; }

# Take the device from virtio_pci; memory decoding + bus mastering on.
if [ -e $PCI/driver ]; then echo $BDF > $PCI/driver/unbind; fi
echo 1 > $PCI/enable
cmd=$(( $(c16 4) | 6 ))
printf "\\$(printf %03o $((cmd & 255)))\\$(printf %03o $((cmd >> 8)))" | dd of=$PCI/config bs=2 seek=2 count=1 conv=notrunc 2>/dev/null

# virtio vendor capabilities (type 1 common, 2 notify, 4 device) and MSI-X.
COMMON= NOTIFY= MULT= DEVCFG= MSIX=0
p=$(c8 52)
while [ "$p" -ne 0 ]; do
	id=$(c8 $p)
	if [ "$id" -eq 9 ]; then
		t=$(c8 $((p + 3)))
		a=$(( $(bar $(c8 $((p + 4)))) + $(c32 $((p + 8))) ))
		case $t in
		1) COMMON=$a ;;
		2) NOTIFY=$a; MULT=$(c32 $((p + 16))) ;;
		4) DEVCFG=$a ;;
		esac
	elif [ "$id" -eq 17 ]; then
		MSIX=$(( ($(c16 $((p + 2))) & 2047) + 1 ))
	fi
	p=$(c8 $((p + 1)))
done
[ -n "$COMMON" ] && [ -n "$NOTIFY" ] && [ -n "$DEVCFG" ] || { echo "vdrv: virtio capabilities missing" >&2; exit 1; }
STATUS=$((COMMON + 20))

probe() {
	echo "config: abi=$(rd $DEVCFG 32) cq_slots=$(rd $((DEVCFG + 4)) 16) qp_slots=$(rd $((DEVCFG + 6)) 16) max_qp=$(rd $((DEVCFG + 20)) 32) phys_port_cnt=$(rd $((DEVCFG + 58)) 8)"
	echo "num_queues=$(rd $((COMMON + 18)) 16) msix=$MSIX"
	wr $COMMON 32 0
	f0=$(rd $((COMMON + 4)) 32)
	wr $COMMON 32 1
	f1=$(rd $((COMMON + 4)) 32)
	printf 'device_features=0x%08x%08x\n' $f1 $f0
}

start() {
	wr $STATUS 8 0
	while [ "$(rd $STATUS 8)" -ne 0 ]; do :; done
	wr $STATUS 8 1
	wr $STATUS 8 3
	wr $((COMMON + 8)) 32 1; wr $((COMMON + 12)) 32 1 # VERSION_1 (bit 32)
	wr $((COMMON + 8)) 32 0; wr $((COMMON + 12)) 32 0
	wr $STATUS 8 11
	[ $(( $(rd $STATUS 8) & 8 )) -ne 0 ] || { echo "vdrv: FEATURES_OK refused" >&2; exit 1; }
	wr $((COMMON + 22)) 16 0 # queue_select 0: the control queue
	max=$(rd $((COMMON + 24)) 16)
	wr $((COMMON + 24)) 16 $QSIZE
	wr $((COMMON + 32)) 32 $DESC; wr $((COMMON + 36)) 32 0
	wr $((COMMON + 40)) 32 $AVAIL; wr $((COMMON + 44)) 32 0
	wr $((COMMON + 48)) 32 $USED; wr $((COMMON + 52)) 32 0
	wr $AVAIL 16 1 # VRING_AVAIL_F_NO_INTERRUPT: nobody handles the IRQ
	wr $((AVAIL + 2)) 16 0
	wr $((USED + 2)) 16 0
	wr $((COMMON + 28)) 16 1 # queue_enable
	wr $STATUS 8 15 # DRIVER_OK
	echo "started: vq 0 size $QSIZE (max $max), status=$(rd $STATUS 8)"
}

command() { # CMD [WORD...]
	code=$1
	shift
	wr $REQ 32 $code
	wr $((REQ + 4)) 32 0
	n=0
	for w in "$@"; do wr $((REQ + 8 + 4 * n)) 32 $w; n=$((n + 1)); done
	wr $DESC 32 $REQ; wr $((DESC + 4)) 32 0; wr $((DESC + 8)) 32 $((8 + 4 * n))
	wr $((DESC + 12)) 16 1; wr $((DESC + 14)) 16 1 # NEXT -> 1
	wr $((DESC + 16)) 32 $RESP; wr $((DESC + 20)) 32 0; wr $((DESC + 24)) 32 128
	wr $((DESC + 28)) 16 2; wr $((DESC + 30)) 16 0 # WRITE
	wr $RESP 32 0xffffffff
	idx=$(rd $((AVAIL + 2)) 16)
	wr $((AVAIL + 4 + 2 * (idx % QSIZE))) 16 0
	next=$(((idx + 1) & 65535))
	wr $((AVAIL + 2)) 16 $next
	wr $((COMMON + 22)) 16 0
	wr $((NOTIFY + $(rd $((COMMON + 30)) 16) * MULT)) 16 0 # kick vq 0
	tries=0
	while [ "$(rd $((USED + 2)) 16)" -ne $next ]; do
		tries=$((tries + 1))
		[ $tries -lt 3000 ] || { echo "vdrv: command $code: no completion" >&2; exit 1; }
	done
	len=$(rd $((USED + 8 + 8 * (idx % QSIZE))) 32)
	words=
	i=0
	while [ $((8 + 4 * i)) -lt $len ]; do
		words="$words$(rd $((RESP + 8 + 4 * i)) 32),"
		i=$((i + 1))
	done
	echo "cmd=$code status=$(rd $RESP 32) len=$len resp=$words"
}

case "$1" in
probe) probe ;;
start) start ;;
cmd) shift; command "$@" ;;
*) echo "usage: vdrv.sh probe|start|cmd CMD [WORD...]" >&2; exit 2 ;;
esac
`;

interface CmdResult {
  status: number;
  len: number;
  resp: number[];
}

/** All "cmd=N ..." lines printed by vdrv.sh for command `code`, in order. */
function cmdResults(output: string, code: number): CmdResult[] {
  return [...output.matchAll(new RegExp(`^cmd=${code} status=(\\d+) len=(\\d+) resp=([\\d,]*)`, 'gm'))].map((m) => ({
    status: Number(m[1]),
    len: Number(m[2]),
    resp: (m[3] ?? '').split(',').filter((w) => w !== '').map(Number),
  }));
}

function deviceArgs(socket: string, extra = ''): string[] {
  return ['-chardev', `socket,id=vrdma0,path=${socket}`, '-device', `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${CQ_SLOTS},qp-slots=${QP_SLOTS}${extra}`];
}

/** One RoCEv2 port for the test's back-ends: a migration's destination takes the source's address over. */
const ROCE_PORT = randomRocePort();

function serveArgs(socket: string, gid = '127.0.0.1'): string[] {
  return ['serve', '--device', 'rdma', '--socket', socket, '--cq-slots', String(CQ_SLOTS), '--qp-slots', String(QP_SLOTS), '--gid', gid, '--roce-port', String(ROCE_PORT), '--log-level', 'debug'];
}

describe('vhost-user-rdma-pci (patched QEMU 10.0) with vrdma serve --device rdma', () => {
  let dir: string;
  let socket: string;
  let backend: BackendProcess;

  beforeEach(async () => {
    if (!existsSync(QEMU)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU}: run \`bash images/qemu/build.sh\``);
    dir = mkdtempSync(join(tmpdir(), 'vrdma-qemu-rdma-'));
    socket = join(dir, 'rdma.sock');
    backend = new BackendProcess(serveArgs(socket));
    await backend.waitFor(/listening on/);
  });

  afterEach(async () => {
    await backend.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('appears as 1af4:106a, serves the back-end config space and negotiates with the back-end', async () => {
    const res = await runInGuest({
      qemu: QEMU,
      command: 'lspci -nk; sh vdrv.sh probe',
      files: { 'vdrv.sh': VDRV },
      sharedMemory: true,
      extraArgs: deviceArgs(socket),
      timeoutMs: 90_000,
    });
    expect(res.exitCode, res.console).toBe(0);
    expect(res.output).toMatch(/^\S+ 0280: 1af4:106a \(rev 01\)\n\tKernel driver in use: virtio-pci$/m);
    // config space comes from the back-end (GET_CONFIG)
    expect(res.output).toContain(`config: abi=1 cq_slots=${CQ_SLOTS} qp_slots=${QP_SLOTS} max_qp=${QP_SLOTS} phys_port_cnt=1`);
    // one vector per queue + config
    expect(res.output).toContain(`num_queues=${NUM_QUEUES} msix=${NUM_QUEUES + 1}`);
    const features = BigInt(/device_features=(0x[0-9a-f]+)/.exec(res.output)?.[1] ?? '0');
    expect(features & (1n << 32n)).toBe(1n << 32n); // VERSION_1
    expect(features & (1n << 28n)).toBe(1n << 28n); // RING_INDIRECT_DESC
    expect(features & (1n << 29n)).toBe(1n << 29n); // RING_EVENT_IDX
    expect(features & ((1n << 30n) | (1n << 26n))).toBe(0n); // vhost-user's PROTOCOL_FEATURES and LOG_ALL stay hidden
    // device-specific bits pass through from the back-end: only VIRTIO_RDMA_F_IB_GRH (bit 0) is defined
    expect(features & ((1n << 24n) - 1n)).toBe(1n);

    await backend.waitFor(/front-end disconnected/);
    const log = backend.output;
    expect(log).toMatch(/<- GET_FEATURES/);
    const proto = BigInt(/protocol features acked (0x[0-9a-f]+)/.exec(log)?.[1] ?? '0');
    expect(proto & (1n << 9n)).toBe(1n << 9n); // CONFIG
    expect(proto & (1n << 19n)).toBe(1n << 19n); // DEVICE_STATE
    expect(log).toMatch(/<- GET_QUEUE_NUM/);
    expect(log).toMatch(/<- GET_CONFIG offset 0 size 128/);
    // every virtqueue got its call fd at init (vhost_dev_init), and no more than those
    expect(log).toMatch(new RegExp(`<- SET_VRING_CALL 0x${(NUM_QUEUES - 1).toString(16)} fds=1`));
    expect(log).not.toMatch(new RegExp(`<- SET_VRING_CALL 0x${NUM_QUEUES.toString(16)} `));
    // The stock driver does not know device 42: no DRIVER_OK, so vhost never starts.
    expect(log).not.toMatch(/<- SET_FEATURES|<- SET_MEM_TABLE|<- ADD_MEM_REG|<- SET_VRING_ADDR/);
  });

  it('hands the rings and guest memory to the back-end at DRIVER_OK and runs control commands', async () => {
    const res = await runInGuest({
      qemu: QEMU,
      command: `sh vdrv.sh start && sh vdrv.sh cmd ${QUERY_DEVICE} && sh vdrv.sh cmd ${CREATE_PD} && sh vdrv.sh cmd ${DESTROY_PD} 4242 0`,
      files: { 'vdrv.sh': VDRV },
      append: APPEND,
      sharedMemory: true,
      extraArgs: deviceArgs(socket),
      timeoutMs: 120_000,
    });
    expect(res.exitCode, res.console).toBe(0);
    // max: queue-size (256), except that QEMU 10.0.13's virtio_add_queue() offers
    // every queue at 1024 ("always set to max queue size for qemu <11.1").
    expect(res.output).toMatch(/started: vq 0 size 16 \(max (256|1024)\), status=15/);
    const [query] = cmdResults(res.output, QUERY_DEVICE);
    expect(query, res.output).toBeDefined();
    expect(query!.status).toBe(0);
    expect(query!.len).toBe(8 + 120);
    expect(query!.resp[15]).toBe(QP_SLOTS); // max_qp (byte offset 60)
    const [pd] = cmdResults(res.output, CREATE_PD);
    expect(pd!.status).toBe(0);
    expect(pd!.resp[0]).toBeGreaterThan(0); // pdn
    expect(cmdResults(res.output, DESTROY_PD)[0]!.status).toBe(2); // ENOENT: no PD 4242

    await backend.waitFor(/front-end disconnected/);
    const log = backend.output;
    expect(log).toMatch(/features acked 0x1[0-9a-f]{8}\b/); // VERSION_1 (bit 32) from the guest
    expect(log).toMatch(/<- (SET_MEM_TABLE|ADD_MEM_REG)/);
    expect(log).toMatch(/memory region /); // the guest RAM (memfd) mapped
    expect(log).toMatch(/<- SET_VRING_NUM vq 0 num 16/);
    expect(log).toMatch(/<- SET_VRING_ADDR vq 0 /);
    expect(log).toMatch(/<- SET_VRING_KICK 0x0/);
    expect(log).toMatch(/vq 0: started \(size 16/);
    // The negotiation ends with the guest driver running, and the vrings came after the memory table.
    expect(log).toMatch(/status DRIVER_OK: the guest driver is running/);
    expect(log.indexOf('memory region ')).toBeLessThan(log.indexOf('vq 0: started'));
  });

  it('refuses a slot mismatch with the back-end and impossible queue counts, with clear errors', () => {
    const run = (device: string): { status: number | null; stderr: string } => {
      const r = spawnSync(
        QEMU,
        ['-machine', 'q35', '-accel', 'tcg', '-nodefaults', '-display', 'none', '-S', '-chardev', `socket,id=vrdma0,path=${socket}`, '-device', device],
        { encoding: 'utf8', timeout: 30_000 },
      );
      return { status: r.status, stderr: r.stderr };
    };
    const mismatch = run('vhost-user-rdma-pci,chardev=vrdma0,cq-slots=4,qp-slots=4');
    expect(mismatch.status).toBe(1);
    expect(mismatch.stderr).toContain('the back-end serves 4 CQ slots and 8 QP slots but the device has cq-slots=4 and qp-slots=4');
    const tooMany = run('vhost-user-rdma-pci,chardev=vrdma0,cq-slots=100,qp-slots=500');
    expect(tooMany.status).toBe(1);
    expect(tooMany.stderr).toContain('1 + 100 + 2 * 500 = 1101 virtqueues, more than the 1024');
    const badSize = run('vhost-user-rdma-pci,chardev=vrdma0,cq-slots=4,qp-slots=8,queue-size=100');
    expect(badSize.status).toBe(1);
    expect(badSize.stderr).toContain('queue-size must be a power of 2');
    const noChardev = run('vhost-user-rdma-pci');
    expect(noChardev.status).toBe(1);
    expect(noChardev.stderr).toContain('the chardev property is required');
  });

  it("migrates: the back-end's state moves to the destination's back-end (DEVICE_STATE)", async () => {
    const dstSocket = join(dir, 'rdma-dst.sock');
    // The GID belongs to the VM: the destination serves the same one, and takes its address once the VM runs there.
    const dstBackend = new BackendProcess([...serveArgs(dstSocket), '--incoming']);
    const qmpSock = join(dir, 'qmp.sock');
    const dstQmpSock = join(dir, 'qmp-dst.sock');
    const incoming = join(dir, 'migrate.sock');
    let src: RunningGuest | undefined;
    let dst: RunningGuest | undefined;
    try {
      await dstBackend.waitFor(/listening on/);
      // The guest makes a PD on the source, then keeps querying GID 0 for
      // 40 times, a few seconds under TCG (the device stays busy while RAM
      // is copied; the test migrates at once, which takes about a second), checking the answer never
      // changes. Then, on the destination, it destroys the PD twice: OK (the
      // PD came along), then ENOENT.
      const command = [
        'sh vdrv.sh start',
        `out=$(sh vdrv.sh cmd ${CREATE_PD}); echo "$out"`,
        `pdn=$(echo "$out" | sed -n 's/.*resp=\\([0-9]*\\),.*/\\1/p')`,
        `gid0=$(sh vdrv.sh cmd ${QUERY_GID} 1 0); echo "$gid0"`,
        'echo MIGRATE-NOW',
        'polls=0',
        `while gid=$(sh vdrv.sh cmd ${QUERY_GID} 1 0) && [ "$gid" = "$gid0" ] && [ $polls -lt 40 ]; do polls=$((polls + 1)); sleep 0.1; done`,
        'echo "$gid"',
        '[ "$gid" = "$gid0" ] || exit 9',
        'echo "MIGRATED after $polls polls"',
        `sh vdrv.sh cmd ${DESTROY_PD} $pdn 0`,
        `sh vdrv.sh cmd ${DESTROY_PD} $pdn 0`,
      ].join(' && ');
      const common = { qemu: QEMU, command, files: { 'vdrv.sh': VDRV }, append: APPEND, sharedMemory: true, timeoutMs: 150_000 };
      dst = startGuest({ ...common, extraArgs: [...deviceArgs(dstSocket), '-incoming', `unix:${incoming}`, '-qmp', `unix:${dstQmpSock},server=on,wait=off`] });
      await dstBackend.waitFor(/<- GET_CONFIG/);
      src = startGuest({ ...common, extraArgs: [...deviceArgs(socket), '-qmp', `unix:${qmpSock},server=on,wait=off`] });
      await src.waitForOutput(/^MIGRATE-NOW/m, 120_000);
      const pdn = Number(/^cmd=5 status=0 len=16 resp=(\d+),/m.exec(src.console)?.[1]);
      expect(pdn).toBeGreaterThan(0);

      const qmp = await Qmp.connect(qmpSock);
      const dstQmp = await Qmp.connect(dstQmpSock);
      try {
        const result = await migrate(qmp, `unix:${incoming}`);
        expect(result.status, result.error ?? '').toBe('completed');
        expect(await qmp.status()).toBe('postmigrate');
        expect(await dstQmp.status()).toBe('running');
      } finally {
        qmp.close();
        dstQmp.close();
      }

      const exit = await dst.waitForOutput(/@@VRDMA-EXIT (\d+)@@/, 90_000);
      const out = dst.console;
      expect(exit[1], out).toBe('0');
      expect(out).toMatch(/MIGRATED after \d+ polls/);
      const destroys = cmdResults(out, DESTROY_PD);
      expect(destroys.map((d) => d.status)).toEqual([0, 2]);
      // GID 0 is ::ffff:127.0.0.1 on both sides (last word, network order): the VM kept its address
      const gids = [...cmdResults(src.console, QUERY_GID), ...cmdResults(out, QUERY_GID)].map((g) => g.resp[3]);
      expect(gids[0]).toBe(0x0100007f);
      expect(gids[gids.length - 1]).toBe(0x0100007f);

      await backend.waitFor(/device state saved: \d+ bytes/);
      expect(backend.output).toMatch(/features acked 0x[0-9a-f]+ \(dirty logging on\)/); // RAM copy with vhost's dirty log
      expect(backend.output).toMatch(/dirty log set: \d+ bytes/);
      await dstBackend.waitFor(/device state loaded: \d+ bytes/);
      expect(dstBackend.output).toMatch(/vq 0: started/);
      // The address moved with the VM: the source gave it up after its save, the destination took it.
      expect(backend.output).toMatch(/RoCE address 127\.0\.0\.1:\d+ released/);
      await dstBackend.waitFor(/RoCE address 127\.0\.0\.1:\d+ held; running/);
    } finally {
      await src?.stop();
      await dst?.stop();
      await dstBackend.stop();
    }
  }, 150_000);
  it('refuses to migrate when the back-end lacks DEVICE_STATE: QMP reports the failure and the source VM keeps running', async () => {
    await backend.stop();
    backend = new BackendProcess([...serveArgs(socket), '--no-device-state']);
    await backend.waitFor(/listening on/);
    const dstSocket = join(dir, 'rdma-dst.sock');
    const dstBackend = new BackendProcess([...serveArgs(dstSocket), '--incoming']);
    const qmpSock = join(dir, 'qmp.sock');
    const incoming = join(dir, 'migrate.sock');
    let src: RunningGuest | undefined;
    let dst: RunningGuest | undefined;
    try {
      await dstBackend.waitFor(/listening on/);
      const command = [
        'sh vdrv.sh start',
        `sh vdrv.sh cmd ${CREATE_PD}`,
        'echo READY',
        // Alive ticks with a counter, so the test can see the guest still running after the failed migration.
        'i=0; while [ $i -lt 600 ]; do i=$((i + 1)); echo "alive $i"; sleep 0.1; done',
      ].join(' && ');
      const common = { qemu: QEMU, command, files: { 'vdrv.sh': VDRV }, append: APPEND, sharedMemory: true, timeoutMs: 150_000 };
      dst = startGuest({ ...common, extraArgs: [...deviceArgs(dstSocket), '-incoming', `unix:${incoming}`] });
      src = startGuest({ ...common, extraArgs: [...deviceArgs(socket), '-qmp', `unix:${qmpSock},server=on,wait=off`] });
      await src.waitForOutput(/^READY/m, 120_000);
      const qmp = await Qmp.connect(qmpSock);
      try {
        const result = await migrate(qmp, `unix:${incoming}`);
        expect(result.status).toBe('failed');
        // QMP names the device state that could not be saved; QEMU's log says why.
        expect(result.error ?? '').toMatch(/vhost-user-rdma\/backend/);
        expect(src.stderr).toMatch(/cannot migrate: the[\s\S]*VHOST_USER_PROTOCOL_F_DEVICE_STATE/);
        expect(await qmp.status()).toBe('running');
        const ticks = (): number => Math.max(0, ...[...src!.console.matchAll(/^alive (\d+)/gm)].map((m) => Number(m[1])));
        const before = ticks();
        await src.waitForOutput(new RegExp(`^alive ${before + 5}\\b`, 'm'), 30_000);
      } finally {
        qmp.close();
      }
      expect(dstBackend.output).not.toMatch(/device state loaded/);
    } finally {
      await src?.stop();
      await dst?.stop();
      await dstBackend.stop();
    }
  });
});
