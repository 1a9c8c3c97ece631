/**
 * QP numbers for engines that own their QPN space (loopback, soft-RoCE):
 * 24 bits, QP0/QP1 and friends reserved below FIRST_QPN.
 */
import { FIRST_QPN, QPN_MASK } from '../abi/constants.js';

/**
 * The QPN for a new QP: `wanted` when it is valid and free (a restore after
 * migration keeps its QPN), otherwise the first free number from `cursor`
 * on, wrapping. Returns it with the cursor to continue from, or null.
 */
export function allocateQpn(wanted: number | null, cursor: number, taken: (qpn: number) => boolean): { qpn: number; cursor: number } | null {
  if (wanted !== null) {
    if (!Number.isInteger(wanted) || wanted < FIRST_QPN || wanted > QPN_MASK || taken(wanted)) return null;
    return { qpn: wanted, cursor };
  }
  let n = cursor;
  for (let tries = QPN_MASK - FIRST_QPN + 1; tries > 0; tries--) {
    const next = n >= QPN_MASK ? FIRST_QPN : n + 1;
    if (!taken(n)) return { qpn: n, cursor: next };
    n = next;
  }
  return null;
}
