/**
 * Hard limits of one device instance. They go into the config space and
 * QUERY_DEVICE, and every table enforces them.
 */
export interface RdmaLimits {
  numCqSlots: number;
  numQpSlots: number;
  maxPd: number;
  maxMr: number;
  maxCq: number;
  maxQp: number;
  maxAh: number;
  maxCqe: number;
  maxQpWr: number;
  maxSge: number;
  maxInlineData: number;
  maxQpRdAtom: number;
  maxMrSize: bigint;
  gidTblLen: number;
}

export const DEFAULT_LIMITS: Readonly<RdmaLimits> = {
  numCqSlots: 16,
  numQpSlots: 16,
  maxPd: 64,
  maxMr: 256,
  maxCq: 16,
  maxQp: 16,
  maxAh: 64,
  maxCqe: 4095,
  maxQpWr: 1024,
  maxSge: 16,
  maxInlineData: 256,
  maxQpRdAtom: 16,
  maxMrSize: 1n << 30n,
  gidTblLen: 4,
};

/** Fills in defaults and keeps the limits consistent with each other and with the ABI. */
export function resolveLimits(partial: Partial<RdmaLimits> = {}): RdmaLimits {
  const l = { ...DEFAULT_LIMITS, ...partial };
  const int = (name: keyof RdmaLimits, min: number, max: number): void => {
    const v = l[name];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new RangeError(`limit ${name}=${String(v)} must be an integer in ${min}..${max}`);
  };
  int('numCqSlots', 1, 1000);
  int('numQpSlots', 1, 500);
  // virtio-pci allows at most 1024 queues: 1 + C + 2Q.
  if (1 + l.numCqSlots + 2 * l.numQpSlots > 1024) throw new RangeError('1 + numCqSlots + 2 * numQpSlots exceeds 1024 virtqueues');
  int('maxPd', 1, 1 << 20);
  int('maxMr', 1, (1 << 24) - 1);
  int('maxCq', 1, l.numCqSlots);
  int('maxQp', 1, l.numQpSlots);
  int('maxAh', 1, 1 << 20);
  int('maxCqe', 1, 32767);
  int('maxQpWr', 1, 32768);
  int('maxSge', 1, 256);
  int('maxInlineData', 0, 4096);
  int('maxQpRdAtom', 1, 128);
  int('gidTblLen', 1, 256);
  if (l.maxMrSize <= 0n || l.maxMrSize > 1n << 30n) throw new RangeError('maxMrSize must be in 1..1 GiB (two-level page list)');
  return l;
}
