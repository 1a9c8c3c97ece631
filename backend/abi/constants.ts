/**
 * Numbers of the virtio-rdma ABI (docs/virtio-rdma.md). Where a value has
 * an established meaning in Linux verbs (status codes, opcodes, access
 * flags, QP states, attribute-mask bits) the same number is used, so a
 * driver passes them through unchanged.
 */

export const VIRTIO_ID_RDMA = 42;
export const VIRTIO_RDMA_ABI_VERSION = 1;
/**
 * Device feature bit 0: UD receives carry an IB / RoCE v1 GRH for every GID
 * (docs/virtio-rdma.md §1, §6), for a driver that shows its consumers IB-typed GIDs.
 */
export const VIRTIO_RDMA_F_IB_GRH = 0;
/** Byte size of every page in MR page lists. */
export const RDMA_PAGE_SIZE = 4096;
/** Entries in one page-list page (4096 / 8). */
export const PAGE_LIST_ENTRIES = 512;
/** Largest MR a two-level page list describes: 512 * 512 pages. */
export const MAX_PAGE_LIST_PAGES = PAGE_LIST_ENTRIES * PAGE_LIST_ENTRIES;

/** Queue layout: vq 0 is control; then CQ slots; then (SQ, RQ) per QP slot. */
export const CONTROL_VQ = 0;
export function cqVq(slot: number): number {
  return 1 + slot;
}
export function sqVq(numCqSlots: number, qpSlot: number): number {
  return 1 + numCqSlots + 2 * qpSlot;
}
export function rqVq(numCqSlots: number, qpSlot: number): number {
  return 2 + numCqSlots + 2 * qpSlot;
}
export function numQueues(numCqSlots: number, numQpSlots: number): number {
  return 1 + numCqSlots + 2 * numQpSlots;
}

/** Control commands. */
export enum Cmd {
  QUERY_DEVICE = 1,
  QUERY_PORT = 2,
  QUERY_GID = 3,
  QUERY_PKEY = 4,
  CREATE_PD = 5,
  DESTROY_PD = 6,
  CREATE_CQ = 7,
  DESTROY_CQ = 8,
  REQ_NOTIFY_CQ = 9,
  REG_MR = 10,
  GET_DMA_MR = 11,
  DEREG_MR = 12,
  CREATE_QP = 13,
  MODIFY_QP = 14,
  QUERY_QP = 15,
  DESTROY_QP = 16,
  CREATE_AH = 17,
  DESTROY_AH = 18,
}

/** Control status: 0 or a Linux errno value, so a driver can return -status. */
export enum Status {
  OK = 0,
  /** No object with that handle. */
  ENOENT = 2,
  /** The request or response buffer is too small for the command. */
  E2BIG = 7,
  /** A resource limit was reached. */
  ENOMEM = 12,
  /** A guest address (page list, buffer) is not in guest memory. */
  EFAULT = 14,
  /** The object is still used by another object. */
  EBUSY = 16,
  /** A field is out of range or inconsistent. */
  EINVAL = 22,
  /** No free queue slot. */
  ENOSPC = 28,
  /** Unknown command, or a feature this device does not have. */
  EOPNOTSUPP = 95,
}

/** QP types (ib_qp_type numbering). */
export enum QpType {
  RC = 2,
  UC = 3,
  UD = 4,
}

/** QP states (ib_qp_state numbering). */
export enum QpState {
  RESET = 0,
  INIT = 1,
  RTR = 2,
  RTS = 3,
  SQD = 4,
  SQE = 5,
  ERR = 6,
}

/** MODIFY_QP attribute-mask bits (ib_qp_attr_mask numbering). */
export const QpAttr = {
  STATE: 1 << 0,
  CUR_STATE: 1 << 1,
  EN_SQD_ASYNC_NOTIFY: 1 << 2,
  ACCESS_FLAGS: 1 << 3,
  PKEY_INDEX: 1 << 4,
  PORT: 1 << 5,
  QKEY: 1 << 6,
  AV: 1 << 7,
  PATH_MTU: 1 << 8,
  TIMEOUT: 1 << 9,
  RETRY_CNT: 1 << 10,
  RNR_RETRY: 1 << 11,
  RQ_PSN: 1 << 12,
  MAX_QP_RD_ATOMIC: 1 << 13,
  ALT_PATH: 1 << 14,
  MIN_RNR_TIMER: 1 << 15,
  SQ_PSN: 1 << 16,
  MAX_DEST_RD_ATOMIC: 1 << 17,
  PATH_MIG_STATE: 1 << 18,
  CAP: 1 << 19,
  DEST_QPN: 1 << 20,
} as const;
export const QP_ATTR_ALL = (1 << 21) - 1;

