/**
 * vhost-user protocol constants: request numbers, header flags and feature
 * bits. Numbers follow the vhost-user specification (QEMU's
 * docs/interop/vhost-user.rst).
 */

/** Requests the front-end (QEMU) sends to the back-end. */
export enum FrontendReq {
  GET_FEATURES = 1,
  SET_FEATURES = 2,
  SET_OWNER = 3,
  RESET_OWNER = 4,
  SET_MEM_TABLE = 5,
  SET_LOG_BASE = 6,
  SET_LOG_FD = 7,
  SET_VRING_NUM = 8,
  SET_VRING_ADDR = 9,
  SET_VRING_BASE = 10,
  GET_VRING_BASE = 11,
  SET_VRING_KICK = 12,
  SET_VRING_CALL = 13,
  SET_VRING_ERR = 14,
  GET_PROTOCOL_FEATURES = 15,
  SET_PROTOCOL_FEATURES = 16,
  GET_QUEUE_NUM = 17,
  SET_VRING_ENABLE = 18,
  SEND_RARP = 19,
  NET_SET_MTU = 20,
  SET_BACKEND_REQ_FD = 21,
  IOTLB_MSG = 22,
  SET_VRING_ENDIAN = 23,
  GET_CONFIG = 24,
  SET_CONFIG = 25,
  CREATE_CRYPTO_SESSION = 26,
  CLOSE_CRYPTO_SESSION = 27,
  POSTCOPY_ADVISE = 28,
  POSTCOPY_LISTEN = 29,
  POSTCOPY_END = 30,
  GET_INFLIGHT_FD = 31,
  SET_INFLIGHT_FD = 32,
  GPU_SET_SOCKET = 33,
  RESET_DEVICE = 34,
  VRING_KICK = 35,
  GET_MAX_MEM_SLOTS = 36,
  ADD_MEM_REG = 37,
  REM_MEM_REG = 38,
  SET_STATUS = 39,
  GET_STATUS = 40,
  GET_SHARED_OBJECT = 41,
  SET_DEVICE_STATE_FD = 42,
  CHECK_DEVICE_STATE = 43,
}

export const FIRST_FRONTEND_REQ = FrontendReq.GET_FEATURES;
export const LAST_FRONTEND_REQ = FrontendReq.CHECK_DEVICE_STATE;

export function requestName(req: number): string {
  return FrontendReq[req] ?? `UNKNOWN(${req})`;
}

/** Header flag bits. */
export const HDR_VERSION_MASK = 0x3;
export const HDR_VERSION = 0x1;
export const HDR_REPLY = 0x4;
export const HDR_NEED_REPLY = 0x8;
export const HEADER_SIZE = 12;

/** Largest payload we accept; every defined request fits well below it. */
export const MAX_PAYLOAD_SIZE = 0x1000;
/** Most fds we accept on one message (QEMU sends at most 8). */
export const MAX_ATTACHED_FDS = 32;
/** Regions in one SET_MEM_TABLE (QEMU's VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_MEM_TABLE_REGIONS = 8;
/** QEMU's VHOST_USER_MAX_CONFIG_SIZE. */
export const MAX_CONFIG_SIZE = 256;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export enum ProtocolFeature {
  MQ = 0,
  LOG_SHMFD = 1,
  RARP = 2,
  REPLY_ACK = 3,
  MTU = 4,
  BACKEND_REQ = 5,
  CROSS_ENDIAN = 6,
  CRYPTO_SESSION = 7,
  PAGEFAULT = 8,
  CONFIG = 9,
  BACKEND_SEND_FD = 10,
  HOST_NOTIFIER = 11,
  INFLIGHT_SHMFD = 12,
  RESET_DEVICE = 13,
  INBAND_NOTIFICATIONS = 14,
  CONFIGURE_MEM_SLOTS = 15,
  STATUS = 16,
  XEN_MMAP = 17,
  SHARED_OBJECT = 18,
  DEVICE_STATE = 19,
}

/** Virtio feature bits the transport layer cares about. */
export const VIRTIO_F_RING_INDIRECT_DESC = 28;
export const VIRTIO_F_RING_EVENT_IDX = 29;
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
export const VHOST_F_LOG_ALL = 26;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_IOMMU_PLATFORM = 33;

export const bit = (n: number): bigint => 1n << BigInt(n);
export const hasBit = (mask: bigint, n: number): boolean => (mask & bit(n)) !== 0n;

/** SET_VRING_ADDR flags. */
export const VHOST_VRING_F_LOG = 0x1;
/** SET_VRING_KICK/CALL/ERR u64 payload. */
export const VRING_IDX_MASK = 0xffn;
export const VRING_NOFD_MASK = 0x100n;

/** Dirty-log granularity (VHOST_LOG_PAGE). */
export const VHOST_LOG_PAGE = 0x1000;

/** SET_DEVICE_STATE_FD direction and phase. */
export enum TransferDirection {
  SAVE = 0,
  LOAD = 1,
}
export enum MigrationPhase {
  STOPPED = 0,
}
