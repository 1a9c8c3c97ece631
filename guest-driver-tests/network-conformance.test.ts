/**
 * The conformance scenarios across the network: env.a is a reference driver
 * on device A, env.b one on device B, each device in this process with a
 * soft-RoCE engine of its own (A on 127.0.0.2, B on 127.0.0.3, the same
 * random UDP port; Linux routes 127/8 to lo). Every scenario gets two fresh
 * devices.
 *
 * Scenarios the soft-RoCE engine cannot do yet are listed in
 * {@link NOT_YET_OVER_THE_NETWORK} with the reason, and are deliberately not
 * registered as tests at all (not skipped: a skipped test would hide the
 * gap). Move a scenario from that list to {@link OVER_THE_NETWORK} once the
 * engine does what it needs.
 */
import { describe, expect, it } from 'vitest';
import { isSysError } from '../virtio/sys/native.js';
import type { RefDriver } from './driver/ref-driver.js';
import { randomRocePort, startDevice, type DeviceUnderTest } from './harness.js';
import { ALL_SCENARIOS, type Scenario } from './scenarios/index.js';

const ADDRESS_A = '127.0.0.2';
const ADDRESS_B = '127.0.0.3';

/**
 * Scenarios that pass with env.a and env.b on two soft-RoCE devices. The
 * first group is the data path (RC, atomics, UD) and its errors, which cross
 * the network; the rest run mostly on one device but exercise the soft-RoCE
 * engine's QP handling (creation, modify rules, destroy, limits).
 */
export const OVER_THE_NETWORK: readonly string[] = [
  'rcSendRecv',
  'rcSendWithImm',
  'rdmaWrite',
  'rdmaWriteWithImm',
  'rdmaRead',
  'atomicCompareAndSwap',
  'atomicFetchAndAdd',
  'udSendRecv',
  'multiSgeSendRecv',
  'inlineSend',
  'zeroLengthSendAndWrite',
  'largeMrTwoLevelPageList',
  'staleKeysAndAccessRights',
  'signalingRules',
  'rnrRetryExceeded',
  'receiveTooSmall',
  'qpErrorFlush',
  'cqOverflow',
  'postInWrongState',
  'destroyQpWithOutstandingWqes',
  // Device-side behaviour with the soft-RoCE engine underneath.
  'queryBasics',
  'dmaMrLocalOnly',
  'modifyQpRules',
  'destroyPdInUse',
  'destroyCqInUse',
  'limitPd',
  'limitMr',
  'limitCq',
  'limitQp',
  'limitAh',
  'limitCqSlots',
  'limitQpSlots',
  'cqArmingAndInterrupts',
];

/**
 * Scenarios not (yet) run across the network, with the reason. They are not
 * registered as tests at all; move one to {@link OVER_THE_NETWORK} when the
 * engine does what it needs. (There is no UC data-path scenario yet: UC QPs
 * appear only in modifyQpRules and limitQp.)
 */
export const NOT_YET_OVER_THE_NETWORK: Readonly<Record<string, string>> = {};

async function startPair(): Promise<{ a: DeviceUnderTest; b: DeviceUnderTest }> {
  const logLevel = process.env.VRDMA_TEST_LOG === 'debug' ? 'debug' : 'info';
  for (let attempt = 0; ; attempt++) {
    const port = randomRocePort();
    let a: DeviceUnderTest | null = null;
    try {
      a = await startDevice({ softRoce: { address: ADDRESS_A, port }, logLevel });
      const b = await startDevice({ softRoce: { address: ADDRESS_B, port }, logLevel });
      return { a, b };
    } catch (err) {
      await a?.stop();
      // The random port may be taken on this host: try another one.
      if (attempt < 5 && isSysError(err, 'EADDRINUSE')) continue;
      throw err;
    }
  }
}

function expectClean(drv: RefDriver, side: string): void {
  const held = [...drv.outstandingDescriptors()].filter(([vq]) => vq !== 0);
  expect(drv.violations, `ABI violations seen by the driver on ${side}`).toEqual([]);
  expect(held, `descriptors device ${side} still holds after the scenario cleaned up (vq, count)`).toEqual([]);
  expect(drv.memoryStats.allocations, `driver guest-memory allocations left on ${side}`).toBe(0);
}

async function runAcross(name: string, fn: Scenario): Promise<void> {
  const { a, b } = await startPair();
  let ok = false;
  try {
    const drvA = await a.open({ name: `${name}/A` });
    const drvB = await b.open({ name: `${name}/B` });
    await fn({ a: drvA, b: drvB, fresh: true, grhLayout: drvB.grhLayout });
    expectClean(drvA, 'A');
    expectClean(drvB, 'B');
    ok = true;
  } finally {
    if (!ok) {
      for (const [side, dut] of [['A', a], ['B', b]] as const) {
        const lines = dut.logLines().filter((l) => /WARN|ERROR/.test(l));
        if (lines.length > 0) process.stderr.write(`--- device ${side} warnings/errors during ${name}:\n${lines.slice(-40).join('\n')}\n`);
      }
    }
    await a.stop();
    await b.stop();
  }
}

describe('network conformance: the scenario lists', () => {
  it('name real scenarios, each in exactly one list', () => {
    for (const n of [...OVER_THE_NETWORK, ...Object.keys(NOT_YET_OVER_THE_NETWORK)]) expect(ALL_SCENARIOS[n], n).toBeTypeOf('function');
    for (const n of OVER_THE_NETWORK) expect(NOT_YET_OVER_THE_NETWORK[n], `${n} is in both lists`).toBeUndefined();
    expect(new Set(OVER_THE_NETWORK).size).toBe(OVER_THE_NETWORK.length);
    // Every scenario is accounted for: run across the network, or listed with its reason.
    const unaccounted = Object.keys(ALL_SCENARIOS).filter((n) => !OVER_THE_NETWORK.includes(n) && NOT_YET_OVER_THE_NETWORK[n] === undefined);
    expect(unaccounted, 'scenarios in neither list').toEqual([]);
  });
});

describe(`conformance across the network: reference drivers on two soft-RoCE devices (${ADDRESS_A} -> ${ADDRESS_B})`, () => {
  for (const name of OVER_THE_NETWORK) {
    it(name, () => runAcross(name, ALL_SCENARIOS[name]!));
  }
});
