/**
 * The out-of-band message of rdma-core's ibv_rc_pingpong / ibv_uc_pingpong /
 * ibv_ud_pingpong (libibverbs/examples): `LID:QPN:PSN:GID` printed as
 * "%04x:%06x:%06x:" plus the GID's 16 bytes as 32 hex digits in wire order,
 * NUL-terminated, always exactly 52 bytes on the TCP stream. The client
 * sends it first; after the server's reply the client sends "done\0".
 */

export const PINGPONG_MESSAGE_SIZE = 52;
/** What the client sends after it read the server's address. */
export const PINGPONG_DONE = new Uint8Array([0x64, 0x6f, 0x6e, 0x65, 0]);
export const PINGPONG_DEFAULT_PORT = 18515;

export interface PingpongDest {
  lid: number;
  qpn: number;
  psn: number;
  /** 16 bytes. */
  gid: Uint8Array;
}

export class PingpongMessageError extends Error {
  override readonly name = 'PingpongMessageError';
}

function hex(v: number, digits: number): string {
  return v.toString(16).padStart(digits, '0');
}

export function encodePingpongDest(d: PingpongDest): Uint8Array {
  if (!Number.isInteger(d.lid) || d.lid < 0 || d.lid > 0xffff) throw new RangeError(`LID ${d.lid} does not fit 16 bits`);
  if (!Number.isInteger(d.qpn) || d.qpn < 0 || d.qpn > 0xffffff) throw new RangeError(`QPN ${d.qpn} does not fit 24 bits`);
  if (!Number.isInteger(d.psn) || d.psn < 0 || d.psn > 0xffffff) throw new RangeError(`PSN ${d.psn} does not fit 24 bits`);
  if (d.gid.length !== 16) throw new RangeError(`a GID has 16 bytes, got ${d.gid.length}`);
  let gid = '';
  for (const b of d.gid) gid += hex(b, 2);
  const text = `${hex(d.lid, 4)}:${hex(d.qpn, 6)}:${hex(d.psn, 6)}:${gid}`;
  const out = new Uint8Array(PINGPONG_MESSAGE_SIZE);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

const MESSAGE_RE = /^([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,8}):([0-9a-fA-F]{32})$/;

/** Parses a peer's message; anything but the tools' exact shape is refused with the reason. */
export function decodePingpongDest(bytes: Uint8Array): PingpongDest {
  if (bytes.length !== PINGPONG_MESSAGE_SIZE) throw new PingpongMessageError(`pingpong message has ${bytes.length} bytes, expected ${PINGPONG_MESSAGE_SIZE}`);
  const nul = bytes.indexOf(0);
  if (nul < 0) throw new PingpongMessageError('pingpong message is not NUL-terminated');
  let text = '';
  for (let i = 0; i < nul; i++) {
    const c = bytes[i]!;
    if (c < 0x20 || c > 0x7e) throw new PingpongMessageError(`pingpong message has a non-printable byte 0x${hex(c, 2)} at ${i}`);
    text += String.fromCharCode(c);
  }
  const m = MESSAGE_RE.exec(text);
  if (m === null) throw new PingpongMessageError(`pingpong message '${text}' is not LID:QPN:PSN:GID`);
  const lid = parseInt(m[1]!, 16);
  const qpn = parseInt(m[2]!, 16);
  const psn = parseInt(m[3]!, 16);
  if (lid > 0xffff) throw new PingpongMessageError(`LID 0x${hex(lid, 1)} does not fit 16 bits`);
  if (qpn === 0 || qpn > 0xffffff) throw new PingpongMessageError(`QPN 0x${hex(qpn, 1)} is not a 24-bit QP number`);
  if (psn > 0xffffff) throw new PingpongMessageError(`PSN 0x${hex(psn, 1)} does not fit 24 bits`);
  const gid = new Uint8Array(16);
  for (let i = 0; i < 16; i++) gid[i] = parseInt(m[4]!.slice(i * 2, i * 2 + 2), 16);
  return { lid, qpn, psn, gid };
}
