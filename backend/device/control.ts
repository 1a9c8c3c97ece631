/**
 * Control commands (docs/virtio-rdma.md §4): each takes the request bytes
 * after the header and returns the response bytes, or throws a
 * ControlError. A failed command changes nothing.
 */
import type { Logger } from '../../virtio/log.js';
import {
  ACCESS_ALL,
  ACCESS_REMOTE,
  Access,
  Cmd,
  CqNotify,
  GidType,
  PortState,
  QpState,
  QpType,
  RDMA_PAGE_SIZE,
  Status,
  cqVq,
  rqVq,
  sqVq,
} from '../abi/constants.js';
import {
  AhAttr,
  CreateAhReq,
  CreateAhResp,
  CreateCqReq,
  CreateCqResp,
  CreatePdResp,
  CreateQpReq,
  CreateQpResp,
  GetDmaMrReq,
  HandleReq,
  ModifyQpReq,
  MrResp,
  QpAttrs,
  QueryDeviceResp,
  QueryGidReq,
  QueryGidResp,
  QueryPkeyResp,
  QueryPortReq,
  QueryPortResp,
  QueryQpResp,
  RegMrReq,
  ReqNotifyCqReq,
  type Struct,
  type StructShape,
  type StructValue,
} from '../abi/index.js';
import { resetQpAttributes, type AddressVector, type Engine } from '../engine/engine.js';
import { ControlError, invalid, noent } from './errors.js';
import type { RdmaLimits } from './limits.js';
import { applyModify, stateName, type QpAttrRequest } from './qp-rules.js';
import type { CqRecord, QpRecord, Resources } from './resources.js';

export interface ControlHooks {
  /** Size of a running ring, 0 when it is not set up. */
  ringSize(vq: number): number;
  returnChain(vq: number, head: number, len: number): void;
  /** Returns every chain the QP holds with length 0. */
  returnAll(qp: QpRecord): void;
  /** Returns the buffers posted on a CQ's ring with length 0 (destroy). */
  releaseCq(cq: CqRecord): void;
}

const EMPTY = new Uint8Array(0);


function need<S extends StructShape>(s: Struct<S>, body: Uint8Array): StructValue<S> {
  if (body.byteLength < s.size) throw new ControlError(Status.E2BIG, `${s.name} needs ${s.size} bytes, got ${body.byteLength}`);
  return s.decodeBytes(body);
}

export function decodeAv(bytes: Uint8Array): { av: AddressVector; port: number } {
  const a = AhAttr.decodeBytes(bytes);
  return {
    av: { dgid: a.dgid, sgidIndex: a.sgid_index, hopLimit: a.hop_limit, trafficClass: a.traffic_class, flowLabel: a.flow_label & 0xfffff, sl: a.sl },
    port: a.port_num,
  };
}

export function encodeAv(av: AddressVector | null): Uint8Array {
  if (av === null) return new Uint8Array(AhAttr.size);
  return AhAttr.encodeBytes({ ...AhAttr.zero(), dgid: av.dgid, flow_label: av.flowLabel, sgid_index: av.sgidIndex, hop_limit: av.hopLimit, traffic_class: av.trafficClass, sl: av.sl, port_num: 1 });
}

interface Command {
  respSize: number;
  run: (body: Uint8Array) => Uint8Array;
}

export class ControlPlane {
  constructor(
    private readonly res: Resources,
    private readonly engine: Engine,
    private readonly limits: RdmaLimits,
    private readonly gids: readonly Uint8Array[],
    private readonly nodeGuid: bigint,
    private readonly log: Logger,
    private readonly hooks: ControlHooks,
  ) {}

