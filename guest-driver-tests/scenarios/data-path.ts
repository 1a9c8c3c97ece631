/**
 * Data-path scenarios: RC send/receive, RDMA write/read, atomics, UD,
 * multi-SGE, inline and zero-length operations. Every transfer is checked
 * byte by byte, including the bytes around it that must stay untouched.
 */
import { Access, QpState, QpType, SendFlag, Status, WcFlag, WcOpcode, WcStatus, WrOpcode } from '../verbs.js';
import {
  DEFAULT_QKEY,
  avTo,
  bringUp,
  check,
  connectedPair,
  expectBytes,
  expectEq,
  expectNoWc,
  expectQpState,
  expectStatus,
  expectWc,
  filled,
  localGid,
  makeSide,
  mrBuf,
  pattern,
  pollN,
  readU64le,
  u64le,
  withTeardown,
  type ScenarioEnv,
} from './common.js';

const LEN = 3000;
const SENTINEL = 0xee;

/** QUERY_DEVICE / QUERY_PORT / QUERY_GID / QUERY_PKEY answers and their index checks. */
export async function queryBasics(env: ScenarioEnv): Promise<void> {
  const v = env.a;
  const dev = await v.queryDevice();
  check(dev.maxQp >= 1 && dev.maxCq >= 1 && dev.maxPd >= 1 && dev.maxMr >= 1 && dev.maxAh >= 1, `device limits are not positive: ${JSON.stringify({ ...dev, fwVer: 0, nodeGuid: 0, sysImageGuid: 0, maxMrSize: 0, pageSizeCap: 0, deviceCapFlags: 0 })}`);
  check((dev.pageSizeCap & 4096n) !== 0n, `page_size_cap 0x${dev.pageSizeCap.toString(16)} lacks 4096`);
  check(dev.maxMrSize > 0n && dev.maxMrSize <= 1n << 30n, `max_mr_size ${dev.maxMrSize} (one MR covers at most 1 GiB)`);
  if (dev.virtio) {
    check(dev.maxCq <= dev.virtio.numCqSlots, `max_cq ${dev.maxCq} > CQ slots ${dev.virtio.numCqSlots}`);
    check(dev.maxQp <= dev.virtio.numQpSlots, `max_qp ${dev.maxQp} > QP slots ${dev.virtio.numQpSlots}`);
  }
  const port = await v.queryPort(1);
  expectEq(port.linkLayer, 2, 'QUERY_PORT link_layer (Ethernet)');
  expectEq(port.state, 4, 'QUERY_PORT state (ACTIVE)');
  check(port.activeMtu >= 1 && port.activeMtu <= 5 && port.activeMtu <= port.maxMtu, `QUERY_PORT mtu active ${port.activeMtu} max ${port.maxMtu}`);
  check(port.gidTblLen >= 1, `gid_tbl_len ${port.gidTblLen}`);
  await expectStatus(v.queryPort(2), Status.EINVAL, 'QUERY_PORT port 2');
  await expectStatus(v.queryPort(0), Status.EINVAL, 'QUERY_PORT port 0');
  const g0 = await v.queryGid(1, 0);
  check(g0.raw.some((b) => b !== 0), 'GID 0 is all zero');
  for (let i = 1; i < port.gidTblLen; i++) await v.queryGid(1, i); // unused entries read (as zero)
  await expectStatus(v.queryGid(1, port.gidTblLen), Status.EINVAL, `QUERY_GID index ${port.gidTblLen} (= gid_tbl_len)`);
  await expectStatus(v.queryGid(2, 0), Status.EINVAL, 'QUERY_GID port 2');
  expectEq(await v.queryPkey(1, 0), 0xffff, 'QUERY_PKEY index 0');
  await expectStatus(v.queryPkey(1, 1), Status.EINVAL, 'QUERY_PKEY index 1');
  await expectStatus(v.queryPkey(2, 0), Status.EINVAL, 'QUERY_PKEY port 2');
}

async function sendRecv(env: ScenarioEnv, withImm: boolean): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const src = await mrBuf(t, env.a, a.pd, LEN, Access.LOCAL_WRITE, pattern(LEN, 1));
    const dst = await mrBuf(t, env.b, b.pd, LEN + 64, Access.LOCAL_WRITE, SENTINEL);
    for (const [i, len] of [LEN, 1, 777].entries()) {
      await env.b.writeBuffer(dst.buf, 0, filled(LEN + 64, SENTINEL));
      const payload = pattern(len, 100 + i);
      await env.a.writeBuffer(src.buf, 0, payload);
      await env.b.postRecv(b.qp, [{ wrId: 0x1000n + BigInt(i), sgList: [{ addr: dst.buf.addr, length: LEN + 64, lkey: dst.mr.lkey }] }]);
      const imm = (0xdeadbeef ^ i) >>> 0;
      await env.a.postSend(a.qp, [
        {
          wrId: 0x2000n + BigInt(i),
          opcode: withImm ? WrOpcode.SEND_WITH_IMM : WrOpcode.SEND,
          sendFlags: SendFlag.SIGNALED,
          sgList: [{ addr: src.buf.addr, length: len, lkey: src.mr.lkey }],
          ...(withImm ? { immData: imm } : {}),
        },
      ]);
      const [sw] = await pollN(env, env.a, a.scq, 1, 'send completion');
      expectWc(sw, { wrId: 0x2000n + BigInt(i), status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, qpNum: a.qp.qpNum }, 'send completion');
      const [rw] = await pollN(env, env.b, b.rcq, 1, 'receive completion');
      expectWc(
        rw,
        { wrId: 0x1000n + BigInt(i), status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: len, qpNum: b.qp.qpNum, wcFlags: withImm ? WcFlag.WITH_IMM : 0 },
        'receive completion',
      );
      if (withImm) expectEq(rw!.immData, imm, 'receive imm_data');
      expectBytes(await env.b.readBuffer(dst.buf, 0, len), payload, `received bytes (${len})`);
      expectBytes(await env.b.readBuffer(dst.buf, len, LEN + 64 - len), filled(LEN + 64 - len, SENTINEL), 'receive buffer past the message');
    }
    await expectNoWc(env, env.a, a.scq, 'send CQ after the exchange');
    await expectNoWc(env, env.b, b.rcq, 'receive CQ after the exchange');
  });
}

