/**
 * Every control command (docs/virtio-rdma.md §4) with every field broken:
 * handles that name nothing, sizes, counts, addresses, keys, lengths, flags,
 * QP types, unknown commands, and the control chain itself. Each case checks
 * the documented status and used length, that the device's tables are
 * exactly as before (a failed command changes nothing), and that a valid
 * command still works afterwards (afterEach).
 *
 * The pvrdma CVE classes (shared/reference/pvrdma-lessons.md §5) are named
 * in the test titles.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  Access,
  Cmd,
  MAX_PAGE_LIST_PAGES,
  PAGE_LIST_ENTRIES,
  QpAttr,
  QpState,
  QpType,
  RDMA_PAGE_SIZE,
  Status,
  cqVq,
  rqVq,
  sqVq,
} from '../../abi/constants.js';
import {
  CreateAhReq,
  CreateCqReq,
  CreateCqResp,
  CreatePdResp,
  CreateQpReq,
  CreateQpResp,
  DeviceConfig,
  GetDmaMrReq,
  MrResp,
  QueryDeviceResp,
  QueryGidReq,
  QueryGidResp,
  QueryPkeyResp,
  QueryPortReq,
  QueryPortResp,
  RegMrReq,
  ReqNotifyCqReq,
} from '../../abi/structs.js';
import { FrontendReq } from '../../../virtio/vhost-user/protocol.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../../../virtio/queue/split-queue.js';
import {
  ALL_CMDS,
  LOCAL_GID,
  REQ_SIZE,
  RESP_SIZE,
  Rig,
  ahBytes,
  enc,
  handleBody,
  modifyBody,
  msg,
  type CqInfo,
  type CtrlItem,
  type QpInfo,
  type RigOptions,
} from './rig.js';

let rig: Rig;

async function expectAlive(r: Rig): Promise<void> {
  const q = await r.ok(Cmd.QUERY_DEVICE, new Uint8Array(0), QueryDeviceResp);
  expect(q.max_qp).toBe(r.limits.maxQp);
  expect(q.max_pd).toBe(r.limits.maxPd);
  const p = await r.ok(Cmd.QUERY_PORT, enc(QueryPortReq, { port: 1 }), QueryPortResp);
  expect(p.link_layer).toBe(2);
}

async function withRig(opts: RigOptions, fn: (r: Rig) => Promise<void>): Promise<void> {
  const r = await Rig.start(opts);
  try {
    await fn(r);
    await expectAlive(r);
    expect(r.log.errors).toEqual([]);
  } finally {
    await r.stop();
  }
}

beforeEach(async () => {
  rig = await Rig.start();
});

afterEach(async () => {
  try {
    await expectAlive(rig);
    expect(rig.log.errors).toEqual([]);
  } finally {
    await rig.stop();
  }
});

const name = (s: number | null): string => (s === null ? 'no status' : (Status[s] ?? `status ${s}`));

/** Sends `req`; expects `status` with used length 8 and no change to any device table. */
async function refused(req: Uint8Array, status: Status, opts: Omit<CtrlItem, 'req'> = {}, r: Rig = rig): Promise<void> {
  const counts = r.counts();
  const before = r.snapshot();
  const res = await r.ctrl(req, opts);
  expect({ status: name(res.status), used: res.used }).toEqual({ status: Status[status], used: 8 });
  expect(r.counts()).toEqual(counts);
  expect(r.snapshot()).toBe(before);
}

/** Sends `req`; expects success with used length 8 + the response size. */
async function accepted(cmd: Cmd, req: Uint8Array, opts: Omit<CtrlItem, 'req'> = {}, r: Rig = rig): Promise<Uint8Array> {
  const res = await r.ctrl(req, opts);
  expect({ status: name(res.status), used: res.used }).toEqual({ status: 'OK', used: 8 + RESP_SIZE[cmd] });
  return res.resp;
}

