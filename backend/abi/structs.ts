/**
 * Every struct of the virtio-rdma ABI (docs/virtio-rdma.md), little-endian,
 * naturally aligned. The device model and the reference driver both use
 * these definitions; nothing else encodes or decodes ABI bytes.
 */
import { Struct } from './struct.js';

const GID = { bytes: 16 } as const;

/** Device config space (read-only), 128 bytes. */
export const DeviceConfig = new Struct('virtio_rdma_config', [
  ['abi_version', 'u32'],
  ['num_cq_slots', 'u16'],
  ['num_qp_slots', 'u16'],
  ['max_pd', 'u32'],
  ['max_mr', 'u32'],
  ['max_cq', 'u32'],
  ['max_qp', 'u32'],
  ['max_ah', 'u32'],
  ['max_cqe', 'u32'],
  ['max_qp_wr', 'u32'],
  ['max_sge', 'u32'],
  ['max_inline_data', 'u32'],
  ['max_qp_rd_atom', 'u32'],
  ['max_mr_size', 'u64'],
  ['gid_tbl_len', 'u16'],
  ['phys_port_cnt', 'u8'],
  ['reserved0', 'u8'],
  ['reserved1', 'u32'],
  ['node_guid', 'u64'],
  ['sys_image_guid', 'u64'],
  ['reserved', { bytes: 48 }],
] as const);

/** Start of every control request (device-readable). */
export const CtrlHeader = new Struct('virtio_rdma_ctrl_hdr', [
  ['cmd', 'u32'],
  ['reserved', 'u32'],
] as const);

/** Start of every control response (device-writable). */
export const CtrlStatus = new Struct('virtio_rdma_ctrl_status', [
  ['status', 'u32'],
  ['reserved', 'u32'],
] as const);

export const Empty = new Struct('virtio_rdma_empty', [] as const);

/** Handle-only request (DESTROY_*, DEREG_MR, QUERY_QP). */
export const HandleReq = new Struct('virtio_rdma_handle', [
  ['handle', 'u32'],
  ['reserved', 'u32'],
] as const);

export const QueryDeviceResp = new Struct('virtio_rdma_query_device_resp', [
  ['fw_ver', 'u64'],
  ['node_guid', 'u64'],
  ['sys_image_guid', 'u64'],
  ['max_mr_size', 'u64'],
  ['page_size_cap', 'u64'],
  ['device_cap_flags', 'u64'],
  ['vendor_id', 'u32'],
  ['vendor_part_id', 'u32'],
  ['hw_ver', 'u32'],
  ['max_qp', 'u32'],
  ['max_qp_wr', 'u32'],
  ['max_send_sge', 'u32'],
  ['max_recv_sge', 'u32'],
  ['max_sge_rd', 'u32'],
  ['max_cq', 'u32'],
  ['max_cqe', 'u32'],
  ['max_mr', 'u32'],
  ['max_pd', 'u32'],
  ['max_qp_rd_atom', 'u32'],
  ['max_qp_init_rd_atom', 'u32'],
  ['max_ah', 'u32'],
  ['max_inline_data', 'u32'],
  ['max_pkeys', 'u16'],
  ['atomic_cap', 'u8'],
  ['local_ca_ack_delay', 'u8'],
  ['reserved', 'u32'],
] as const);

export const QueryPortReq = new Struct('virtio_rdma_query_port', [
  ['port', 'u32'],
  ['reserved', 'u32'],
] as const);

export const QueryPortResp = new Struct('virtio_rdma_query_port_resp', [
  ['state', 'u8'],
  ['max_mtu', 'u8'],
  ['active_mtu', 'u8'],
  ['phys_state', 'u8'],
  ['gid_tbl_len', 'u32'],
  ['port_cap_flags', 'u32'],
  ['max_msg_sz', 'u32'],
  ['pkey_tbl_len', 'u16'],
  ['active_speed', 'u16'],
  ['active_width', 'u8'],
  ['link_layer', 'u8'],
  ['reserved', 'u16'],
] as const);

export const QueryGidReq = new Struct('virtio_rdma_query_gid', [
  ['port', 'u32'],
  ['index', 'u32'],
] as const);