/** RC SEND: data, wr_id, byte_len, qp_num, opcode on both sides. */
export async function rcSendRecv(env: ScenarioEnv): Promise<void> {
  await sendRecv(env, false);
}

/** RC SEND_WITH_IMM: as SEND plus WITH_IMM and the immediate on the receive. */
export async function rcSendWithImm(env: ScenarioEnv): Promise<void> {
  await sendRecv(env, true);
}

async function rdmaWriteCommon(env: ScenarioEnv, withImm: boolean): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const src = await mrBuf(t, env.a, a.pd, LEN, Access.LOCAL_WRITE, pattern(LEN, 7));
    const target = await mrBuf(t, env.b, b.pd, 2 * LEN, Access.LOCAL_WRITE | Access.REMOTE_WRITE, SENTINEL);
    const rbuf = await mrBuf(t, env.b, b.pd, 64, Access.LOCAL_WRITE, 0x55);
    const off = 1234;
    if (withImm) await env.b.postRecv(b.qp, [{ wrId: 77n, sgList: [{ addr: rbuf.buf.addr, length: 64, lkey: rbuf.mr.lkey }] }]);
    await env.a.postSend(a.qp, [
      {
        wrId: 5n,
        opcode: withImm ? WrOpcode.RDMA_WRITE_WITH_IMM : WrOpcode.RDMA_WRITE,
        sendFlags: SendFlag.SIGNALED,
        sgList: [{ addr: src.buf.addr, length: LEN, lkey: src.mr.lkey }],
        rdma: { remoteAddr: target.mr.addr + BigInt(off), rkey: target.mr.rkey },
        ...(withImm ? { immData: 0x01020304 } : {}),
      },
    ]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'write completion'))[0], { wrId: 5n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE, qpNum: a.qp.qpNum }, 'write completion');
    expectBytes(await env.b.readBuffer(target.buf, off, LEN), pattern(LEN, 7), 'written bytes');
    expectBytes(await env.b.readBuffer(target.buf, 0, off), filled(off, SENTINEL), 'target before the write');
    expectBytes(await env.b.readBuffer(target.buf, off + LEN, LEN - off), filled(LEN - off, SENTINEL), 'target after the write');
    if (withImm) {
      const [rw] = await pollN(env, env.b, b.rcq, 1, 'write-with-imm receive completion');
      expectWc(
        rw,
        { wrId: 77n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, immData: 0x01020304, qpNum: b.qp.qpNum, wcFlags: WcFlag.WITH_IMM, byteLen: LEN },
        'write-with-imm receive completion',
      );
      expectBytes(await env.b.readBuffer(rbuf.buf, 0, 64), filled(64, 0x55), 'receive buffer of a write-with-imm (untouched)');
    } else {
      // A plain write consumes no receive: one posted now still takes the next send.
      await env.b.postRecv(b.qp, [{ wrId: 78n, sgList: [{ addr: rbuf.buf.addr, length: 64, lkey: rbuf.mr.lkey }] }]);
      await expectNoWc(env, env.b, b.rcq, 'receive CQ after a plain RDMA WRITE');
      await env.a.postSend(a.qp, [{ wrId: 6n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 16, lkey: src.mr.lkey }] }]);
      await pollN(env, env.a, a.scq, 1, 'send after write');
      expectWc((await pollN(env, env.b, b.rcq, 1, 'receive after write'))[0], { wrId: 78n, byteLen: 16, status: WcStatus.SUCCESS }, 'receive after write');
    }
  });
}

/** RDMA WRITE into a remote MR at an offset; the bytes around it stay as they were. */
export async function rdmaWrite(env: ScenarioEnv): Promise<void> {
  await rdmaWriteCommon(env, false);
}

/** RDMA WRITE_WITH_IMM: the data lands at the remote address and a receive completes with the immediate. */
export async function rdmaWriteWithImm(env: ScenarioEnv): Promise<void> {
  await rdmaWriteCommon(env, true);
}