const U32_EDGES = [0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

/** Handles that name nothing: 0, the table limit (when free), limit + 1, and the 32-bit edges. */
function deadHandles(limit: number, live: readonly number[]): number[] {
  return [0, limit, limit + 1, ...U32_EDGES].filter((h) => !live.includes(h));
}

// -----------------------------------------------------------------------------
// Valid request bodies, to be corrupted one field at a time

interface Base {
  pdn: number;
  cq: CqInfo;
  cq2: CqInfo;
}

async function base(): Promise<Base> {
  const pdn = await rig.createPd();
  const cq = await rig.createCq(16);
  const cq2 = await rig.createCq(16);
  return { pdn, cq, cq2 };
}

function createQpBody(b: Base, over: Partial<Parameters<typeof CreateQpReq.encodeBytes>[0]> = {}): Uint8Array {
  return enc(CreateQpReq, {
    pdn: b.pdn,
    qp_type: QpType.RC,
    send_cqn: b.cq.cqn,
    recv_cqn: b.cq2.cqn,
    max_send_wr: 16,
    max_recv_wr: 16,
    max_send_sge: 4,
    max_recv_sge: 4,
    max_inline_data: 64,
    ...over,
  });
}

/** A valid 2-page REG_MR request over a fresh buffer. */
function regMrReq(pdn: number, over: Partial<Parameters<typeof RegMrReq.encodeBytes>[0]> = {}): Uint8Array {
  const gpa = rig.allocBuffer(2 * RDMA_PAGE_SIZE);
  const list = rig.writePageList([gpa, gpa + RDMA_PAGE_SIZE]);
  return enc(RegMrReq, {
    pdn,
    access: Access.LOCAL_WRITE | Access.REMOTE_WRITE,
    iova: BigInt(gpa),
    length: BigInt(2 * RDMA_PAGE_SIZE),
    page_list: BigInt(list),
    npages: 2,
    ...over,
  });
}

const MEM_END = (): number => rig.ram.gpa + rig.ram.size;

// =============================================================================

describe('control chain framing (docs §4)', () => {
  it('a chain whose writable part is under 8 bytes is returned with used length 0 and has no effect', async () => {
    for (const writable of [0, 1, 4, 7]) {
      for (const cmd of [Cmd.CREATE_PD, Cmd.QUERY_DEVICE, 99]) {
        const before = rig.snapshot();
        const r = await rig.ctrl(msg(cmd), { writable });
        expect(r.used).toBe(0);
        expect(rig.snapshot()).toBe(before);
      }
    }
    // Split into 1-byte writable descriptors, still 7 bytes in all.
    const r = await rig.ctrl(msg(Cmd.CREATE_PD), { writable: 7, writableSplit: [1, 1, 1, 1, 1, 1, 1] });
    expect(r.used).toBe(0);
    expect(rig.counts().pds).toBe(0);
  });

  it('a readable part shorter than the 8-byte header is E2BIG', async () => {
    const full = msg(Cmd.CREATE_PD);
    for (let n = 0; n < 8; n++) await refused(full.subarray(0, n), Status.E2BIG);
  });

  it.each(ALL_CMDS.filter((c) => REQ_SIZE[c] > 0).map((c) => [Cmd[c], c] as const))('%s with a request one byte short is E2BIG and changes nothing', async (_n, cmd) => {
    const b = await base();
    // A plausible request prefix: first field a live handle where there is one.
    const body = new Uint8Array(REQ_SIZE[cmd]);
    new DataView(body.buffer).setUint32(0, cmd === Cmd.QUERY_PORT || cmd === Cmd.QUERY_GID || cmd === Cmd.QUERY_PKEY ? 1 : b.pdn, true);
    for (const short of [REQ_SIZE[cmd] - 1, 0, 1]) {
      if (short < 0 || short >= REQ_SIZE[cmd]) continue;
      await refused(msg(cmd, body.subarray(0, short)), Status.E2BIG);
    }
  });

  it.each(ALL_CMDS.filter((c) => RESP_SIZE[c] > 0).map((c) => [Cmd[c], c] as const))(
    'CVE-2018-20126 class (error-path cleanup): %s with a writable part one byte short of its response is E2BIG and allocates nothing',
    async (_n, cmd) => {
      const b = await base();
      const qp = await rig.createQp({ pdn: b.pdn, sendCq: b.cq });
      const bodies: Record<number, Uint8Array> = {
        [Cmd.QUERY_DEVICE]: new Uint8Array(0),
        [Cmd.QUERY_PORT]: enc(QueryPortReq, { port: 1 }),
        [Cmd.QUERY_GID]: enc(QueryGidReq, { port: 1, index: 0 }),
        [Cmd.QUERY_PKEY]: enc(QueryGidReq, { port: 1, index: 0 }),
        [Cmd.CREATE_PD]: new Uint8Array(0),
        [Cmd.CREATE_CQ]: enc(CreateCqReq, { cqe: 8 }),
        [Cmd.REG_MR]: regMrReq(b.pdn),
        [Cmd.GET_DMA_MR]: enc(GetDmaMrReq, { pdn: b.pdn, access: Access.LOCAL_WRITE }),
        [Cmd.CREATE_QP]: createQpBody(b),
        [Cmd.QUERY_QP]: handleBody(qp.qpn),
        [Cmd.CREATE_AH]: enc(CreateAhReq, { pdn: b.pdn, ah: ahBytes() }),
      };
      const req = msg(cmd, bodies[cmd]);
      await refused(req, Status.E2BIG, { writable: 8 + RESP_SIZE[cmd] - 1 });
      await refused(req, Status.E2BIG, { writable: 8 });
      // The same request with room for the response works.
      await accepted(cmd, req, { writable: 8 + RESP_SIZE[cmd] });
    },
  );

  it('a request and a response split at every byte across descriptors work like unsplit ones', async () => {
    const pdn = await rig.createPd();
    const req = msg(Cmd.REG_MR, regMrReq(pdn));
    const ones = new Array<number>(req.byteLength).fill(1);
    const resp = await accepted(Cmd.REG_MR, req, { split: ones, writable: 8 + MrResp.size, writableSplit: new Array<number>(8 + MrResp.size).fill(1) });
    const mr = MrResp.decodeBytes(resp);
    expect(mr.mrn).toBeGreaterThan(0);
    expect(mr.lkey).toBe(mr.rkey);
    expect(mr.lkey >>> 8).toBe(mr.mrn);
    // Odd splits, including zero-length descriptors.
    const resp2 = await accepted(Cmd.REG_MR, msg(Cmd.REG_MR, regMrReq(pdn)), { split: [3, 0, 5, 7, 0, 11], writable: 8 + 16, writableSplit: [5, 0, 3, 9] });
    expect(MrResp.decodeBytes(resp2).mrn).not.toBe(mr.mrn);
    expect(rig.counts().mrs).toBe(2);
  });

  it('a writable part larger than needed gets exactly 8 + the response, and nothing beyond it is written', async () => {
    // The rig checks the canary beyond the used length on every chain.
    await accepted(Cmd.QUERY_DEVICE, msg(Cmd.QUERY_DEVICE), { writable: 4096 });
    await accepted(Cmd.CREATE_PD, msg(Cmd.CREATE_PD), { writable: 1000 });
    const r = await rig.ctrl(msg(Cmd.DESTROY_PD, handleBody(77)), { writable: 4096 });
    expect(r.used).toBe(8);
  });

  it('bytes after a complete request are ignored (the doc only refuses shorter ones)', async () => {
    const garbage = new Uint8Array(64).fill(0xff);
    await accepted(Cmd.QUERY_DEVICE, msg(Cmd.QUERY_DEVICE, garbage));
    const resp = await accepted(Cmd.CREATE_CQ, msg(Cmd.CREATE_CQ, new Uint8Array([...enc(CreateCqReq, { cqe: 4 }), ...garbage])));
    expect(CreateCqResp.decodeBytes(resp).cqe).toBe(4);
  });

  it('checks run in the documented order: header, command known, writable room (before the command runs), request length, then the command', async () => {
    const b = await base();
    // Unknown command with no room for any response: EOPNOTSUPP, not E2BIG.
    await refused(msg(99), Status.EOPNOTSUPP, { writable: 8 });
    // Known command, writable part short and the handle dead: E2BIG (room is checked before the command runs).
    await refused(msg(Cmd.QUERY_QP, handleBody(0x999)), Status.E2BIG, { writable: 8 });
    await refused(msg(Cmd.CREATE_QP, createQpBody(b, { qp_type: 1, pdn: 77 })), Status.E2BIG, { writable: 8 + CreateQpResp.size - 1 });
    // Writable part short and request short: E2BIG.
    await refused(msg(Cmd.CREATE_CQ, new Uint8Array(3)), Status.E2BIG, { writable: 9 });
    // Room enough, request short, handle dead: E2BIG (length before the command's own checks).
    await refused(msg(Cmd.DESTROY_PD, new Uint8Array([0x99, 0x99, 0x99])), Status.E2BIG);
    await refused(msg(Cmd.MODIFY_QP, modifyBody(0x999, 0xffff_ffff).subarray(0, 71)), Status.E2BIG);
    // Reserved fields are ignored.
    await accepted(Cmd.QUERY_PORT, msg(Cmd.QUERY_PORT, enc(QueryPortReq, { port: 1, reserved: 0xffff_ffff }), 0xdead_beef));
    await accepted(Cmd.CREATE_CQ, msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: 3, reserved: 1 })));
  });

  it('unknown command numbers are EOPNOTSUPP and change nothing', async () => {
    for (const cmd of [0, 19, 20, 64, 255, 256, 0x1_0001, 0x8000_0000, 0xffff_ffff, 0x8000_0005]) {
      await refused(msg(cmd, new Uint8Array(128)), Status.EOPNOTSUPP);
    }
  });

  it('a batch of valid and invalid commands is handled in order, each with its own status', async () => {
    const items: CtrlItem[] = [];
    for (let i = 0; i < 40; i++) items.push({ req: i % 2 === 0 ? msg(Cmd.CREATE_PD) : msg(Cmd.DESTROY_PD, handleBody(1000 + i)) });
    const res = await rig.ctrlBatch(items);
    const ok = res.filter((_r, i) => i % 2 === 0).map((r) => r.status);
    expect(ok.slice(0, rig.limits.maxPd)).toEqual(new Array(rig.limits.maxPd).fill(Status.OK));
    expect(ok.slice(rig.limits.maxPd)).toEqual(new Array(20 - rig.limits.maxPd).fill(Status.ENOMEM));
    expect(res.filter((_r, i) => i % 2 === 1).every((r) => r.status === Status.ENOENT && r.used === 8)).toBe(true);
    const pdns = res.filter((r, i) => i % 2 === 0 && r.status === Status.OK).map((r) => CreatePdResp.decodeBytes(r.resp).pdn);
    expect(new Set(pdns).size).toBe(rig.limits.maxPd);
    expect(rig.counts().pds).toBe(rig.limits.maxPd);
  });

  it('unexpected guest access: descriptor-level faults on the control queue return the chain unused and the queue keeps serving', async () => {
    const buf = rig.ram.alloc(64, 16);
    rig.ram.bytes(buf, 8).set(msg(Cmd.CREATE_PD));
    const wbuf = rig.ram.alloc(64, 16);
    const end = MEM_END();
    const W = VIRTQ_DESC_F_WRITE;
    const N = VIRTQ_DESC_F_NEXT;
    const cases: [string, Parameters<Rig['ctrlRaw']>[0]][] = [
      ['readable buffer at GPA 0 (below guest memory)', [{ addr: 0, len: 8, flags: N, next: 1 }, { addr: wbuf, len: 16, flags: W }]],
      ['readable buffer straddling the end of memory', [{ addr: end - 4, len: 8, flags: N, next: 1 }, { addr: wbuf, len: 16, flags: W }]],
      ['readable buffer at 2^63', [{ addr: 1n << 63n, len: 8, flags: N, next: 1 }, { addr: wbuf, len: 16, flags: W }]],
      ['readable length 2^32-1', [{ addr: buf, len: 0xffff_ffff, flags: N, next: 1 }, { addr: wbuf, len: 16, flags: W }]],
      ['writable buffer outside memory', [{ addr: buf, len: 8, flags: N, next: 1 }, { addr: end, len: 16, flags: W }]],
      ['writable before readable', [{ addr: wbuf, len: 16, flags: W | N, next: 1 }, { addr: buf, len: 8, flags: 0 }]],
      ['a descriptor loop', [{ addr: buf, len: 8, flags: N, next: 1 }, { addr: wbuf, len: 16, flags: W | N, next: 1 }]],
      ['next past the descriptor table', [{ addr: buf, len: 8, flags: N, nextAbs: rig.ctrlQ.size + 3 }]],
      ['an indirect table that was not negotiated', [{ addr: buf, len: 32, flags: VIRTQ_DESC_F_INDIRECT }]],
    ];
    for (const [what, specs] of cases) {
      const before = rig.snapshot();
      const used = await rig.ctrlRaw(specs);
      expect({ what, used }).toEqual({ what, used: 0 });
      expect(rig.snapshot()).toBe(before);
      await accepted(Cmd.QUERY_DEVICE, msg(Cmd.QUERY_DEVICE));
    }
    expect(rig.counts().pds).toBe(0);
  });
});

// =============================================================================