export const QueryGidResp = new Struct('virtio_rdma_query_gid_resp', [
  ['gid', GID],
  ['gid_type', 'u32'],
  ['reserved', 'u32'],
] as const);

export const QueryPkeyReq = QueryGidReq;
export const QueryPkeyResp = new Struct('virtio_rdma_query_pkey_resp', [
  ['pkey', 'u16'],
  ['reserved', 'u16'],
] as const);

export const CreatePdResp = new Struct('virtio_rdma_create_pd_resp', [
  ['pdn', 'u32'],
  ['reserved', 'u32'],
] as const);

export const CreateCqReq = new Struct('virtio_rdma_create_cq', [
  ['cqe', 'u32'],
  ['reserved', 'u32'],
] as const);

export const CreateCqResp = new Struct('virtio_rdma_create_cq_resp', [
  ['cqn', 'u32'],
  /** Index into the CQ slot pool: the CQ's virtqueue is 1 + slot. */
  ['slot', 'u32'],
  ['cqe', 'u32'],
  ['reserved', 'u32'],
] as const);

export const ReqNotifyCqReq = new Struct('virtio_rdma_req_notify_cq', [
  ['cqn', 'u32'],
  ['flags', 'u32'],
] as const);

export const RegMrReq = new Struct('virtio_rdma_reg_mr', [
  ['pdn', 'u32'],
  ['access', 'u32'],
  /** Address the MR is known by in SGEs and RDMA requests. */
  ['iova', 'u64'],
  ['length', 'u64'],
  /** Guest-physical address of the page list (level 1 when npages > 512, else the only level). */
  ['page_list', 'u64'],
  /** Pages covered: must equal ceil(((iova % 4096) + length) / 4096). */
  ['npages', 'u32'],
  ['reserved', 'u32'],
] as const);

export const GetDmaMrReq = new Struct('virtio_rdma_get_dma_mr', [
  ['pdn', 'u32'],
  ['access', 'u32'],
] as const);

export const MrResp = new Struct('virtio_rdma_mr_resp', [
  ['mrn', 'u32'],
  ['lkey', 'u32'],
  ['rkey', 'u32'],
  ['reserved', 'u32'],
] as const);

export const CreateQpReq = new Struct('virtio_rdma_create_qp', [
  ['pdn', 'u32'],
  ['qp_type', 'u8'],
  ['sq_sig_all', 'u8'],
  ['reserved0', 'u16'],
  ['send_cqn', 'u32'],
  ['recv_cqn', 'u32'],
  ['max_send_wr', 'u32'],
  ['max_recv_wr', 'u32'],
  ['max_send_sge', 'u32'],
  ['max_recv_sge', 'u32'],
  ['max_inline_data', 'u32'],
  ['reserved1', 'u32'],
] as const);

export const CreateQpResp = new Struct('virtio_rdma_create_qp_resp', [
  ['qpn', 'u32'],
  /** Index into the QP slot pool: SQ is vq 1 + num_cq_slots + 2*slot, RQ the next. */
  ['slot', 'u32'],
  ['max_send_wr', 'u32'],
  ['max_recv_wr', 'u32'],
  ['max_send_sge', 'u32'],
  ['max_recv_sge', 'u32'],
  ['max_inline_data', 'u32'],
  ['reserved', 'u32'],
] as const);

/** Address vector, used in MODIFY_QP (RC/UC path) and CREATE_AH. */
export const AhAttr = new Struct('virtio_rdma_ah_attr', [
  ['dgid', GID],
  ['flow_label', 'u32'],
  ['sgid_index', 'u8'],
  ['hop_limit', 'u8'],
  ['traffic_class', 'u8'],
  ['sl', 'u8'],
  ['port_num', 'u8'],
  ['static_rate', 'u8'],
  ['reserved', 'u16'],
] as const);