/** RDMA READ from a remote MR into a local buffer. */
export async function rdmaRead(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const remote = await mrBuf(t, env.b, b.pd, 2 * LEN, Access.LOCAL_WRITE | Access.REMOTE_READ, pattern(2 * LEN, 9));
    const local = await mrBuf(t, env.a, a.pd, LEN + 128, Access.LOCAL_WRITE, SENTINEL);
    const off = 333;
    await env.a.postSend(a.qp, [
      {
        wrId: 0xabcn,
        opcode: WrOpcode.RDMA_READ,
        sendFlags: SendFlag.SIGNALED,
        sgList: [{ addr: local.buf.addr + 64n, length: LEN, lkey: local.mr.lkey }],
        rdma: { remoteAddr: remote.mr.addr + BigInt(off), rkey: remote.mr.rkey },
      },
    ]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'read completion'))[0], { wrId: 0xabcn, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_READ, byteLen: LEN, qpNum: a.qp.qpNum }, 'read completion');
    expectBytes(await env.a.readBuffer(local.buf, 64, LEN), pattern(2 * LEN, 9).subarray(off, off + LEN), 'read bytes');
    expectBytes(await env.a.readBuffer(local.buf, 0, 64), filled(64, SENTINEL), 'local buffer before the read');
    expectBytes(await env.a.readBuffer(local.buf, 64 + LEN, 64), filled(64, SENTINEL), 'local buffer after the read');
    expectBytes(await env.b.readBuffer(remote.buf, 0, 2 * LEN), pattern(2 * LEN, 9), 'remote buffer (unchanged by a read)');
    await expectNoWc(env, env.b, b.rcq, 'responder receive CQ (a read consumes no receive)');
  });
}

async function atomicSetup(env: ScenarioEnv, t: Parameters<Parameters<typeof withTeardown>[0]>[0]) {
  const { a, b } = await connectedPair(t, env);
  const target = await mrBuf(t, env.b, b.pd, 64, Access.LOCAL_WRITE | Access.REMOTE_ATOMIC, SENTINEL);
  const result = await mrBuf(t, env.a, a.pd, 64, Access.LOCAL_WRITE, SENTINEL);
  return { a, b, target, result };
}

/** ATOMIC_CMP_AND_SWP: swaps when equal, not when different; the original value comes back each time (little-endian u64). */
export async function atomicCompareAndSwap(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, target, result } = await atomicSetup(env, t);
    const v0 = 0x0123456789abcdefn;
    const v1 = 0xfedcba9876543210n;
    await env.b.writeBuffer(target.buf, 8, u64le(v0));
    const cas = async (wrId: bigint, compare: bigint, swap: bigint, resultOff: number): Promise<void> => {
      await env.a.postSend(a.qp, [
        {
          wrId,
          opcode: WrOpcode.ATOMIC_CMP_AND_SWP,
          sendFlags: SendFlag.SIGNALED,
          sgList: [{ addr: result.buf.addr + BigInt(resultOff), length: 8, lkey: result.mr.lkey }],
          atomic: { remoteAddr: target.mr.addr + 8n, compareAdd: compare, swap, rkey: target.mr.rkey },
        },
      ]);
      expectWc((await pollN(env, env.a, a.scq, 1, 'CAS completion'))[0], { wrId, status: WcStatus.SUCCESS, opcode: WcOpcode.COMP_SWAP, byteLen: 8, qpNum: a.qp.qpNum }, 'CAS completion');
    };
    await cas(1n, v0, v1, 0); // equal: swaps
    expectEq(readU64le(await env.a.readBuffer(result.buf, 0, 8)), v0, 'CAS (match) original value');
    expectEq(readU64le(await env.b.readBuffer(target.buf, 8, 8)), v1, 'target after a matching CAS');
    await cas(2n, v0, 0x1111n, 16); // differs: no swap
    expectEq(readU64le(await env.a.readBuffer(result.buf, 16, 8)), v1, 'CAS (mismatch) original value');
    expectEq(readU64le(await env.b.readBuffer(target.buf, 8, 8)), v1, 'target after a mismatching CAS');
    expectBytes(await env.b.readBuffer(target.buf, 0, 8), filled(8, SENTINEL), 'bytes before the atomic target');
    expectBytes(await env.b.readBuffer(target.buf, 16, 48), filled(48, SENTINEL), 'bytes after the atomic target');
    expectBytes(await env.a.readBuffer(result.buf, 8, 8), filled(8, SENTINEL), 'result buffer between results');
  });
}

