/**
 * The conformance scenarios through the TypeScript reference driver against
 * the loopback engine: each on a device of its own, in this process; again
 * with scattered guest pages, split descriptor chains and indirect tables;
 * the limit scenarios on a device with small limits; and a few through a
 * separate `vrdma serve` process.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { RdmaLimits } from '../backend/device/limits.js';
import { PROJECT_ROOT } from '../test/support/backend-process.js';
import type { RefDriverOptions } from './driver/ref-driver.js';
import { startDevice, type DeviceMode } from './harness.js';
import { ALL_SCENARIOS, LIMIT_SCENARIOS, type Scenario } from './scenarios/index.js';

interface Config {
  name: string;
  mode: DeviceMode;
  limits?: Partial<RdmaLimits>;
  gids?: string[];
  driver?: RefDriverOptions;
  scenarios: Record<string, Scenario>;
}

const SMALL_LIMITS: Partial<RdmaLimits> = { numCqSlots: 6, numQpSlots: 5, maxPd: 5, maxMr: 20, maxCq: 6, maxQp: 4, maxAh: 7 };
const PROCESS_SCENARIOS = ['rcSendRecv', 'rdmaRead', 'atomicFetchAndAdd', 'udSendRecv', 'cqArmingAndInterrupts', 'cqOverflow', 'qpErrorFlush', 'limitQpSlots'];
const cliBuilt = existsSync(join(PROJECT_ROOT, 'dist', 'backend', 'device', 'rdma-device.js'));

const CONFIGS: Config[] = [
  { name: 'in-process', mode: 'in-process', scenarios: ALL_SCENARIOS },
  {
    name: 'in-process, scattered pages + split chains + indirect',
    mode: 'in-process',
    driver: { scatterBuffers: true, splitChains: true, indirect: true },
    scenarios: ALL_SCENARIOS,
  },
  { name: 'in-process, small limits', mode: 'in-process', limits: SMALL_LIMITS, scenarios: LIMIT_SCENARIOS },
  {
    name: 'in-process, IPv6 GID table',
    mode: 'in-process',
    gids: ['fd00:1234::7', '10.1.2.3'],
    scenarios: Object.fromEntries(['udSendRecv', 'rcSendRecv', 'queryBasics', 'limitAh'].map((n) => [n, ALL_SCENARIOS[n]!])),
  },
  {
    name: 'in-process, IB GRHs negotiated (VIRTIO_RDMA_F_IB_GRH)',
    mode: 'in-process',
    driver: { ibGrh: true },
    gids: ['10.1.2.3', 'fd00:1234::7'],
    scenarios: Object.fromEntries(['udSendRecv'].map((n) => [n, ALL_SCENARIOS[n]!])),
  },
  {
    name: 'separate process',
    mode: 'process',
    limits: { numCqSlots: 8, numQpSlots: 8 },
    scenarios: Object.fromEntries(PROCESS_SCENARIOS.map((n) => [n, ALL_SCENARIOS[n]!])),
  },
];

async function runScenario(cfg: Config, name: string, fn: Scenario): Promise<void> {
  const dut = await startDevice({ mode: cfg.mode, ...(cfg.limits ? { limits: cfg.limits } : {}), ...(cfg.gids ? { gids: cfg.gids } : {}), logLevel: process.env.VRDMA_TEST_LOG === 'debug' ? 'debug' : 'info' });
  let ok = false;
  try {
    const drv = await dut.open({ name, ...cfg.driver });
    await fn({ a: drv, b: drv, fresh: true, grhLayout: drv.grhLayout });
    // Everything the scenario created was destroyed: the device holds no WQE or CQE buffer any more.
    const held = [...drv.outstandingDescriptors()].filter(([vq]) => vq !== 0);
    expect(drv.violations, 'ABI violations seen by the driver').toEqual([]);
    expect(held, 'descriptors the device still holds after the scenario cleaned up (vq, count)').toEqual([]);
    expect(drv.memoryStats.allocations, 'driver guest-memory allocations left').toBe(0);
    ok = true;
  } finally {
    if (!ok) {
      const lines = dut.logLines().filter((l) => /WARN|ERROR/.test(l));
      if (lines.length > 0) process.stderr.write(`--- device warnings/errors during ${cfg.name} / ${name}:\n${lines.slice(-40).join('\n')}\n`);
    }
    await dut.stop();
  }
}

for (const cfg of CONFIGS) {
  describe(`conformance: reference driver, loopback engine, ${cfg.name}`, () => {
    // The global setup builds dist/; a missing CLI is a failure, not a skip.
    beforeAll(() => {
      if (cfg.mode === 'process' && !cliBuilt) throw new Error('dist/backend/cli.js is missing: run `npm run setup`');
    });
    for (const [name, fn] of Object.entries(cfg.scenarios)) {
      it(name, () => runScenario(cfg, name, fn));
    }
  });
}