describe('queries', () => {
  it('QUERY_DEVICE matches the config space and the limits', async () => {
    const q = QueryDeviceResp.decodeBytes(await accepted(Cmd.QUERY_DEVICE, msg(Cmd.QUERY_DEVICE)));
    const cfg = DeviceConfig.decodeBytes(await rig.fe.getConfig(0, DeviceConfig.size));
    expect(cfg.abi_version).toBe(1);
    expect(cfg.num_cq_slots).toBe(rig.limits.numCqSlots);
    expect(cfg.num_qp_slots).toBe(rig.limits.numQpSlots);
    for (const [k, v] of [
      ['max_pd', q.max_pd],
      ['max_mr', q.max_mr],
      ['max_cq', q.max_cq],
      ['max_qp', q.max_qp],
      ['max_ah', q.max_ah],
      ['max_cqe', q.max_cqe],
      ['max_qp_wr', q.max_qp_wr],
      ['max_sge', q.max_send_sge],
      ['max_inline_data', q.max_inline_data],
      ['max_qp_rd_atom', q.max_qp_rd_atom],
    ] as const) {
      expect({ [k]: cfg[k] }).toEqual({ [k]: v });
    }
    expect(cfg.max_mr_size).toBe(q.max_mr_size);
  });

  it('QUERY_PORT: port other than 1 is EINVAL', async () => {
    for (const port of [0, 2, 255, ...U32_EDGES]) await refused(msg(Cmd.QUERY_PORT, enc(QueryPortReq, { port })), Status.EINVAL);
    const p = QueryPortResp.decodeBytes(await accepted(Cmd.QUERY_PORT, msg(Cmd.QUERY_PORT, enc(QueryPortReq, { port: 1 }))));
    expect(p.gid_tbl_len).toBe(rig.limits.gidTblLen);
  });

  it('QUERY_GID: bad port or index is EINVAL; unused entries read as zero; index 0 is the host GID', async () => {
    const n = rig.limits.gidTblLen;
    for (const port of [0, 2, 0xffff_ffff]) await refused(msg(Cmd.QUERY_GID, enc(QueryGidReq, { port, index: 0 })), Status.EINVAL);
    for (const index of [n, n + 1, 256, ...U32_EDGES]) await refused(msg(Cmd.QUERY_GID, enc(QueryGidReq, { port: 1, index })), Status.EINVAL);
    const g0 = QueryGidResp.decodeBytes(await accepted(Cmd.QUERY_GID, msg(Cmd.QUERY_GID, enc(QueryGidReq, { port: 1, index: 0 }))));
    expect(Array.from(g0.gid)).toEqual(Array.from(LOCAL_GID));
    const last = QueryGidResp.decodeBytes(await accepted(Cmd.QUERY_GID, msg(Cmd.QUERY_GID, enc(QueryGidReq, { port: 1, index: n - 1 }))));
    expect(last.gid.every((b) => b === 0)).toBe(true);
  });

  it('QUERY_PKEY: bad port or index is EINVAL; index 0 is 0xFFFF', async () => {
    for (const port of [0, 2, 0xffff_ffff]) await refused(msg(Cmd.QUERY_PKEY, enc(QueryGidReq, { port, index: 0 })), Status.EINVAL);
    for (const index of [1, 2, ...U32_EDGES]) await refused(msg(Cmd.QUERY_PKEY, enc(QueryGidReq, { port: 1, index })), Status.EINVAL);
    expect(QueryPkeyResp.decodeBytes(await accepted(Cmd.QUERY_PKEY, msg(Cmd.QUERY_PKEY, enc(QueryGidReq, { port: 1, index: 0 })))).pkey).toBe(0xffff);
  });

  it('CVE-2018-20191 class (unexpected guest access): config reads anywhere are answered or refused, writes are refused, the device stays up', async () => {
    const full = await rig.fe.getConfig(0, DeviceConfig.size);
    for (let off = 0; off <= DeviceConfig.size; off += 7) {
      for (const size of [1, 2, 4, 8, 13]) {
        if (off + size <= DeviceConfig.size) {
          expect(Array.from(await rig.fe.getConfig(off, size))).toEqual(Array.from(full.subarray(off, off + size)));
        } else {
          await expect(rig.fe.getConfig(off, size)).rejects.toThrow(/GET_CONFIG/);
        }
      }
    }
    await expect(rig.fe.getConfig(0xffff_fff0, 16)).rejects.toThrow(/GET_CONFIG/);
    for (const [offset, size] of [
      [0, 4],
      [4, 2],
      [120, 8],
      [128, 4],
    ] as const) {
      await expect(rig.fe.send(FrontendReq.SET_CONFIG, { kind: 'config', offset, size, flags: 0, data: new Uint8Array(size).fill(0x5a) })).rejects.toThrow(/status 1/);
    }
    expect(Array.from(await rig.fe.getConfig(0, DeviceConfig.size))).toEqual(Array.from(full));
  });
});

// =============================================================================

describe('PD', () => {
  it('DESTROY_PD with dead handles (0, limit, limit+1, 2^31-1, 2^31, 2^32-1, freed, destroyed twice) is ENOENT', async () => {
    const live = await rig.createPd();
    const freed = await rig.createPd();
    await rig.ok(Cmd.DESTROY_PD, handleBody(freed));
    for (const h of [...deadHandles(rig.limits.maxPd, [live]), freed]) await refused(msg(Cmd.DESTROY_PD, handleBody(h)), Status.ENOENT);
    await rig.ok(Cmd.DESTROY_PD, handleBody(live));
    await refused(msg(Cmd.DESTROY_PD, handleBody(live)), Status.ENOENT);
    expect(rig.counts().pds).toBe(0);
  });

  it('DESTROY_PD is EBUSY while an MR, a QP or an AH uses it, and works once they are gone', async () => {
    const b = await base();
    const mr = await rig.regMr(b.pdn, 4096);
    await refused(msg(Cmd.DESTROY_PD, handleBody(b.pdn)), Status.EBUSY);
    await rig.ok(Cmd.DEREG_MR, handleBody(mr.mrn));
    const dma = await rig.dmaMr(b.pdn);
    await refused(msg(Cmd.DESTROY_PD, handleBody(b.pdn)), Status.EBUSY);
    await rig.ok(Cmd.DEREG_MR, handleBody(dma.mrn));
    const qp = await rig.createQp({ pdn: b.pdn, sendCq: b.cq });
    await refused(msg(Cmd.DESTROY_PD, handleBody(b.pdn)), Status.EBUSY);
    await rig.ok(Cmd.DESTROY_QP, handleBody(qp.qpn));
    const ah = await rig.createAh(b.pdn);
    await refused(msg(Cmd.DESTROY_PD, handleBody(b.pdn)), Status.EBUSY);
    await rig.ok(Cmd.DESTROY_AH, handleBody(ah));
    await rig.ok(Cmd.DESTROY_PD, handleBody(b.pdn));
  });
});

// =============================================================================

describe('off-by-one on a full table (the latent rdma_rm.c bug)', () => {
  it('every table holds exactly its limit: the next create is ENOMEM, handles are distinct and non-zero, the last can be freed and reused', async () => {
    const l = rig.limits;
    // PDs
    const pds: number[] = [];
    for (let i = 0; i < l.maxPd; i++) pds.push(await rig.createPd());
    expect(new Set(pds).size).toBe(l.maxPd);
    expect(pds.every((h) => h > 0)).toBe(true);
    await refused(msg(Cmd.CREATE_PD), Status.ENOMEM);
    const lastPd = pds.pop()!;
    await rig.ok(Cmd.DESTROY_PD, handleBody(lastPd));
    pds.push(await rig.createPd());
    await refused(msg(Cmd.CREATE_PD), Status.ENOMEM);
    const pdn = pds[0]!;
    // MRs
    const mrs: number[] = [];
    for (let i = 0; i < l.maxMr; i++) mrs.push((await rig.regMr(pdn, 4096)).mrn);
    expect(new Set(mrs).size).toBe(l.maxMr);
    expect(mrs.every((h) => h > 0)).toBe(true);
    await refused(msg(Cmd.REG_MR, regMrReq(pdn)), Status.ENOMEM);
    await refused(msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn, access: 0 })), Status.ENOMEM);
    await rig.ok(Cmd.DEREG_MR, handleBody(Math.max(...mrs)));
    await rig.ok(Cmd.REG_MR, regMrReq(pdn), MrResp);
    await refused(msg(Cmd.REG_MR, regMrReq(pdn)), Status.ENOMEM);
    // CQs (max_cq = number of slots)
    const cqs: CqInfo[] = [];
    for (let i = 0; i < l.maxCq; i++) cqs.push(await rig.createCq(4));
    expect(new Set(cqs.map((c) => c.cqn)).size).toBe(l.maxCq);
    expect(new Set(cqs.map((c) => c.slot)).size).toBe(l.maxCq);
    expect(cqs.every((c) => c.cqn > 0 && c.slot >= 0 && c.slot < l.numCqSlots)).toBe(true);
    await refused(msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: 4 })), Status.ENOMEM);
    // QPs (max_qp = number of slots)
    const qps: QpInfo[] = [];
    for (let i = 0; i < l.maxQp; i++) qps.push(await rig.createQp({ pdn, sendCq: cqs[i % cqs.length]! }));
    expect(new Set(qps.map((q) => q.qpn)).size).toBe(l.maxQp);
    expect(new Set(qps.map((q) => q.slot)).size).toBe(l.maxQp);
    expect(qps.every((q) => q.qpn >= 0x11 && q.qpn <= 0xffffff && q.slot < l.numQpSlots)).toBe(true);
    await refused(msg(Cmd.CREATE_QP, createQpBody({ pdn, cq: cqs[0]!, cq2: cqs[1]! })), Status.ENOMEM);
    const lastQp = qps.find((q) => q.slot === l.numQpSlots - 1)!;
    await rig.ok(Cmd.DESTROY_QP, handleBody(lastQp.qpn));
    const again = await rig.createQp({ pdn, sendCq: cqs[0]! });
    expect(again.slot).toBe(l.numQpSlots - 1);
    // AHs
    const ahs: number[] = [];
    for (let i = 0; i < l.maxAh; i++) ahs.push(await rig.createAh(pdn));
    expect(new Set(ahs).size).toBe(l.maxAh);
    await refused(msg(Cmd.CREATE_AH, enc(CreateAhReq, { pdn, ah: ahBytes() })), Status.ENOMEM);
    // Handles past the end of each table name nothing.
    await refused(msg(Cmd.DESTROY_PD, handleBody(l.maxPd + 1)), Status.ENOENT);
    await refused(msg(Cmd.DEREG_MR, handleBody(l.maxMr + 1)), Status.ENOENT);
    await refused(msg(Cmd.DESTROY_CQ, handleBody(l.maxCq + 1)), Status.ENOENT);
    await refused(msg(Cmd.DESTROY_AH, handleBody(l.maxAh + 1)), Status.ENOENT);
    expect(rig.counts()).toMatchObject({ pds: l.maxPd, mrs: l.maxMr, cqs: l.maxCq, qps: l.maxQp, ahs: l.maxAh, cqSlots: l.maxCq, qpSlots: l.maxQp });
  });
});