/** ATOMIC_FETCH_AND_ADD: returns the original, adds (mod 2^64). */
export async function atomicFetchAndAdd(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, target, result } = await atomicSetup(env, t);
    await env.b.writeBuffer(target.buf, 0, u64le(1000n));
    await env.b.writeBuffer(target.buf, 32, u64le(0xffff_ffff_ffff_fffen));
    const faa = async (wrId: bigint, remoteOff: number, add: bigint, resultOff: number): Promise<bigint> => {
      await env.a.postSend(a.qp, [
        {
          wrId,
          opcode: WrOpcode.ATOMIC_FETCH_AND_ADD,
          sendFlags: SendFlag.SIGNALED,
          sgList: [{ addr: result.buf.addr + BigInt(resultOff), length: 8, lkey: result.mr.lkey }],
          atomic: { remoteAddr: target.mr.addr + BigInt(remoteOff), compareAdd: add, swap: 0n, rkey: target.mr.rkey },
        },
      ]);
      expectWc((await pollN(env, env.a, a.scq, 1, 'FAA completion'))[0], { wrId, status: WcStatus.SUCCESS, opcode: WcOpcode.FETCH_ADD, byteLen: 8, qpNum: a.qp.qpNum }, 'FAA completion');
      return readU64le(await env.a.readBuffer(result.buf, resultOff, 8));
    };
    expectEq(await faa(1n, 0, 5n, 0), 1000n, 'FAA original value');
    expectEq(readU64le(await env.b.readBuffer(target.buf, 0, 8)), 1005n, 'target after FAA +5');
    expectEq(await faa(2n, 0, 0x1_0000_0000n, 8), 1005n, 'second FAA original value');
    expectEq(readU64le(await env.b.readBuffer(target.buf, 0, 8)), 0x1_0000_0000n + 1005n, 'target after FAA +2^32 (carry into the high word)');
    expectEq(await faa(3n, 32, 3n, 16), 0xffff_ffff_ffff_fffen, 'wrapping FAA original value');
    expectEq(readU64le(await env.b.readBuffer(target.buf, 32, 8)), 1n, 'target after a wrapping FAA');
    expectBytes(await env.b.readBuffer(target.buf, 8, 24), filled(24, SENTINEL), 'bytes between atomic targets');
  });
}

/** UD SEND through an AH: GRH in the first 40 bytes, byte_len counts it, src_qp names the sender; a wrong Q_Key is dropped. */
export async function udSendRecv(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const o = { type: QpType.UD };
    const a = await makeSide(t, env.a, o, 0x100);
    const b = await makeSide(t, env.b, o, 0x200);
    const gidA = await localGid(env.a);
    const gidB = await localGid(env.b);
    await bringUp(a, b, gidB, o);
    await bringUp(b, a, gidA, o);
    const ah = await env.a.createAh(a.pd, avTo(gidB));
    t.add('ah', () => env.a.destroyAh(ah));
    const N = 700;
    const src = await mrBuf(t, env.a, a.pd, N, Access.LOCAL_WRITE, pattern(N, 21));
    const dst = await mrBuf(t, env.b, b.pd, 40 + N + 32, Access.LOCAL_WRITE, SENTINEL);
    await env.b.postRecv(b.qp, [{ wrId: 11n, sgList: [{ addr: dst.buf.addr, length: 40 + N + 32, lkey: dst.mr.lkey }] }]);
    await env.a.postSend(a.qp, [
      {
        wrId: 12n,
        opcode: WrOpcode.SEND_WITH_IMM,
        immData: 0xcafef00d,
        sendFlags: SendFlag.SIGNALED,
        sgList: [{ addr: src.buf.addr, length: N, lkey: src.mr.lkey }],
        ud: { ah, remoteQpn: b.qp.qpNum, remoteQkey: DEFAULT_QKEY },
      },
    ]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'UD send completion'))[0], { wrId: 12n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND, qpNum: a.qp.qpNum }, 'UD send completion');
    const [rw] = await pollN(env, env.b, b.rcq, 1, 'UD receive completion');
    expectWc(
      rw,
      { wrId: 11n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 40 + N, qpNum: b.qp.qpNum, srcQp: a.qp.qpNum, immData: 0xcafef00d, wcFlags: WcFlag.GRH | WcFlag.WITH_IMM },
      'UD receive completion',
    );
    expectBytes(await env.b.readBuffer(dst.buf, 40, N), pattern(N, 21), 'UD payload after the GRH');
    expectBytes(await env.b.readBuffer(dst.buf, 40 + N, 32), filled(32, SENTINEL), 'receive buffer past the UD payload');
    checkGrh(await env.b.readBuffer(dst.buf, 0, 40), gidA, gidB, env.grhLayout ?? 'rocev2');

    // A wrong Q_Key: silently dropped at the receiver; the sender still completes.
    await env.b.postRecv(b.qp, [{ wrId: 13n, sgList: [{ addr: dst.buf.addr, length: 40 + N, lkey: dst.mr.lkey }] }]);
    await env.a.postSend(a.qp, [
      { wrId: 14n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 8, lkey: src.mr.lkey }], ud: { ah, remoteQpn: b.qp.qpNum, remoteQkey: DEFAULT_QKEY ^ 1 } },
    ]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'UD send with a wrong Q_Key'))[0], { wrId: 14n, status: WcStatus.SUCCESS }, 'UD send with a wrong Q_Key');
    await expectNoWc(env, env.b, b.rcq, 'receiver after a wrong Q_Key');
  });
}

/**
 * The 40-byte GRH of §6: with the RoCEv2 layout an IPv6 header, or 20 zero
 * bytes + IPv4 header for IPv4-mapped GIDs; with the IB layout an IB GRH
 * (IPv6 format, next header 0x1B) for every GID.
 */
