/**
 * What only a driver can check, below the verbs interface: the config space
 * against QUERY_DEVICE / QUERY_PORT, control chains of the wrong size or
 * with an unknown command, REQ_NOTIFY_CQ flags, and REG_MR page lists that
 * are inconsistent, misaligned or outside guest memory (docs/virtio-rdma.md §2, §4).
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Access, Cmd, MAX_PAGE_LIST_PAGES, Status } from '../backend/abi/constants.js';
import { CreatePdResp, CtrlHeader, CtrlStatus, MrResp, QueryDeviceResp, QueryGidReq, RegMrReq } from '../backend/abi/structs.js';
import { GuestAllocator } from './driver/allocator.js';
import type { RefDriver } from './driver/ref-driver.js';
import { startDevice, type DeviceUnderTest } from './harness.js';
import { VerbsError, type Buffer, type Pd } from './verbs.js';

const MAX_PD = 4;
let dut: DeviceUnderTest;
let drv: RefDriver;

beforeEach(async () => {
  dut = await startDevice({ limits: { maxPd: MAX_PD } });
  drv = await dut.open();
});

afterEach(async () => {
  expect(drv.violations).toEqual([]);
  await dut.stop();
});

function header(cmd: number, body: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(CtrlHeader.size + body.length);
  CtrlHeader.encode({ cmd, reserved: 0 }, new DataView(out.buffer), 0);
  out.set(body, CtrlHeader.size);
  return out;
}

function statusOf(resp: Uint8Array): number {
  return CtrlStatus.decodeBytes(resp).status;
}

async function pdsUntilFull(): Promise<Pd[]> {
  const pds: Pd[] = [];
  for (;;) {
    try {
      pds.push(await drv.allocPd());
    } catch (err) {
      expect(err).toBeInstanceOf(VerbsError);
      expect((err as VerbsError).status).toBe(Status.ENOMEM);
      return pds;
    }
  }
}

async function expectCommandStatus(p: Promise<unknown>, status: Status): Promise<void> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err, `expected ${Status[status]}`).toBeInstanceOf(VerbsError);
  expect(Status[(err as VerbsError).status]).toBe(Status[status]);
}

describe('reference driver: config space and control queue', () => {
  it('config space agrees with QUERY_DEVICE and QUERY_PORT', async () => {
    const c = drv.config;
    const d = await drv.queryDevice();
    const p = await drv.queryPort(1);
    expect({
      max_pd: d.maxPd,
      max_mr: d.maxMr,
      max_cq: d.maxCq,
      max_qp: d.maxQp,
      max_ah: d.maxAh,
      max_cqe: d.maxCqe,
      max_qp_wr: d.maxQpWr,
      max_send_sge: d.maxSendSge,
      max_recv_sge: d.maxRecvSge,
      max_inline_data: d.maxInlineData,
      max_qp_rd_atom: d.maxQpRdAtom,
      max_mr_size: d.maxMrSize,
      node_guid: d.nodeGuid,
      sys_image_guid: d.sysImageGuid,
      gid_tbl_len: p.gidTblLen,
    }).toEqual({
      max_pd: c.max_pd,
      max_mr: c.max_mr,
      max_cq: c.max_cq,
      max_qp: c.max_qp,
      max_ah: c.max_ah,
      max_cqe: c.max_cqe,
      max_qp_wr: c.max_qp_wr,
      max_send_sge: c.max_sge,
      max_recv_sge: c.max_sge,
      max_inline_data: c.max_inline_data,
      max_qp_rd_atom: c.max_qp_rd_atom,
      max_mr_size: c.max_mr_size,
      node_guid: c.node_guid,
      sys_image_guid: c.sys_image_guid,
      gid_tbl_len: c.gid_tbl_len,
    });
    expect(c.max_pd).toBe(MAX_PD);
    expect(c.abi_version).toBe(1);
    expect(c.phys_port_cnt).toBe(1);
  });

  it('answers an unknown command with EOPNOTSUPP and used length 8', async () => {
    for (const cmd of [0, 19, 0xffffffff]) {
      const r = await drv.rawCommand(header(cmd), 8 + 64);
      expect(r.usedLen).toBe(8);
      expect(Status[statusOf(r.response)]).toBe('EOPNOTSUPP');
    }
  });

  it('answers a request shorter than header + request with E2BIG', async () => {
    const r = await drv.rawCommand(header(Cmd.QUERY_GID, new Uint8Array(QueryGidReq.size - 1)), 8 + 24);
    expect(r.usedLen).toBe(8);
    expect(Status[statusOf(r.response)]).toBe('E2BIG');
    const h = await drv.rawCommand(new Uint8Array(4), 8 + 24);
    expect(h.usedLen).toBe(8);
    expect(Status[statusOf(h.response)]).toBe('E2BIG');
  });

  it('answers a writable part too short for the response with E2BIG, and creates nothing', async () => {
    const r = await drv.rawCommand(header(Cmd.CREATE_PD), CtrlStatus.size + CreatePdResp.size - 1);
    expect(r.usedLen).toBe(8);
    expect(Status[statusOf(r.response)]).toBe('E2BIG');
    const q = await drv.rawCommand(header(Cmd.QUERY_DEVICE), CtrlStatus.size + QueryDeviceResp.size - 4);
    expect(Status[statusOf(q.response)]).toBe('E2BIG');
    const pds = await pdsUntilFull();
    expect(pds.length).toBe(MAX_PD);
    for (const pd of pds) await drv.deallocPd(pd);
  });

  it('returns a chain whose writable part is under 8 bytes with used length 0, doing nothing', async () => {
    for (const len of [0, 4, 7]) {
      const r = await drv.rawCommand(header(Cmd.CREATE_PD), len);
      expect(r.usedLen).toBe(0);
    }
    const pds = await pdsUntilFull();
    expect(pds.length).toBe(MAX_PD);
    for (const pd of pds) await drv.deallocPd(pd);
  });

  it('refuses REQ_NOTIFY_CQ flags other than SOLICITED or NEXT_COMPLETION', async () => {
    const cq = await drv.createCq(4);
    for (const flags of [0, 3, 4, 0x80000000]) await expectCommandStatus(drv.reqNotifyCqRaw(cq, flags), Status.EINVAL);
    await drv.reqNotifyCqRaw(cq, 1);
    await drv.reqNotifyCqRaw(cq, 2);
    await drv.destroyCq(cq);
    await expectCommandStatus(drv.reqNotifyCqRaw(cq, 2), Status.ENOENT);
  });
});

describe('reference driver: REG_MR page lists (§4)', () => {
  let pd: Pd;
  let data: Buffer;
  let list: Buffer;
  let dataGpa: bigint;
  let listGpa: bigint;

  beforeEach(async () => {
    pd = await drv.allocPd();
    data = await drv.allocBuffer(8 * 4096, { align: 4096, contiguous: true });
    list = await drv.allocBuffer(4 * 4096, { align: 4096, contiguous: true });
    dataGpa = data.dmaAddr!;
    listGpa = list.dmaAddr!;
  });

  afterEach(async () => {
    await drv.freeBuffer(data);
    await drv.freeBuffer(list);
    await drv.deallocPd(pd);
  });

  /** Writes le64 page addresses at `offset` of the list buffer (a page list is a plain le64 array). */
  async function writeList(entries: bigint[], offset = 0): Promise<void> {
    const bytes = new Uint8Array(entries.length * 8);
    const dv = new DataView(bytes.buffer);
    entries.forEach((e, i) => dv.setBigUint64(8 * i, e, true));
    await drv.writeBuffer(list, offset, bytes);
  }

  function pages(n: number, from = dataGpa): bigint[] {
    return Array.from({ length: n }, (_, i) => from + BigInt(4096 * i));
  }

  function reg(f: { iova?: bigint; length: bigint; npages: number; pageList?: bigint; access?: number }): Promise<{ mrn: number }> {
    return drv.command(
      Cmd.REG_MR,
      RegMrReq,
      { pdn: pd.handle, access: f.access ?? Access.LOCAL_WRITE, iova: f.iova ?? dataGpa, length: f.length, page_list: f.pageList ?? listGpa, npages: f.npages, reserved: 0 },
      MrResp,
    );
  }

  it('cross-checks npages against iova and length', async () => {
    await writeList(pages(4));
    const ok = await reg({ length: 3n * 4096n, npages: 3 });
    await drv.deregMr({ handle: ok.mrn } as never);
    await expectCommandStatus(reg({ length: 3n * 4096n, npages: 2 }), Status.EINVAL);
    await expectCommandStatus(reg({ length: 3n * 4096n, npages: 4 }), Status.EINVAL);
    // With a page offset the same length spans one more page.
    await expectCommandStatus(reg({ iova: dataGpa + 100n, length: 3n * 4096n, npages: 3 }), Status.EINVAL);
    const off = await reg({ iova: dataGpa + 100n, length: 3n * 4096n, npages: 4 });
    await drv.deregMr({ handle: off.mrn } as never);
    // The iova is just a name: any value with the right page offset works.
    const named = await reg({ iova: 0x1234_5000_0064n, length: 3n * 4096n, npages: 4 });
    await drv.deregMr({ handle: named.mrn } as never);
  });

  it('refuses zero, oversized and wrapping lengths', async () => {
    await writeList(pages(2));
    await expectCommandStatus(reg({ length: 0n, npages: 0 }), Status.EINVAL);
    await expectCommandStatus(reg({ iova: 0xffff_ffff_ffff_f000n, length: 8192n, npages: 2 }), Status.EINVAL);
    const max = drv.config.max_mr_size;
    await expectCommandStatus(reg({ length: max + 4096n, npages: Number((max + 4096n) / 4096n) }), Status.EINVAL);
    await expectCommandStatus(reg({ length: BigInt(MAX_PAGE_LIST_PAGES + 1) * 4096n, npages: MAX_PAGE_LIST_PAGES + 1 }), Status.EINVAL);
  });

  it('refuses misaligned page addresses (EINVAL) and pages outside guest memory (EFAULT)', async () => {
    await writeList([dataGpa, dataGpa + 8n]);
    await expectCommandStatus(reg({ length: 8192n, npages: 2 }), Status.EINVAL);
    // Guest RAM starts at 4 GiB: page 0 is not guest memory.
    await writeList([dataGpa, 0n]);
    await expectCommandStatus(reg({ length: 8192n, npages: 2 }), Status.EFAULT);
    await writeList([dataGpa, 1n << 40n]);
    await expectCommandStatus(reg({ length: 8192n, npages: 2 }), Status.EFAULT);
  });

  it('refuses a page list outside guest memory (EFAULT), at either level', async () => {
    await expectCommandStatus(reg({ length: 8192n, npages: 2, pageList: 0x1000n }), Status.EFAULT);
    // A two-level list (513 pages) whose second level-2 array is outside guest memory.
    const many = 513;
    await writeList([listGpa + 4096n, 0x2000n]);
    await writeList(Array.from({ length: 512 }, () => dataGpa), 4096);
    await expectCommandStatus(reg({ length: BigInt(many) * 4096n, npages: many }), Status.EFAULT);
    // Made valid, the same registration succeeds (the same page may appear many times).
    await writeList([listGpa + 4096n, listGpa + 2n * 4096n]);
    await writeList([dataGpa], 2 * 4096);
    const ok = await reg({ length: BigInt(many) * 4096n, npages: many });
    await drv.deregMr({ handle: ok.mrn } as never);
  });

});

describe('guest allocator', () => {
  it('aligns, frees and coalesces', () => {
    const a = new GuestAllocator(0x1000, 0x10000);
    const x = a.alloc(100, 64);
    const y = a.alloc(5000, 4096);
    const z = a.alloc(10, 8);
    expect(x % 64).toBe(0);
    expect(y % 4096).toBe(0);
    expect(new Set([x, y, z]).size).toBe(3);
    a.release(y);
    a.release(x);
    a.release(z);
    expect(a.used).toBe(0);
    expect(a.alloc(0x10000, 4096)).toBe(0x1000);
    expect(() => a.alloc(1)).toThrow(/exhausted/);
  });
});