  /**
   * Every command: the bytes its success writes after ctrl_status (checked
   * before it runs, so a command that could not report has no effect) and
   * its handler.
   */
  private readonly commands: ReadonlyMap<number, Command> = new Map<number, Command>([
    [Cmd.QUERY_DEVICE, { respSize: QueryDeviceResp.size, run: () => this.queryDevice() }],
    [Cmd.QUERY_PORT, { respSize: QueryPortResp.size, run: (b) => this.queryPort(b) }],
    [Cmd.QUERY_GID, { respSize: QueryGidResp.size, run: (b) => this.queryGid(b) }],
    [Cmd.QUERY_PKEY, { respSize: QueryPkeyResp.size, run: (b) => this.queryPkey(b) }],
    [Cmd.CREATE_PD, { respSize: CreatePdResp.size, run: () => this.createPd() }],
    [Cmd.DESTROY_PD, { respSize: 0, run: (b) => this.destroyPd(b) }],
    [Cmd.CREATE_CQ, { respSize: CreateCqResp.size, run: (b) => this.createCq(b) }],
    [Cmd.DESTROY_CQ, { respSize: 0, run: (b) => this.destroyCq(b) }],
    [Cmd.REQ_NOTIFY_CQ, { respSize: 0, run: (b) => this.reqNotifyCq(b) }],
    [Cmd.REG_MR, { respSize: MrResp.size, run: (b) => this.regMr(b) }],
    [Cmd.GET_DMA_MR, { respSize: MrResp.size, run: (b) => this.getDmaMr(b) }],
    [Cmd.DEREG_MR, { respSize: 0, run: (b) => this.deregMr(b) }],
    [Cmd.CREATE_QP, { respSize: CreateQpResp.size, run: (b) => this.createQp(b) }],
    [Cmd.MODIFY_QP, { respSize: 0, run: (b) => this.modifyQp(b) }],
    [Cmd.QUERY_QP, { respSize: QueryQpResp.size, run: (b) => this.queryQp(b) }],
    [Cmd.DESTROY_QP, { respSize: 0, run: (b) => this.destroyQp(b) }],
    [Cmd.CREATE_AH, { respSize: CreateAhResp.size, run: (b) => this.createAh(b) }],
    [Cmd.DESTROY_AH, { respSize: 0, run: (b) => this.destroyAh(b) }],
  ]);

  /** Bytes of the response a successful `cmd` writes, or null for an unknown command. */
  responseSize(cmd: number): number | null {
    return this.commands.get(cmd)?.respSize ?? null;
  }

  run(cmd: number, body: Uint8Array): Uint8Array {
    const c = this.commands.get(cmd);
    if (c === undefined) throw new ControlError(Status.EOPNOTSUPP, `unknown command ${cmd}`);
    return c.run(body);
  }

  // --- queries ---------------------------------------------------------------

  private queryDevice(): Uint8Array {
    const l = this.limits;
    return QueryDeviceResp.encodeBytes({
      ...QueryDeviceResp.zero(),
      fw_ver: 1n,
      node_guid: this.nodeGuid,
      sys_image_guid: this.nodeGuid,
      max_mr_size: l.maxMrSize,
      page_size_cap: BigInt(RDMA_PAGE_SIZE),
      vendor_id: 0x1af4,
      vendor_part_id: 0x106a,
      hw_ver: 1,
      max_qp: l.maxQp,
      max_qp_wr: l.maxQpWr,
      max_send_sge: l.maxSge,
      max_recv_sge: l.maxSge,
      max_sge_rd: l.maxSge,
      max_cq: l.maxCq,
      max_cqe: l.maxCqe,
      max_mr: l.maxMr,
      max_pd: l.maxPd,
      max_qp_rd_atom: l.maxQpRdAtom,
      max_qp_init_rd_atom: l.maxQpRdAtom,
      max_ah: l.maxAh,
      max_inline_data: l.maxInlineData,
      max_pkeys: 1,
      atomic_cap: 1,
      local_ca_ack_delay: 15,
    });
  }

  private checkPort(port: number): void {
    if (port !== 1) throw invalid(`port ${port} does not exist`);
  }

  private queryPort(body: Uint8Array): Uint8Array {
    this.checkPort(need(QueryPortReq, body).port);
    return QueryPortResp.encodeBytes({
      ...QueryPortResp.zero(),
      state: PortState.ACTIVE,
      max_mtu: 5,
      active_mtu: 5,
      phys_state: 5,
      gid_tbl_len: this.limits.gidTblLen,
      max_msg_sz: 0x8000_0000,
      pkey_tbl_len: 1,
      active_speed: 1,
      active_width: 1,
      link_layer: 2,
    });
  }

  private queryGid(body: Uint8Array): Uint8Array {
    const r = need(QueryGidReq, body);
    this.checkPort(r.port);
    if (r.index >= this.limits.gidTblLen) throw invalid(`GID index ${r.index} >= table length ${this.limits.gidTblLen}`);
    const gid = this.gids[r.index];
    return QueryGidResp.encodeBytes({ ...QueryGidResp.zero(), gid: gid ?? new Uint8Array(16), gid_type: gid ? GidType.ROCE_V2 : 0 });
  }