// =============================================================================

describe('CQ', () => {
  it('CVE-2021-3607 / CVE-2018-20125 classes: CREATE_CQ with 0, too many or 2^32-1 entries is EINVAL and allocates nothing', async () => {
    const ring = rig.cqQ[0]!.size;
    for (const cqe of [0, ring, ring + 1, rig.limits.maxCqe + 1, 0x8000, ...U32_EDGES]) await refused(msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe })), Status.EINVAL);
    // The largest the ring allows (one buffer stays in reserve).
    const cq = CreateCqResp.decodeBytes(await accepted(Cmd.CREATE_CQ, msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: ring - 1 }))));
    expect(cq.cqe).toBe(ring - 1);
  });

  it('CREATE_CQ above max_cqe is EINVAL even when the ring is larger', async () => {
    await withRig({ cqSize: 256 }, async (r) => {
      const max = r.limits.maxCqe;
      await refused(msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: max + 1 })), Status.EINVAL, {}, r);
      await accepted(Cmd.CREATE_CQ, msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: max })), {}, r);
    });
  });

  it('DESTROY_CQ with dead handles is ENOENT; EBUSY while a QP uses it as send or receive CQ', async () => {
    const b = await base();
    const freed = await rig.createCq(4);
    await rig.ok(Cmd.DESTROY_CQ, handleBody(freed.cqn));
    for (const h of [...deadHandles(rig.limits.maxCq, [b.cq.cqn, b.cq2.cqn]), freed.cqn]) await refused(msg(Cmd.DESTROY_CQ, handleBody(h)), Status.ENOENT);
    const qp = await rig.createQp({ pdn: b.pdn, sendCq: b.cq, recvCq: b.cq2 });
    await refused(msg(Cmd.DESTROY_CQ, handleBody(b.cq.cqn)), Status.EBUSY);
    await refused(msg(Cmd.DESTROY_CQ, handleBody(b.cq2.cqn)), Status.EBUSY);
    await rig.ok(Cmd.DESTROY_QP, handleBody(qp.qpn));
    await rig.ok(Cmd.DESTROY_CQ, handleBody(b.cq.cqn));
    await refused(msg(Cmd.DESTROY_CQ, handleBody(b.cq.cqn)), Status.ENOENT);
  });

  it('DESTROY_CQ returns the posted CQ buffers with used length 0', async () => {
    const cq = await rig.createCq(8);
    const posted = rig.cqQ[cq.slot]!.inFlight;
    expect(posted).toBeGreaterThan(0);
    const unusedBefore = rig.cqUnused[cq.slot]!;
    await rig.ok(Cmd.DESTROY_CQ, handleBody(cq.cqn));
    await rig.until(() => rig.cqUnused[cq.slot]! - unusedBefore >= posted, 2000, 'CQ buffers back');
    expect(rig.takeCqes(cq)).toEqual([]);
  });

  it('REQ_NOTIFY_CQ: flags other than SOLICITED or NEXT_COMPLETION are EINVAL, dead CQs ENOENT; arming state unchanged', async () => {
    const cq = await rig.createCq(8);
    await rig.ok(Cmd.REQ_NOTIFY_CQ, enc(ReqNotifyCqReq, { cqn: cq.cqn, flags: 1 }));
    for (const flags of [0, 3, 4, 8, 0x100, ...U32_EDGES]) await refused(msg(Cmd.REQ_NOTIFY_CQ, enc(ReqNotifyCqReq, { cqn: cq.cqn, flags })), Status.EINVAL);
    for (const cqn of deadHandles(rig.limits.maxCq, [cq.cqn])) await refused(msg(Cmd.REQ_NOTIFY_CQ, enc(ReqNotifyCqReq, { cqn, flags: 2 })), Status.ENOENT);
    await rig.ok(Cmd.REQ_NOTIFY_CQ, enc(ReqNotifyCqReq, { cqn: cq.cqn, flags: 2 }));
  });
});

// =============================================================================

