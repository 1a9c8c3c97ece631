/**
 * IBTA transport timers, in milliseconds.
 */

/** The RNR NAK timer field (min_rnr_timer), IBTA table 45; code 0 is the longest. */
const RNR_TIMER_MS = [
  655.36, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48, 0.64, 0.96, 1.28, 1.92, 2.56, 3.84, 5.12, 7.68, 10.24, 15.36, 20.48, 30.72,
  40.96, 61.44, 81.92, 122.88, 163.84, 245.76, 327.68, 491.52,
] as const;

/** How long a requester waits after an RNR NAK carrying `code`. */
export function rnrTimerMs(code: number): number {
  return RNR_TIMER_MS[code & 31]!;
}

/** Local ACK timeout for the QP attribute `timeout`: 4.096 µs · 2^timeout; 0 means wait forever (null). */
export function transportTimeoutMs(code: number): number | null {
  return code === 0 ? null : 4.096e-3 * 2 ** (code & 31);
}

/** The longest delay setTimeout takes without overflowing (longer waits re-arm). */
export const MAX_TIMER_MS = 0x7fff_ffff;
