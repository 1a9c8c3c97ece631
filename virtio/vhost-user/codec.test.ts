import { describe, expect, it } from 'vitest';
import {
  decodeHeader,
  decodeRequest,
  encodeHeader,
  encodeRequest,
  payloadKindOf,
  ProtocolError,
  UnknownRequestError,
  type Payload,
  type PayloadKind,
} from './codec.js';
import { FIRST_FRONTEND_REQ, FrontendReq, HDR_REPLY, HEADER_SIZE, LAST_FRONTEND_REQ, MAX_PAYLOAD_SIZE, VRING_NOFD_MASK } from './protocol.js';

const region = { guestPhysAddr: 0x1000_0000, size: 0x4000_0000, userAddr: 0x7f12_3456_0000, mmapOffset: 0x20_0000 };

function samplePayload(kind: PayloadKind): Payload {
  switch (kind) {
    case 'none':
      return { kind };
    case 'u64':
      return { kind, value: 0x1234_5678_9abc_def0n };
    case 'vringState':
      return { kind, index: 3, num: 0xbeef };
    case 'vringAddr':
      return { kind, index: 2, flags: 1, desc: 0x7f00_0000_1000, used: 0x7f00_0000_3000, avail: 0x7f00_0000_2000, log: 0x3000 };
    case 'memTable':
      return { kind, regions: [region, { ...region, guestPhysAddr: 0x1_0000_0000, userAddr: 0x7f20_0000_0000 }] };
    case 'memRegion':
      return { kind, region };
    case 'log':
      return { kind, size: 0x8000, offset: 0x1000 };
    case 'config':
      return { kind, offset: 4, size: 5, flags: 1, data: new Uint8Array([1, 2, 3, 4, 5]) };
    case 'inflight':
      return { kind, mmapSize: 0x10000, mmapOffset: 0, numQueues: 4, queueSize: 256 };
    case 'iotlb':
      return { kind, iova: 0x1000, size: 0x2000, uaddr: 0x7f00_0000_0000, perm: 3, type: 2 };
    case 'deviceStateFd':
      return { kind, direction: 1, phase: 0 };
    case 'uuid':
      return { kind, uuid: Uint8Array.from({ length: 16 }, (_, i) => i * 7) };
    case 'bytes':
      return { kind, data: Uint8Array.from({ length: 40 }, (_, i) => i) };
  }
}

function fdsFor(req: FrontendReq, p: Payload): number[] {
  switch (req) {
    case FrontendReq.SET_MEM_TABLE:
      return p.kind === 'memTable' ? p.regions.map((_, i) => 100 + i) : [];
    case FrontendReq.SET_LOG_BASE:
    case FrontendReq.SET_LOG_FD:
    case FrontendReq.SET_VRING_KICK:
    case FrontendReq.SET_VRING_CALL:
    case FrontendReq.SET_VRING_ERR:
    case FrontendReq.SET_BACKEND_REQ_FD:
    case FrontendReq.SET_INFLIGHT_FD:
    case FrontendReq.GPU_SET_SOCKET:
    case FrontendReq.ADD_MEM_REG:
    case FrontendReq.SET_DEVICE_STATE_FD:
      return [100];
    default:
      return [];
  }
}

function split(bytes: Uint8Array): { header: ReturnType<typeof decodeHeader>; payload: Uint8Array } {
  return { header: decodeHeader(bytes), payload: bytes.subarray(HEADER_SIZE) };
}