function checkGrh(grh: Uint8Array, sgid: Uint8Array, dgid: Uint8Array, layout: 'rocev2' | 'ib'): void {
  const v4mapped = (g: Uint8Array): boolean => g.subarray(0, 10).every((x) => x === 0) && g[10] === 0xff && g[11] === 0xff;
  if (layout === 'ib') {
    expectEq(grh[0]! >> 4, 6, 'IB GRH IP version');
    expectEq(grh[6], 0x1b, 'IB GRH next header (BTH)');
    expectBytes(grh.subarray(8, 24), sgid, 'IB GRH source GID');
    expectBytes(grh.subarray(24, 40), dgid, 'IB GRH destination GID');
  } else if (v4mapped(sgid) && v4mapped(dgid)) {
    expectBytes(grh.subarray(0, 20), filled(20, 0), 'GRH bytes 0..19 (IPv4 form: zero)');
    expectEq(grh[20]! >> 4, 4, 'GRH IPv4 version');
    expectEq(grh[20]! & 0xf, 5, 'GRH IPv4 IHL');
    expectEq(grh[29], 17, 'GRH IPv4 protocol (UDP)');
    expectBytes(grh.subarray(32, 36), sgid.subarray(12, 16), 'GRH IPv4 source address');
    expectBytes(grh.subarray(36, 40), dgid.subarray(12, 16), 'GRH IPv4 destination address');
  } else {
    expectEq(grh[0]! >> 4, 6, 'GRH IPv6 version');
    expectEq(grh[6], 17, 'GRH next header (UDP)');
    expectBytes(grh.subarray(8, 24), sgid, 'GRH source GID');
    expectBytes(grh.subarray(24, 40), dgid, 'GRH destination GID');
  }
}

/** A SEND gathered from three SGEs (two MRs, odd offsets) scattered into four receive SGEs of other sizes. */
export async function multiSgeSendRecv(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const s1 = await mrBuf(t, env.a, a.pd, 4096, Access.LOCAL_WRITE, pattern(4096, 31));
    const s2 = await mrBuf(t, env.a, a.pd, 4096, Access.LOCAL_WRITE, pattern(4096, 32));
    const gather = [
      { buf: s1, off: 3, len: 1001 },
      { buf: s2, off: 4000, len: 96 },
      { buf: s1, off: 2048, len: 1500 },
    ];
    const total = gather.reduce((n, g) => n + g.len, 0);
    const expected = new Uint8Array(total);
    let at = 0;
    for (const g of gather) {
      expected.set((await env.a.readBuffer(g.buf.buf, g.off, g.len)), at);
      at += g.len;
    }
    const d1 = await mrBuf(t, env.b, b.pd, 8192, Access.LOCAL_WRITE, SENTINEL);
    const d2 = await mrBuf(t, env.b, b.pd, 1024, Access.LOCAL_WRITE, SENTINEL);
    const scatter = [
      { buf: d1, off: 17, len: 500 },
      { buf: d2, off: 0, len: 1 },
      { buf: d1, off: 4090, len: 1200 }, // crosses a page boundary
      { buf: d2, off: 100, len: 900 }, // only partly filled
    ];
    await env.b.postRecv(b.qp, [{ wrId: 1n, sgList: scatter.map((s) => ({ addr: s.buf.buf.addr + BigInt(s.off), length: s.len, lkey: s.buf.mr.lkey })) }]);
    await env.a.postSend(a.qp, [{ wrId: 2n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: gather.map((g) => ({ addr: g.buf.buf.addr + BigInt(g.off), length: g.len, lkey: g.buf.mr.lkey })) }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'multi-SGE send'))[0], { wrId: 2n, status: WcStatus.SUCCESS }, 'multi-SGE send');
    expectWc((await pollN(env, env.b, b.rcq, 1, 'multi-SGE receive'))[0], { wrId: 1n, status: WcStatus.SUCCESS, byteLen: total }, 'multi-SGE receive');
    let from = 0;
    for (const [i, s] of scatter.entries()) {
      const n = Math.min(s.len, total - from);
      expectBytes(await env.b.readBuffer(s.buf.buf, s.off, n), expected.subarray(from, from + n), `receive SGE ${i}`);
      if (n < s.len) expectBytes(await env.b.readBuffer(s.buf.buf, s.off + n, s.len - n), filled(s.len - n, SENTINEL), `receive SGE ${i} past the message`);
      from += n;
    }
    expectBytes(await env.b.readBuffer(d1.buf, 0, 17), filled(17, SENTINEL), 'before receive SGE 0');
    expectBytes(await env.b.readBuffer(d1.buf, 517, 4090 - 517), filled(4090 - 517, SENTINEL), 'between receive SGEs 0 and 2');
    expectBytes(await env.b.readBuffer(d2.buf, 1, 99), filled(99, SENTINEL), 'between receive SGEs 1 and 3');
  });
}

