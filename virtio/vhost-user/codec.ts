/**
 * Wire codec for vhost-user messages: one decoder and one encoder per payload
 * shape, shared by the back-end and by the test front-end.
 *
 * Decoding validates size and fd count against the request's definition; a
 * message that fails is a {@link ProtocolError}, never a partially filled
 * object. All integers are little-endian (host order on x86-64).
 */
import {
  FrontendReq,
  HDR_NEED_REPLY,
  HDR_REPLY,
  HDR_VERSION,
  HDR_VERSION_MASK,
  HEADER_SIZE,
  MAX_ATTACHED_FDS,
  MAX_CONFIG_SIZE,
  MAX_MEM_TABLE_REGIONS,
  MAX_PAYLOAD_SIZE,
  VRING_NOFD_MASK,
  requestName,
} from './protocol.js';

export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

export interface Header {
  request: number;
  flags: number;
  size: number;
}

export interface MemRegion {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

export type Payload =
  | { kind: 'none' }
  | { kind: 'u64'; value: bigint }
  | { kind: 'vringState'; index: number; num: number }
  | { kind: 'vringAddr'; index: number; flags: number; desc: number; used: number; avail: number; log: number }
  | { kind: 'memTable'; regions: MemRegion[] }
  | { kind: 'memRegion'; region: MemRegion }
  | { kind: 'log'; size: number; offset: number }
  | { kind: 'config'; offset: number; size: number; flags: number; data: Uint8Array }
  | { kind: 'inflight'; mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number }
  | { kind: 'iotlb'; iova: number; size: number; uaddr: number; perm: number; type: number }
  | { kind: 'deviceStateFd'; direction: number; phase: number }
  | { kind: 'uuid'; uuid: Uint8Array }
  | { kind: 'bytes'; data: Uint8Array };

export type PayloadKind = Payload['kind'];

export interface Message {
  request: number;
  flags: number;
  payload: Payload;
  fds: number[];
}

/** How many descriptors a request may carry. */
type FdRule =
  | 'none'
  | 'one'
  /** SET_VRING_KICK/CALL/ERR: one fd unless the payload's NOFD bit is set. */
  | 'vringFd'
  /** SET_MEM_TABLE: one per region. */
  | 'perRegion'
  /** REM_MEM_REG: should carry none, but any that arrive are tolerated (and closed). */
  | 'ignored'
  /** SET_LOG_BASE: one with LOG_SHMFD, none in the legacy form. */
  | 'optional';

interface RequestSpec {
  payload: PayloadKind;
  fds: FdRule;
}

const SPECS: Readonly<Record<FrontendReq, RequestSpec>> = {
  [FrontendReq.GET_FEATURES]: { payload: 'none', fds: 'none' },
  [FrontendReq.SET_FEATURES]: { payload: 'u64', fds: 'none' },
  [FrontendReq.SET_OWNER]: { payload: 'none', fds: 'none' },
  [FrontendReq.RESET_OWNER]: { payload: 'none', fds: 'none' },
  [FrontendReq.SET_MEM_TABLE]: { payload: 'memTable', fds: 'perRegion' },
  [FrontendReq.SET_LOG_BASE]: { payload: 'log', fds: 'optional' },
  [FrontendReq.SET_LOG_FD]: { payload: 'none', fds: 'one' },
  [FrontendReq.SET_VRING_NUM]: { payload: 'vringState', fds: 'none' },
  [FrontendReq.SET_VRING_ADDR]: { payload: 'vringAddr', fds: 'none' },
  [FrontendReq.SET_VRING_BASE]: { payload: 'vringState', fds: 'none' },
  [FrontendReq.GET_VRING_BASE]: { payload: 'vringState', fds: 'none' },
  [FrontendReq.SET_VRING_KICK]: { payload: 'u64', fds: 'vringFd' },
  [FrontendReq.SET_VRING_CALL]: { payload: 'u64', fds: 'vringFd' },
  [FrontendReq.SET_VRING_ERR]: { payload: 'u64', fds: 'vringFd' },
  [FrontendReq.GET_PROTOCOL_FEATURES]: { payload: 'none', fds: 'none' },
  [FrontendReq.SET_PROTOCOL_FEATURES]: { payload: 'u64', fds: 'none' },
  [FrontendReq.GET_QUEUE_NUM]: { payload: 'none', fds: 'none' },
  [FrontendReq.SET_VRING_ENABLE]: { payload: 'vringState', fds: 'none' },
  [FrontendReq.SEND_RARP]: { payload: 'u64', fds: 'none' },
  [FrontendReq.NET_SET_MTU]: { payload: 'u64', fds: 'none' },
  [FrontendReq.SET_BACKEND_REQ_FD]: { payload: 'none', fds: 'one' },
  [FrontendReq.IOTLB_MSG]: { payload: 'iotlb', fds: 'none' },
  [FrontendReq.SET_VRING_ENDIAN]: { payload: 'vringState', fds: 'none' },
  [FrontendReq.GET_CONFIG]: { payload: 'config', fds: 'none' },
  [FrontendReq.SET_CONFIG]: { payload: 'config', fds: 'none' },
  [FrontendReq.CREATE_CRYPTO_SESSION]: { payload: 'bytes', fds: 'none' },
  [FrontendReq.CLOSE_CRYPTO_SESSION]: { payload: 'u64', fds: 'none' },
  [FrontendReq.POSTCOPY_ADVISE]: { payload: 'none', fds: 'none' },
  [FrontendReq.POSTCOPY_LISTEN]: { payload: 'none', fds: 'none' },
  [FrontendReq.POSTCOPY_END]: { payload: 'none', fds: 'none' },
  [FrontendReq.GET_INFLIGHT_FD]: { payload: 'inflight', fds: 'none' },
  [FrontendReq.SET_INFLIGHT_FD]: { payload: 'inflight', fds: 'one' },
  [FrontendReq.GPU_SET_SOCKET]: { payload: 'none', fds: 'one' },
  [FrontendReq.RESET_DEVICE]: { payload: 'none', fds: 'none' },
  [FrontendReq.VRING_KICK]: { payload: 'vringState', fds: 'none' },
  [FrontendReq.GET_MAX_MEM_SLOTS]: { payload: 'none', fds: 'none' },
  [FrontendReq.ADD_MEM_REG]: { payload: 'memRegion', fds: 'one' },
  [FrontendReq.REM_MEM_REG]: { payload: 'memRegion', fds: 'ignored' },
  [FrontendReq.SET_STATUS]: { payload: 'u64', fds: 'none' },
  [FrontendReq.GET_STATUS]: { payload: 'none', fds: 'none' },
  [FrontendReq.GET_SHARED_OBJECT]: { payload: 'uuid', fds: 'none' },
  [FrontendReq.SET_DEVICE_STATE_FD]: { payload: 'deviceStateFd', fds: 'one' },
  [FrontendReq.CHECK_DEVICE_STATE]: { payload: 'none', fds: 'none' },
};

export function isKnownRequest(req: number): req is FrontendReq {
  return Object.prototype.hasOwnProperty.call(SPECS, req);
}

export function payloadKindOf(req: FrontendReq): PayloadKind {
  return SPECS[req].payload;
}

// ---------------------------------------------------------------------------
// Header

export function decodeHeader(buf: Uint8Array): Header {
  if (buf.byteLength < HEADER_SIZE) throw new ProtocolError(`header is ${buf.byteLength} bytes, need ${HEADER_SIZE}`);
  const dv = new DataView(buf.buffer, buf.byteOffset, HEADER_SIZE);
  const header = { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
  if ((header.flags & HDR_VERSION_MASK) !== HDR_VERSION) {
    throw new ProtocolError(`${requestName(header.request)}: bad version ${header.flags & HDR_VERSION_MASK}`);
  }
  if (header.size > MAX_PAYLOAD_SIZE) {
    throw new ProtocolError(`${requestName(header.request)}: payload of ${header.size} bytes exceeds ${MAX_PAYLOAD_SIZE}`);
  }
  return header;
}

export function encodeHeader(dst: Uint8Array, h: Header): void {
  const dv = new DataView(dst.buffer, dst.byteOffset, HEADER_SIZE);
  dv.setUint32(0, h.request, true);
  dv.setUint32(4, h.flags, true);
  dv.setUint32(8, h.size, true);
}

// ---------------------------------------------------------------------------
// Payload shapes

const PAYLOAD_SIZES: Partial<Record<PayloadKind, number>> = {
  none: 0,
  u64: 8,
  vringState: 8,
  vringAddr: 40,
  memRegion: 40,
  log: 16,
  inflight: 24,
  iotlb: 32,
  deviceStateFd: 8,
  uuid: 16,
};
const MEM_REGION_SIZE = 32;
const CONFIG_HEADER_SIZE = 12;

/** Reads a u64 that must fit a JS number exactly (addresses, sizes, offsets). */
function u64Number(dv: DataView, off: number, what: string): number {
  const lo = dv.getUint32(off, true);
  const hi = dv.getUint32(off + 4, true);
  if (hi >= 0x200000) throw new ProtocolError(`${what} 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is beyond 2^53`);
  return hi * 0x1_0000_0000 + lo;
}

function putU64(dv: DataView, off: number, v: number | bigint): void {
  dv.setBigUint64(off, typeof v === 'bigint' ? v : BigInt(v), true);
}

function decodeRegion(dv: DataView, off: number): MemRegion {
  return {
    guestPhysAddr: u64Number(dv, off, 'guest_phys_addr'),
    size: u64Number(dv, off + 8, 'memory_size'),
    userAddr: u64Number(dv, off + 16, 'userspace_addr'),
    mmapOffset: u64Number(dv, off + 24, 'mmap_offset'),
  };
}

function encodeRegion(dv: DataView, off: number, r: MemRegion): void {
  putU64(dv, off, r.guestPhysAddr);
  putU64(dv, off + 8, r.size);
  putU64(dv, off + 16, r.userAddr);
  putU64(dv, off + 24, r.mmapOffset);
}

export function decodePayload(kind: PayloadKind, bytes: Uint8Array): Payload {
  const fixed = PAYLOAD_SIZES[kind];
  if (fixed !== undefined && bytes.byteLength !== fixed) {
    throw new ProtocolError(`${kind} payload is ${bytes.byteLength} bytes, expected ${fixed}`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (kind) {
    case 'none':
      return { kind };
    case 'u64':
      return { kind, value: dv.getBigUint64(0, true) };
    case 'vringState':
      return { kind, index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
    case 'vringAddr':
      return {
        kind,
        index: dv.getUint32(0, true),
        flags: dv.getUint32(4, true),
        desc: u64Number(dv, 8, 'desc_user_addr'),
        used: u64Number(dv, 16, 'used_user_addr'),
        avail: u64Number(dv, 24, 'avail_user_addr'),
        log: u64Number(dv, 32, 'log_guest_addr'),
      };
    case 'memTable': {
      if (bytes.byteLength < 8) throw new ProtocolError(`memory table payload is ${bytes.byteLength} bytes`);
      const n = dv.getUint32(0, true);
      if (n === 0 || n > MAX_MEM_TABLE_REGIONS) throw new ProtocolError(`memory table with ${n} regions (1..${MAX_MEM_TABLE_REGIONS})`);
      if (bytes.byteLength !== 8 + n * MEM_REGION_SIZE) {
        throw new ProtocolError(`memory table of ${n} regions needs ${8 + n * MEM_REGION_SIZE} bytes, got ${bytes.byteLength}`);
      }
      const regions: MemRegion[] = [];
      for (let i = 0; i < n; i++) regions.push(decodeRegion(dv, 8 + i * MEM_REGION_SIZE));
      return { kind, regions };
    }
    case 'memRegion':
      return { kind, region: decodeRegion(dv, 8) };
    case 'log':
      return { kind, size: u64Number(dv, 0, 'log size'), offset: u64Number(dv, 8, 'log offset') };
    case 'config': {
      if (bytes.byteLength < CONFIG_HEADER_SIZE) throw new ProtocolError(`config payload is ${bytes.byteLength} bytes`);
      const offset = dv.getUint32(0, true);
      const size = dv.getUint32(4, true);
      const flags = dv.getUint32(8, true);
      if (size > MAX_CONFIG_SIZE) throw new ProtocolError(`config size ${size} exceeds ${MAX_CONFIG_SIZE}`);
      if (bytes.byteLength !== CONFIG_HEADER_SIZE + size) {
        throw new ProtocolError(`config payload of ${bytes.byteLength} bytes does not match size ${size}`);
      }
      return { kind, offset, size, flags, data: bytes.slice(CONFIG_HEADER_SIZE) };
    }
    case 'inflight':
      return {
        kind,
        mmapSize: u64Number(dv, 0, 'mmap_size'),
        mmapOffset: u64Number(dv, 8, 'mmap_offset'),
        numQueues: dv.getUint16(16, true),
        queueSize: dv.getUint16(18, true),
      };
    case 'iotlb':
      return {
        kind,
        iova: u64Number(dv, 0, 'iova'),
        size: u64Number(dv, 8, 'size'),
        uaddr: u64Number(dv, 16, 'uaddr'),
        perm: dv.getUint8(24),
        type: dv.getUint8(25),
      };
    case 'deviceStateFd':
      return { kind, direction: dv.getUint32(0, true), phase: dv.getUint32(4, true) };
    case 'uuid':
      return { kind, uuid: bytes.slice() };
    case 'bytes':
      return { kind, data: bytes.slice() };
  }
}

export function payloadSize(p: Payload): number {
  switch (p.kind) {
    case 'memTable':
      return 8 + p.regions.length * MEM_REGION_SIZE;
    case 'config':
      return CONFIG_HEADER_SIZE + p.data.byteLength;
    case 'bytes':
      return p.data.byteLength;
    default:
      return PAYLOAD_SIZES[p.kind] ?? 0;
  }
}

export function encodePayload(dst: Uint8Array, p: Payload): void {
  const dv = new DataView(dst.buffer, dst.byteOffset, payloadSize(p));
  switch (p.kind) {
    case 'none':
      return;
    case 'u64':
      dv.setBigUint64(0, p.value, true);
      return;
    case 'vringState':
      dv.setUint32(0, p.index, true);
      dv.setUint32(4, p.num, true);
      return;
    case 'vringAddr':
      dv.setUint32(0, p.index, true);
      dv.setUint32(4, p.flags, true);
      putU64(dv, 8, p.desc);
      putU64(dv, 16, p.used);
      putU64(dv, 24, p.avail);
      putU64(dv, 32, p.log);
      return;
    case 'memTable':
      dv.setUint32(0, p.regions.length, true);
      dv.setUint32(4, 0, true);
      p.regions.forEach((r, i) => encodeRegion(dv, 8 + i * MEM_REGION_SIZE, r));
      return;
    case 'memRegion':
      putU64(dv, 0, 0);
      encodeRegion(dv, 8, p.region);
      return;
    case 'log':
      putU64(dv, 0, p.size);
      putU64(dv, 8, p.offset);
      return;
    case 'config':
      dv.setUint32(0, p.offset, true);
      dv.setUint32(4, p.size, true);
      dv.setUint32(8, p.flags, true);
      dst.set(p.data, CONFIG_HEADER_SIZE);
      return;
    case 'inflight':
      putU64(dv, 0, p.mmapSize);
      putU64(dv, 8, p.mmapOffset);
      dv.setUint16(16, p.numQueues, true);
      dv.setUint16(18, p.queueSize, true);
      return;
    case 'iotlb':
      putU64(dv, 0, p.iova);
      putU64(dv, 8, p.size);
      putU64(dv, 16, p.uaddr);
      dv.setUint8(24, p.perm);
      dv.setUint8(25, p.type);
      return;
    case 'deviceStateFd':
      dv.setUint32(0, p.direction, true);
      dv.setUint32(4, p.phase, true);
      return;
    case 'uuid':
      dst.set(p.uuid.subarray(0, 16));
      return;
    case 'bytes':
      dst.set(p.data);
      return;
  }
}

/** Header + payload as one buffer, ready for sendmsg. */
export function encodeMessage(request: number, flags: number, payload: Payload): Uint8Array {
  const size = payloadSize(payload);
  const out = new Uint8Array(HEADER_SIZE + size);
  encodeHeader(out, { request, flags, size });
  encodePayload(out.subarray(HEADER_SIZE), payload);
  return out;
}

export function encodeRequest(request: FrontendReq, payload: Payload, needReply: boolean): Uint8Array {
  return encodeMessage(request, HDR_VERSION | (needReply ? HDR_NEED_REPLY : 0), payload);
}

export function encodeReply(request: number, payload: Payload): Uint8Array {
  return encodeMessage(request, HDR_VERSION | HDR_REPLY, payload);
}

function expectedFds(spec: RequestSpec, payload: Payload, got: number): { ok: boolean; want: string } {
  switch (spec.fds) {
    case 'none':
      return { ok: got === 0, want: '0' };
    case 'one':
      return { ok: got === 1, want: '1' };
    case 'optional':
      return { ok: got <= 1, want: '0 or 1' };
    case 'ignored':
      return { ok: true, want: 'any' };
    case 'perRegion': {
      const n = payload.kind === 'memTable' ? payload.regions.length : 0;
      return { ok: got === n, want: String(n) };
    }
    case 'vringFd': {
      const nofd = payload.kind === 'u64' && (payload.value & VRING_NOFD_MASK) !== 0n;
      return nofd ? { ok: got === 0, want: '0 (NOFD set)' } : { ok: got === 1, want: '1' };
    }
  }
}

/**
 * Decodes a front-end request. Throws {@link ProtocolError} for an unknown
 * request number, a reply flag on a request, a payload of the wrong size or
 * shape, or the wrong number of fds. The caller owns `fds` either way.
 */
export function decodeRequest(header: Header, payloadBytes: Uint8Array, fds: number[]): Message {
  const name = requestName(header.request);
  if (!isKnownRequest(header.request)) throw new UnknownRequestError(header.request);
  if ((header.flags & HDR_REPLY) !== 0) throw new ProtocolError(`${name}: reply flag set on a request`);
  if (fds.length > MAX_ATTACHED_FDS) throw new ProtocolError(`${name}: ${fds.length} fds attached`);
  const spec = SPECS[header.request];
  let payload: Payload;
  try {
    payload = decodePayload(spec.payload, payloadBytes);
  } catch (err) {
    if (err instanceof ProtocolError) throw new ProtocolError(`${name}: ${err.message}`);
    throw err;
  }
  const fdCheck = expectedFds(spec, payload, fds.length);
  if (!fdCheck.ok) throw new ProtocolError(`${name}: ${fds.length} fds attached, expected ${fdCheck.want}`);
  return { request: header.request, flags: header.flags, payload, fds };
}

/** A well-framed message whose request number this codec does not know. */
export class UnknownRequestError extends ProtocolError {
  constructor(readonly request: number) {
    super(`unknown request ${request}`);
    this.name = 'UnknownRequestError';
  }
}

/** Decodes a back-end reply of the given shape (used by the front-end). */
export function decodeReply(expectRequest: number, kind: PayloadKind, header: Header, payloadBytes: Uint8Array): Payload {
  if (header.request !== expectRequest) {
    throw new ProtocolError(`reply for ${requestName(header.request)} while waiting for ${requestName(expectRequest)}`);
  }
  if ((header.flags & HDR_REPLY) === 0) throw new ProtocolError(`${requestName(header.request)}: reply without REPLY flag`);
  // GET_CONFIG signals failure with an empty payload.
  if (kind === 'config' && payloadBytes.byteLength === 0) return { kind: 'bytes', data: new Uint8Array(0) };
  return decodePayload(kind, payloadBytes);
}
