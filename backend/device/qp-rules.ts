/**
 * MODIFY_QP validation: which transitions exist, which attributes each one
 * requires and allows (the IBTA table, docs/virtio-rdma.md §8), and the
 * range of every value. Produces the QP's new attributes or a ControlError;
 * it never changes anything itself.
 */
import { QpAttr, QpState, QpType, ACCESS_ALL, QPN_MASK } from '../abi/constants.js';
import { resetQpAttributes, type AddressVector, type QpAttributes } from '../engine/engine.js';
import { invalid } from './errors.js';

/** The decoded qp_attr struct (docs §8). */
export interface QpAttrRequest {
  qp_state: number;
  cur_qp_state: number;
  path_mtu: number;
  timeout: number;
  retry_cnt: number;
  rnr_retry: number;
  min_rnr_timer: number;
  max_rd_atomic: number;
  max_dest_rd_atomic: number;
  pkey_index: number;
  qp_access_flags: number;
  qkey: number;
  rq_psn: number;
  sq_psn: number;
  dest_qp_num: number;
  port_num: number;
  av: AddressVector;
  avPort: number;
}

type PerType = Record<QpType, number>;
interface Rule {
  required: PerType;
  optional: PerType;
}

const A = QpAttr;
const same = (m: number): PerType => ({ [QpType.RC]: m, [QpType.UC]: m, [QpType.UD]: m });
const NONE = same(0);

const RULES = new Map<string, Rule>([
  [key(QpState.RESET, QpState.INIT), { required: { [QpType.RC]: A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, [QpType.UC]: A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, [QpType.UD]: A.PKEY_INDEX | A.PORT | A.QKEY }, optional: NONE }],
  [key(QpState.INIT, QpState.INIT), { required: NONE, optional: { [QpType.RC]: A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, [QpType.UC]: A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS, [QpType.UD]: A.PKEY_INDEX | A.PORT | A.QKEY } }],
  [
    key(QpState.INIT, QpState.RTR),
    {
      required: { [QpType.RC]: A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER, [QpType.UC]: A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN, [QpType.UD]: 0 },
      optional: { [QpType.RC]: A.PKEY_INDEX | A.ACCESS_FLAGS, [QpType.UC]: A.PKEY_INDEX | A.ACCESS_FLAGS, [QpType.UD]: A.PKEY_INDEX | A.QKEY },
    },
  ],
  [
    key(QpState.RTR, QpState.RTS),
    {
      required: { [QpType.RC]: A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC, [QpType.UC]: A.SQ_PSN, [QpType.UD]: A.SQ_PSN },
      optional: { [QpType.RC]: A.CUR_STATE | A.ACCESS_FLAGS | A.MIN_RNR_TIMER, [QpType.UC]: A.CUR_STATE | A.ACCESS_FLAGS, [QpType.UD]: A.CUR_STATE | A.QKEY },
    },
  ],
  [key(QpState.RTS, QpState.RTS), { required: NONE, optional: { [QpType.RC]: A.CUR_STATE | A.ACCESS_FLAGS | A.MIN_RNR_TIMER, [QpType.UC]: A.CUR_STATE | A.ACCESS_FLAGS, [QpType.UD]: A.CUR_STATE | A.QKEY } }],
  [key(QpState.SQE, QpState.RTS), { required: NONE, optional: { [QpType.RC]: -1, [QpType.UC]: A.CUR_STATE | A.ACCESS_FLAGS, [QpType.UD]: A.CUR_STATE | A.QKEY } }],
]);

function key(from: QpState, to: QpState): string {
  return `${from}>${to}`;
}

function ruleFor(from: QpState, to: QpState): Rule | null {
  if (to === QpState.RESET || to === QpState.ERR) return { required: NONE, optional: same(A.CUR_STATE) };
  return RULES.get(key(from, to)) ?? null;
}

/** Attributes of a new QP (RESET). */
export const initialAttributes = resetQpAttributes;

export interface ModifyContext {
  type: QpType;
  current: QpAttributes;
  maxQpRdAtom: number;
  gidValid: (index: number) => boolean;
}

const STATE_NAMES = ['RESET', 'INIT', 'RTR', 'RTS', 'SQD', 'SQE', 'ERR'];

export function stateName(s: number): string {
  return STATE_NAMES[s] ?? `state ${s}`;
}