describe('vhost-user codec', () => {
  it('round-trips every front-end request 1..43 with its payload shape', () => {
    for (let req = FIRST_FRONTEND_REQ; req <= LAST_FRONTEND_REQ; req++) {
      const kind = payloadKindOf(req);
      const p = samplePayload(kind);
      const bytes = encodeRequest(req, p, true);
      const { header, payload } = split(bytes);
      expect(header.request).toBe(req);
      const fds = fdsFor(req, p);
      const msg = decodeRequest(header, payload, fds);
      expect(msg.payload, FrontendReq[req]).toEqual(p);
      expect(msg.fds).toEqual(fds);
    }
  });

  it('rejects a header with the wrong version', () => {
    const h = new Uint8Array(HEADER_SIZE);
    encodeHeader(h, { request: 1, flags: 2, size: 0 });
    expect(() => decodeHeader(h)).toThrow(/bad version/);
  });

  it('rejects an oversized payload before reading it', () => {
    const h = new Uint8Array(HEADER_SIZE);
    encodeHeader(h, { request: 1, flags: 1, size: MAX_PAYLOAD_SIZE + 1 });
    expect(() => decodeHeader(h)).toThrow(/exceeds/);
  });

  it('rejects fixed-size payloads of the wrong length', () => {
    for (const req of [FrontendReq.SET_FEATURES, FrontendReq.SET_VRING_NUM, FrontendReq.SET_VRING_ADDR, FrontendReq.SET_LOG_BASE, FrontendReq.ADD_MEM_REG]) {
      const good = encodeRequest(req, samplePayload(payloadKindOf(req)), false);
      const { header, payload } = split(good);
      const fds = fdsFor(req, samplePayload(payloadKindOf(req)));
      expect(() => decodeRequest({ ...header, size: header.size - 1 }, payload.subarray(0, payload.byteLength - 1), fds), FrontendReq[req]).toThrow(ProtocolError);
      const longer = new Uint8Array(payload.byteLength + 4);
      longer.set(payload);
      expect(() => decodeRequest({ ...header, size: longer.byteLength }, longer, fds), FrontendReq[req]).toThrow(/expected/);
    }
  });

  it('rejects memory tables with no regions, too many regions, or a size that does not match the count', () => {
    const table = (n: number, extra = 0): Uint8Array => {
      const b = new Uint8Array(8 + n * 32 + extra);
      new DataView(b.buffer).setUint32(0, n, true);
      return b;
    };
    const hdr = (b: Uint8Array) => ({ request: FrontendReq.SET_MEM_TABLE, flags: 1, size: b.byteLength });
    expect(() => decodeRequest(hdr(table(0)), table(0), [])).toThrow(/0 regions/);
    expect(() => decodeRequest(hdr(table(9)), table(9), [1, 2, 3, 4, 5, 6, 7, 8, 9])).toThrow(/9 regions/);
    const lying = table(2);
    new DataView(lying.buffer).setUint32(0, 3, true);
    expect(() => decodeRequest(hdr(lying), lying, [1, 2, 3])).toThrow(/needs/);
  });

  it('rejects a region whose numbers do not fit 2^53', () => {
    const b = encodeRequest(FrontendReq.ADD_MEM_REG, samplePayload('memRegion'), false);
    const { header, payload } = split(b);
    new DataView(payload.buffer, payload.byteOffset).setBigUint64(16, 0xffff_ffff_ffff_f000n, true);
    expect(() => decodeRequest(header, payload, [5])).toThrow(/beyond 2\^53/);
  });

  it('rejects config payloads larger than 256 bytes or inconsistent with their size field', () => {
    const big = { kind: 'config' as const, offset: 0, size: 257, flags: 0, data: new Uint8Array(257) };
    const b1 = encodeRequest(FrontendReq.GET_CONFIG, big, false);
    expect(() => decodeRequest(decodeHeader(b1), b1.subarray(HEADER_SIZE), [])).toThrow(/exceeds 256/);
    const b2 = encodeRequest(FrontendReq.GET_CONFIG, samplePayload('config'), false);
    const payload = b2.subarray(HEADER_SIZE);
    new DataView(payload.buffer, payload.byteOffset).setUint32(4, 9, true);
    expect(() => decodeRequest(decodeHeader(b2), payload, [])).toThrow(/does not match/);
  });

  it('checks the number of attached fds against each request', () => {
    const dec = (req: FrontendReq, p: Payload, fds: number[]) => {
      const b = encodeRequest(req, p, false);
      return () => decodeRequest(decodeHeader(b), b.subarray(HEADER_SIZE), fds);
    };
    expect(dec(FrontendReq.SET_FEATURES, samplePayload('u64'), [3])).toThrow(/1 fds attached, expected 0/);
    expect(dec(FrontendReq.SET_MEM_TABLE, samplePayload('memTable'), [3])).toThrow(/expected 2/);
    expect(dec(FrontendReq.SET_MEM_TABLE, samplePayload('memTable'), [3, 4, 5])).toThrow(/expected 2/);
    expect(dec(FrontendReq.ADD_MEM_REG, samplePayload('memRegion'), [])).toThrow(/expected 1/);
    expect(dec(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: 0n }, [])).toThrow(/expected 1/);
    expect(dec(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: VRING_NOFD_MASK }, [3])).toThrow(/NOFD/);
    expect(dec(FrontendReq.SET_VRING_KICK, { kind: 'u64', value: VRING_NOFD_MASK }, [])).not.toThrow();
    expect(dec(FrontendReq.REM_MEM_REG, samplePayload('memRegion'), [7])).not.toThrow();
  });

  it('names unknown requests and refuses reply-flagged requests', () => {
    expect(() => decodeRequest({ request: 99, flags: 1, size: 0 }, new Uint8Array(0), [])).toThrow(UnknownRequestError);
    expect(() => decodeRequest({ request: 0, flags: 1, size: 0 }, new Uint8Array(0), [])).toThrow(UnknownRequestError);
    expect(() => decodeRequest({ request: FrontendReq.GET_FEATURES, flags: 1 | HDR_REPLY, size: 0 }, new Uint8Array(0), [])).toThrow(/reply flag/);
  });
});
