/**
 * Seeded random fuzzing of the control queue and the send/receive queues.
 * Deterministic: set VRDMA_FUZZ_SEED to replay a run; the seed is printed
 * with every failure. Checks: no crash (no ERROR line in the device log),
 * no hang (every batch returns within a deadline), every chain returned
 * exactly once, every status one of the documented values with the right
 * used length, every CQE well-formed, no byte of guest memory outside what
 * may be written changed; and afterwards a fresh valid scenario still works
 * on the same device.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Access, Cmd, PAGE_LIST_ENTRIES, QpAttr, QpState, QpType, RDMA_PAGE_SIZE, SendFlag, SendOp, Status, WcOpcode, WcStatus } from '../../abi/constants.js';
import {
  CreateAhReq,
  CreateAhResp,
  CreateCqReq,
  CreateCqResp,
  CreatePdResp,
  CreateQpReq,
  CreateQpResp,
  GetDmaMrReq,
  MrResp,
  QueryGidReq,
  QueryPortReq,
  RegMrReq,
  ReqNotifyCqReq,
} from '../../abi/structs.js';
import {
  DOCUMENTED_STATUSES,
  REQ_SIZE,
  RESP_SIZE,
  Rig,
  ahBytes,
  enc,
  handleBody,
  modifyBody,
  msg,
  prng,
  recvWqe,
  sendWqe,
  type CqInfo,
  type CtrlItem,
  type MrInfo,
  type QpInfo,
  type SgeSpec,
} from './rig.js';

const SEED = Number(process.env.VRDMA_FUZZ_SEED ?? 0x5eed_2024) >>> 0;
const CONTROL_MESSAGES = Number(process.env.VRDMA_FUZZ_CONTROL ?? 100_000);
const WQES = Number(process.env.VRDMA_FUZZ_WQES ?? 100_000);
const seedText = `seed 0x${SEED.toString(16)} (VRDMA_FUZZ_SEED=${SEED})`;

let rig: Rig;

/** Runs `fn`; any failure names the seed. */
async function seeded(what: string, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (err) {
    const e = err as Error;
    e.message = `${what} failed with ${seedText}: ${e.message}`;
    throw e;
  }
}

class Rand {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = prng(seed);
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  u32(): number {
    return (this.int(0x1_0000) * 0x1_0000 + this.int(0x1_0000)) >>> 0;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  /** A number that is often on an edge. */
  edgy(small: number): number {
    return this.pick([0, 1, small, small + 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, this.u32(), this.int(small + 2), this.int(small + 2)]);
  }
  /** Splits `len` into 1..4 random parts. */
  split(len: number): number[] | undefined {
    if (len === 0 || this.chance(0.7)) return undefined;
    const parts: number[] = [];
    const n = 1 + this.int(3);
    for (let i = 0; i < n; i++) parts.push(this.int(len + 1));
    return parts;
  }
}

function counter(): Map<string, number> {
  return new Map();
}
function bump(m: Map<string, number>, k: string, by = 1): void {
  m.set(k, (m.get(k) ?? 0) + by);
}
function table(m: Map<string, number>): string {
  return [...m.entries()]
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `  ${k.padEnd(44)} ${v}`)
    .join('\n');
}

beforeAll(async () => {
  rig = await Rig.start({
    logLevel: 'warn',
    ctrlSize: 1024,
    cqSize: 512,
    sqSize: 128,
    rqSize: 128,
    ramBytes: 48 << 20,
    limits: { maxCqe: 511, maxQpWr: 128, maxMr: 24, maxAh: 8 },
  });
  console.log(`fuzz: ${seedText}; ${CONTROL_MESSAGES} control messages, ${WQES} WQEs`);
}, 60_000);

afterAll(async () => {
  await rig?.stop();
});

// =============================================================================
// Control queue

interface Pool {
  pd: number[];
  cq: number[];
  qp: number[];
  mr: number[];
  ah: number[];
  dead: number[];
}

/** What the driver was told: objects created and not destroyed according to the statuses it received. */
const told = { pd: new Set<number>(), cq: new Set<number>(), qp: new Set<number>(), mr: new Set<number>(), ah: new Set<number>() };
/** Objects the device held that no successful command had told the driver about (a refused command left them), with what was refused in that batch. */
const leaks: string[] = [];
const knownLeaks = new Set<string>();
let controlDone = false;