describe('REG_MR', () => {
  it('dead PDs are ENOENT', async () => {
    const pdn = await rig.createPd();
    const freed = await rig.createPd();
    await rig.ok(Cmd.DESTROY_PD, handleBody(freed));
    for (const h of [...deadHandles(rig.limits.maxPd, [pdn]), freed]) await refused(msg(Cmd.REG_MR, regMrReq(pdn, { pdn: h })), Status.ENOENT);
  });

  it('access flags outside the four, or remote write/atomic without LOCAL_WRITE, are EINVAL', async () => {
    const pdn = await rig.createPd();
    for (const access of [0x10, 0x20, 0x100, 0x8000_0000, 0xffff_ffff, Access.REMOTE_WRITE, Access.REMOTE_ATOMIC, Access.REMOTE_WRITE | Access.REMOTE_READ, Access.REMOTE_ATOMIC | Access.REMOTE_READ]) {
      await refused(msg(Cmd.REG_MR, regMrReq(pdn, { access })), Status.EINVAL);
    }
    for (const access of [0, Access.LOCAL_WRITE, Access.REMOTE_READ, 0xf]) await accepted(Cmd.REG_MR, msg(Cmd.REG_MR, regMrReq(pdn, { access })));
  });

  it('CVE-2021-3607 class (degenerate sizes): length 0 with npages 0 or 1 is EINVAL', async () => {
    const pdn = await rig.createPd();
    await refused(msg(Cmd.REG_MR, regMrReq(pdn, { length: 0n, npages: 0 })), Status.EINVAL);
    await refused(msg(Cmd.REG_MR, regMrReq(pdn, { length: 0n, npages: 1 })), Status.EINVAL);
    await refused(msg(Cmd.REG_MR, regMrReq(pdn, { npages: 0 })), Status.EINVAL);
  });

  it('CVE-2021-3582 class (inconsistent redundant fields): npages that disagrees with iova and length is EINVAL', async () => {
    const pdn = await rig.createPd();
    const gpa = rig.allocBuffer(4 * RDMA_PAGE_SIZE);
    const list = rig.writePageList([0, 1, 2, 3].map((i) => gpa + i * RDMA_PAGE_SIZE));
    const req = (iova: number, length: number, npages: number): Uint8Array => msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: BigInt(iova), length: BigInt(length), page_list: BigInt(list), npages }));
    // 2 pages of data exactly.
    for (const n of [1, 3, 4, 0xffff, 0xffff_ffff]) await refused(req(gpa, 8192, n), Status.EINVAL);
    // One byte more spills into a third page.
    for (const n of [2, 4]) await refused(req(gpa, 8193, n), Status.EINVAL);
    // An unaligned iova: 100 bytes into the page, 4096 bytes long, spans 2 pages.
    for (const n of [1, 3]) await refused(req(gpa + 100, 4096, n), Status.EINVAL);
    // The consistent versions are accepted.
    await accepted(Cmd.REG_MR, req(gpa, 8192, 2));
    await accepted(Cmd.REG_MR, req(gpa, 8193, 3));
    await accepted(Cmd.REG_MR, req(gpa + 100, 4096, 2));
    await accepted(Cmd.REG_MR, req(gpa + 4095, 1, 1));
    await accepted(Cmd.REG_MR, req(gpa + 4095, 2, 2));
  });

  it('length above max_mr_size, a wrapping iova + length, or npages above 512*512 are EINVAL', async () => {
    const pdn = await rig.createPd();
    const max = rig.limits.maxMrSize;
    const page = rig.allocBuffer(4096);
    const list = rig.writePageList([page]);
    const req = (iova: bigint, length: bigint, npages: number): Uint8Array => msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova, length, page_list: BigInt(list), npages }));
    await refused(req(0n, max + 1n, Number((max + 1n + 4095n) / 4096n)), Status.EINVAL);
    await refused(req(0n, 0xffff_ffff_ffff_ffffn, 0xffff_ffff), Status.EINVAL);
    await refused(req(0n, 1n << 63n, 0), Status.EINVAL);
    // iova + length would pass 2^64.
    await refused(req((1n << 64n) - 4096n, 4097n, 2), Status.EINVAL);
    await refused(req(0xffff_ffff_ffff_ffffn, 2n, 2), Status.EINVAL);
    // CVE-2023-1544 class: more pages than a two-level list holds.
    await refused(req(0n, BigInt(MAX_PAGE_LIST_PAGES + 1) * 4096n, MAX_PAGE_LIST_PAGES + 1), Status.EINVAL);
    // Ending exactly at 2^64 does not wrap.
    await accepted(Cmd.REG_MR, req((1n << 64n) - 4096n, 4096n, 1));
  });

  it('CVE-2023-1544 class: the largest MR (512*512 pages, a full two-level list) is accepted; the device reads only the entries npages needs', async () => {
    const pdn = await rig.createPd();
    const data = rig.allocBuffer(4096);
    // One level-2 page naming the same data page 512 times, and a level-1 array of 512 pointers to it, ending exactly at the end of guest memory.
    const l2 = rig.writePageList(new Array<number>(PAGE_LIST_ENTRIES).fill(data));
    const end = MEM_END();
    const l1 = end - 8 * PAGE_LIST_ENTRIES;
    for (let i = 0; i < PAGE_LIST_ENTRIES; i++) rig.ram.dv.setBigUint64(l1 - rig.ram.gpa + 8 * i, BigInt(l2), true);
    const length = BigInt(MAX_PAGE_LIST_PAGES) * 4096n;
    if (length <= rig.limits.maxMrSize) {
      await accepted(Cmd.REG_MR, msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length, page_list: BigInt(l1), npages: MAX_PAGE_LIST_PAGES })));
    }
    // 513 pages: two level-1 entries; put them in the last 16 bytes of guest memory.
    const l1b = end - 16;
    rig.ram.dv.setBigUint64(l1b - rig.ram.gpa, BigInt(l2), true);
    rig.ram.dv.setBigUint64(l1b - rig.ram.gpa + 8, BigInt(l2), true);
    await accepted(Cmd.REG_MR, msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: 513n * 4096n, page_list: BigInt(l1b), npages: 513 })));
    // 512 pages is still one level: an array of 512 entries ending exactly at the end of guest memory.
    const flat = end - 8 * 512;
    for (let i = 0; i < 512; i++) rig.ram.dv.setBigUint64(flat - rig.ram.gpa + 8 * i, BigInt(data), true);
    await accepted(Cmd.REG_MR, msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: 512n * 4096n, page_list: BigInt(flat), npages: 512 })));
    // One entry more than fits before the end of memory.
    await refused(msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: 512n * 4096n, page_list: BigInt(flat + 8), npages: 512 })), Status.EFAULT);
  });

  it('page lists outside guest memory are EFAULT: below, above, straddling the end, at 2^53 and 2^64-8', async () => {
    const pdn = await rig.createPd();
    const end = MEM_END();
    // A valid 2-entry list at the very end of memory (so that +8 straddles it).
    const data = rig.allocBuffer(8192);
    rig.ram.dv.setBigUint64(end - 16 - rig.ram.gpa, BigInt(data), true);
    rig.ram.dv.setBigUint64(end - 8 - rig.ram.gpa, BigInt(data + 4096), true);
    const req = (page_list: bigint): Uint8Array => msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: BigInt(data), length: 8192n, page_list, npages: 2 }));
    for (const at of [0n, BigInt(rig.ram.gpa - 16), BigInt(rig.ram.gpa - 8), BigInt(end - 8), BigInt(end), 1n << 53n, (1n << 64n) - 8n, (1n << 64n) - 16n]) {
      await refused(req(at), Status.EFAULT);
    }
    await accepted(Cmd.REG_MR, req(BigInt(end - 16)));
  });

  it('page addresses: unaligned is EINVAL; outside guest memory (below, at the end, straddling, 2^53, 2^64-4096) is EFAULT', async () => {
    const pdn = await rig.createPd();
    const data = rig.allocBuffer(4096);
    const end = MEM_END();
    const reg = (page: number | bigint): Uint8Array => msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: 4096n, page_list: BigInt(rig.writePageList([page])), npages: 1 }));
    for (const page of [data + 1, data + 8, data + 2048, data + 4095]) await refused(reg(page), Status.EINVAL);
    for (const page of [0, rig.ram.gpa - 4096, end, end + 4096, 1n << 53n, (1n << 64n) - 4096n]) await refused(reg(page), Status.EFAULT);
    // The first and last page of guest memory are fine.
    await accepted(Cmd.REG_MR, reg(rig.ram.gpa));
    await accepted(Cmd.REG_MR, reg(end - 4096));
    // A bad page anywhere in a longer list, not only the first.
    const pages = [data, data, data, end];
    await refused(msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: 4n * 4096n, page_list: BigInt(rig.writePageList(pages)), npages: 4 })), Status.EFAULT);
  });

  it('a page list need not be 8-byte aligned (the doc only requires it to lie in guest memory)', async () => {
    const pdn = await rig.createPd();
    const data = rig.allocBuffer(4096);
    const at = rig.ram.alloc(32, 8) + 3;
    rig.ram.dv.setBigUint64(at - rig.ram.gpa, BigInt(data), true);
    await accepted(Cmd.REG_MR, msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: 4096n, page_list: BigInt(at), npages: 1 })));
  });

  it('two-level lists: bad level-2 pointers are EFAULT, misaligned pages inside a level-2 array EINVAL', async () => {
    const pdn = await rig.createPd();
    const data = rig.allocBuffer(4096);
    const end = MEM_END();
    const l2 = rig.writePageList(new Array<number>(512).fill(data));
    const reg = (l1: (number | bigint)[], npages = 513): Uint8Array =>
      msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 1, iova: 0n, length: BigInt(npages) * 4096n, page_list: BigInt(rig.writePageList(l1)), npages }));
    // The second level-2 array holds only one entry; place it in the last 8 bytes of memory, then one byte further.
    rig.ram.dv.setBigUint64(end - 8 - rig.ram.gpa, BigInt(data), true);
    await accepted(Cmd.REG_MR, reg([l2, end - 8]));
    for (const bad of [0, end - 7, end, rig.ram.gpa - 4096, 1n << 53n, (1n << 64n) - 8n]) await refused(reg([l2, bad]), Status.EFAULT);
    for (const bad of [0, end - 4096 + 8, (1n << 64n) - 4096n]) await refused(reg([bad, l2]), Status.EFAULT);
    // A level-2 array whose 300th page is misaligned.
    const badL2 = rig.writePageList(Array.from({ length: 512 }, (_, i) => (i === 300 ? data + 512 : data)));
    await refused(reg([l2, badL2], 1024), Status.EINVAL);
    // ... or outside memory.
    const farL2 = rig.writePageList(Array.from({ length: 512 }, (_, i) => (i === 511 ? end : data)));
    await refused(reg([l2, farL2], 1024), Status.EFAULT);
    await accepted(Cmd.REG_MR, reg([l2, l2], 1024));
  });

  it('the MR table limit is ENOMEM and a failed REG_MR does not advance any key', async () => {
    const pdn = await rig.createPd();
    const first = await rig.regMr(pdn, 4096);
    await rig.ok(Cmd.DEREG_MR, handleBody(first.mrn));
    // Many refused registrations in between...
    for (let i = 0; i < 5; i++) await refused(msg(Cmd.REG_MR, regMrReq(pdn, { npages: 7 })), Status.EINVAL);
    const second = await rig.regMr(pdn, 4096);
    // ... the number is reused with the next key, not a key skipped by failures.
    expect(second.mrn).toBe(first.mrn);
    expect(second.lkey).not.toBe(first.lkey);
    expect((second.lkey - first.lkey) & 0xff).toBe(1);
  });
});

// =============================================================================

