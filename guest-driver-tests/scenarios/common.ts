/**
 * What the conformance scenarios share: the environment they get, checks
 * that say precisely what differed, polling with deadlines, and the usual
 * RC/UD connection set-up. Only the {@link Verbs} interface is used, so a
 * scenario runs against any implementation of it.
 */
import {
  Access,
  PostError,
  QpAttrMask,
  QpState,
  QpType,
  Status,
  VerbsError,
  WcStatus,
  qpStateName,
  statusName,
  wcOpcodeName,
  wcStatusName,
  type AhAttr,
  type Buffer,
  type Cq,
  type Mr,
  type Pd,
  type Qp,
  type QpCap,
  type Verbs,
  type Wc,
} from '../verbs.js';

export interface ScenarioEnv {
  /** Requester side. */
  a: Verbs;
  /** Responder side; may be the very same context as `a` (a loopback device). */
  b: Verbs;
  /** True when the device was opened for this scenario alone, so limits can be counted exactly. */
  fresh: boolean;
  /** How long to wait for something that should happen (completions, events). Default 5000 ms. */
  timeoutMs?: number;
  /** How long to watch for something that must not happen (an interrupt, a completion). Default 100 ms. */
  quietMs?: number;
  log?: (msg: string) => void;
  /** The GRH layout `b` negotiated (VIRTIO_RDMA_F_IB_GRH: 'ib'); default RoCEv2's. */
  grhLayout?: 'rocev2' | 'ib';
}

export type Scenario = (env: ScenarioEnv) => Promise<void>;

export class ScenarioFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ScenarioFailure';
  }
}

export function check(cond: boolean, msg: string): asserts cond {
  if (!cond) throw new ScenarioFailure(msg);
}

function show(v: unknown): string {
  if (typeof v === 'bigint') return `${v}n (0x${v.toString(16)})`;
  if (typeof v === 'number') return Number.isInteger(v) && v > 9 ? `${v} (0x${v.toString(16)})` : String(v);
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `${x}n` : x instanceof Uint8Array ? Array.from(x) : x));
}

export function expectEq<T>(actual: T, expected: T, what: string): void {
  if (actual !== expected) throw new ScenarioFailure(`${what}: got ${show(actual)}, expected ${show(expected)}`);
}

/** Compares bytes one by one and reports the first difference. */
export function expectBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length !== expected.length) throw new ScenarioFailure(`${what}: ${actual.length} bytes, expected ${expected.length}`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      let bad = 0;
      for (let j = i; j < actual.length; j++) if (actual[j] !== expected[j]) bad++;
      throw new ScenarioFailure(`${what}: byte ${i} is 0x${actual[i]!.toString(16)}, expected 0x${expected[i]!.toString(16)} (${bad} of ${actual.length} bytes differ)`);
    }
  }
}

/** Deterministic, position-dependent bytes: a shifted copy does not match. */
export function pattern(len: number, seed: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = (x ^ i) & 0xff;
  }
  return out;
}

export function filled(len: number, byte: number): Uint8Array {
  return new Uint8Array(len).fill(byte);
}

/** Expects `p` to fail with a VerbsError (or PostError) carrying `status`. */
export async function expectStatus(p: Promise<unknown>, status: Status, what: string): Promise<void> {
  try {
    await p;
  } catch (err) {
    if (err instanceof VerbsError || err instanceof PostError) {
      if (err.status !== status) throw new ScenarioFailure(`${what}: failed with ${statusName(err.status)}, expected ${statusName(status)}`);
      return;
    }
    throw err;
  }
  throw new ScenarioFailure(`${what}: succeeded, expected ${statusName(status)}`);
}

/** Runs `fn` until it fails with a VerbsError; returns the results and the status. */
export async function allocateUntilFailure<T>(fn: (i: number) => Promise<T>, cap: number): Promise<{ items: T[]; status: Status }> {
  const items: T[] = [];
  for (let i = 0; i < cap; i++) {
    try {
      items.push(await fn(i));
    } catch (err) {
      if (err instanceof VerbsError) return { items, status: err.status };
      throw err;
    }
  }
  throw new ScenarioFailure(`allocated ${cap} objects without reaching a limit`);
}

