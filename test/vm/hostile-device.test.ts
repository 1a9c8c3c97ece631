/**
 * The guest driver does not trust its device. One guest boots with fifteen
 * vhost-user-rdma-pci devices: one honest, thirteen each telling the
 * driver one lie (test/vm/lying-device.ts) — in config space, in a control
 * answer (values, status, used length, no answer at all) or in CQEs — and
 * one older device without VIRTIO_RDMA_F_IB_GRH, which must still work. The
 * honest device runs ibv_rc_pingpong before and after the lies; each lying
 * device gets the same attempt. The driver must refuse every lie with its
 * logged reason, fail the verb (or drop the CQE) instead of using the value,
 * and leave the kernel and the honest device unharmed; the module then
 * unloads with every device in whatever state the lies left it, and reloads.
 *
 * The back-ends run in this process (a real RdmaDevice on the loopback
 * engine behind each lying wrapper), over real vhost-user sockets.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Cmd, VIRTIO_RDMA_F_IB_GRH } from '../../backend/abi/constants.js';
import { CreateCqResp, CreateQpResp, CtrlStatus, Cqe, DeviceConfig, MrResp, QueryDeviceResp, QueryPortResp } from '../../backend/abi/structs.js';
import { RdmaDevice } from '../../backend/device/rdma-device.js';
import { LoopbackEngine } from '../../backend/engines/loopback/loopback-engine.js';
import { gidFromAddress } from '../../backend/gid.js';
import { Logger } from '../../virtio/log.js';
import { VhostUserBackend } from '../../virtio/vhost-user/backend.js';
import { VhostUserServer } from '../../virtio/vhost-user/server.js';
import { runInGuest } from './guest.js';
import { LyingRdmaDevice, type Lie } from './lying-device.js';
import { QEMU_RDMA, RDMA_SHELL, driverFiles, loadModules, rdmaUserFiles } from './vrdma-guest.js';

const SLOTS = 4;
const CMD_TIMEOUT_MS = 400;
/** Seconds a pingpong may take before the guest kills it (the CQE lies stall it for good). */
const STALL_S = 6;

/** Little-endian u32 at a response field (after the 8-byte status). */
const setResp32 = (a: Uint8Array, offset: number, v: number): void => new DataView(a.buffer, a.byteOffset).setUint32(CtrlStatus.size + offset, v, true);
const onCmd = (cmd: Cmd, lie: (a: Uint8Array, used: number) => number | null): Lie['answer'] => (c, a, used) => (c === cmd ? lie(a, used) : used);

interface Case {
  name: string;
  lie: Lie;
  /** When the lie bites: at probe (no ib_device), in a verb (the tools fail at once), or in CQEs (the tools wait for completions that never come). */
  bites: 'probe' | 'verb' | 'cqe' | 'never' | 'older';
  /** The driver's logged reason (after "virtio_rdma virtioN: "). */
  dmesg: RegExp | null;
}