describe('GET_DMA_MR and DEREG_MR', () => {
  it('GET_DMA_MR: dead PDs are ENOENT; remote access flags EINVAL', async () => {
    const pdn = await rig.createPd();
    for (const h of deadHandles(rig.limits.maxPd, [pdn])) await refused(msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn: h, access: 1 })), Status.ENOENT);
    for (const access of [Access.REMOTE_READ, Access.REMOTE_WRITE | 1, Access.REMOTE_ATOMIC | 1, 0xf]) {
      await refused(msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn, access })), Status.EINVAL);
    }
    const r = MrResp.decodeBytes(await accepted(Cmd.GET_DMA_MR, msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn, access: 1 }))));
    expect(r.lkey >>> 8).toBe(r.mrn);
  });

  it('GET_DMA_MR: access bits outside the four defined flags are EINVAL, as for REG_MR', async () => {
    const pdn = await rig.createPd();
    for (const access of [0x10, 0x11, 0x100, 0x8000_0000]) await refused(msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn, access })), Status.EINVAL);
  });

  it('DEREG_MR with dead handles (including an lkey passed as the handle) is ENOENT; twice is ENOENT', async () => {
    const pdn = await rig.createPd();
    const mr = await rig.regMr(pdn, 4096);
    const freed = await rig.regMr(pdn, 4096);
    await rig.ok(Cmd.DEREG_MR, handleBody(freed.mrn));
    for (const h of [...deadHandles(rig.limits.maxMr, [mr.mrn]), freed.mrn, mr.lkey, mr.mrn | 0x100_0000]) await refused(msg(Cmd.DEREG_MR, handleBody(h)), Status.ENOENT);
    await rig.ok(Cmd.DEREG_MR, handleBody(mr.mrn));
    await refused(msg(Cmd.DEREG_MR, handleBody(mr.mrn)), Status.ENOENT);
    expect(rig.counts().mrs).toBe(0);
  });
});

// =============================================================================

describe('CREATE_QP', () => {
  it('dead PD or CQ handles are ENOENT', async () => {
    const b = await base();
    const freedCq = await rig.createCq(4);
    await rig.ok(Cmd.DESTROY_CQ, handleBody(freedCq.cqn));
    for (const h of deadHandles(rig.limits.maxPd, [b.pdn])) await refused(msg(Cmd.CREATE_QP, createQpBody(b, { pdn: h })), Status.ENOENT);
    for (const h of [...deadHandles(rig.limits.maxCq, [b.cq.cqn, b.cq2.cqn]), freedCq.cqn]) {
      await refused(msg(Cmd.CREATE_QP, createQpBody(b, { send_cqn: h })), Status.ENOENT);
      await refused(msg(Cmd.CREATE_QP, createQpBody(b, { recv_cqn: h })), Status.ENOENT);
    }
  });

  it('QP types other than RC, UC, UD (SMI 0, GSI 1, raw, 255) are EOPNOTSUPP', async () => {
    const b = await base();
    for (const t of [0, 1, 5, 6, 8, 0x7f, 0xff]) await refused(msg(Cmd.CREATE_QP, createQpBody(b, { qp_type: t })), Status.EOPNOTSUPP);
    for (const t of [QpType.RC, QpType.UC, QpType.UD]) await accepted(Cmd.CREATE_QP, msg(Cmd.CREATE_QP, createQpBody(b, { qp_type: t })));
  });

  it('CVE-2018-20125 / CVE-2021-3607 classes: WR counts of 0, above max_qp_wr, above the ring, or 2^32-1 are EINVAL and allocate nothing', async () => {
    const b = await base();
    const max = rig.limits.maxQpWr;
    for (const n of [0, max + 1, 0x1_0000, ...U32_EDGES]) {
      await refused(msg(Cmd.CREATE_QP, createQpBody(b, { max_send_wr: n })), Status.EINVAL);
      await refused(msg(Cmd.CREATE_QP, createQpBody(b, { max_recv_wr: n })), Status.EINVAL);
    }
    const qp = CreateQpResp.decodeBytes(await accepted(Cmd.CREATE_QP, msg(Cmd.CREATE_QP, createQpBody(b, { max_send_wr: max, max_recv_wr: 1 }))));
    expect([qp.max_send_wr, qp.max_recv_wr]).toEqual([max, 1]);
  });

  it('WR counts above the SQ or RQ ring size are EINVAL even below max_qp_wr', async () => {
    await withRig({ sqSize: 8, rqSize: 16 }, async (r) => {
      const pdn = await r.createPd();
      const cq = await r.createCq(8);
      const body = (o: Partial<Parameters<typeof CreateQpReq.encodeBytes>[0]>): Uint8Array =>
        msg(Cmd.CREATE_QP, enc(CreateQpReq, { pdn, qp_type: QpType.RC, send_cqn: cq.cqn, recv_cqn: cq.cqn, max_send_wr: 8, max_recv_wr: 16, ...o }));
      await refused(body({ max_send_wr: 9 }), Status.EINVAL, {}, r);
      await refused(body({ max_recv_wr: 17 }), Status.EINVAL, {}, r);
      await accepted(Cmd.CREATE_QP, body({}), {}, r);
    });
  });

  it('CVE-2018-20124 class at creation: SGE counts above max_sge, inline above max_inline_data, sq_sig_all above 1 are EINVAL', async () => {
    const b = await base();
    const l = rig.limits;
    for (const n of [l.maxSge + 1, 0x100, 0xffff, ...U32_EDGES]) {
      await refused(msg(Cmd.CREATE_QP, createQpBody(b, { max_send_sge: n })), Status.EINVAL);
      await refused(msg(Cmd.CREATE_QP, createQpBody(b, { max_recv_sge: n })), Status.EINVAL);
    }
    for (const n of [l.maxInlineData + 1, 4097, ...U32_EDGES]) await refused(msg(Cmd.CREATE_QP, createQpBody(b, { max_inline_data: n })), Status.EINVAL);
    for (const s of [2, 0x80, 0xff]) await refused(msg(Cmd.CREATE_QP, createQpBody(b, { sq_sig_all: s })), Status.EINVAL);
    await accepted(Cmd.CREATE_QP, msg(Cmd.CREATE_QP, createQpBody(b, { max_send_sge: 0, max_recv_sge: 0, max_inline_data: 0 })));
  });

  it('the QP limit is ENOMEM and leaves no slot or QPN taken', async () => {
    const b = await base();
    for (let i = 0; i < rig.limits.maxQp; i++) await rig.createQp({ pdn: b.pdn, sendCq: b.cq });
    await refused(msg(Cmd.CREATE_QP, createQpBody(b)), Status.ENOMEM);
    expect(rig.counts().qpSlots).toBe(rig.limits.maxQp);
  });
});

// =============================================================================