  private queryPkey(body: Uint8Array): Uint8Array {
    const r = need(QueryGidReq, body);
    this.checkPort(r.port);
    if (r.index !== 0) throw invalid(`P_Key index ${r.index} out of range`);
    return QueryPkeyResp.encodeBytes({ pkey: 0xffff, reserved: 0 });
  }

  // --- PD ----------------------------------------------------------------------

  private createPd(): Uint8Array {
    const pd = this.res.pds.add((pdn) => ({ pdn }));
    if (pd === null) throw new ControlError(Status.ENOMEM, `PD limit ${this.limits.maxPd} reached`);
    return CreatePdResp.encodeBytes({ pdn: pd.pdn, reserved: 0 });
  }

  private pd(pdn: number): void {
    if (this.res.pds.get(pdn) === undefined) throw noent(`PD ${pdn} does not exist`);
  }

  private destroyPd(body: Uint8Array): Uint8Array {
    const { handle } = need(HandleReq, body);
    this.pd(handle);
    const user = this.res.pdInUse(handle);
    if (user !== null) throw new ControlError(Status.EBUSY, `PD ${handle} is still used by ${user}`);
    this.res.pds.delete(handle);
    return EMPTY;
  }

  // --- CQ ----------------------------------------------------------------------

  private createCq(body: Uint8Array): Uint8Array {
    const { cqe } = need(CreateCqReq, body);
    if (cqe < 1 || cqe > this.limits.maxCqe) throw invalid(`cqe ${cqe} not in 1..${this.limits.maxCqe}`);
    if (this.res.cqs.full) throw new ControlError(Status.ENOMEM, `CQ limit ${this.limits.maxCq} reached`);
    const slot = this.res.freeCqSlot();
    if (slot < 0) throw new ControlError(Status.ENOSPC, 'no free CQ slot');
    const ring = this.hooks.ringSize(cqVq(slot));
    if (ring === 0) throw invalid(`the virtqueue of CQ slot ${slot} is not set up`);
    if (cqe >= ring) throw invalid(`cqe ${cqe} needs a ring of more than ${ring} entries (one buffer stays in reserve)`);
    const cq = this.res.cqs.add((cqn) => ({ cqn, slot, cqe, armed: 0, error: false, errorEventPending: null, backlog: [] }))!;
    this.res.cqSlots[slot] = cq.cqn;
    this.log.info(`cqn ${cq.cqn}: created in slot ${slot} (vq ${cqVq(slot)}), ${cqe} entries`);
    return CreateCqResp.encodeBytes({ cqn: cq.cqn, slot, cqe, reserved: 0 });
  }

  private cq(cqn: number): CqRecord {
    const cq = this.res.cqs.get(cqn);
    if (cq === undefined) throw noent(`CQ ${cqn} does not exist`);
    return cq;
  }

  private destroyCq(body: Uint8Array): Uint8Array {
    const cq = this.cq(need(HandleReq, body).handle);
    const users = this.res.qpsUsingCq(cq.cqn);
    if (users.length > 0) throw new ControlError(Status.EBUSY, `CQ ${cq.cqn} is used by QP 0x${users[0]!.qpn.toString(16)}`);
    this.hooks.releaseCq(cq);
    this.res.cqSlots[cq.slot] = 0;
    this.res.cqs.delete(cq.cqn);
    this.log.info(`cqn ${cq.cqn}: destroyed`);
    return EMPTY;
  }

  private reqNotifyCq(body: Uint8Array): Uint8Array {
    const r = need(ReqNotifyCqReq, body);
    const cq = this.cq(r.cqn);
    if (r.flags !== CqNotify.SOLICITED && r.flags !== CqNotify.NEXT_COMPLETION) throw invalid(`notify flags ${r.flags} are not SOLICITED or NEXT_COMPLETION`);
    cq.armed |= r.flags;
    return EMPTY;
  }

  // --- MR ----------------------------------------------------------------------

