/**
 * The guest-side probe module (native/guest/probe/virtio_rdma_probe.c, built by
 * images/guest/probe.sh into the guest image, `noload`) against the
 * vhost-user-rdma-pci QEMU device and `vrdma serve --device rdma`.
 *
 * One boot: the guest loads the probe (all 1 + C + 2Q virtqueues, DRIVER_OK,
 * QUERY_DEVICE), drives create/destroy of a PD and a CQ through its sysfs
 * files, then unloads it (device reset). The back-end's log must show the
 * same story.
 *
 * FAILS when the patched QEMU is missing (`bash images/qemu/build.sh`) or the
 * image has no probe (`bash images/guest/build.sh` builds it).
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BackendProcess } from '../support/backend-process.js';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { guestImage, runInGuest } from './guest.js';

const QEMU =
  process.env.VRDMA_QEMU_RDMA ||
  join(process.env.VRDMA_CACHE || join(homedir(), '.cache', 'vrdma'), 'qemu', 'current', 'bin', 'qemu-system-x86_64');

const CQ_SLOTS = 4;
const QP_SLOTS = 8;
const NUM_QUEUES = 1 + CQ_SLOTS + 2 * QP_SLOTS; // 21

/**
 * In the guest: `p CMD...` runs one probe command and prints
 * "R <probe_result line>". Handles are taken from the results.
 */
const SCRIPT = String.raw`
set -e
modprobe virtio_rdma_probe
D=$(echo /sys/bus/virtio/drivers/virtio_rdma_probe/virtio*)
[ -e "$D/probe_cmd" ] || { echo "no probe device bound"; exit 1; }
p() { echo "$*" > $D/probe_cmd; echo "R $(cat $D/probe_result)"; }
get() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" $D/probe_result; }
echo "R $(cat $D/probe_result)"
p create_pd
pdn=$(get pdn)
p create_cq 15
cqn=$(get cqn)
p create_cq 0
p destroy_pd 4242
p query_port 1
p raw 1
cat $D/probe_info
p destroy_cq $cqn
p destroy_pd $pdn
p destroy_pd $pdn
echo bogus > $D/probe_cmd 2>/dev/null && echo "bogus accepted" || echo "bogus refused"
cat $D/probe_info
echo "virtio status $(cat $D/status)"
rmmod virtio_rdma_probe
dmesg | grep -E 'virtio_rdma_probe|virtio-rdma' | sed 's/^\[[ 0-9.]*\] /K /'
`;

interface ProbeResult {
  cmd: string;
  rc: number;
  status: number | null;
  fields: Record<string, string>;
}

function results(output: string): ProbeResult[] {
  return [...output.matchAll(/^R cmd=(\S+) rc=(-?\d+) status=(\S+)(.*)$/gm)].map((m) => ({
    cmd: m[1]!,
    rc: Number(m[2]),
    status: m[3] === 'none' ? null : Number(m[3]),
    fields: Object.fromEntries([...(m[4] ?? '').matchAll(/(\w+)=(\S+)/g)].map((f) => [f[1]!, f[2]!])),
  }));
}