describe('MODIFY_QP, QUERY_QP, DESTROY_QP', () => {
  async function rcQp(): Promise<{ b: Base; qp: QpInfo }> {
    const b = await base();
    return { b, qp: await rig.createQp({ pdn: b.pdn, sendCq: b.cq }) };
  }

  /** MODIFY_QP that must be EINVAL and leave the QP (QUERY_QP) and every table as they were. */
  async function badModify(qpn: number, mask: number, attr: Parameters<typeof modifyBody>[2] = {}, ah: Parameters<typeof modifyBody>[3] = null): Promise<void> {
    const q = await rig.queryQp(qpn);
    await refused(msg(Cmd.MODIFY_QP, modifyBody(qpn, mask, attr, ah)), Status.EINVAL);
    expect(await rig.queryQp(qpn)).toEqual(q);
  }

  it('QUERY_QP, MODIFY_QP and DESTROY_QP on QPNs that name nothing are ENOENT (0, reserved, 24-bit max, high bits set, freed)', async () => {
    const { b, qp } = await rcQp();
    const freed = await rig.createQp({ pdn: b.pdn, sendCq: b.cq });
    await rig.ok(Cmd.DESTROY_QP, handleBody(freed.qpn));
    const dead = [0, 1, 0x10, 0xff_ffff, 0x100_0000 | qp.qpn, 0xff00_0000 | qp.qpn, ...U32_EDGES, freed.qpn].filter((h) => h !== qp.qpn);
    for (const h of dead) {
      await refused(msg(Cmd.QUERY_QP, handleBody(h)), Status.ENOENT);
      await refused(msg(Cmd.MODIFY_QP, modifyBody(h, QpAttr.STATE, { qp_state: QpState.ERR })), Status.ENOENT);
      await refused(msg(Cmd.DESTROY_QP, handleBody(h)), Status.ENOENT);
    }
    await rig.ok(Cmd.DESTROY_QP, handleBody(qp.qpn));
    await refused(msg(Cmd.DESTROY_QP, handleBody(qp.qpn)), Status.ENOENT);
  });

  it('unknown or unsupported attribute-mask bits, and states that are not states, are EINVAL', async () => {
    const { qp } = await rcQp();
    const init = QpAttr.STATE | QpAttr.PKEY_INDEX | QpAttr.PORT | QpAttr.ACCESS_FLAGS;
    for (const extra of [1 << 21, 1 << 31, QpAttr.ALT_PATH, QpAttr.PATH_MIG_STATE, QpAttr.EN_SQD_ASYNC_NOTIFY, QpAttr.CAP]) {
      await badModify(qp.qpn, init | extra, { qp_state: QpState.INIT, port_num: 1 });
    }
    for (const s of [7, 8, 0x80, 0xff]) await badModify(qp.qpn, QpAttr.STATE, { qp_state: s });
    await badModify(qp.qpn, 0xffff_ffff, { qp_state: QpState.INIT, port_num: 1 });
  });

  it('protocol order (CVE-2022-1050 class): transitions that skip a state are EINVAL', async () => {
    const { qp } = await rcQp();
    const A = QpAttr;
    // From RESET: RTR, RTS, SQD, SQE are not reachable.
    await badModify(qp.qpn, A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER, { qp_state: QpState.RTR, path_mtu: 3, dest_qp_num: 0x20 }, {});
    await badModify(qp.qpn, A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC, { qp_state: QpState.RTS });
    await badModify(qp.qpn, A.STATE, { qp_state: QpState.SQD });
    await badModify(qp.qpn, A.STATE, { qp_state: QpState.SQE });
    await rig.toInit(qp);
    // INIT -> RTS, INIT -> SQD.
    await badModify(qp.qpn, A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC, { qp_state: QpState.RTS });
    await badModify(qp.qpn, A.STATE, { qp_state: QpState.SQD });
    await rig.toRtr(qp, 0x33);
    await rig.toRts(qp);
    // RTS -> INIT, RTS -> RTR, RTS -> SQD; SQE -> RTS for RC.
    await badModify(qp.qpn, A.STATE | A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, { qp_state: QpState.INIT, port_num: 1 });
    await badModify(qp.qpn, A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER, { qp_state: QpState.RTR, path_mtu: 3 }, {});
    await badModify(qp.qpn, A.STATE, { qp_state: QpState.SQD });
    // A mask without STATE is RTS -> RTS: only CUR_STATE, ACCESS_FLAGS, MIN_RNR_TIMER are allowed.
    for (const extra of [A.PATH_MTU, A.PORT, A.PKEY_INDEX, A.QKEY, A.AV, A.DEST_QPN, A.SQ_PSN, A.RQ_PSN, A.TIMEOUT, A.RETRY_CNT, A.RNR_RETRY, A.MAX_QP_RD_ATOMIC, A.MAX_DEST_RD_ATOMIC]) {
      await badModify(qp.qpn, extra, { path_mtu: 3, port_num: 1 }, extra === A.AV ? {} : null);
    }
    await rig.modifyOk(qp.qpn, A.MIN_RNR_TIMER | A.ACCESS_FLAGS, { min_rnr_timer: 5, qp_access_flags: Access.REMOTE_READ });
    // Any -> RESET and any -> ERR take nothing but CUR_STATE.
    await badModify(qp.qpn, A.STATE | A.PORT, { qp_state: QpState.ERR, port_num: 1 });
    await badModify(qp.qpn, A.STATE | A.ACCESS_FLAGS, { qp_state: QpState.RESET });
    await badModify(qp.qpn, A.STATE | A.CUR_STATE, { qp_state: QpState.ERR, cur_qp_state: QpState.RTR });
    expect(await rig.qpState(qp.qpn)).toBe(QpState.RTS);
    await rig.modifyOk(qp.qpn, A.STATE | A.CUR_STATE, { qp_state: QpState.ERR, cur_qp_state: QpState.RTS });
    // ERR -> RTS, ERR -> INIT are not transitions.
    await badModify(qp.qpn, A.STATE | A.SQ_PSN, { qp_state: QpState.RTS });
    await badModify(qp.qpn, A.STATE | A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, { qp_state: QpState.INIT, port_num: 1 });
    // A mask without STATE in RESET (RESET -> RESET) takes nothing.
    await rig.modifyOk(qp.qpn, A.STATE, { qp_state: QpState.RESET });
    await badModify(qp.qpn, A.PORT, { port_num: 1 });
  });

  it('RESET -> INIT: missing or extra attributes and bad values are EINVAL', async () => {
    const { qp } = await rcQp();
    const A = QpAttr;
    const req = A.STATE | A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS;
    const ok = { qp_state: QpState.INIT, port_num: 1 };
    for (const missing of [A.PKEY_INDEX, A.PORT, A.ACCESS_FLAGS]) await badModify(qp.qpn, req & ~missing, ok);
    for (const extra of [A.QKEY, A.AV, A.PATH_MTU, A.DEST_QPN, A.RQ_PSN, A.SQ_PSN, A.TIMEOUT, A.CUR_STATE]) {
      await badModify(qp.qpn, req | extra, { ...ok, cur_qp_state: QpState.RESET }, extra === A.AV ? {} : null);
    }
    for (const port_num of [0, 2, 0xff]) await badModify(qp.qpn, req, { ...ok, port_num });
    for (const pkey_index of [1, 0xffff]) await badModify(qp.qpn, req, { ...ok, pkey_index });
    for (const qp_access_flags of [0x10, 0x100, 0xffff_ffff]) await badModify(qp.qpn, req, { ...ok, qp_access_flags });
    await rig.modifyOk(qp.qpn, req, { ...ok, qp_access_flags: Access.REMOTE_READ });
    expect(await rig.qpState(qp.qpn)).toBe(QpState.INIT);
  });

  it('INIT -> RTR: every out-of-range value is EINVAL (path_mtu, dest_qp_num, rq_psn, max_dest_rd_atomic, min_rnr_timer, AV port, sgid_index)', async () => {
    const { qp } = await rcQp();
    await rig.toInit(qp);
    const A = QpAttr;
    const mask = A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER;
    const ok = { qp_state: QpState.RTR, path_mtu: 3, dest_qp_num: 0x40, rq_psn: 0, max_dest_rd_atomic: 1, min_rnr_timer: 1 };
    for (const path_mtu of [0, 6, 7, 0xff]) await badModify(qp.qpn, mask, { ...ok, path_mtu }, {});
    for (const dest_qp_num of [0x100_0000, 0xffff_ffff]) await badModify(qp.qpn, mask, { ...ok, dest_qp_num }, {});
    for (const rq_psn of [0x100_0000, 0xffff_ffff]) await badModify(qp.qpn, mask, { ...ok, rq_psn }, {});
    for (const max_dest_rd_atomic of [rig.limits.maxQpRdAtom + 1, 0xff]) await badModify(qp.qpn, mask, { ...ok, max_dest_rd_atomic }, {});
    for (const min_rnr_timer of [32, 0xff]) await badModify(qp.qpn, mask, { ...ok, min_rnr_timer }, {});
    for (const port_num of [0, 2, 0xff]) await badModify(qp.qpn, mask, ok, { port_num });
    for (const sgid_index of [1, rig.limits.gidTblLen, 0xff]) await badModify(qp.qpn, mask, ok, { sgid_index });
    for (const missing of [A.AV, A.PATH_MTU, A.DEST_QPN, A.RQ_PSN, A.MAX_DEST_RD_ATOMIC, A.MIN_RNR_TIMER]) await badModify(qp.qpn, mask & ~missing, ok, {});
    for (const extra of [A.SQ_PSN, A.TIMEOUT, A.RETRY_CNT, A.QKEY, A.PORT]) await badModify(qp.qpn, mask | extra, { ...ok, port_num: 1 }, {});
    await rig.modifyOk(qp.qpn, mask, ok, {});
  });

  it('RTR -> RTS: every out-of-range value, and a CUR_STATE that is not current, is EINVAL', async () => {
    const { qp } = await rcQp();
    await rig.toInit(qp);
    await rig.toRtr(qp, 0x40);
    const A = QpAttr;
    const mask = A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC;
    const ok = { qp_state: QpState.RTS, sq_psn: 1, timeout: 14, retry_cnt: 7, rnr_retry: 7, max_rd_atomic: 1 };
    for (const sq_psn of [0x100_0000, 0xffff_ffff]) await badModify(qp.qpn, mask, { ...ok, sq_psn });
    for (const timeout of [32, 0xff]) await badModify(qp.qpn, mask, { ...ok, timeout });
    for (const retry_cnt of [8, 0xff]) await badModify(qp.qpn, mask, { ...ok, retry_cnt });
    for (const rnr_retry of [8, 0xff]) await badModify(qp.qpn, mask, { ...ok, rnr_retry });
    for (const max_rd_atomic of [rig.limits.maxQpRdAtom + 1, 0xff]) await badModify(qp.qpn, mask, { ...ok, max_rd_atomic });
    for (const cur_qp_state of [QpState.RESET, QpState.INIT, QpState.RTS, 0xff]) await badModify(qp.qpn, mask | A.CUR_STATE, { ...ok, cur_qp_state });
    await rig.modifyOk(qp.qpn, mask | A.CUR_STATE, { ...ok, cur_qp_state: QpState.RTR });
  });

  it('UD and UC: attributes their transitions do not take are EINVAL', async () => {
    const b = await base();
    const ud = await rig.createQp({ pdn: b.pdn, sendCq: b.cq, type: QpType.UD });
    const uc = await rig.createQp({ pdn: b.pdn, sendCq: b.cq, type: QpType.UC });
    const A = QpAttr;
    // UD RESET -> INIT takes QKEY, not ACCESS_FLAGS.
    await badModify(ud.qpn, A.STATE | A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, { qp_state: QpState.INIT, port_num: 1 });
    await rig.toInit(ud);
    // UD INIT -> RTR takes no AV or DEST_QPN.
    await badModify(ud.qpn, A.STATE | A.AV, { qp_state: QpState.RTR }, {});
    await badModify(ud.qpn, A.STATE | A.DEST_QPN, { qp_state: QpState.RTR, dest_qp_num: 5 });
    // UC takes no RDMA READ/atomic attributes.
    await rig.toInit(uc);
    await badModify(uc.qpn, A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC, { qp_state: QpState.RTR, path_mtu: 3 }, {});
    await rig.toRtr(uc, 0x50);
    await badModify(uc.qpn, A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT, { qp_state: QpState.RTS });
  });

  it('QUERY_QP with a writable part too short for the response is E2BIG', async () => {
    const { qp } = await rcQp();
    await refused(msg(Cmd.QUERY_QP, handleBody(qp.qpn)), Status.E2BIG, { writable: 8 + RESP_SIZE[Cmd.QUERY_QP] - 1 });
  });
});