/** QP attributes, MODIFY_QP request body (after qpn + mask) and QUERY_QP response. */
export const QpAttrs = new Struct('virtio_rdma_qp_attr', [
  ['qp_state', 'u8'],
  ['cur_qp_state', 'u8'],
  ['path_mtu', 'u8'],
  ['timeout', 'u8'],
  ['retry_cnt', 'u8'],
  ['rnr_retry', 'u8'],
  ['min_rnr_timer', 'u8'],
  ['max_rd_atomic', 'u8'],
  ['max_dest_rd_atomic', 'u8'],
  ['sq_draining', 'u8'],
  ['pkey_index', 'u16'],
  ['qp_access_flags', 'u32'],
  ['qkey', 'u32'],
  ['rq_psn', 'u32'],
  ['sq_psn', 'u32'],
  ['dest_qp_num', 'u32'],
  ['port_num', 'u8'],
  ['reserved0', 'u8'],
  ['reserved1', 'u16'],
  ['ah', { bytes: AhAttr.size }],
] as const);

export const ModifyQpReq = new Struct('virtio_rdma_modify_qp', [
  ['qpn', 'u32'],
  ['attr_mask', 'u32'],
  ['attr', { bytes: QpAttrs.size }],
] as const);

export const QueryQpResp = new Struct('virtio_rdma_query_qp_resp', [
  ['attr', { bytes: QpAttrs.size }],
  ['qp_type', 'u8'],
  ['sq_sig_all', 'u8'],
  ['reserved0', 'u16'],
  ['max_send_wr', 'u32'],
  ['max_recv_wr', 'u32'],
  ['max_send_sge', 'u32'],
  ['max_recv_sge', 'u32'],
  ['max_inline_data', 'u32'],
] as const);

export const CreateAhReq = new Struct('virtio_rdma_create_ah', [
  ['pdn', 'u32'],
  ['reserved', 'u32'],
  ['ah', { bytes: AhAttr.size }],
] as const);

export const CreateAhResp = new Struct('virtio_rdma_create_ah_resp', [
  ['ahn', 'u32'],
  ['reserved', 'u32'],
] as const);

/** Scatter/gather element, 16 bytes. */
export const Sge = new Struct('virtio_rdma_sge', [
  ['addr', 'u64'],
  ['length', 'u32'],
  ['lkey', 'u32'],
] as const);

/** Send WQE header (device-readable, 64 bytes), followed by num_sge SGEs or inline_len bytes. */
export const SendWqe = new Struct('virtio_rdma_send_wqe', [
  ['wr_id', 'u64'],
  ['opcode', 'u8'],
  ['send_flags', 'u8'],
  ['num_sge', 'u16'],
  /** Immediate data (network byte order, as in verbs) or the rkey to invalidate. */
  ['imm_data', 'u32'],
  /** RDMA and atomic: remote address. */
  ['remote_addr', 'u64'],
  /** Atomic: compare (CMP_AND_SWP) or add (FETCH_AND_ADD) operand. */
  ['compare_add', 'u64'],
  /** Atomic: swap operand. */
  ['swap', 'u64'],
  /** RDMA and atomic: remote key. */
  ['rkey', 'u32'],
  /** UD: address handle, destination QPN, Q_Key. */
  ['ahn', 'u32'],
  ['remote_qpn', 'u32'],
  ['remote_qkey', 'u32'],
  ['inline_len', 'u32'],
  ['reserved', 'u32'],
] as const);

/** Receive WQE header (device-readable, 16 bytes), followed by num_sge SGEs. */
export const RecvWqe = new Struct('virtio_rdma_recv_wqe', [
  ['wr_id', 'u64'],
  ['num_sge', 'u16'],
  ['reserved0', 'u16'],
  ['reserved1', 'u32'],
] as const);

/** Completion entry, written into a device-writable CQ buffer (48 bytes). */
export const Cqe = new Struct('virtio_rdma_cqe', [
  ['wr_id', 'u64'],
  ['status', 'u8'],
  ['opcode', 'u8'],
  ['wc_flags', 'u16'],
  ['vendor_err', 'u32'],
  ['byte_len', 'u32'],
  /** Immediate data (network byte order) or the invalidated rkey. */
  ['imm_data', 'u32'],
  ['qp_num', 'u32'],
  ['src_qp', 'u32'],
  ['pkey_index', 'u16'],
  ['sl', 'u8'],
  ['port_num', 'u8'],
  ['reserved0', 'u32'],
  ['reserved1', 'u64'],
] as const);
