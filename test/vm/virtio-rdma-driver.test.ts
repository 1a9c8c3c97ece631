/**
 * The guest RDMA driver (native/guest/virtio_rdma, built by
 * images/guest/virtio-rdma.sh) on the vhost-user-rdma-pci QEMU device and
 * `vrdma serve`.
 *
 * The test puts ib_core/ib_uverbs (from the guest kernel package, via the
 * build script's deps/) and the driver into the guest as files and insmods
 * them in dependency order. User space is driven two ways: uverbs_smoke
 * (native/guest/virtio_rdma/selftest, built static here with the host's
 * gcc) speaks the kernel's uverbs write() ABI directly; and unmodified
 * rdma-core tools and perftest run on libibverbs 56.1 with the project's
 * provider built in the same rdma-core tree (see vrdma-guest.ts).
 *
 * FAILS when the patched QEMU is missing (`bash images/qemu/build.sh`) or
 * the guest image is not built (`bash images/guest/build.sh`).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { randomRocePort } from '../../guest-driver-tests/harness.js';
import { BackendProcess, PROJECT_ROOT } from '../support/backend-process.js';
import { runInGuest } from './guest.js';
import { QEMU_RDMA, RDMA_SHELL, driverFiles, loadModules, rdmaUserFiles, withDriver } from './vrdma-guest.js';

const QEMU = QEMU_RDMA;

const CQ_SLOTS = 4;
const QP_SLOTS = 8;
const GID = '127.0.0.1';
const LIMITS = { maxPd: 7, maxMr: 9, maxAh: 5, maxCqe: 63, maxQpWr: 31, maxSge: 4, maxInline: 64, maxRdAtom: 3 };

/** uverbs_smoke (native/guest/virtio_rdma/selftest), static, so the busybox guest can run it. */
function buildSmoke(dir: string): Uint8Array {
  const out = join(dir, 'uverbs_smoke');
  execFileSync('gcc', ['-static', '-O2', '-Wall', '-Werror', '-Wno-psabi', '-o', out, join(PROJECT_ROOT, 'native', 'guest', 'virtio_rdma', 'selftest', 'uverbs_smoke.c')]);
  return readFileSync(out);
}

const SYSFS = [
  'node_type', 'fw_ver', 'node_guid', 'sys_image_guid', 'node_desc',
  'ports/1/state', 'ports/1/phys_state', 'ports/1/link_layer', 'ports/1/cap_mask',
  'ports/1/gids/0', 'ports/1/gids/1', 'ports/1/gid_attrs/types/0', 'ports/1/pkeys/0',
];

function script(order: string[]): string {
  return String.raw`
set -e
${loadModules(order)}
D=/sys/class/infiniband/virtio_rdma0
show() { for f in ${SYSFS.join(' ')}; do echo "S $f=$(cat $D/$f 2>/dev/null || echo '<none>')"; done; }
show
echo "uverbs $(cat /sys/class/infiniband_verbs/uverbs0/ibdev) abi $(cat /sys/class/infiniband_verbs/uverbs0/abi_version)"
echo "modalias $(cat /sys/class/infiniband_verbs/uverbs0/device/modalias)"
rmmod virtio_rdma
[ -e $D ] && echo "still registered" || echo "unregistered"
insmod virtio_rdma.ko
echo "R state=$(cat $D/ports/1/state) gid0=$(cat $D/ports/1/gids/0)"
rmmod virtio_rdma
dmesg | grep -E 'virtio_rdma|infiniband' | sed 's/^\[[ 0-9.]*\] /K /'
`;
}

/** "key=value key=value" on the line starting with `prefix`, as numbers. */
function fields(out: string, prefix: string): Record<string, number> {
  const r: Record<string, number> = {};
  for (const line of out.split('\n').filter((l) => l.startsWith(`${prefix} `))) {
    for (const m of line.matchAll(/(\w+)=(\S+)/g)) r[m[1]!] = Number(m[2]);
  }
  return r;
}