// =============================================================================

describe('AH', () => {
  it('CREATE_AH: dead PDs are ENOENT; port other than 1 or an sgid_index naming no GID is EINVAL; the limit is ENOMEM', async () => {
    const pdn = await rig.createPd();
    const body = (p: number, ah: Parameters<typeof ahBytes>[0] = {}): Uint8Array => msg(Cmd.CREATE_AH, enc(CreateAhReq, { pdn: p, ah: ahBytes(ah) }));
    for (const h of deadHandles(rig.limits.maxPd, [pdn])) await refused(body(h), Status.ENOENT);
    for (const port_num of [0, 2, 0xff]) await refused(body(pdn, { port_num }), Status.EINVAL);
    for (const sgid_index of [1, 3, rig.limits.gidTblLen, 0xff]) await refused(body(pdn, { sgid_index }), Status.EINVAL);
    for (let i = 0; i < rig.limits.maxAh; i++) await accepted(Cmd.CREATE_AH, body(pdn));
    await refused(body(pdn), Status.ENOMEM);
  });

  it('DESTROY_AH with dead handles is ENOENT; twice is ENOENT', async () => {
    const pdn = await rig.createPd();
    const ah = await rig.createAh(pdn);
    const freed = await rig.createAh(pdn);
    await rig.ok(Cmd.DESTROY_AH, handleBody(freed));
    for (const h of [...deadHandles(rig.limits.maxAh, [ah]), freed]) await refused(msg(Cmd.DESTROY_AH, handleBody(h)), Status.ENOENT);
    await rig.ok(Cmd.DESTROY_AH, handleBody(ah));
    await refused(msg(Cmd.DESTROY_AH, handleBody(ah)), Status.ENOENT);
  });
});

// =============================================================================

describe('CVE-2022-1050 class: protocol-order violations', () => {
  it('CREATE_CQ before its CQ slot virtqueue is set up is EINVAL and allocates nothing', async () => {
    await withRig({ notStarted: [cqVq(0)] }, async (r) => {
      await refused(msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: 4 })), Status.EINVAL, {}, r);
      expect(r.counts()).toMatchObject({ cqs: 0, cqSlots: 0 });
    });
  });

  it('CREATE_QP before its SQ or RQ virtqueue is set up is EINVAL and allocates nothing', async () => {
    for (const which of ['sq', 'rq'] as const) {
      const n = 8; // SMALL_LIMITS.numCqSlots
      await withRig({ notStarted: [which === 'sq' ? sqVq(n, 0) : rqVq(n, 0)] }, async (r) => {
        const pdn = await r.createPd();
        const cq = await r.createCq(4);
        await refused(msg(Cmd.CREATE_QP, enc(CreateQpReq, { pdn, qp_type: QpType.RC, send_cqn: cq.cqn, recv_cqn: cq.cqn, max_send_wr: 1, max_recv_wr: 1 })), Status.EINVAL, {}, r);
        expect(r.counts()).toMatchObject({ qps: 0, qpSlots: 0 });
      });
    }
  });

  it('commands naming objects that were destroyed are refused: REG_MR/GET_DMA_MR/CREATE_AH on a dead PD, CREATE_QP and REQ_NOTIFY_CQ on a dead CQ', async () => {
    const b = await base();
    await rig.ok(Cmd.DESTROY_PD, handleBody(b.pdn));
    await rig.ok(Cmd.DESTROY_CQ, handleBody(b.cq.cqn));
    await refused(msg(Cmd.REG_MR, regMrReq(b.pdn)), Status.ENOENT);
    await refused(msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn: b.pdn })), Status.ENOENT);
    await refused(msg(Cmd.CREATE_AH, enc(CreateAhReq, { pdn: b.pdn, ah: ahBytes() })), Status.ENOENT);
    const pdn = await rig.createPd();
    await refused(msg(Cmd.CREATE_QP, createQpBody({ ...b, pdn })), Status.ENOENT);
    await refused(msg(Cmd.REQ_NOTIFY_CQ, enc(ReqNotifyCqReq, { cqn: b.cq.cqn, flags: 2 })), Status.ENOENT);
  });

  it('CQ buffers posted on a slot before any CQ exists are not consumed and serve the CQ created there later', async () => {
    const posted = rig.cqQ[0]!.inFlight;
    await rig.settle(10);
    expect(rig.cqQ[0]!.inFlight).toBe(posted);
    expect(rig.cqUnused[0]).toBe(0);
    const cq = await rig.createCq(8);
    expect(cq.slot).toBe(0);
  });
});

// =============================================================================

describe('starvation: one kick of the control queue must not stall the device (docs §9: no hang)', () => {
  it('100 REG_MRs of 1 GiB, each failing at its last page, do not block the event loop for a second', async () => {
    const pdn = await rig.createPd();
    const page = rig.allocBuffer(4096);
    const l2 = rig.writePageList(new Array<number>(PAGE_LIST_ENTRIES).fill(page));
    const lastBad = rig.writePageList([...new Array<number>(PAGE_LIST_ENTRIES - 1).fill(page), 0]);
    const l1 = rig.writePageList([...new Array<number>(PAGE_LIST_ENTRIES - 1).fill(l2), lastBad]);
    const req = msg(Cmd.REG_MR, enc(RegMrReq, { pdn, access: 0xf, iova: 0n, length: 1n << 30n, page_list: BigInt(l1), npages: MAX_PAGE_LIST_PAGES }));
    const stalls = rig.watchStalls();
    const res = await rig.ctrlBatch(new Array(100).fill(0).map(() => ({ req })), 120_000);
    const maxStall = stalls();
    expect(res.every((r) => r.status === Status.EFAULT)).toBe(true);
    expect(rig.counts().mrs).toBe(0);
    expect({ maxStallMs: Math.round(maxStall), under: maxStall < 1000 }).toMatchObject({ under: true });
  }, 120_000);
});

// =============================================================================

describe('CVE-2018-20123/20126/2021-3608 class: failed creates leave nothing allocated', () => {
  it('a long run of refused creates of every kind leaves every count where it was', async () => {
    const b = await base();
    const before = rig.counts();
    const snap = rig.snapshot();
    const bad: CtrlItem[] = [];
    for (let i = 0; i < 10; i++) {
      bad.push({ req: msg(Cmd.CREATE_CQ, enc(CreateCqReq, { cqe: 0 })) });
      bad.push({ req: msg(Cmd.CREATE_QP, createQpBody(b, { max_send_wr: 0 })) });
      bad.push({ req: msg(Cmd.CREATE_QP, createQpBody(b, { qp_type: 1 })) });
      bad.push({ req: msg(Cmd.CREATE_QP, createQpBody(b, { recv_cqn: 999 })) });
      bad.push({ req: msg(Cmd.REG_MR, regMrReq(b.pdn, { npages: 3 })) });
      bad.push({ req: msg(Cmd.REG_MR, regMrReq(b.pdn, { page_list: 0n })) });
      bad.push({ req: msg(Cmd.GET_DMA_MR, enc(GetDmaMrReq, { pdn: b.pdn, access: Access.REMOTE_READ })) });
      bad.push({ req: msg(Cmd.CREATE_AH, enc(CreateAhReq, { pdn: b.pdn, ah: ahBytes({ sgid_index: 2 }) })) });
      bad.push({ req: msg(Cmd.CREATE_AH, enc(CreateAhReq, { pdn: 0, ah: ahBytes() })) });
      bad.push({ req: msg(Cmd.CREATE_PD).subarray(0, 5) });
      bad.push({ req: msg(Cmd.CREATE_QP, createQpBody(b).subarray(0, 39)) });
      // (Creates refused for a short writable part are covered one by one above.)
    }
    const res = await rig.ctrlBatch(bad);
    expect(res.every((r) => r.status !== Status.OK && r.used === 8)).toBe(true);
    expect(rig.counts()).toEqual(before);
    expect(rig.snapshot()).toBe(snap);
  });
});
