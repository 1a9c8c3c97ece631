/**
 * Every conformance scenario by name. A scenario is a plain async function
 * of a {@link ScenarioEnv} that throws on failure; runners (the reference
 * driver here, a VM later) decide how to give it a device.
 */
import type { Scenario } from './common.js';
import {
  atomicCompareAndSwap,
  atomicFetchAndAdd,
  dmaMrLocalOnly,
  inlineSend,
  largeMrTwoLevelPageList,
  multiSgeSendRecv,
  queryBasics,
  rcSendRecv,
  rcSendWithImm,
  rdmaRead,
  rdmaWrite,
  rdmaWriteWithImm,
  staleKeysAndAccessRights,
  udSendRecv,
  zeroLengthSendAndWrite,
} from './data-path.js';
import { cqArmingAndInterrupts, cqOverflow } from './completion-queue.js';
import { modifyQpRules, qpErrorFlush } from './qp-state.js';
import { limitAh, limitCq, limitCqSlots, limitMr, limitPd, limitQp, limitQpSlots } from './limits.js';
import { postInWrongState, receiveTooSmall, rnrRetryExceeded, signalingRules } from './errors.js';
import { destroyCqInUse, destroyPdInUse, destroyQpWithOutstandingWqes } from './lifetimes.js';

export type { Scenario, ScenarioEnv } from './common.js';

export const DATA_PATH_SCENARIOS: Record<string, Scenario> = {
  queryBasics,
  rcSendRecv,
  rcSendWithImm,
  rdmaWrite,
  rdmaWriteWithImm,
  rdmaRead,
  atomicCompareAndSwap,
  atomicFetchAndAdd,
  udSendRecv,
  multiSgeSendRecv,
  inlineSend,
  zeroLengthSendAndWrite,
  largeMrTwoLevelPageList,
  dmaMrLocalOnly,
  staleKeysAndAccessRights,
};

export const CQ_SCENARIOS: Record<string, Scenario> = { cqOverflow, cqArmingAndInterrupts };

export const QP_STATE_SCENARIOS: Record<string, Scenario> = { qpErrorFlush, modifyQpRules };

/** These count objects: run them on a device opened for them alone (env.fresh). */
export const LIMIT_SCENARIOS: Record<string, Scenario> = { limitPd, limitMr, limitCq, limitQp, limitAh, limitCqSlots, limitQpSlots };

export const LIFETIME_SCENARIOS: Record<string, Scenario> = { destroyPdInUse, destroyCqInUse, destroyQpWithOutstandingWqes };

/** Signalling and the work-request errors of §9. */
export const ERROR_SCENARIOS: Record<string, Scenario> = { signalingRules, postInWrongState, rnrRetryExceeded, receiveTooSmall };

export const ALL_SCENARIOS: Record<string, Scenario> = {
  ...DATA_PATH_SCENARIOS,
  ...CQ_SCENARIOS,
  ...QP_STATE_SCENARIOS,
  ...LIMIT_SCENARIOS,
  ...LIFETIME_SCENARIOS,
  ...ERROR_SCENARIOS,
};