  private regMr(body: Uint8Array): Uint8Array {
    const r = need(RegMrReq, body);
    this.pd(r.pdn);
    const mr = this.res.mrs.register(r.pdn, r.access, r.iova, r.length, r.page_list, r.npages);
    this.log.debug(`mrn ${mr.mrn}: registered ${r.length} bytes at iova 0x${r.iova.toString(16)}, access 0x${r.access.toString(16)}`);
    return MrResp.encodeBytes({ mrn: mr.mrn, lkey: mr.lkey, rkey: mr.rkey, reserved: 0 });
  }

  private getDmaMr(body: Uint8Array): Uint8Array {
    const r = need(GetDmaMrReq, body);
    this.pd(r.pdn);
    if (r.access & ~ACCESS_ALL) throw invalid(`unknown access bits 0x${r.access.toString(16)}`);
    if (r.access & ACCESS_REMOTE) throw invalid('a DMA MR cannot grant remote access');
    const mr = this.res.mrs.registerDma(r.pdn, r.access & Access.LOCAL_WRITE);
    return MrResp.encodeBytes({ mrn: mr.mrn, lkey: mr.lkey, rkey: mr.rkey, reserved: 0 });
  }

  private deregMr(body: Uint8Array): Uint8Array {
    this.res.mrs.deregister(need(HandleReq, body).handle);
    return EMPTY;
  }

  // --- QP ----------------------------------------------------------------------

  private createQp(body: Uint8Array): Uint8Array {
    const r = need(CreateQpReq, body);
    const l = this.limits;
    this.pd(r.pdn);
    if (r.qp_type !== QpType.RC && r.qp_type !== QpType.UC && r.qp_type !== QpType.UD) {
      throw new ControlError(Status.EOPNOTSUPP, `QP type ${r.qp_type} is not supported`);
    }
    this.cq(r.send_cqn);
    this.cq(r.recv_cqn);
    if (r.sq_sig_all > 1) throw invalid(`sq_sig_all ${r.sq_sig_all}`);
    if (r.max_send_sge > l.maxSge || r.max_recv_sge > l.maxSge) throw invalid(`SGE count above ${l.maxSge}`);
    if (r.max_inline_data > l.maxInlineData) throw invalid(`max_inline_data ${r.max_inline_data} above ${l.maxInlineData}`);
    if (this.res.qps.size >= l.maxQp) throw new ControlError(Status.ENOMEM, `QP limit ${l.maxQp} reached`);
    const slot = this.res.freeQpSlot();
    if (slot < 0) throw new ControlError(Status.ENOSPC, 'no free QP slot');
    const sqSize = this.hooks.ringSize(sqVq(l.numCqSlots, slot));
    const rqSize = this.hooks.ringSize(rqVq(l.numCqSlots, slot));
    if (sqSize === 0 || rqSize === 0) throw invalid(`the virtqueues of QP slot ${slot} are not set up`);
    if (r.max_send_wr < 1 || r.max_send_wr > Math.min(l.maxQpWr, sqSize)) throw invalid(`max_send_wr ${r.max_send_wr} not in 1..${Math.min(l.maxQpWr, sqSize)}`);
    if (r.max_recv_wr < 1 || r.max_recv_wr > Math.min(l.maxQpWr, rqSize)) throw invalid(`max_recv_wr ${r.max_recv_wr} not in 1..${Math.min(l.maxQpWr, rqSize)}`);
    const qpn = this.engine.createQp({ type: r.qp_type, pdn: r.pdn, maxSendWr: r.max_send_wr, maxRecvWr: r.max_recv_wr }, null, (n) => this.res.qps.has(n));
    if (qpn === null) throw new ControlError(Status.ENOMEM, 'the engine has no QP number left');
    const qp: QpRecord = {
      qpn,
      slot,
      type: r.qp_type,
      pdn: r.pdn,
      sendCqn: r.send_cqn,
      recvCqn: r.recv_cqn,
      sqSigAll: r.sq_sig_all === 1,
      caps: { maxSendWr: r.max_send_wr, maxRecvWr: r.max_recv_wr, maxSendSge: r.max_send_sge, maxRecvSge: r.max_recv_sge, maxInlineData: r.max_inline_data },
      attrs: resetQpAttributes(),
      sendOut: new Map(),
      recvOut: new Map(),
    };
    this.res.qps.set(qpn, qp);
    this.res.qpSlots[slot] = qpn;
    this.log.info(`qpn 0x${qpn.toString(16)}: created (${QpType[qp.type]}) in slot ${slot}`);
    return CreateQpResp.encodeBytes({
      qpn,
      slot,
      max_send_wr: qp.caps.maxSendWr,
      max_recv_wr: qp.caps.maxRecvWr,
      max_send_sge: qp.caps.maxSendSge,
      max_recv_sge: qp.caps.maxRecvSge,
      max_inline_data: qp.caps.maxInlineData,
      reserved: 0,
    });
  }