/** Access flags (ib_access_flags numbering). */
export const Access = {
  LOCAL_WRITE: 1,
  REMOTE_WRITE: 2,
  REMOTE_READ: 4,
  REMOTE_ATOMIC: 8,
} as const;
export const ACCESS_ALL = 0xf;
export const ACCESS_REMOTE = Access.REMOTE_WRITE | Access.REMOTE_READ | Access.REMOTE_ATOMIC;

/** Send opcodes (ib_uverbs_wr_opcode numbering). */
export enum SendOp {
  RDMA_WRITE = 0,
  RDMA_WRITE_WITH_IMM = 1,
  SEND = 2,
  SEND_WITH_IMM = 3,
  RDMA_READ = 4,
  ATOMIC_CMP_AND_SWP = 5,
  ATOMIC_FETCH_AND_ADD = 6,
  LOCAL_INV = 7,
  SEND_WITH_INV = 9,
}

/** Send flags. */
export const SendFlag = {
  FENCE: 1,
  SIGNALED: 2,
  SOLICITED: 4,
  INLINE: 8,
} as const;
export const SEND_FLAGS_ALL = 0xf;

/** Completion status (ib_wc_status numbering). */
export enum WcStatus {
  SUCCESS = 0,
  LOC_LEN_ERR = 1,
  LOC_QP_OP_ERR = 2,
  LOC_PROT_ERR = 4,
  WR_FLUSH_ERR = 5,
  BAD_RESP_ERR = 7,
  LOC_ACCESS_ERR = 8,
  REM_INV_REQ_ERR = 9,
  REM_ACCESS_ERR = 10,
  REM_OP_ERR = 11,
  RETRY_EXC_ERR = 12,
  RNR_RETRY_EXC_ERR = 13,
  FATAL_ERR = 19,
  GENERAL_ERR = 21,
}

/** Completion opcodes (ib_wc_opcode numbering), plus the CQ error event. */
export enum WcOpcode {
  SEND = 0,
  RDMA_WRITE = 1,
  RDMA_READ = 2,
  COMP_SWAP = 3,
  FETCH_ADD = 4,
  LOCAL_INV = 6,
  RECV = 128,
  RECV_RDMA_WITH_IMM = 129,
  /** Not a work completion: the CQ overflowed and is now in error (docs/virtio-rdma.md, CQ overflow). */
  CQ_ERROR = 255,
}

/** The completion opcode a send WR of opcode `op` reports (§7). */
export function sendWcOpcode(op: SendOp): WcOpcode {
  switch (op) {
    case SendOp.RDMA_WRITE:
    case SendOp.RDMA_WRITE_WITH_IMM:
      return WcOpcode.RDMA_WRITE;
    case SendOp.RDMA_READ:
      return WcOpcode.RDMA_READ;
    case SendOp.ATOMIC_CMP_AND_SWP:
      return WcOpcode.COMP_SWAP;
    case SendOp.ATOMIC_FETCH_AND_ADD:
      return WcOpcode.FETCH_ADD;
    default:
      return WcOpcode.SEND;
  }
}

/** Completion flags. */
export const WcFlag = {
  GRH: 1,
  WITH_IMM: 2,
  WITH_INVALIDATE: 4,
} as const;

/** REQ_NOTIFY_CQ flags. */
export const CqNotify = {
  SOLICITED: 1,
  NEXT_COMPLETION: 2,
} as const;

/** Path MTU enum (ib_mtu): 1 = 256 ... 5 = 4096. */
export function mtuBytes(mtu: number): number {
  return 128 << mtu;
}

/** GID types. */
export enum GidType {
  ROCE_V2 = 2,
}

/** Port states (ib_port_state). */
export enum PortState {
  DOWN = 1,
  ACTIVE = 4,
}

/** QPNs below this are reserved (QP0, QP1 and friends). */
export const FIRST_QPN = 0x11;
export const QPN_MASK = 0xffffff;
