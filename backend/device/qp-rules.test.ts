import { describe, expect, it } from 'vitest';
import { QpAttr as A, QpState, QpType } from '../abi/constants.js';
import type { QpAttributes } from '../engine/engine.js';
import { ControlError } from './errors.js';
import { applyModify, initialAttributes, type QpAttrRequest } from './qp-rules.js';

const req = (over: Partial<QpAttrRequest> = {}): QpAttrRequest => ({
  qp_state: 0,
  cur_qp_state: 0,
  path_mtu: 3,
  timeout: 14,
  retry_cnt: 7,
  rnr_retry: 7,
  min_rnr_timer: 12,
  max_rd_atomic: 1,
  max_dest_rd_atomic: 1,
  pkey_index: 0,
  qp_access_flags: 0,
  qkey: 0x11111111,
  rq_psn: 100,
  sq_psn: 200,
  dest_qp_num: 0x12,
  port_num: 1,
  av: { dgid: new Uint8Array(16), sgidIndex: 0, hopLimit: 1, trafficClass: 0, flowLabel: 0, sl: 0 },
  avPort: 1,
  ...over,
});

function modify(type: QpType, current: QpAttributes, mask: number, r: QpAttrRequest): QpAttributes {
  return applyModify({ type, current, maxQpRdAtom: 16, gidValid: (i) => i === 0 }, mask, r);
}

const INIT_RC = A.STATE | A.PKEY_INDEX | A.PORT | A.ACCESS_FLAGS;
const RTR_RC = A.STATE | A.AV | A.PATH_MTU | A.DEST_QPN | A.RQ_PSN | A.MAX_DEST_RD_ATOMIC | A.MIN_RNR_TIMER;
const RTS_RC = A.STATE | A.SQ_PSN | A.TIMEOUT | A.RETRY_CNT | A.RNR_RETRY | A.MAX_QP_RD_ATOMIC;

function rcToRts(): QpAttributes {
  let a = modify(QpType.RC, initialAttributes(), INIT_RC, req({ qp_state: QpState.INIT }));
  a = modify(QpType.RC, a, RTR_RC, req({ qp_state: QpState.RTR }));
  return modify(QpType.RC, a, RTS_RC, req({ qp_state: QpState.RTS }));
}

describe('MODIFY_QP rules', () => {
  it('walks an RC QP RESET -> INIT -> RTR -> RTS with the required attributes', () => {
    const a = rcToRts();
    expect(a.state).toBe(QpState.RTS);
    expect(a.destQpn).toBe(0x12);
    expect(a.sqPsn).toBe(200);
    expect(a.rqPsn).toBe(100);
    expect(a.pathMtu).toBe(3);
  });

  it('refuses a transition with a required attribute missing, and one with an attribute it does not take', () => {
    expect(() => modify(QpType.RC, initialAttributes(), INIT_RC & ~A.ACCESS_FLAGS, req({ qp_state: QpState.INIT }))).toThrow(/needs attributes 0x8/);
    expect(() => modify(QpType.RC, initialAttributes(), INIT_RC | A.SQ_PSN, req({ qp_state: QpState.INIT }))).toThrow(/does not take/);
  });

  it('uses a different required set for UD (QKEY at INIT, nothing at RTR)', () => {
    let a = modify(QpType.UD, initialAttributes(), A.STATE | A.PKEY_INDEX | A.PORT | A.QKEY, req({ qp_state: QpState.INIT }));
    a = modify(QpType.UD, a, A.STATE, req({ qp_state: QpState.RTR }));
    a = modify(QpType.UD, a, A.STATE | A.SQ_PSN, req({ qp_state: QpState.RTS }));
    expect(a.state).toBe(QpState.RTS);
    expect(a.qkey).toBe(0x11111111);
  });

  it('refuses transitions that do not exist', () => {
    expect(() => modify(QpType.RC, initialAttributes(), A.STATE, req({ qp_state: QpState.RTS }))).toThrow(/no transition RESET -> RTS/);
    expect(() => modify(QpType.RC, rcToRts(), A.STATE, req({ qp_state: QpState.SQD }))).toThrow(/no transition/);
    expect(() => modify(QpType.RC, initialAttributes(), A.STATE, req({ qp_state: 9 }))).toThrow(/not a state/);
  });

  it('allows RESET and ERR from any state, and RESET forgets the attributes', () => {
    const err = modify(QpType.RC, rcToRts(), A.STATE, req({ qp_state: QpState.ERR }));
    expect(err.state).toBe(QpState.ERR);
    const reset = modify(QpType.RC, err, A.STATE, req({ qp_state: QpState.RESET }));
    expect(reset).toEqual(initialAttributes());
  });

  it('range-checks values: port, pkey index, MTU, 24-bit PSNs and QPN, retry counts, rd_atomic, GID index', () => {
    const bad: Array<[number, Partial<QpAttrRequest>, RegExp, QpState, QpAttributes]> = [
      [INIT_RC, { port_num: 2 }, /port 2/, QpState.INIT, initialAttributes()],
      [INIT_RC, { pkey_index: 1 }, /pkey_index/, QpState.INIT, initialAttributes()],
    ];
    for (const [mask, over, re, st, cur] of bad) expect(() => modify(QpType.RC, cur, mask, req({ qp_state: st, ...over }))).toThrow(re);
    const init = modify(QpType.RC, initialAttributes(), INIT_RC, req({ qp_state: QpState.INIT }));
    const rtr: Array<[Partial<QpAttrRequest>, RegExp]> = [
      [{ path_mtu: 0 }, /path_mtu/],
      [{ path_mtu: 6 }, /path_mtu/],
      [{ rq_psn: 1 << 24 }, /rq_psn/],
      [{ dest_qp_num: 1 << 24 }, /24 bits/],
      [{ max_dest_rd_atomic: 17 }, /max_dest_rd_atomic/],
      [{ min_rnr_timer: 32 }, /min_rnr_timer/],
      [{ av: { dgid: new Uint8Array(16), sgidIndex: 3, hopLimit: 1, trafficClass: 0, flowLabel: 0, sl: 0 } }, /sgid_index 3/],
      [{ avPort: 0 }, /port 0/],
    ];
    for (const [over, re] of rtr) {
      const e = (() => {
        try {
          modify(QpType.RC, init, RTR_RC, req({ qp_state: QpState.RTR, ...over }));
        } catch (err) {
          return err;
        }
        return null;
      })();
      expect(e, JSON.stringify(over)).toBeInstanceOf(ControlError);
      expect((e as Error).message).toMatch(re);
    }
  });

  it('refuses unsupported attributes and a CUR_STATE that is not the current state', () => {
    expect(() => modify(QpType.RC, initialAttributes(), INIT_RC | A.ALT_PATH, req({ qp_state: QpState.INIT }))).toThrow(/not supported/);
    const rts = rcToRts();
    expect(() => modify(QpType.RC, rts, A.CUR_STATE, req({ cur_qp_state: QpState.RTR }))).toThrow(/cur_qp_state/);
    expect(modify(QpType.RC, rts, A.CUR_STATE, req({ cur_qp_state: QpState.RTS })).state).toBe(QpState.RTS);
    expect(() => modify(QpType.RC, rts, 1 << 25, req())).toThrow(/unknown attribute-mask/);
  });
});