describe('virtio_rdma_probe.ko (guest kernel module) on vhost-user-rdma-pci + vrdma serve', () => {
  let dir: string;
  let backend: BackendProcess;
  let socket: string;

  beforeEach(async () => {
    if (!existsSync(QEMU)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU}: run \`bash images/qemu/build.sh\``);
    if (!guestImage().manifest.modulesIncluded.includes('virtio_rdma_probe')) {
      throw new Error('the guest image has no virtio_rdma_probe module: run `bash images/guest/build.sh`');
    }
    dir = mkdtempSync(join(tmpdir(), 'vrdma-probe-'));
    socket = join(dir, 'rdma.sock');
    backend = new BackendProcess([
      'serve', '--device', 'rdma', '--socket', socket,
      '--cq-slots', String(CQ_SLOTS), '--qp-slots', String(QP_SLOTS), '--roce-port', String(randomRocePort()), '--log-level', 'debug',
    ]);
    await backend.waitFor(/listening on/);
  });

  afterEach(async () => {
    await backend.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('sets up every virtqueue, reaches DRIVER_OK, creates and destroys a PD and a CQ, resets on rmmod', async () => {
    const res = await runInGuest({
      qemu: QEMU,
      command: SCRIPT,
      sharedMemory: true,
      extraArgs: ['-chardev', `socket,id=vrdma0,path=${socket}`, '-device', `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${CQ_SLOTS},qp-slots=${QP_SLOTS}`],
      timeoutMs: 90_000,
    });
    const out = res.output;
    expect(res.exitCode, res.console).toBe(0);
    expect(res.warnings).toEqual([]);

    const r = results(out);
    expect(r.map((x) => `${x.cmd}:${x.rc}`), out).toEqual([
      'query_device:0', // run by probe()
      'create_pd:0',
      'create_cq:0',
      'create_cq:-22', // cqe 0: EINVAL from the device
      'destroy_pd:-2', // ENOENT
      'query_port:0',
      'raw:0',
      'destroy_cq:0',
      'destroy_pd:0',
      'destroy_pd:-2', // already gone
    ]);
    const [qd, pd, cq, , , port, raw] = r;
    expect(Number(qd!.fields.max_qp)).toBe(QP_SLOTS);
    expect(Number(qd!.fields.max_cq)).toBe(CQ_SLOTS);
    const pdn = Number(pd!.fields.pdn);
    const cqn = Number(cq!.fields.cqn);
    expect(pdn).toBeGreaterThan(0);
    expect(cqn).toBeGreaterThan(0);
    expect(cq!.fields).toMatchObject({ slot: '0', cqe: '15', vq: '1' });
    expect(port!.fields).toMatchObject({ port: '1', link_layer: '2' });
    expect(raw!.fields).toMatchObject({ code: '1', len: '128' }); // QUERY_DEVICE: 8 + 120
    expect(r[7]!.fields).toMatchObject({ handle: String(cqn), slot: '0' });
    expect(r[8]!.fields.handle).toBe(String(pdn));
    expect(out).toContain('bogus refused');

    // probe_info: config space, the rings the virtio core set up, live CQs
    expect(out).toContain(`abi_version=1 num_cq_slots=${CQ_SLOTS} num_qp_slots=${QP_SLOTS} num_vqs=${NUM_QUEUES} phys_port_cnt=1`);
    expect(out).toMatch(/^vq_size ctrl=(\d+) cq=\1\.\.\1 qp=\1\.\.\1$/m);
    expect(out).toMatch(new RegExp(`^commands=7 broken=0 cqs=${cqn}:0,$`, 'm'));
    expect(out).toMatch(/^commands=10 broken=0 cqs=$/m);
    // dmesg: one line per command, the probe summary and the removal
    expect(out).toMatch(/^K virtio_rdma_probe virtio\d+: virtio-rdma probe: abi 1, 4 CQ slots, 8 QP slots, 21 virtqueues .*DRIVER_OK$/m);
    expect(out).toMatch(new RegExp(`^K virtio_rdma_probe virtio\\d+: cmd=create_cq rc=0 status=0 cqn=${cqn} slot=0 cqe=15`, 'm'));
    expect([...out.matchAll(/^K virtio_rdma_probe virtio\d+: cmd=/gm)]).toHaveLength(10);
    expect(out).toMatch(/^K virtio_rdma_probe virtio\d+: virtio-rdma probe: removed after 10 commands \(device reset\)$/m);

    // The guest's view of the device status: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
    expect(out).toMatch(/^virtio status 0x0000000f$/m);

    const log = backend.output;
    // This QEMU device never forwards the status byte's DRIVER_OK (vq_index_end stays 0,
    // see images/qemu/0001-vhost-user-rdma-pci.patch), so the back-end sees DRIVER_OK as
    // what QEMU does on it: the guest memory and every ring are handed over and started.
    expect(log, log).toMatch(/<- SET_STATUS 0x8\b/); // FEATURES_OK
    expect(log, log).toMatch(/<- (SET_MEM_TABLE|ADD_MEM_REG)/);
    for (let vq = 0; vq < NUM_QUEUES; vq++) expect(log, log).toMatch(new RegExp(`vq ${vq}: started \\(size \\d+`));
    expect(log, log).toContain(`cqn ${cqn}: created in slot 0 (vq 1), 15 entries`);
    expect(log, log).toContain('control CREATE_CQ: EINVAL');
    expect(log, log).toContain(`cqn ${cqn}: destroyed`);
    // rmmod resets the device: QEMU stops every ring and resets the back-end
    const after = log.slice(log.indexOf(`cqn ${cqn}: destroyed`));
    expect(after, log).toMatch(new RegExp(`<- GET_VRING_BASE vq ${NUM_QUEUES - 1} `));
    expect(after, log).toMatch(/device reset \(RESET_DEVICE\)/);
  });
});