/** Validates a MODIFY_QP and returns the attributes after it. */
export function applyModify(ctx: ModifyContext, mask: number, req: QpAttrRequest): QpAttributes {
  if ((mask & ~((1 << 21) - 1)) !== 0) throw invalid(`unknown attribute-mask bits 0x${mask.toString(16)}`);
  const unsupported = A.ALT_PATH | A.PATH_MIG_STATE | A.EN_SQD_ASYNC_NOTIFY | A.CAP;
  if (mask & unsupported) throw invalid(`attributes 0x${(mask & unsupported).toString(16)} are not supported`);
  const from = ctx.current.state;
  const to = mask & A.STATE ? req.qp_state : from;
  if (to > QpState.ERR) throw invalid(`qp_state ${to} is not a state`);
  const rule = ruleFor(from, to);
  if (rule === null) throw invalid(`no transition ${stateName(from)} -> ${stateName(to)}`);
  const required = rule.required[ctx.type];
  const allowed = required | rule.optional[ctx.type] | A.STATE;
  if (rule.optional[ctx.type] === -1) throw invalid(`no transition ${stateName(from)} -> ${stateName(to)} for this QP type`);
  const missing = required & ~mask;
  if (missing) throw invalid(`${stateName(from)} -> ${stateName(to)} needs attributes 0x${missing.toString(16)}`);
  const extra = mask & ~allowed;
  if (extra) throw invalid(`${stateName(from)} -> ${stateName(to)} does not take attributes 0x${extra.toString(16)}`);

  if (mask & A.CUR_STATE && req.cur_qp_state !== from) throw invalid(`cur_qp_state ${stateName(req.cur_qp_state)} is not the current ${stateName(from)}`);
  const next: QpAttributes = to === QpState.RESET ? initialAttributes() : { ...ctx.current, av: ctx.current.av };
  next.state = to;
  if (to === QpState.RESET) return next;
  if (mask & A.PORT && req.port_num !== 1) throw invalid(`port ${req.port_num} does not exist`);
  if (mask & A.PKEY_INDEX) {
    if (req.pkey_index !== 0) throw invalid(`pkey_index ${req.pkey_index} out of range`);
    next.pkeyIndex = 0;
  }
  if (mask & A.ACCESS_FLAGS) {
    if (req.qp_access_flags & ~ACCESS_ALL) throw invalid(`access flags 0x${req.qp_access_flags.toString(16)}`);
    next.accessFlags = req.qp_access_flags;
  }
  if (mask & A.QKEY) next.qkey = req.qkey >>> 0;
  if (mask & A.PATH_MTU) {
    if (req.path_mtu < 1 || req.path_mtu > 5) throw invalid(`path_mtu ${req.path_mtu} is not 1..5`);
    next.pathMtu = req.path_mtu;
  }
  if (mask & A.DEST_QPN) {
    if (req.dest_qp_num > QPN_MASK) throw invalid(`dest_qp_num 0x${req.dest_qp_num.toString(16)} exceeds 24 bits`);
    next.destQpn = req.dest_qp_num;
  }
  if (mask & A.RQ_PSN) {
    if (req.rq_psn > QPN_MASK) throw invalid(`rq_psn exceeds 24 bits`);
    next.rqPsn = req.rq_psn;
  }
  if (mask & A.SQ_PSN) {
    if (req.sq_psn > QPN_MASK) throw invalid(`sq_psn exceeds 24 bits`);
    next.sqPsn = req.sq_psn;
  }
  if (mask & A.TIMEOUT) {
    if (req.timeout > 31) throw invalid(`timeout ${req.timeout} exceeds 31`);
    next.timeout = req.timeout;
  }
  if (mask & A.RETRY_CNT) {
    if (req.retry_cnt > 7) throw invalid(`retry_cnt ${req.retry_cnt} exceeds 7`);
    next.retryCnt = req.retry_cnt;
  }
  if (mask & A.RNR_RETRY) {
    if (req.rnr_retry > 7) throw invalid(`rnr_retry ${req.rnr_retry} exceeds 7`);
    next.rnrRetry = req.rnr_retry;
  }
  if (mask & A.MIN_RNR_TIMER) {
    if (req.min_rnr_timer > 31) throw invalid(`min_rnr_timer ${req.min_rnr_timer} exceeds 31`);
    next.minRnrTimer = req.min_rnr_timer;
  }
  if (mask & A.MAX_QP_RD_ATOMIC) {
    if (req.max_rd_atomic > ctx.maxQpRdAtom) throw invalid(`max_rd_atomic ${req.max_rd_atomic} exceeds ${ctx.maxQpRdAtom}`);
    next.maxRdAtomic = req.max_rd_atomic;
  }
  if (mask & A.MAX_DEST_RD_ATOMIC) {
    if (req.max_dest_rd_atomic > ctx.maxQpRdAtom) throw invalid(`max_dest_rd_atomic ${req.max_dest_rd_atomic} exceeds ${ctx.maxQpRdAtom}`);
    next.maxDestRdAtomic = req.max_dest_rd_atomic;
  }
  if (mask & A.AV) {
    if (req.avPort !== 1) throw invalid(`address vector port ${req.avPort} does not exist`);
    if (!ctx.gidValid(req.av.sgidIndex)) throw invalid(`sgid_index ${req.av.sgidIndex} names no GID`);
    next.av = req.av;
  }
  return next;
}