export function timeoutOf(env: ScenarioEnv): number {
  return env.timeoutMs ?? 5000;
}
export function quietOf(env: ScenarioEnv): number {
  return env.quietMs ?? 100;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls until exactly `n` completions arrived (more is a failure too, checked briefly). */
export async function pollN(env: ScenarioEnv, v: Verbs, cq: Cq, n: number, what: string): Promise<Wc[]> {
  const deadline = Date.now() + timeoutOf(env);
  const got: Wc[] = [];
  while (got.length < n) {
    got.push(...(await v.pollCq(cq, n - got.length)));
    if (got.length >= n) break;
    if (Date.now() > deadline) throw new ScenarioFailure(`${what}: ${got.length} of ${n} completions after ${timeoutOf(env)} ms: ${got.map(describeWc).join('; ')}`);
    await sleep(1);
  }
  return got;
}

export async function expectNoWc(env: ScenarioEnv, v: Verbs, cq: Cq, what: string): Promise<void> {
  await sleep(quietOf(env));
  const extra = await v.pollCq(cq, 16);
  if (extra.length > 0) throw new ScenarioFailure(`${what}: unexpected completions: ${extra.map(describeWc).join('; ')}`);
}

export function describeWc(w: Wc): string {
  return `{wr_id ${w.wrId} ${wcStatusName(w.status)} ${wcOpcodeName(w.opcode)} len ${w.byteLen} qp 0x${w.qpNum.toString(16)} flags ${w.wcFlags} imm 0x${w.immData.toString(16)}}`;
}

export interface WcExpectation {
  wrId?: bigint;
  status?: WcStatus;
  opcode?: number;
  byteLen?: number;
  qpNum?: number;
  srcQp?: number;
  immData?: number;
  /** Exact wc_flags. */
  wcFlags?: number;
}

export function expectWc(w: Wc | undefined, e: WcExpectation, what: string): Wc {
  if (w === undefined) throw new ScenarioFailure(`${what}: no completion`);
  const d = describeWc(w);
  if (e.status !== undefined && w.status !== e.status) throw new ScenarioFailure(`${what}: status ${wcStatusName(w.status)}, expected ${wcStatusName(e.status)} in ${d}`);
  if (e.wrId !== undefined && w.wrId !== e.wrId) throw new ScenarioFailure(`${what}: wr_id ${w.wrId}, expected ${e.wrId} in ${d}`);
  if (e.opcode !== undefined && w.opcode !== e.opcode) throw new ScenarioFailure(`${what}: opcode ${wcOpcodeName(w.opcode)}, expected ${wcOpcodeName(e.opcode)} in ${d}`);
  if (e.byteLen !== undefined && w.byteLen !== e.byteLen) throw new ScenarioFailure(`${what}: byte_len ${w.byteLen}, expected ${e.byteLen} in ${d}`);
  if (e.qpNum !== undefined && w.qpNum !== e.qpNum) throw new ScenarioFailure(`${what}: qp_num 0x${w.qpNum.toString(16)}, expected 0x${e.qpNum.toString(16)} in ${d}`);
  if (e.srcQp !== undefined && w.srcQp !== e.srcQp) throw new ScenarioFailure(`${what}: src_qp 0x${w.srcQp.toString(16)}, expected 0x${e.srcQp.toString(16)} in ${d}`);
  if (e.immData !== undefined && w.immData !== e.immData) throw new ScenarioFailure(`${what}: imm_data 0x${w.immData.toString(16)}, expected 0x${e.immData.toString(16)} in ${d}`);
  if (e.wcFlags !== undefined && w.wcFlags !== e.wcFlags) throw new ScenarioFailure(`${what}: wc_flags ${w.wcFlags}, expected ${e.wcFlags} in ${d}`);
  return w;
}

export async function expectQpState(v: Verbs, qp: Qp, state: QpState, what: string): Promise<void> {
  const q = await v.queryQp(qp);
  if (q.attr.qpState !== state) throw new ScenarioFailure(`${what}: QP 0x${qp.qpNum.toString(16)} is ${qpStateName(q.attr.qpState)}, expected ${qpStateName(state)}`);
}

/** Drains pending interrupts of a CQ so a later check sees only new ones. */
export async function drainCqEvents(v: Verbs, cq: Cq): Promise<void> {
  while (await v.waitCqEvent(cq, 0));
}

// ---------------------------------------------------------------------------
// Resource bookkeeping: everything a scenario creates is destroyed at the end.

export class Teardown {
  private readonly steps: Array<{ what: string; fn: () => Promise<unknown> }> = [];

  add(what: string, fn: () => Promise<unknown>): void {
    this.steps.push({ what, fn });
  }

  /** Forgets a step (the scenario destroyed the object itself). */
  forget(what: string): void {
    const i = this.steps.findIndex((s) => s.what === what);
    if (i >= 0) this.steps.splice(i, 1);
  }

  /** Forgets every step whose name starts with `prefix` ("qp#", "cq#"...). */
  forgetPrefix(prefix: string): void {
    for (let i = this.steps.length - 1; i >= 0; i--) if (this.steps[i]!.what.startsWith(prefix)) this.steps.splice(i, 1);
  }

  async run(): Promise<string[]> {
    const errors: string[] = [];
    for (const s of this.steps.splice(0).reverse()) {
      try {
        await s.fn();
      } catch (err) {
        errors.push(`${s.what}: ${(err as Error).message}`);
      }
    }
    return errors;
  }
}

/** Runs `body` with a Teardown; cleanup failures fail the scenario when the body passed. */
export async function withTeardown(body: (t: Teardown) => Promise<void>): Promise<void> {
  const t = new Teardown();
  let failed = false;
  try {
    await body(t);
  } catch (err) {
    failed = true;
    throw err;
  } finally {
    const errors = await t.run();
    if (!failed && errors.length > 0) throw new ScenarioFailure(`cleanup failed: ${errors.join('; ')}`);
  }
}

let objectSeq = 0;
const tag = (kind: string): string => `${kind}#${++objectSeq}`;

export async function pdOf(t: Teardown, v: Verbs): Promise<Pd> {
  const pd = await v.allocPd();
  t.add(tag('pd'), () => v.deallocPd(pd));
  return pd;
}

export async function cqOf(t: Teardown, v: Verbs, cqe: number): Promise<Cq> {
  const cq = await v.createCq(cqe);
  const name = tag('cq');
  t.add(name, () => v.destroyCq(cq));
  return cq;
}

export interface MrBuf {
  buf: Buffer;
  mr: Mr;
}

/** A buffer with an MR over it, filled with `fill` (bytes or one byte value). */
export async function mrBuf(t: Teardown, v: Verbs, pd: Pd, len: number, access: number, fill: Uint8Array | number = 0): Promise<MrBuf> {
  const buf = await v.allocBuffer(len);
  t.add(tag('buf'), () => v.freeBuffer(buf));
  await v.writeBuffer(buf, 0, typeof fill === 'number' ? filled(len, fill) : fill);
  const mr = await v.regMr(pd, buf, access);
  t.add(tag('mr'), () => v.deregMr(mr));
  return { buf, mr };
}

export const ALL_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;

export async function localGid(v: Verbs): Promise<Uint8Array> {
  return (await v.queryGid(1, 0)).raw;
}

export function avTo(dgid: Uint8Array): AhAttr {
  return { grh: { dgid, flowLabel: 0, sgidIndex: 0, hopLimit: 64, trafficClass: 0 }, sl: 0, staticRate: 0, portNum: 1 };
}

export const DEFAULT_CAP: QpCap = { maxSendWr: 32, maxRecvWr: 32, maxSendSge: 4, maxRecvSge: 4, maxInlineData: 64 };

/** One side of a connection: its context, PD, CQs and QP. */
export interface Side {
  v: Verbs;
  pd: Pd;
  scq: Cq;
  rcq: Cq;
  qp: Qp;
  sqPsn: number;
}

export interface PairOptions {
  type?: QpType;
  cap?: Partial<QpCap>;
  cqe?: number;
  /** Use one CQ for send and receive completions on each side. */
  sharedCq?: boolean;
  sqSigAll?: boolean;
  /** RC: rnr_retry (7 = forever) and min_rnr_timer. */
  rnrRetry?: number;
  minRnrTimer?: number;
  qkey?: number;
  /** Stop at this state instead of RTS (both sides). */
  upTo?: QpState;
}

export async function makeSide(t: Teardown, v: Verbs, o: PairOptions, sqPsn: number): Promise<Side> {
  const pd = await pdOf(t, v);
  const cqe = o.cqe ?? 64;
  const scq = await cqOf(t, v, cqe);
  const rcq = o.sharedCq ? scq : await cqOf(t, v, cqe);
  const qp = await v.createQp(pd, { qpType: o.type ?? QpType.RC, sendCq: scq, recvCq: rcq, cap: { ...DEFAULT_CAP, ...o.cap }, sqSigAll: o.sqSigAll ?? false });
  // QPs go first in teardown (added last).
  t.add(tag('qp'), () => v.destroyQp(qp));
  return { v, pd, scq, rcq, qp, sqPsn };
}

export const RC_INIT_MASK = QpAttrMask.STATE | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.ACCESS_FLAGS;
export const RC_RTR_MASK =
  QpAttrMask.STATE | QpAttrMask.AV | QpAttrMask.PATH_MTU | QpAttrMask.DEST_QPN | QpAttrMask.RQ_PSN | QpAttrMask.MAX_DEST_RD_ATOMIC | QpAttrMask.MIN_RNR_TIMER;
export const RC_RTS_MASK = QpAttrMask.STATE | QpAttrMask.SQ_PSN | QpAttrMask.TIMEOUT | QpAttrMask.RETRY_CNT | QpAttrMask.RNR_RETRY | QpAttrMask.MAX_QP_RD_ATOMIC;
export const UD_INIT_MASK = QpAttrMask.STATE | QpAttrMask.PKEY_INDEX | QpAttrMask.PORT | QpAttrMask.QKEY;

export const DEFAULT_QKEY = 0x11111111;

/** Brings `me` to RTS (or `o.upTo`) talking to `peer`: RC/UC need the peer's QPN and GID. */
export async function bringUp(me: Side, peer: Side, peerGid: Uint8Array, o: PairOptions = {}): Promise<void> {
  const v = me.v;
  const type = me.qp.qpType;
  const upTo = o.upTo ?? QpState.RTS;
  if (type === QpType.UD) {
    await v.modifyQp(me.qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qkey: o.qkey ?? DEFAULT_QKEY }, UD_INIT_MASK);
    if (upTo === QpState.INIT) return;
    await v.modifyQp(me.qp, { qpState: QpState.RTR }, QpAttrMask.STATE);
    if (upTo === QpState.RTR) return;
    await v.modifyQp(me.qp, { qpState: QpState.RTS, sqPsn: me.sqPsn }, QpAttrMask.STATE | QpAttrMask.SQ_PSN);
    return;
  }
  const access = Access.REMOTE_WRITE | Access.REMOTE_READ | (type === QpType.RC ? Access.REMOTE_ATOMIC : 0);
  await v.modifyQp(me.qp, { qpState: QpState.INIT, pkeyIndex: 0, portNum: 1, qpAccessFlags: access }, RC_INIT_MASK);
  if (upTo === QpState.INIT) return;
  const port = await v.queryPort(1);
  const rtr = {
    qpState: QpState.RTR,
    ahAttr: avTo(peerGid),
    pathMtu: Math.min(port.activeMtu || 3, 3),
    destQpNum: peer.qp.qpNum,
    rqPsn: peer.sqPsn,
    maxDestRdAtomic: 4,
    minRnrTimer: o.minRnrTimer ?? 1,
  };
  const rtrMask = type === QpType.RC ? RC_RTR_MASK : QpAttrMask.STATE | QpAttrMask.AV | QpAttrMask.PATH_MTU | QpAttrMask.DEST_QPN | QpAttrMask.RQ_PSN;
  await v.modifyQp(me.qp, rtr, rtrMask);
  if (upTo === QpState.RTR) return;
  const rts = { qpState: QpState.RTS, sqPsn: me.sqPsn, timeout: 14, retryCnt: 7, rnrRetry: o.rnrRetry ?? 7, maxRdAtomic: 4 };
  await v.modifyQp(me.qp, rts, type === QpType.RC ? RC_RTS_MASK : QpAttrMask.STATE | QpAttrMask.SQ_PSN);
}

/** Two connected QPs, `a` on env.a and `b` on env.b, both in RTS. */
export async function connectedPair(t: Teardown, env: ScenarioEnv, o: PairOptions = {}): Promise<{ a: Side; b: Side }> {
  const a = await makeSide(t, env.a, o, 0xfffffa);
  const b = await makeSide(t, env.b, o, 0x123456);
  const gidA = await localGid(env.a);
  const gidB = await localGid(env.b);
  await bringUp(a, b, gidB, o);
  await bringUp(b, a, gidA, o);
  return { a, b };
}

export function u64le(v: bigint): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt.asUintN(64, v), true);
  return out;
}

export function readU64le(b: Uint8Array, off = 0): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off, true);
}