/** INLINE SEND and INLINE RDMA WRITE: data from memory no MR covers, copied at post time. */
export async function inlineSend(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    check(a.qp.cap.maxInlineData >= 64, `granted max_inline_data ${a.qp.cap.maxInlineData}`);
    const n = a.qp.cap.maxInlineData;
    const raw = await env.a.allocBuffer(n);
    t.add('raw buffer', () => env.a.freeBuffer(raw));
    await env.a.writeBuffer(raw, 0, pattern(n, 41));
    const dst = await mrBuf(t, env.b, b.pd, 2 * n, Access.LOCAL_WRITE | Access.REMOTE_WRITE, SENTINEL);
    await env.b.postRecv(b.qp, [{ wrId: 1n, sgList: [{ addr: dst.buf.addr, length: 2 * n, lkey: dst.mr.lkey }] }]);
    const half = n >> 1;
    await env.a.postSend(a.qp, [
      {
        wrId: 2n,
        opcode: WrOpcode.SEND,
        sendFlags: SendFlag.SIGNALED | SendFlag.INLINE,
        // Two pieces, and an lkey that names nothing: inline data is not read through an MR.
        sgList: [
          { addr: raw.addr + BigInt(half), length: n - half, lkey: 0xdead },
          { addr: raw.addr, length: half, lkey: 0 },
        ],
      },
    ]);
    // Inline data was copied when posting: changing the source now changes nothing.
    await env.a.writeBuffer(raw, 0, filled(n, 0));
    expectWc((await pollN(env, env.a, a.scq, 1, 'inline send'))[0], { wrId: 2n, status: WcStatus.SUCCESS, opcode: WcOpcode.SEND }, 'inline send');
    expectWc((await pollN(env, env.b, b.rcq, 1, 'inline receive'))[0], { wrId: 1n, status: WcStatus.SUCCESS, byteLen: n }, 'inline receive');
    const p = pattern(n, 41);
    const want = new Uint8Array(n);
    want.set(p.subarray(half), 0);
    want.set(p.subarray(0, half), n - half);
    expectBytes(await env.b.readBuffer(dst.buf, 0, n), want, 'inline send payload');

    await env.a.writeBuffer(raw, 0, pattern(n, 42));
    await env.a.postSend(a.qp, [
      {
        wrId: 3n,
        opcode: WrOpcode.RDMA_WRITE,
        sendFlags: SendFlag.SIGNALED | SendFlag.INLINE,
        sgList: [{ addr: raw.addr, length: n, lkey: 0 }],
        rdma: { remoteAddr: dst.mr.addr + BigInt(n), rkey: dst.mr.rkey },
      },
    ]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'inline write'))[0], { wrId: 3n, status: WcStatus.SUCCESS, opcode: WcOpcode.RDMA_WRITE }, 'inline write');
    expectBytes(await env.b.readBuffer(dst.buf, n, n), pattern(n, 42), 'inline write payload');
  });
}

/** Zero-length SEND (consumes a receive, byte_len 0, buffer untouched) and zero-length RDMA WRITE / WRITE_WITH_IMM. */
export async function zeroLengthSendAndWrite(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const dst = await mrBuf(t, env.b, b.pd, 256, Access.LOCAL_WRITE | Access.REMOTE_WRITE, SENTINEL);
    await env.b.postRecv(b.qp, [
      { wrId: 1n, sgList: [{ addr: dst.buf.addr, length: 128, lkey: dst.mr.lkey }] },
      { wrId: 2n, sgList: [] },
      { wrId: 3n, sgList: [{ addr: dst.buf.addr + 128n, length: 128, lkey: dst.mr.lkey }] },
    ]);
    await env.a.postSend(a.qp, [
      { wrId: 10n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [] },
      { wrId: 11n, opcode: WrOpcode.SEND_WITH_IMM, immData: 0x99, sendFlags: SendFlag.SIGNALED, sgList: [] },
      { wrId: 12n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [], rdma: { remoteAddr: dst.mr.addr + 10n, rkey: dst.mr.rkey } },
      { wrId: 13n, opcode: WrOpcode.RDMA_WRITE_WITH_IMM, immData: 0x77, sendFlags: SendFlag.SIGNALED, sgList: [], rdma: { remoteAddr: dst.mr.addr, rkey: dst.mr.rkey } },
    ]);
    const sw = await pollN(env, env.a, a.scq, 4, 'zero-length sends');
    const ops = [WcOpcode.SEND, WcOpcode.SEND, WcOpcode.RDMA_WRITE, WcOpcode.RDMA_WRITE];
    sw.forEach((w, i) => expectWc(w, { wrId: 10n + BigInt(i), status: WcStatus.SUCCESS, opcode: ops[i]! }, `zero-length send completion ${i}`));
    const rw = await pollN(env, env.b, b.rcq, 3, 'zero-length receives');
    expectWc(rw[0], { wrId: 1n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 0, wcFlags: 0 }, 'zero-length SEND receive');
    expectWc(rw[1], { wrId: 2n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV, byteLen: 0, wcFlags: WcFlag.WITH_IMM, immData: 0x99 }, 'zero-length SEND_WITH_IMM receive (no SGE)');
    expectWc(rw[2], { wrId: 3n, status: WcStatus.SUCCESS, opcode: WcOpcode.RECV_RDMA_WITH_IMM, byteLen: 0, wcFlags: WcFlag.WITH_IMM, immData: 0x77 }, 'zero-length WRITE_WITH_IMM receive');
    expectBytes(await env.b.readBuffer(dst.buf, 0, 256), filled(256, SENTINEL), 'buffers after zero-length operations');
  });
}