const CASES: Case[] = [
  { name: 'honest', lie: {}, bites: 'never', dmesg: null },
  {
    name: 'abi-version',
    lie: { config: (c) => new DataView(c.buffer, c.byteOffset).setUint32(DeviceConfig.offsetOf('abi_version'), 2, true) },
    bites: 'probe',
    dmesg: /device ABI version 2, driver speaks 1/,
  },
  {
    name: 'two-ports',
    lie: { config: (c) => void (c[DeviceConfig.offsetOf('phys_port_cnt')] = 2) },
    bites: 'probe',
    dmesg: /impossible config: 4 CQ slots, 4 QP slots, \d+ GIDs, 2 ports/,
  },
  {
    name: 'no-qps',
    lie: { answer: onCmd(Cmd.QUERY_DEVICE, (a, used) => (setResp32(a, QueryDeviceResp.offsetOf('max_qp'), 0), used)) },
    bites: 'probe',
    dmesg: /QUERY_DEVICE: unusable limits \(qp 0,/,
  },
  {
    name: 'port-mtu',
    lie: { answer: onCmd(Cmd.QUERY_PORT, (a, used) => ((a[CtrlStatus.size + QueryPortResp.offsetOf('active_mtu')] = 7), used)) },
    bites: 'probe',
    dmesg: /QUERY_PORT: impossible answer \(state 4, mtu 7\/5,/,
  },
  {
    name: 'short-answer',
    lie: { answer: onCmd(Cmd.CREATE_CQ, () => CtrlStatus.size + 4) },
    bites: 'verb',
    dmesg: new RegExp(`command ${Cmd.CREATE_CQ}: used length 12, expected ${CtrlStatus.size + CreateCqResp.size}`),
  },
  {
    name: 'status-not-errno',
    lie: { answer: onCmd(Cmd.MODIFY_QP, (a) => (new DataView(a.buffer, a.byteOffset).setUint32(0, 0x7fffffff, true), CtrlStatus.size)) },
    bites: 'verb',
    dmesg: new RegExp(`command ${Cmd.MODIFY_QP}: status 2147483647 is not an errno value`),
  },
  {
    name: 'cq-slot',
    lie: { answer: onCmd(Cmd.CREATE_CQ, (a, used) => (setResp32(a, CreateCqResp.offsetOf('slot'), 999), used)) },
    bites: 'verb',
    dmesg: /CREATE_CQ: cqn \d+ in slot 999, which is not a free slot of 4/,
  },
  {
    name: 'qp-depth',
    lie: { answer: onCmd(Cmd.CREATE_QP, (a, used) => (setResp32(a, CreateQpResp.offsetOf('max_send_wr'), 0xffffffff), used)) },
    bites: 'verb',
    dmesg: /CREATE_QP: impossible answer \(qpn 0x[0-9a-f]+, slot \d+, wr 4294967295\//,
  },
  {
    name: 'mr-key',
    lie: { answer: onCmd(Cmd.REG_MR, (a, used) => (setResp32(a, MrResp.offsetOf('lkey'), 0), used)) },
    bites: 'verb',
    dmesg: /MR: device returned mrn \d+ with lkey 0x0 rkey 0x[0-9a-f]+/,
  },
  {
    name: 'silent',
    lie: { answer: onCmd(Cmd.MODIFY_QP, () => null) },
    bites: 'verb',
    dmesg: new RegExp(`command ${Cmd.MODIFY_QP}: no answer within ${CMD_TIMEOUT_MS} ms; control queue disabled until reset`),
  },
  {
    name: 'cqe-qpn',
    lie: { cqe: (c) => (new DataView(c.buffer, c.byteOffset).setUint32(Cqe.offsetOf('qp_num'), 0xabcdef, true), Cqe.size) },
    bites: 'cqe',
    dmesg: /cqn \d+: CQE for unknown qpn 0xabcdef dropped/,
  },
  {
    name: 'cqe-opcode',
    lie: { cqe: (c) => ((c[Cqe.offsetOf('opcode')] = 0xee), Cqe.size) },
    bites: 'cqe',
    dmesg: /cqn \d+: malformed CQE \(status \d+ opcode 238 flags 0x[0-9a-f]+\) dropped/,
  },
  { name: 'cqe-length', lie: { cqe: () => 7 }, bites: 'cqe', dmesg: /cqn \d+: CQE with used length 7 dropped/ },
  {
    name: 'no-ib-grh',
    lie: { hideFeatures: 1n << BigInt(VIRTIO_RDMA_F_IB_GRH) },
    bites: 'older',
    dmesg: /virtio_rdma\d+: .*; the device lacks VIRTIO_RDMA_F_IB_GRH: UD GRHs from IPv4 GIDs will not parse as IB GRHs/,
  },
];

const pciSlot = (i: number): string => (0x08 + i).toString(16).padStart(2, '0');

function script(order: string[]): string {
  const modules = order.filter((m) => m !== 'virtio_rdma.ko');
  const slots = CASES.map((_, i) => pciSlot(i)).join(' ');
  const byBite = (b: Case['bites']): string =>
    CASES.map((c, i) => [c, i] as const)
      .filter(([c]) => c.bites === b)
      .map(([c, i]) => `${pciSlot(i)}:${c.name}:${18600 + i}`)
      .join(' ');
  return String.raw`
${loadModules(modules)}
insmod virtio_rdma.ko cmd_timeout_ms=${CMD_TIMEOUT_MS}
${RDMA_SHELL}
PP="/vrdma/lib/ld-linux-x86-64.so.2 --library-path /vrdma/rdma-core/lib:/vrdma/lib /vrdma/rdma-core/bin/ibv_rc_pingpong"
ibname() { ls /sys/bus/pci/devices/0000:00:$1.0/virtio*/infiniband 2>/dev/null; }
map() { for s in ${slots}; do v=$(basename $(ls -d /sys/bus/pci/devices/0000:00:$s.0/virtio*)); echo "MAP $1 $s $v $(ibname $s)"; done; }
listening() { grep -q ":$(printf '%04X' $1) [0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
# pingpong SLOT:NAME:PORT SECONDS: server and client on one device, each killed after SECONDS
pingpong() {
  s=$(echo $1 | cut -d: -f1); n=$(echo $1 | cut -d: -f2); p=$(echo $1 | cut -d: -f3)
  d=$(ibname $s)
  [ -n "$d" ] || { echo "PP $n no-device"; return; }
  timeout $2 $PP -d $d -g 0 -p $p -n 5 > /tmp/$n-server.log 2>&1 & sp=$!
  while kill -0 $sp 2>/dev/null && ! listening $p; do sleep 0.05; done
  timeout $2 $PP -d $d -g 0 -p $p -n 5 127.0.0.1 > /tmp/$n-client.log 2>&1; cc=$?
  wait $sp; sc=$?
  echo "PP $n server=$sc client=$cc"
  sed "s/^/L $n server: /" /tmp/$n-server.log; sed "s/^/L $n client: /" /tmp/$n-client.log
}
map loaded
pingpong 08:honest-before:18599 20
for c in ${byBite('probe')} ${byBite('verb')} ${byBite('older')}; do pingpong $c 20; done
for c in ${byBite('cqe')}; do pingpong $c ${STALL_S} & done
wait
pingpong 08:honest-after:18598 20
rmmod virtio_rdma; echo "RMMOD $?"
insmod virtio_rdma.ko cmd_timeout_ms=${CMD_TIMEOUT_MS}; echo "INSMOD $?"
map reloaded
pingpong 08:honest-reloaded:18597 20
rmmod virtio_rdma; echo "RMMOD $?"
dmesg | grep -E 'virtio_rdma|BUG|WARNING|Oops|Call Trace|general protection|refcount_t|list_(add|del) corruption' | sed 's/^\[[ 0-9.]*\] /K /'
`;
}

describe('virtio_rdma.ko against devices that lie (config space, control answers, CQEs)', () => {
  let dir: string;
  const servers: VhostUserServer[] = [];
  const devices: LyingRdmaDevice[] = [];
  const engines: LoopbackEngine[] = [];
  const logs: string[][] = [];

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'vrdma-hostile-'));
    CASES.forEach((c, i) => {
      const lines: string[] = [];
      logs.push(lines);
      const log = new Logger('info', c.name, (l) => lines.push(l));
      const engine = new LoopbackEngine();
      engines.push(engine);
      const rdma = new RdmaDevice({
        engine,
        log: log.child('rdma'),
        gids: [gidFromAddress('127.0.0.1')],
        limits: { numCqSlots: SLOTS, numQpSlots: SLOTS, maxCq: SLOTS, maxQp: SLOTS },
      });
      const device = new LyingRdmaDevice(rdma, c.lie);
      devices.push(device);
      const server = new VhostUserServer(join(dir, `${i}.sock`), new VhostUserBackend(device, log.child('vhost-user')), log.child('server'));
      server.listen();
      servers.push(server);
    });
  });

  afterAll(() => {
    for (const s of servers) s.close();
    for (const e of engines) e.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('refuses each lie with its reason, keeps the kernel and the honest device whole, and unloads and reloads', async () => {
    const guest = driverFiles();
    const extraArgs = CASES.flatMap((_, i) => [
      '-chardev', `socket,id=vrdma${i},path=${join(dir, `${i}.sock`)}`,
      '-device', `vhost-user-rdma-pci,chardev=vrdma${i},cq-slots=${SLOTS},qp-slots=${SLOTS},addr=${pciSlot(i)}.0`,
    ]);
    const res = await runInGuest({
      qemu: QEMU_RDMA,
      command: script(guest.order),
      files: { ...guest.files, ...rdmaUserFiles() },
      sharedMemory: true,
      extraArgs,
      timeoutMs: 180_000,
    });
    const out = res.output;
    const context = `${out}\n--- console tail ---\n${res.console.slice(-3000)}`;
    if (process.env.VRDMA_TEST_VERBOSE) console.log(context);
    expect(res.exitCode, context).toBe(0);

    // No kernel complaint of any kind, in the command's view or on the console.
    expect(out, context).not.toMatch(/^K .*(BUG|WARNING|Oops|Call Trace|general protection|refcount_t|corruption)/m);
    expect(res.console).not.toMatch(/BUG:|WARNING:|Oops|Call Trace/);

    // The honest device works before, after, and after a reload.
    for (const when of ['before', 'after', 'reloaded']) expect(out, context).toContain(`PP honest-${when} server=0 client=0`);
    expect(out.match(/^RMMOD 0$/gm), context).toHaveLength(2);
    expect(out).toContain('INSMOD 0');

    for (const [i, c] of CASES.entries()) {
      const slot = pciSlot(i);
      const virtio = new RegExp(`^MAP loaded ${slot} (virtio\\d+) ?(\\S*)$`, 'm').exec(out);
      expect(virtio, `${c.name}: no MAP line`).not.toBeNull();
      const [, vdev, ibdev] = virtio!;
      const pp = new RegExp(`^PP ${c.name} (.*)$`, 'm').exec(out)?.[1];
      switch (c.bites) {
        case 'probe':
          expect(ibdev, `${c.name}: registered despite the lie`).toBe('');
          expect(pp, c.name).toBe('no-device');
          break;
        case 'verb': {
          expect(ibdev, c.name).toMatch(/^virtio_rdma\d+$/);
          // Both tools fail at once (the silent device costs one command timeout), none is killed by `timeout`.
          const m = /^server=(\d+) client=(\d+)$/.exec(pp ?? '');
          expect(m, `${c.name}: ${pp}`).not.toBeNull();
          for (const code of [m![1], m![2]]) expect(Number(code), `${c.name}: ${pp}\n${context}`).toBe(1);
          break;
        }
        case 'cqe':
          // The CQEs never reach the tools: both wait until killed (busybox timeout: 143 = SIGTERM).
          expect(ibdev, c.name).toMatch(/^virtio_rdma\d+$/);
          expect(pp, `${c.name}\n${context}`).toBe('server=143 client=143');
          break;
        case 'never':
          expect(ibdev, c.name).toMatch(/^virtio_rdma\d+$/);
          break;
        case 'older':
          // A device without the feature still works (RC is untouched); the driver says what UD loses.
          expect(ibdev, c.name).toMatch(/^virtio_rdma\d+$/);
          expect(pp, c.name).toBe('server=0 client=0');
          break;
      }
      if (c.dmesg !== null) {
        const reason = new RegExp(`^K virtio_rdma ${vdev}: ${c.dmesg.source}`, 'm');
        expect(out, `${c.name}: the driver's reason`).toMatch(reason);
      }
      // Each lie was actually told (the honest device told none).
      const n = devices[i]!.counts;
      const told = n.config + n.answers + n.withheld + n.cqes;
      // (hiding a feature bit is decided before the driver looks: nothing to count)
      if (c.bites === 'never' || c.bites === 'older') expect(told).toBe(0);
      else expect(told, `${c.name}: ${JSON.stringify(n)}`).toBeGreaterThan(0);
    }

    // After the reload every device that lies only at run time registers again, the silent one included: reset recovers it.
    for (const [i, c] of CASES.entries()) {
      const registered = new RegExp(`^MAP reloaded ${pciSlot(i)} virtio\\d+ virtio_rdma\\d+$`, 'm').test(out);
      expect(registered, `${c.name} after reload`).toBe(c.bites !== 'probe');
    }
    // The back-ends saw only well-formed traffic: nothing the lies provoked made the device itself complain.
    for (const [i, c] of CASES.entries()) {
      expect(logs[i]!.filter((l) => / (ERROR|FATAL) /.test(l)), c.name).toEqual([]);
    }
  }, 240_000);
});