describe('fuzz', () => {
  it(`control queue: ${CONTROL_MESSAGES} random commands — documented statuses and used lengths, no crash, no hang`, async () => {
    await seeded('control fuzz', async () => {
      const r = new Rand(SEED);
      const res = rig.device.resources!;
      // Some valid page lists to point REG_MR at.
      const data = rig.allocBuffer(8 * RDMA_PAGE_SIZE);
      const lists = {
        one: rig.writePageList([data]),
        two: rig.writePageList([data, data + 4096]),
        big: rig.writePageList(new Array<number>(PAGE_LIST_ENTRIES + 1).fill(data)),
      };
      const end = rig.ram.gpa + rig.ram.size;
      const pool = (): Pool => {
        // The driver's own knowledge, plus what the device holds (so that leaked objects still get exercised).
        return {
          pd: [...told.pd, ...[...res.pds.values()].map((p) => p.pdn)],
          cq: [...told.cq, ...[...res.cqs.values()].map((c) => c.cqn)],
          qp: [...told.qp, ...res.qps.keys()],
          mr: [...told.mr, ...res.mrs.all().map((m) => m.mrn)],
          ah: [...told.ah, ...[...res.ahs.values()].map((a) => a.ahn)],
          dead: [0, 1, 2, 0x11, 0xff_ffff, 0x100_0011, 0xffff_ffff],
        };
      };
      const handle = (p: Pool, kind: keyof Pool): number => {
        const mine = p[kind];
        if (mine.length > 0 && r.chance(0.75)) return r.pick(mine);
        if (r.chance(0.5)) return r.pick(p.dead);
        return r.pick([...p.pd, ...p.cq, ...p.qp, ...p.mr, ...p.ah, r.u32()].filter((x) => x !== undefined));
      };

      const gen = (p: Pool): { item: CtrlItem; cmd: number; bodyLen: number } => {
        const roll = r.next();
        let cmd: number;
        let body: Uint8Array;
        if (roll < 0.05) {
          // Random bytes, random length.
          const n = r.int(140);
          const b = new Uint8Array(n);
          for (let i = 0; i < n; i++) b[i] = r.int(256);
          if (n >= 4 && r.chance(0.5)) new DataView(b.buffer).setUint32(0, 1 + r.int(18), true);
          const item: CtrlItem = { req: b, writable: r.pick([0, 7, 8, 16, 64, 200]) };
          const split = r.split(n);
          if (split !== undefined) item.split = split;
          return { item, cmd: n >= 4 ? new DataView(b.buffer).getUint32(0, true) : -1, bodyLen: Math.max(0, n - 8) };
        }
        if (roll < 0.08) {
          cmd = r.pick([0, 19, 20, 99, 255, r.u32()]);
          body = new Uint8Array(r.int(64));
        } else {
          cmd = 1 + r.int(18);
          body = validish(cmd, p);
        }
        // Mutations.
        if (body.length > 0 && r.chance(0.35)) {
          const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
          const k = 1 + r.int(3);
          for (let i = 0; i < k; i++) {
            const how = r.int(3);
            if (how === 0) body[r.int(body.length)] = r.int(256);
            else if (how === 1 && body.length >= 4) dv.setUint32(4 * r.int(body.length >> 2), r.edgy(64), true);
            else body[r.int(body.length)]! ^= 1 << r.int(8);
          }
        }
        if (r.chance(0.06)) body = body.subarray(0, r.int(body.length + 1));
        if (r.chance(0.04)) body = new Uint8Array([...body, ...new Uint8Array(r.int(32)).map(() => r.int(256))]);
        const req = msg(cmd, body, r.chance(0.03) ? r.u32() : 0);
        const need = 8 + (RESP_SIZE[cmd as Cmd] ?? 0);
        const writable = r.chance(0.8) ? need + r.pick([0, 0, 0, 8, 100]) : r.int(need + 1);
        const item: CtrlItem = { req, writable };
        const split = r.split(req.length);
        if (split !== undefined) item.split = split;
        if (writable > 8 && r.chance(0.2)) item.writableSplit = [r.int(writable), r.int(writable)];
        return { item, cmd, bodyLen: body.length };
      };

      const validish = (cmd: number, p: Pool): Uint8Array => {
        const l = rig.limits;
        switch (cmd as Cmd) {
          case Cmd.QUERY_DEVICE:
          case Cmd.CREATE_PD:
            return new Uint8Array(0);
          case Cmd.QUERY_PORT:
            return enc(QueryPortReq, { port: r.chance(0.8) ? 1 : r.edgy(2) });
          case Cmd.QUERY_GID:
          case Cmd.QUERY_PKEY:
            return enc(QueryGidReq, { port: r.chance(0.8) ? 1 : r.edgy(2), index: r.chance(0.7) ? r.int(l.gidTblLen) : r.edgy(l.gidTblLen) });
          case Cmd.DESTROY_PD:
            return handleBody(handle(p, 'pd'));
          case Cmd.CREATE_CQ:
            return enc(CreateCqReq, { cqe: r.chance(0.8) ? 1 + r.int(64) : r.edgy(512) });
          case Cmd.DESTROY_CQ:
            return handleBody(handle(p, 'cq'));
          case Cmd.REQ_NOTIFY_CQ:
            return enc(ReqNotifyCqReq, { cqn: handle(p, 'cq'), flags: r.chance(0.8) ? 1 + r.int(2) : r.edgy(3) });
          case Cmd.REG_MR: {
            const kind = r.int(4);
            const iovaOff = r.chance(0.5) ? 0 : r.int(4096);
            const length = kind === 0 ? 1 + r.int(4096 - iovaOff) : kind === 1 ? 4096 + r.int(4096 - iovaOff) : kind === 2 ? 513 * 4096 - iovaOff : r.edgy(8192);
            const npages = Math.ceil((iovaOff + length) / 4096);
            const list = kind === 0 ? lists.one : kind === 1 ? lists.two : kind === 2 ? lists.big : r.pick([lists.one, 0, end - 8, r.u32()]);
            return enc(RegMrReq, {
              pdn: handle(p, 'pd'),
              access: r.chance(0.8) ? r.pick([0, 1, 5, 7, 0xf, 4]) : r.edgy(16),
              iova: r.chance(0.9) ? BigInt(data + iovaOff) : r.u64(),
              length: BigInt(length),
              page_list: BigInt(list),
              npages: r.chance(0.85) ? npages : r.edgy(npages),
            });
          }
          case Cmd.GET_DMA_MR:
            return enc(GetDmaMrReq, { pdn: handle(p, 'pd'), access: r.chance(0.8) ? r.int(2) : r.edgy(16) });
          case Cmd.DEREG_MR:
            return handleBody(handle(p, 'mr'));
          case Cmd.CREATE_QP: {
            const cq = handle(p, 'cq');
            return enc(CreateQpReq, {
              pdn: handle(p, 'pd'),
              qp_type: r.chance(0.85) ? r.pick([QpType.RC, QpType.UC, QpType.UD]) : r.int(256),
              sq_sig_all: r.chance(0.9) ? r.int(2) : r.int(256),
              send_cqn: cq,
              recv_cqn: r.chance(0.7) ? cq : handle(p, 'cq'),
              max_send_wr: r.chance(0.85) ? 1 + r.int(64) : r.edgy(128),
              max_recv_wr: r.chance(0.85) ? 1 + r.int(64) : r.edgy(128),
              max_send_sge: r.chance(0.85) ? r.int(l.maxSge + 1) : r.edgy(l.maxSge),
              max_recv_sge: r.chance(0.85) ? r.int(l.maxSge + 1) : r.edgy(l.maxSge),
              max_inline_data: r.chance(0.85) ? r.int(l.maxInlineData + 1) : r.edgy(l.maxInlineData),
            });
          }
          case Cmd.MODIFY_QP: {
            const A = QpAttr;
            const templates: [number, number][] = [
              [A.STATE | A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, QpState.INIT],
              [A.STATE | A.PKEY_INDEX | A.PORT | A.QKEY, QpState.INIT],
              [A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER, QpState.RTR],
              [A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN, QpState.RTR],
              [A.STATE, QpState.RTR],
              [A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC, QpState.RTS],
              [A.STATE | A.SQ_PSN, QpState.RTS],
              [A.STATE, QpState.ERR],
              [A.STATE, QpState.RESET],
              [A.ACCESS_FLAGS, QpState.RTS],
              [r.u32(), r.int(256)],
            ];
            const [mask, state] = r.pick(templates);
            return modifyBody(
              handle(p, 'qp'),
              r.chance(0.9) ? mask : mask ^ (1 << r.int(32)),
              {
                qp_state: state,
                cur_qp_state: r.int(8),
                path_mtu: r.chance(0.9) ? 1 + r.int(5) : r.int(256),
                timeout: r.int(40),
                retry_cnt: r.int(9),
                rnr_retry: r.int(9),
                min_rnr_timer: r.int(40),
                max_rd_atomic: r.int(6),
                max_dest_rd_atomic: r.int(6),
                port_num: r.chance(0.9) ? 1 : r.int(4),
                qp_access_flags: r.chance(0.9) ? r.int(16) : r.u32(),
                qkey: r.u32(),
                rq_psn: r.chance(0.9) ? r.int(0x100_0000) : r.u32(),
                sq_psn: r.chance(0.9) ? r.int(0x100_0000) : r.u32(),
                dest_qp_num: r.chance(0.5) ? handle(p, 'qp') : r.u32(),
                pkey_index: r.chance(0.9) ? 0 : r.int(0x1_0000),
              },
              { port_num: r.chance(0.9) ? 1 : r.int(4), sgid_index: r.chance(0.9) ? 0 : r.int(256) },
            );
          }
          case Cmd.QUERY_QP:
          case Cmd.DESTROY_QP:
            return handleBody(handle(p, 'qp'));
          case Cmd.CREATE_AH:
            return enc(CreateAhReq, { pdn: handle(p, 'pd'), ah: ahBytes({ port_num: r.chance(0.85) ? 1 : r.int(256), sgid_index: r.chance(0.85) ? 0 : r.int(256) }) });
          case Cmd.DESTROY_AH:
            return handleBody(handle(p, 'ah'));
        }
        return new Uint8Array(0);
      };

      const outcomes = counter();
      const byCmd = counter();
      let sent = 0;
      let batchNo = 0;
      /** Control chains the rig itself sent (setup and clean-ups). */
      let extra = rig.ctrlQ.returned;
      const started = Date.now();
      while (sent < CONTROL_MESSAGES) {
        const n = Math.min(250, CONTROL_MESSAGES - sent);
        const p = pool();
        const batch = Array.from({ length: n }, () => gen(p));
        const results = await rig.ctrlBatch(
          batch.map((b) => b.item),
          10_000,
        );
        results.forEach((res, i) => {
          const { item, cmd, bodyLen } = batch[i]!;
          const writable = item.writable ?? 264;
          const known = cmd >= 1 && cmd <= 18;
          const name = known ? Cmd[cmd]! : 'unknown/random';
          const where = `message ${sent + i} (cmd ${cmd}, ${item.req.length} readable, ${writable} writable)`;
          if (writable < 8) {
            if (res.used !== 0) throw new Error(`${where}: used ${res.used} with under 8 writable bytes`);
            bump(outcomes, 'returned unused (writable < 8)');
            bump(byCmd, `${name} -> unused`);
            return;
          }
          const status = res.status!;
          if (!DOCUMENTED_STATUSES.has(status)) throw new Error(`${where}: undocumented status ${status}`);
          if (item.req.length < 8 && status !== Status.E2BIG) throw new Error(`${where}: no header but ${Status[status]}`);
          if (item.req.length >= 8 && !known && status !== Status.EOPNOTSUPP) throw new Error(`${where}: unknown command got ${Status[status]}`);
          if (known && item.req.length >= 8 && bodyLen < REQ_SIZE[cmd as Cmd] && status !== Status.E2BIG) throw new Error(`${where}: short request got ${Status[status]}`);
          const want = status === Status.OK ? 8 + RESP_SIZE[cmd as Cmd] : 8;
          if (res.used !== want) throw new Error(`${where}: status ${Status[status]} with used length ${res.used}, expected ${want}`);
          if (status === Status.OK && writable < want) throw new Error(`${where}: OK with a ${writable}-byte writable part`);
          bump(outcomes, Status[status]!);
          bump(byCmd, `${name} -> ${Status[status]}`);
          if (status !== Status.OK) return;
          // Keep the driver's view.
          const body = item.req.subarray(8);
          const h = body.length >= 4 ? new DataView(body.buffer, body.byteOffset).getUint32(0, true) : 0;
          switch (cmd as Cmd) {
            case Cmd.CREATE_PD:
              told.pd.add(CreatePdResp.decodeBytes(res.resp).pdn);
              break;
            case Cmd.CREATE_CQ:
              told.cq.add(CreateCqResp.decodeBytes(res.resp).cqn);
              break;
            case Cmd.REG_MR:
            case Cmd.GET_DMA_MR:
              told.mr.add(MrResp.decodeBytes(res.resp).mrn);
              break;
            case Cmd.CREATE_QP:
              told.qp.add(CreateQpResp.decodeBytes(res.resp).qpn);
              break;
            case Cmd.CREATE_AH:
              told.ah.add(CreateAhResp.decodeBytes(res.resp).ahn);
              break;
            case Cmd.DESTROY_PD:
              told.pd.delete(h);
              break;
            case Cmd.DESTROY_CQ:
              told.cq.delete(h);
              break;
            case Cmd.DEREG_MR:
              told.mr.delete(h);
              break;
            case Cmd.DESTROY_QP:
              told.qp.delete(h);
              break;
            case Cmd.DESTROY_AH:
              told.ah.delete(h);
              break;
            default:
          }
        });
        // Leak check: everything the device holds must be something the driver was told about.
        const held = {
          pd: [...res.pds.values()].map((x) => x.pdn),
          cq: [...res.cqs.values()].map((x) => x.cqn),
          qp: [...res.qps.keys()],
          mr: res.mrs.all().map((x) => x.mrn),
          ah: [...res.ahs.values()].map((x) => x.ahn),
        };
        for (const [kind, hs] of Object.entries(held) as [keyof typeof told, number[]][]) {
          for (const h of hs) {
            const key = `${kind} ${h}`;
            if (told[kind].has(h) || knownLeaks.has(key)) continue;
            knownLeaks.add(key);
            const suspects = results
              .map((res2, i) => ({ res2, b: batch[i]! }))
              .filter(({ res2, b }) => res2.status !== null && res2.status !== Status.OK && [Cmd.CREATE_PD, Cmd.CREATE_CQ, Cmd.REG_MR, Cmd.GET_DMA_MR, Cmd.CREATE_QP, Cmd.CREATE_AH].includes(b.cmd))
              .map(({ res2, b }) => `${Cmd[b.cmd]} -> ${Status[res2.status!]} (writable ${b.item.writable ?? 264}, needs ${8 + RESP_SIZE[b.cmd as Cmd]})`);
            leaks.push(`${key} appeared in messages ${sent}..${sent + n - 1}; refused creates there: ${[...new Set(suspects)].join('; ')}`);
          }
        }
        sent += n;
        // Now and then the driver starts over (valid destroys of everything), so that creates are not all ENOMEM.
        if (++batchNo % 16 === 0) {
          const before = rig.ctrlQ.returned;
          await cleanAll();
          extra += rig.ctrlQ.returned - before;
        }
        // SQ/RQ chains returned by DESTROY_QP / RESET: collect them.
        for (let s = 0; s < rig.sqQ.length; s++) rig.reapQp(s);
        expect(rig.log.errors).toEqual([]);
      }
      const ms = Date.now() - started;
      console.log(`control fuzz (${seedText}): ${sent} messages in ${ms} ms, ${leaks.length} leaked objects\noutcomes:\n${table(outcomes)}\nby command:\n${table(byCmd)}`);
      expect(rig.ctrlQ.outstandingChains).toBe(0);
      expect(rig.ctrlQ.returned - extra).toBe(sent);
      controlDone = true;
    });
  }, 120_000);

  it('control fuzz: the device holds exactly the objects the driver was told it created (no leak from a refused command)', async () => {
    expect(controlDone).toBe(true);
    const r = rig.device.resources!;
    const has = {
      pd: new Set([...r.pds.values()].map((p) => p.pdn)),
      cq: new Set([...r.cqs.values()].map((c) => c.cqn)),
      qp: new Set(r.qps.keys()),
      mr: new Set(r.mrs.all().map((m) => m.mrn)),
      ah: new Set([...r.ahs.values()].map((a) => a.ahn)),
    };
    const sorted = (s: Set<number>): number[] => [...s].sort((a, b) => a - b);
    await seeded('control accounting', async () => {
      if (leaks.length > 0) console.log(`control fuzz leaks (${leaks.length}):\n  ${leaks.slice(0, 12).join('\n  ')}`);
      expect(leaks.slice(0, 5)).toEqual([]);
      expect({ pd: sorted(has.pd), cq: sorted(has.cq), qp: sorted(has.qp), mr: sorted(has.mr), ah: sorted(has.ah) }).toEqual({
        pd: sorted(told.pd),
        cq: sorted(told.cq),
        qp: sorted(told.qp),
        mr: sorted(told.mr),
        ah: sorted(told.ah),
      });
    });
  });

  // ===========================================================================
  // Send and receive queues

  it(`WQEs: ${WQES} random send/receive WQEs on RC, UC and UD QPs — every chain back once, documented CQEs, memory outside the MRs untouched`, async () => {
    await seeded('WQE fuzz', async () => {
      await cleanAll();
      const r = new Rand(SEED ^ 0xa5a5_a5a5);
      const pdn = await rig.createPd();
      const otherPd = await rig.createPd();
      const cqs: CqInfo[] = [];
      for (let i = 0; i < 6; i++) cqs.push(await rig.createCq(511));
      const qps: QpInfo[] = [];
      for (const [i, type] of [QpType.RC, QpType.RC, QpType.UC, QpType.UC, QpType.UD, QpType.UD].entries()) {
        qps.push(await rig.createQp({ pdn, type, sendCq: cqs[i]!, maxSendWr: 128, maxRecvWr: 128, sqSigAll: i % 2 === 1 }));
      }
      const peerOf = (i: number): QpInfo => qps[i ^ 1]!;
      const up = async (i: number): Promise<void> => {
        await rig.bringUp(qps[i]!, peerOf(i).qpn, { rnrRetry: 0, minRnrTimer: 1, timeout: 1, retryCnt: 0, qkey: 0x1111 });
      };
      for (let i = 0; i < 6; i++) await up(i);
      const ah = await rig.createAh(pdn);
      const foreignAh = await rig.createAh(otherPd);
      // Memory: guard zones around every MR; a read-only MR nobody may write.
      const guards: [number, number, Uint8Array][] = [];
      const guardZone = (pages: number): void => {
        const g = rig.allocBuffer(pages * RDMA_PAGE_SIZE);
        const b = rig.ram.bytes(g, pages * RDMA_PAGE_SIZE);
        for (let i = 0; i < b.length; i++) b[i] = (i * 29 + 3) & 0xff;
        guards.push([g, b.length, b.slice()]);
      };
      const mrs: MrInfo[] = [];
      guardZone(2);
      for (let i = 0; i < 4; i++) {
        mrs.push(await rig.regMr(pdn, 4 * RDMA_PAGE_SIZE, 0xf));
        guardZone(1);
      }
      const readOnly = await rig.regMr(pdn, 2 * RDMA_PAGE_SIZE, Access.REMOTE_READ);
      const roBytes = rig.ram.bytes(readOnly.gpa, readOnly.length);
      for (let i = 0; i < roBytes.length; i++) roBytes[i] = (i * 7) & 0xff;
      const roCopy = roBytes.slice();
      guardZone(1);
      const foreignMr = await rig.regMr(otherPd, RDMA_PAGE_SIZE, 0xf);
      guardZone(1);
      const dmaRead = await rig.dmaMr(pdn, 0);
      const deadMr = await rig.regMr(pdn, RDMA_PAGE_SIZE, 0xf);
      await rig.ok(Cmd.DEREG_MR, handleBody(deadMr.mrn));
      guardZone(1);
      const allMrs = [...mrs, readOnly, foreignMr, deadMr];

      // Each batch has a dirt level: how often a generator picks something invalid.
      let fmt = 1;
      let sem = 1;
      /** Format errors (opcode, flags, counts, sizes): the device refuses the WQE at post time. */
      const bad = (p: number): boolean => r.chance(Math.min(1, p * fmt));
      /** Semantic errors (keys, ranges, rights, addresses): found when the WR executes. */
      const wrong = (p: number): boolean => r.chance(Math.min(1, p * sem));
      const localSge = (forRecv: boolean): SgeSpec => {
        if (!wrong(0.1)) {
          const m = r.pick(mrs);
          const off = r.int(m.length / 2);
          const max = forRecv ? m.length - off : Math.min(600, m.length - off);
          return { addr: m.iova + BigInt(off), length: forRecv ? Math.max(1, max - r.int(64)) : r.int(max + 1), lkey: m.lkey };
        }
        const roll = r.int(6);
        if (roll === 0) return { addr: BigInt(rig.ram.gpa + r.int(rig.ram.size)), length: r.int(256), lkey: dmaRead.lkey };
        const m = r.pick(allMrs);
        if (roll === 1) return { addr: m.iova + BigInt(m.length - r.int(16)), length: 1 + r.int(64), lkey: m.lkey };
        if (roll === 2) return { addr: m.iova, length: r.int(128), lkey: r.pick([0, 0xffff_ffff, r.u32(), m.lkey ^ 1]) };
        if (roll === 3) return { addr: r.u64(), length: r.int(0x1_0000), lkey: m.lkey };
        return { addr: m.iova, length: r.edgy(64), lkey: m.lkey };
      };
      const remote = (len: number): { rkey: number; addr: bigint } => {
        const m = wrong(0.1) ? r.pick(allMrs) : r.pick(mrs);
        const room = Math.max(0, m.length - len);
        const addr = m.iova + BigInt(wrong(0.1) ? r.int(m.length + 64) : r.int(room + 1) & ~7);
        return { rkey: wrong(0.1) ? r.pick([0, r.u32(), dmaRead.rkey, m.rkey ^ 0x100]) : m.rkey, addr: wrong(0.03) ? r.u64() : addr };
      };
      const OPS: Record<QpType, SendOp[]> = {
        [QpType.RC]: [SendOp.SEND, SendOp.SEND_WITH_IMM, SendOp.RDMA_WRITE, SendOp.RDMA_WRITE_WITH_IMM, SendOp.RDMA_READ, SendOp.ATOMIC_CMP_AND_SWP, SendOp.ATOMIC_FETCH_AND_ADD],
        [QpType.UC]: [SendOp.SEND, SendOp.SEND_WITH_IMM, SendOp.RDMA_WRITE, SendOp.RDMA_WRITE_WITH_IMM],
        [QpType.UD]: [SendOp.SEND, SendOp.SEND_WITH_IMM],
      };
      let wrSeq = 0n;
      const genSend = (qp: QpInfo, peer: QpInfo): { bytes: Uint8Array; writable: number; split?: number[] } => {
        const opcode = bad(0.08) ? r.pick([...OPS[QpType.RC], 7, 8, 9, 10, r.int(256)]) : r.pick(OPS[qp.type]);
        const atomic = opcode === SendOp.ATOMIC_CMP_AND_SWP || opcode === SendOp.ATOMIC_FETCH_AND_ADD;
        let flags = r.chance(0.7) ? SendFlag.SIGNALED : 0;
        if (r.chance(0.2)) flags |= SendFlag.SOLICITED;
        if (r.chance(0.1)) flags |= SendFlag.FENCE;
        const inline = !atomic && opcode !== SendOp.RDMA_READ && r.chance(0.15);
        if (inline) flags |= SendFlag.INLINE;
        if (bad(0.03)) flags = r.int(256);
        const f = {
          wr_id: ++wrSeq,
          opcode,
          send_flags: flags,
          imm_data: r.u32(),
          compare_add: r.u64(),
          swap: r.u64(),
          ahn: bad(0.1) ? r.pick([0, foreignAh, r.u32()]) : ah,
          remote_qpn: wrong(0.1) ? r.u32() : peer.qpn,
          remote_qkey: wrong(0.1) ? r.u32() : 0x1111,
        };
        let bytes: Uint8Array;
        if (inline) {
          const n = bad(0.1) ? r.int(300) : r.int(qp.caps.max_inline_data + 1);
          bytes = sendWqe({ ...f, ...remoteFields(n) }, [], new Uint8Array(n).map(() => r.int(256)));
        } else if (atomic && !bad(0.15)) {
          const m = r.pick(mrs);
          bytes = sendWqe({ ...f, ...remoteFields(8) }, [{ addr: m.iova + BigInt(r.int(m.length / 8) * 8), length: 8, lkey: m.lkey }]);
        } else {
          const n = bad(0.1) ? r.int(8) : r.int(qp.caps.max_send_sge + 1);
          const sges = Array.from({ length: n }, () => localSge(false));
          bytes = sendWqe({ ...f, ...remoteFields(sges.reduce((a, x) => a + x.length, 0)) }, sges);
        }
        return mutate(bytes, 64);
      };
      const remoteFields = (len: number): { remote_addr: bigint; rkey: number } => {
        const t = remote(len);
        return { remote_addr: t.addr, rkey: t.rkey };
      };
      const genRecv = (qp: QpInfo): { bytes: Uint8Array; writable: number; split?: number[] } => {
        const n = bad(0.1) ? r.int(8) : 1 + r.int(qp.caps.max_recv_sge);
        return mutate(recvWqe(++wrSeq, Array.from({ length: n }, () => localSge(true))), 16);
      };
      const mutate = (bytes: Uint8Array, hdr: number): { bytes: Uint8Array; writable: number; split?: number[] } => {
        let b = bytes;
        if (bad(0.2)) {
          b = b.slice();
          const k = 1 + r.int(3);
          for (let i = 0; i < k; i++) {
            // Mostly in the header (after wr_id, so completions stay attributable), sometimes anywhere.
            const at = r.chance(0.8) ? 8 + r.int(hdr - 8) : r.int(b.length);
            if (at < b.length) b[at] = r.int(256);
          }
        }
        if (bad(0.03)) b = b.subarray(0, r.int(b.length + 1));
        if (bad(0.03)) b = new Uint8Array([...b, ...new Uint8Array(1 + r.int(24))]);
        const out: { bytes: Uint8Array; writable: number; split?: number[] } = { bytes: b, writable: bad(0.02) ? 1 + r.int(64) : 0 };
        const split = r.split(b.length);
        if (split !== undefined) out.split = split;
        return out;
      };

      const statuses = counter();
      const kinds = counter();
      const qpnSet = new Set(qps.map((q) => q.qpn));
      let posted = 0;
      let batches = 0;
      let recoveries = 0;
      const started = Date.now();
      const takeAll = (): void => {
        for (const cq of cqs) {
          for (const c of rig.takeCqes(cq)) {
            if (!qpnSet.has(c.qp_num)) throw new Error(`CQE for qpn 0x${c.qp_num.toString(16)}, which is not ours`);
            if (c.opcode === WcOpcode.CQ_ERROR) throw new Error(`CQ ${cq.cqn} overflowed (the fuzzer keeps its CQs stocked)`);
            bump(statuses, WcStatus[c.status] ?? `status ${c.status}`);
            bump(kinds, `${c.opcode >= 128 ? 'recv' : 'send'} ${WcStatus[c.status] ?? c.status}`);
          }
        }
      };
      while (posted < WQES) {
        batches++;
        fmt = r.pick([0, 0, 0.02, 0.1, 1, 3]);
        sem = r.pick([0, 0.05, 0.3, 1, 3]);
        for (let i = 0; i < qps.length && posted < WQES; i++) {
          const qp = qps[i]!;
          const held = rig.held(qp);
          const nr = held.rq > 64 ? 0 : 1 + r.int(40);
          for (let k = 0; k < nr && rig.rqQ[qp.slot]!.freeDescs >= 8; k++) {
            const g = genRecv(qp);
            rig.postRecv(qp, g.bytes, { ...g, kick: false });
          }
          const ns = 1 + r.int(48);
          for (let k = 0; k < ns && rig.sqQ[qp.slot]!.freeDescs >= 8; k++) {
            const g = genSend(qp, peerOf(i));
            rig.postSend(qp, g.bytes, { ...g, kick: false });
          }
          posted += nr + ns;
          rig.rqQ[qp.slot]!.kick();
          rig.sqQ[qp.slot]!.kick();
        }
        // Every send chain comes back (sends always finish: no RNR or ACK retries are allowed to last).
        await rig.until(() => qps.every((q) => rig.held(q).sq === 0), 10_000, `batch ${batches}: every send chain back`);
        for (const q of qps) rig.reapQp(q);
        takeAll();
        // Bring QPs that ended in ERR back.
        for (let i = 0; i < qps.length; i++) {
          const q = qps[i]!;
          if (rig.device.resources!.qps.get(q.qpn)!.attrs.state !== QpState.RTS) {
            recoveries++;
            await rig.modifyOk(q.qpn, QpAttr.STATE, { qp_state: QpState.RESET });
            await up(i);
            rig.reapQp(q);
          }
        }
        if (rig.log.errors.length > 0) throw new Error(`device errors: ${rig.log.errors.slice(0, 5).join('\n')}`);
      }
      // Flush everything: every chain must come back.
      for (const q of qps) await rig.modifyOk(q.qpn, QpAttr.STATE, { qp_state: QpState.ERR });
      await rig.until(() => qps.every((q) => rig.held(q).sq === 0 && rig.held(q).rq === 0), 10_000, 'every chain back after ERR');
      for (const q of qps) rig.reapQp(q);
      await rig.settle(10);
      takeAll();
      for (const q of qps) {
        expect(rig.sqQ[q.slot]!.outstandingChains).toBe(0);
        expect(rig.rqQ[q.slot]!.outstandingChains).toBe(0);
        const rec = rig.device.resources!.qps.get(q.qpn)!;
        expect([rec.sendOut.size, rec.recvOut.size]).toEqual([0, 0]);
      }
      for (const [gpa, len, copy] of guards) {
        const now = rig.ram.bytes(gpa, len);
        const i = now.findIndex((b, k) => b !== copy[k]);
        expect(i === -1 ? null : `guard byte 0x${(gpa + i).toString(16)} changed`).toBeNull();
      }
      expect(Buffer.from(roBytes).equals(Buffer.from(roCopy))).toBe(true);
      const ms = Date.now() - started;
      console.log(
        `WQE fuzz (${seedText}): ${posted} WQEs in ${batches} batches, ${recoveries} QP recoveries, ${ms} ms\nCQE statuses:\n${table(statuses)}\nby side:\n${table(kinds)}`,
      );
      expect(rig.log.errors).toEqual([]);
      await cleanAll();
    });
  }, 120_000);

  it('after the fuzzing, a fresh scenario (PD, CQs, RC pair, MRs) passes SEND, RDMA WRITE, RDMA READ and an atomic with exact bytes', async () => {
    await seeded('fresh scenario', async () => {
      await cleanAll();
      const p = await rig.createPair();
      const len = 3000;
      const src = rig.ram.bytes(p.mrA.gpa, len);
      for (let i = 0; i < len; i++) src[i] = (i * 11 + 1) & 0xff;
      rig.ram.bytes(p.mrB.gpa, p.mrB.length).fill(0);
      rig.postRecv(p.b, recvWqe(1n, [{ addr: p.mrB.iova, length: len, lkey: p.mrB.lkey }]));
      rig.postSend(p.a, sendWqe({ wr_id: 2n, opcode: SendOp.SEND, send_flags: SendFlag.SIGNALED }, [{ addr: p.mrA.iova, length: len, lkey: p.mrA.lkey }]));
      expect((await rig.waitCqes(p.a.sendCq, 1)).map((c) => [c.wr_id, WcStatus[c.status]])).toEqual([[2n, 'SUCCESS']]);
      const rc = await rig.waitCqes(p.b.recvCq, 1);
      expect(rc.map((c) => [c.wr_id, WcStatus[c.status], c.byte_len])).toEqual([[1n, 'SUCCESS', len]]);
      expect(Buffer.from(rig.ram.bytes(p.mrB.gpa, len)).equals(Buffer.from(src))).toBe(true);
      rig.postSend(p.a, sendWqe({ wr_id: 3n, opcode: SendOp.RDMA_WRITE, send_flags: SendFlag.SIGNALED, rkey: p.mrB.rkey, remote_addr: p.mrB.iova + 4096n }, [{ addr: p.mrA.iova, length: 1000, lkey: p.mrA.lkey }]));
      rig.postSend(p.a, sendWqe({ wr_id: 4n, opcode: SendOp.RDMA_READ, send_flags: SendFlag.SIGNALED, rkey: p.mrB.rkey, remote_addr: p.mrB.iova }, [{ addr: p.mrA.iova + 4096n, length: 1000, lkey: p.mrA.lkey }]));
      rig.ram.dv.setBigUint64(p.mrB.gpa + 8000 - rig.ram.gpa, 7n, true);
      rig.postSend(p.a, sendWqe({ wr_id: 5n, opcode: SendOp.ATOMIC_CMP_AND_SWP, send_flags: SendFlag.SIGNALED, rkey: p.mrB.rkey, remote_addr: p.mrB.iova + 8000n, compare_add: 7n, swap: 99n }, [{ addr: p.mrA.iova + 6000n, length: 8, lkey: p.mrA.lkey }]));
      expect((await rig.waitCqes(p.a.sendCq, 3)).map((c) => [c.wr_id, WcStatus[c.status]])).toEqual([
        [3n, 'SUCCESS'],
        [4n, 'SUCCESS'],
        [5n, 'SUCCESS'],
      ]);
      expect(Buffer.from(rig.ram.bytes(p.mrB.gpa + 4096, 1000)).equals(Buffer.from(src.subarray(0, 1000)))).toBe(true);
      expect(Buffer.from(rig.ram.bytes(p.mrA.gpa + 4096, 1000)).equals(Buffer.from(src.subarray(0, 1000)))).toBe(true);
      expect(rig.ram.dv.getBigUint64(p.mrB.gpa + 8000 - rig.ram.gpa, true)).toBe(99n);
      expect(rig.ram.dv.getBigUint64(p.mrA.gpa + 6000 - rig.ram.gpa, true)).toBe(7n);
      expect(rig.log.errors).toEqual([]);
    });
  });
});

/** Destroys every object the device holds (QPs, MRs, AHs, CQs, PDs) with valid commands. */
async function cleanAll(): Promise<void> {
  const r = rig.device.resources!;
  for (const qpn of [...r.qps.keys()]) await rig.ok(Cmd.DESTROY_QP, handleBody(qpn));
  for (const mr of r.mrs.all()) await rig.ok(Cmd.DEREG_MR, handleBody(mr.mrn));
  for (const ah of [...r.ahs.values()]) await rig.ok(Cmd.DESTROY_AH, handleBody(ah.ahn));
  for (const cq of [...r.cqs.values()]) await rig.ok(Cmd.DESTROY_CQ, handleBody(cq.cqn));
  for (const pd of [...r.pds.values()]) await rig.ok(Cmd.DESTROY_PD, handleBody(pd.pdn));
  for (const k of Object.values(told)) k.clear();
  await rig.settle(5);
  for (let s = 0; s < rig.sqQ.length; s++) rig.reapQp(s);
  for (let s = 0; s < rig.cqQ.length; s++) rig.takeCqes(s);
  expect(rig.counts()).toMatchObject({ pds: 0, cqs: 0, qps: 0, mrs: 0, ahs: 0, cqSlots: 0, qpSlots: 0 });
}