/** An MR over more than 512 pages (two-level page list): RDMA WRITE and READ across its whole span, checked at page edges. */
export async function largeMrTwoLevelPageList(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    const SIZE = 513 * 4096 + 100; // 514 pages with the start offset below
    const big = await env.b.allocBuffer(SIZE + 64);
    t.add('big buffer', () => env.b.freeBuffer(big));
    await env.b.writeBuffer(big, 0, filled(SIZE + 64, SENTINEL));
    const mr = await env.b.regMr(b.pd, big, Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ, { offset: 32, length: SIZE });
    t.add('big mr', () => env.b.deregMr(mr));
    const CH = 6000;
    const src = await mrBuf(t, env.a, a.pd, CH, Access.LOCAL_WRITE, 0);
    const back = await mrBuf(t, env.a, a.pd, CH, Access.LOCAL_WRITE, 0);
    // Chunks at the start, across the level-2 boundary (page 512), and at the very end.
    const offsets = [0, 511 * 4096 + 1000, SIZE - CH];
    for (const [i, off] of offsets.entries()) {
      const data = pattern(CH, 50 + i);
      await env.a.writeBuffer(src.buf, 0, data);
      await env.a.postSend(a.qp, [{ wrId: BigInt(i), opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: CH, lkey: src.mr.lkey }], rdma: { remoteAddr: mr.addr + BigInt(off), rkey: mr.rkey } }]);
      expectWc((await pollN(env, env.a, a.scq, 1, 'write into the large MR'))[0], { status: WcStatus.SUCCESS }, `write ${i} into the large MR`);
      expectBytes(await env.b.readBuffer(big, 32 + off, CH), data, `large MR bytes at ${off}`);
      await env.a.postSend(a.qp, [{ wrId: 100n + BigInt(i), opcode: WrOpcode.RDMA_READ, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: back.buf.addr, length: CH, lkey: back.mr.lkey }], rdma: { remoteAddr: mr.addr + BigInt(off), rkey: mr.rkey } }]);
      expectWc((await pollN(env, env.a, a.scq, 1, 'read from the large MR'))[0], { status: WcStatus.SUCCESS, byteLen: CH }, `read ${i} from the large MR`);
      expectBytes(await env.a.readBuffer(back.buf, 0, CH), data, `read back at ${off}`);
    }
    expectBytes(await env.b.readBuffer(big, 0, 32), filled(32, SENTINEL), 'bytes before the MR');
    expectBytes(await env.b.readBuffer(big, 32 + SIZE, 32), filled(32, SENTINEL), 'bytes after the MR');
    // One byte past the MR is a remote access error.
    await env.a.postSend(a.qp, [{ wrId: 999n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 2, lkey: src.mr.lkey }], rdma: { remoteAddr: mr.addr + BigInt(SIZE - 1), rkey: mr.rkey } }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'write past the MR end'))[0], { wrId: 999n, status: WcStatus.REM_ACCESS_ERR }, 'write past the MR end');
    expectBytes(await env.b.readBuffer(big, 32 + SIZE - 1, 1), pattern(CH, 50 + offsets.length - 1).subarray(CH - 1), 'last MR byte after a refused write (unchanged)');
    expectBytes(await env.b.readBuffer(big, 32 + SIZE, 64 - 32), filled(32, SENTINEL), 'bytes past the MR after a refused write');
  });
}

/** GET_DMA_MR: local-only (remote flags refused), SGE addresses are guest-physical. */
export async function dmaMrLocalOnly(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    const { a, b } = await connectedPair(t, env);
    await expectStatus(env.a.getDmaMr(a.pd, Access.LOCAL_WRITE | Access.REMOTE_WRITE), Status.EINVAL, 'GET_DMA_MR with REMOTE_WRITE');
    await expectStatus(env.a.getDmaMr(a.pd, Access.LOCAL_WRITE | Access.REMOTE_READ), Status.EINVAL, 'GET_DMA_MR with REMOTE_READ');
    const dma = await env.a.getDmaMr(a.pd, Access.LOCAL_WRITE);
    t.add('dma mr', () => env.a.deregMr(dma));
    const src = await env.a.allocBuffer(512, { contiguous: true });
    t.add('dma buffer', () => env.a.freeBuffer(src));
    if (src.dmaAddr === undefined) return; // this implementation cannot name guest-physical addresses
    await env.a.writeBuffer(src, 0, pattern(512, 61));
    const dst = await mrBuf(t, env.b, b.pd, 512, Access.LOCAL_WRITE, SENTINEL);
    await env.b.postRecv(b.qp, [{ wrId: 1n, sgList: [{ addr: dst.buf.addr, length: 512, lkey: dst.mr.lkey }] }]);
    await env.a.postSend(a.qp, [{ wrId: 2n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.dmaAddr, length: 512, lkey: dma.lkey }] }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'send from a DMA MR'))[0], { wrId: 2n, status: WcStatus.SUCCESS }, 'send from a DMA MR');
    expectWc((await pollN(env, env.b, b.rcq, 1, 'receive of a DMA-MR send'))[0], { wrId: 1n, status: WcStatus.SUCCESS, byteLen: 512 }, 'receive of a DMA-MR send');
    expectBytes(await env.b.readBuffer(dst.buf, 0, 512), pattern(512, 61), 'bytes sent from a DMA MR');
  });
}