function sysfs(out: string): Record<string, string> {
  return Object.fromEntries([...out.matchAll(/^S ([^=]+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
}

describe('virtio_rdma.ko (guest RDMA driver) on vhost-user-rdma-pci + vrdma serve', () => {
  let dir: string;
  let backend: BackendProcess;
  let socket: string;
  let guest: ReturnType<typeof driverFiles>;

  beforeAll(() => {
    if (!existsSync(QEMU)) throw new Error(`no vhost-user-rdma QEMU at ${QEMU}: run \`bash images/qemu/build.sh\``);
    guest = driverFiles();
    const tmp = mkdtempSync(join(tmpdir(), 'vrdma-smoke-'));
    try {
      guest.files['uverbs_smoke'] = { data: buildSmoke(tmp), mode: 0o755 };
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'vrdma-driver-'));
    socket = join(dir, 'rdma.sock');
    backend = new BackendProcess([
      'serve', '--device', 'rdma', '--socket', socket, '--gid', GID,
      '--cq-slots', String(CQ_SLOTS), '--qp-slots', String(QP_SLOTS), '--roce-port', String(randomRocePort()),
      '--max-pd', String(LIMITS.maxPd), '--max-mr', String(LIMITS.maxMr), '--max-ah', String(LIMITS.maxAh),
      '--max-cqe', String(LIMITS.maxCqe), '--max-qp-wr', String(LIMITS.maxQpWr), '--max-sge', String(LIMITS.maxSge),
      '--max-inline-data', String(LIMITS.maxInline), '--max-qp-rd-atom', String(LIMITS.maxRdAtom),
      '--log-level', 'debug',
    ]);
    await backend.waitFor(/listening on/);
  });

  afterEach(async () => {
    await backend.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  async function boot(command: string, files = guest.files) {
    const res = await runInGuest({
      qemu: QEMU,
      command,
      files,
      sharedMemory: true,
      extraArgs: ['-chardev', `socket,id=vrdma0,path=${socket}`, '-device', `vhost-user-rdma-pci,chardev=vrdma0,cq-slots=${CQ_SLOTS},qp-slots=${QP_SLOTS}`],
      timeoutMs: 120_000,
    });
    if (process.env.VRDMA_TEST_VERBOSE) console.log(`${res.output}\n--- backend ---\n${backend.output}`);
    expect(res.exitCode, `${res.output}\n--- console ---\n${res.console.slice(-4000)}\n--- backend ---\n${backend.output.slice(-4000)}`).toBe(0);
    return res;
  }

  it('registers an ib_device whose sysfs shows the back-end GID on an active Ethernet port, and unloads and reloads', async () => {
    const res = await boot(script(guest.order));
    const out = res.output;
    const s = sysfs(out);
    expect(s['node_type']).toBe('1: CA');
    expect(s['fw_ver']).toBe('0.0.1'); // QUERY_DEVICE fw_ver 1
    expect(s['ports/1/state']).toBe('4: ACTIVE');
    expect(s['ports/1/phys_state']).toBe('5: LinkUp');
    expect(s['ports/1/link_layer']).toBe('Ethernet');
    expect(s['ports/1/gids/0']).toBe('0000:0000:0000:0000:0000:ffff:7f00:0001');
    expect(s['ports/1/gids/1']).toBe('0000:0000:0000:0000:0000:0000:0000:0000');
    expect(s['ports/1/pkeys/0']).toBe('0xffff');
    expect(out).toContain('uverbs virtio_rdma0 abi 1');
    // what rdma-core matches its provider by (VERBS_MODALIAS_MATCH)
    expect(out).toMatch(/^modalias virtio:d0000002Av[0-9A-F]{8}$/m);
    expect(res.console).not.toMatch(/WARNING:|BUG:|Call Trace/);
    expect(out).toContain('unregistered');
    expect(out).toContain('R state=4: ACTIVE gid0=0000:0000:0000:0000:0000:ffff:7f00:0001');
  });

  it('reports the back-end limits through uverbs QUERY_DEVICE and QUERY_PORT', async () => {
    const res = await boot(withDriver(guest.order, './uverbs_smoke info'));
    const d = fields(res.output, 'D');
    expect(d, res.output).toMatchObject({
      fw_ver: 1, vendor_id: 0x1af4, vendor_part_id: 0x106a, hw_ver: 1, phys_port_cnt: 1,
      max_qp: QP_SLOTS, max_cq: CQ_SLOTS, max_qp_wr: LIMITS.maxQpWr, max_sge: LIMITS.maxSge,
      max_cqe: LIMITS.maxCqe, max_mr: LIMITS.maxMr, max_pd: LIMITS.maxPd, max_ah: LIMITS.maxAh,
      max_qp_rd_atom: LIMITS.maxRdAtom, max_qp_init_rd_atom: LIMITS.maxRdAtom,
      max_mr_size: 2 ** 30, page_size_cap: 4096, atomic_cap: 1, max_pkeys: 1,
    });
    // ACTIVE, MTU 4096, Ethernet (2), IB_UVERBS_QPF_GRH_REQUIRED (1)
    expect(fields(res.output, 'P'), res.output).toMatchObject({ state: 4, max_mtu: 5, active_mtu: 5, gid_tbl_len: 4, pkey_tbl_len: 1, link_layer: 2, flags: 1 });
  });

  it('moves data between two RC QPs: SEND, inline SEND, RDMA WRITE with immediate, RDMA READ, WRITE into a two-level-page-list MR', async () => {
    const res = await boot(withDriver(guest.order, './uverbs_smoke rc'));
    expect(res.output).toMatch(/^OK rc$/m);
    expect(res.output).toContain('B big_mr_pages=768 ok');
    expect(res.output).toContain('E inline_too_long=-22');
    const qpns = [...res.output.matchAll(/^Q qpn=(0x[0-9a-f]+) /gm)].map((m) => m[1]!);
    expect(qpns).toHaveLength(2);
    for (const qpn of qpns) {
      expect(backend.output).toContain(`qpn ${qpn}: created (RC)`);
      expect(backend.output).toContain(`qpn ${qpn}: RTR -> RTS`);
    }
    // every WR completed successfully: the QPs never went to ERR
    expect(backend.output).not.toMatch(/-> ERR/);
  });

  it('interrupts an armed CQ into its completion channel, and stays quiet when not armed', async () => {
    const res = await boot(withDriver(guest.order, './uverbs_smoke notify'));
    expect(res.output).toMatch(/^OK notify$/m);
    expect([...res.output.matchAll(/^V event /gm)]).toHaveLength(2);
  });

  it('sends a UD datagram through an address handle, received with its GRH', async () => {
    const res = await boot(withDriver(guest.order, './uverbs_smoke ud'));
    expect(res.output).toMatch(/^OK ud$/m);
  });

  it('serves an in-kernel consumer: DMA-MR PD, softirq-polled CQ re-armed from softirq, RC SEND and inline SEND', async () => {
    const res = await boot(withDriver(guest.order, String.raw`
insmod vrdma_kselftest.ko && echo "kselftest loaded" || echo "kselftest failed"
dmesg | grep vrdma_kselftest | sed 's/^\[[ 0-9.]*\] /K /'
`));
    const out = res.output;
    expect(out, out).toContain('kselftest loaded');
    expect(out).toMatch(/^K vrdma_kselftest: pd with local_dma_lkey 0x[0-9a-f]+$/m);
    expect(out).toMatch(/^K vrdma_kselftest: 50 SENDs \(half inline\) received intact$/m);
    expect(out).toMatch(/^K vrdma_kselftest: PASSED$/m);
    expect(res.console).not.toMatch(/WARNING:|BUG:|Call Trace/);
    // the test's QPs were created and destroyed on the device
    const qpns = [.../qpn (0x[0-9a-f]+): created \(RC\)/g[Symbol.matchAll](backend.output)].map((m) => m[1]!);
    expect(qpns).toHaveLength(2);
    for (const qpn of qpns) expect(backend.output).toContain(`qpn ${qpn}: destroyed`);
  });

  it('unloads with a user context holding a PD, CQ, MR and QP: the device destroys them and the process sees EIO', async () => {
    const res = await boot(withDriver(guest.order, String.raw`
./uverbs_smoke hold > hold.log 2>&1 &
pid=$!
for i in $(seq 100); do grep -q READY hold.log && break; sleep 0.1; done
cat hold.log
rmmod virtio_rdma
echo "rmmod=$?"
touch /tmp/go
wait $pid || true
cat hold.log
insmod virtio_rdma.ko
echo "reloaded state=$(cat /sys/class/infiniband/virtio_rdma0/ports/1/state)"
./uverbs_smoke info | head -1
`));
    const out = res.output;
    expect(out).toContain('READY');
    const qpn = /^Q qpn=(0x[0-9a-f]+) /m.exec(out)?.[1];
    expect(qpn).toBeDefined();
    // unregistering destroyed the process's objects on the device
    expect(backend.output).toContain(`qpn ${qpn}: destroyed`);
    expect(backend.output).toMatch(/cqn \d+: destroyed/);
    expect(out).toContain('rmmod=0');
    expect(out).toMatch(/^AFTER query_device=-5$/m); // EIO: the context was disassociated
    expect(out).toContain('reloaded state=4: ACTIVE');
    expect(out).toMatch(/^D fw_ver=1 /m);
  });

  it('is listed by rdma link and by unmodified rdma-core tools through the virtio_rdma provider, and runs ibv_rc_pingpong and ibv_ud_pingpong', async () => {
    const res = await boot(withDriver(guest.order, String.raw`
ip link set lo up
${RDMA_SHELL}
run ibv_devices
run ibv_devinfo -v
run rdma link show
run rdma dev show
run ibv_rc_pingpong -d virtio_rdma0 -g 0 -n 20 -s 1024 -r 16 > rc-server.log 2>&1 &
wait_listen 18515
run ibv_rc_pingpong -d virtio_rdma0 -g 0 -n 20 -s 1024 -r 16 127.0.0.1 > rc-client.log 2>&1 || echo "rc client exit $?"
wait $! || true
echo "--- rc server"; cat rc-server.log; echo "--- rc client"; cat rc-client.log
run ibv_ud_pingpong -d virtio_rdma0 -g 0 -n 20 -s 512 -r 16 > ud-server.log 2>&1 &
wait_listen 18515
run ibv_ud_pingpong -d virtio_rdma0 -g 0 -n 20 -s 512 -r 16 127.0.0.1 > ud-client.log 2>&1 || echo "ud client exit $?"
wait $! || true
echo "--- ud server"; cat ud-server.log; echo "--- ud client"; cat ud-client.log
`), { ...guest.files, ...rdmaUserFiles() });
    const out = res.output;
    expect(out).toMatch(/^\s+virtio_rdma0\s+020000fffe000001$/m); // ibv_devices
    // iproute2's rdma tool (netlink): the link is up, shown IB-style (an IB-protocol port, no netdev)
    expect(out).toMatch(/^link virtio_rdma0\/1 subnet_prefix 0000:0000:0000:0000 lid 0 sm_lid 0 lmc 0 state ACTIVE physical_state LINK_UP\s*$/m);
    expect(out).toMatch(/^\d+: virtio_rdma0: node_type ca fw 0\.0\.1 node_guid 0200:00ff:fe00:0001 sys_image_guid 0200:00ff:fe00:0001\s*$/m);
    // ibv_devinfo -v: the back-end's limits, through libibverbs and the provider
    const attr = (name: string) => new RegExp(`^\\s+${name}:\\s+(\\S+)`, 'm').exec(out)?.[1];
    expect({
      max_qp: attr('max_qp'), max_qp_wr: attr('max_qp_wr'), max_sge: attr('max_sge'), max_cq: attr('max_cq'),
      max_cqe: attr('max_cqe'), max_mr: attr('max_mr'), max_pd: attr('max_pd'), max_ah: attr('max_ah'),
      max_qp_rd_atom: attr('max_qp_rd_atom'), max_mr_size: attr('max_mr_size'), vendor_id: attr('vendor_id'),
      state: attr('state'), link_layer: attr('link_layer'), active_mtu: attr('active_mtu'),
    }).toEqual({
      max_qp: String(QP_SLOTS), max_qp_wr: String(LIMITS.maxQpWr), max_sge: String(LIMITS.maxSge), max_cq: String(CQ_SLOTS),
      max_cqe: String(LIMITS.maxCqe), max_mr: String(LIMITS.maxMr), max_pd: String(LIMITS.maxPd), max_ah: String(LIMITS.maxAh),
      max_qp_rd_atom: String(LIMITS.maxRdAtom), max_mr_size: '0x40000000', vendor_id: '0x1af4',
      state: 'PORT_ACTIVE', link_layer: 'Ethernet', active_mtu: '4096',
    });
    expect(out).toMatch(/^\s+GID\[\s+0\]:\s+0000:0000:0000:0000:0000:ffff:7f00:0001/m);
    // both ends of both pingpongs ran their 20 iterations over the device
    for (const side of ['rc server', 'rc client', 'ud server', 'ud client']) {
      const log = out.slice(out.indexOf(`--- ${side}`)).split('\n--- ')[0]!;
      expect(log, out).toMatch(/^20 iters in [\d.]+ seconds/m);
      expect(log, out).toMatch(/remote address: LID 0x0000, QPN 0x[0-9a-f]{6}, PSN 0x[0-9a-f]{6},? GID ::ffff:127\.0\.0\.1/);
    }
    expect(out, out).not.toMatch(/client exit|nothing listens/);
  });

  it('runs perftest ib_write_bw, ib_send_bw and ib_read_lat between two processes', async () => {
    const res = await boot(withDriver(guest.order, String.raw`
ip link set lo up
${RDMA_SHELL}
# queue depths within the back-end's limits (max_qp_wr ${LIMITS.maxQpWr})
for t in ib_write_bw ib_send_bw ib_read_lat; do
  o="-d virtio_rdma0 -x 0 -n 50 -t 16 -s 4096 -p 18515"
  [ $t = ib_send_bw ] && o="$o -r 16"
  run $t $o > $t-server.log 2>&1 &
  wait_listen 18515
  run $t $o 127.0.0.1 > $t-client.log 2>&1 || echo "$t client exit $?"
  wait $! || echo "$t server exit $?"
  echo "--- $t server"; cat $t-server.log; echo "--- $t client"; cat $t-client.log
done
`), { ...guest.files, ...rdmaUserFiles() });
    const out = res.output;
    expect(out, out).not.toMatch(/exit \d+$|nothing listens/m);
    const section = (name: string) => out.slice(out.indexOf(`--- ${name}`)).split('\n--- ')[0]!;
    for (const side of ['server', 'client']) {
      // #bytes #iterations BW-peak BW-average MsgRate
      expect(section(`ib_write_bw ${side}`), out).toMatch(/^\s*4096\s+50\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$/m);
      expect(section(`ib_send_bw ${side}`), out).toMatch(/^\s*4096\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$/m);
      // the back-end's max_qp_rd_atom
      expect(section(`ib_read_lat ${side}`), out).toMatch(new RegExp(`Outstand reads\\s*:\\s*${LIMITS.maxRdAtom}`));
    }
    // #bytes #iterations t_min t_max t_typical ...
    expect(section('ib_read_lat client'), out).toMatch(/^\s*4096\s+50\s+[\d.]+\s+[\d.]+\s+[\d.]+/m);
  });
});