  private qp(qpn: number): QpRecord {
    const qp = this.res.qps.get(qpn);
    if (qp === undefined) throw noent(`QP 0x${qpn.toString(16)} does not exist`);
    return qp;
  }

  private modifyQp(body: Uint8Array): Uint8Array {
    const r = need(ModifyQpReq, body);
    const qp = this.qp(r.qpn);
    const a = QpAttrs.decodeBytes(r.attr);
    const { av, port } = decodeAv(a.ah);
    const req: QpAttrRequest = { ...a, av, avPort: port };
    const next = applyModify(
      { type: qp.type, current: qp.attrs, maxQpRdAtom: this.limits.maxQpRdAtom, gidValid: (i) => i < this.gids.length },
      r.attr_mask,
      req,
    );
    const from = qp.attrs.state;
    qp.attrs = next;
    this.engine.modifyQp(qp.qpn, next, r.attr_mask);
    if (next.state === QpState.RESET) this.hooks.returnAll(qp);
    if (from !== next.state) this.log.info(`qpn 0x${qp.qpn.toString(16)}: ${stateName(from)} -> ${stateName(next.state)}`);
    return EMPTY;
  }

  private queryQp(body: Uint8Array): Uint8Array {
    const qp = this.qp(need(HandleReq, body).handle);
    const t = qp.attrs;
    const attr = QpAttrs.encodeBytes({
      ...QpAttrs.zero(),
      qp_state: t.state,
      cur_qp_state: t.state,
      path_mtu: t.pathMtu,
      timeout: t.timeout,
      retry_cnt: t.retryCnt,
      rnr_retry: t.rnrRetry,
      min_rnr_timer: t.minRnrTimer,
      max_rd_atomic: t.maxRdAtomic,
      max_dest_rd_atomic: t.maxDestRdAtomic,
      pkey_index: t.pkeyIndex,
      qp_access_flags: t.accessFlags,
      qkey: t.qkey,
      rq_psn: t.rqPsn,
      sq_psn: t.sqPsn,
      dest_qp_num: t.destQpn,
      port_num: 1,
      ah: encodeAv(t.av),
    });
    return QueryQpResp.encodeBytes({
      attr,
      qp_type: qp.type,
      sq_sig_all: qp.sqSigAll ? 1 : 0,
      reserved0: 0,
      max_send_wr: qp.caps.maxSendWr,
      max_recv_wr: qp.caps.maxRecvWr,
      max_send_sge: qp.caps.maxSendSge,
      max_recv_sge: qp.caps.maxRecvSge,
      max_inline_data: qp.caps.maxInlineData,
    });
  }

  private destroyQp(body: Uint8Array): Uint8Array {
    const qp = this.qp(need(HandleReq, body).handle);
    this.engine.destroyQp(qp.qpn);
    this.hooks.returnAll(qp);
    this.res.qpSlots[qp.slot] = -1;
    this.res.qps.delete(qp.qpn);
    this.log.info(`qpn 0x${qp.qpn.toString(16)}: destroyed`);
    return EMPTY;
  }

  // --- AH ----------------------------------------------------------------------

  private createAh(body: Uint8Array): Uint8Array {
    const r = need(CreateAhReq, body);
    this.pd(r.pdn);
    const { av, port } = decodeAv(r.ah);
    this.checkPort(port);
    if (av.sgidIndex >= this.gids.length) throw invalid(`sgid_index ${av.sgidIndex} names no GID`);
    const ah = this.res.ahs.add((ahn) => ({ ahn, pdn: r.pdn, av }));
    if (ah === null) throw new ControlError(Status.ENOMEM, `AH limit ${this.limits.maxAh} reached`);
    return CreateAhResp.encodeBytes({ ahn: ah.ahn, reserved: 0 });
  }

  private destroyAh(body: Uint8Array): Uint8Array {
    const { handle } = need(HandleReq, body);
    if (!this.res.ahs.delete(handle)) throw noent(`AH ${handle} does not exist`);
    return EMPTY;
  }
}