/**
 * Keys after DEREG_MR (§4: a WR still using the key fails its key check, and
 * a re-registration gets a new key) and remote access rights (§9): the
 * requester gets REM_ACCESS_ERR, nothing is written and both RC QPs go to
 * ERR; a stale local key is LOC_PROT_ERR.
 */
export async function staleKeysAndAccessRights(env: ScenarioEnv): Promise<void> {
  await withTeardown(async (t) => {
    // 1. A stale rkey.
    let { a, b } = await connectedPair(t, env);
    const src = await mrBuf(t, env.a, a.pd, 256, Access.LOCAL_WRITE, pattern(256, 71));
    const tbuf = await env.b.allocBuffer(4096);
    t.add('target buffer', () => env.b.freeBuffer(tbuf));
    await env.b.writeBuffer(tbuf, 0, filled(4096, SENTINEL));
    const old = await env.b.regMr(b.pd, tbuf, Access.LOCAL_WRITE | Access.REMOTE_WRITE);
    await env.b.deregMr(old);
    const fresh = await env.b.regMr(b.pd, tbuf, Access.LOCAL_WRITE | Access.REMOTE_WRITE);
    t.add('fresh mr', () => env.b.deregMr(fresh));
    check(fresh.rkey !== old.rkey, `re-registration reused rkey 0x${old.rkey.toString(16)}`);
    await env.a.postSend(a.qp, [{ wrId: 1n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src.buf.addr, length: 256, lkey: src.mr.lkey }], rdma: { remoteAddr: old.addr, rkey: old.rkey } }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'write with a stale rkey'))[0], { wrId: 1n, status: WcStatus.REM_ACCESS_ERR, qpNum: a.qp.qpNum }, 'write with a stale rkey');
    expectBytes(await env.b.readBuffer(tbuf, 0, 4096), filled(4096, SENTINEL), 'target of a write with a stale rkey');
    await expectQpState(env.a, a.qp, QpState.ERR, 'requester after REM_ACCESS_ERR');
    await expectQpState(env.b, b.qp, QpState.ERR, 'responder after REM_ACCESS_ERR (§9: both QPs for RC)');

    // 2. Missing REMOTE_WRITE, and a write past the end of an MR that has it.
    ({ a, b } = await connectedPair(t, env));
    const src2 = await mrBuf(t, env.a, a.pd, 256, Access.LOCAL_WRITE, pattern(256, 72));
    const ro = await env.b.regMr(b.pd, tbuf, Access.LOCAL_WRITE | Access.REMOTE_READ);
    t.add('read-only mr', () => env.b.deregMr(ro));
    await env.a.postSend(a.qp, [{ wrId: 2n, opcode: WrOpcode.RDMA_WRITE, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: src2.buf.addr, length: 16, lkey: src2.mr.lkey }], rdma: { remoteAddr: ro.addr, rkey: ro.rkey } }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'write without REMOTE_WRITE'))[0], { wrId: 2n, status: WcStatus.REM_ACCESS_ERR }, 'write into an MR without REMOTE_WRITE');
    expectBytes(await env.b.readBuffer(tbuf, 0, 4096), filled(4096, SENTINEL), 'target of a refused write');

    // 3. A stale lkey.
    ({ a, b } = await connectedPair(t, env));
    const lbuf = await env.a.allocBuffer(256);
    t.add('local buffer', () => env.a.freeBuffer(lbuf));
    const lmr = await env.a.regMr(a.pd, lbuf, Access.LOCAL_WRITE);
    await env.a.deregMr(lmr);
    const dst = await mrBuf(t, env.b, b.pd, 256, Access.LOCAL_WRITE, SENTINEL);
    await env.b.postRecv(b.qp, [{ wrId: 3n, sgList: [{ addr: dst.buf.addr, length: 256, lkey: dst.mr.lkey }] }]);
    await env.a.postSend(a.qp, [{ wrId: 4n, opcode: WrOpcode.SEND, sendFlags: SendFlag.SIGNALED, sgList: [{ addr: lbuf.addr, length: 64, lkey: lmr.lkey }] }]);
    expectWc((await pollN(env, env.a, a.scq, 1, 'send with a stale lkey'))[0], { wrId: 4n, status: WcStatus.LOC_PROT_ERR }, 'send with a stale lkey');
    await expectQpState(env.a, a.qp, QpState.ERR, 'requester after LOC_PROT_ERR');
    await expectNoWc(env, env.b, b.rcq, 'responder after a send that failed locally');
    expectBytes(await env.b.readBuffer(dst.buf, 0, 256), filled(256, SENTINEL), 'receive buffer of a send that failed locally');
  });
}
